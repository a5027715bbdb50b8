"""DPT (Dense Prediction Transformer, https://arxiv.org/abs/2103.13413) on a timm ViT backbone.

The decoder is HuggingFace's ``DPTNeck`` (reassemble + fusion) and ``DPTSemanticSegmentationHead``,
fed with four intermediate block outputs and their real CLS tokens (registers are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, List, Literal, Optional

import torch
import torch.nn as nn
from transformers import DPTConfig
from transformers.models.dpt.modeling_dpt import DPTNeck, DPTSemanticSegmentationHead

from nnunetv2.model.common import ViTSegmentationModel, make_factory
from nnunetv2.model.config import DecoderConfig, NonNegativeFloat, PositiveInt, entries


@dataclass
class DPTDecoderConfig(DecoderConfig):
    """DPT's options (``model.decoder`` for ``model_dpt``)."""

    fusion_hidden_size: PositiveInt = 256  # channels of the fusion stage
    readout_type: Literal["project", "add", "ignore"] = "project"  # what the CLS token does to the patch tokens
    # channels of the four reassembled maps; None: [E]*4 (the DPT paper uses [E/4, E/2, E, E])
    neck_hidden_sizes: Annotated[Optional[List[PositiveInt]], entries(4, "one per feature level")] = None
    use_batch_norm_in_fusion_residual: bool = True
    dropout: NonNegativeFloat = 0.1  # before the classifier


class DPTSegmentationModel(ViTSegmentationModel):
    """ViT backbone + HF DPT neck and segmentation head, with the options of ``DPTDecoderConfig``."""

    config_class = DPTDecoderConfig
    token_grid_multiple = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        options = self.decoder_config
        self.config = DPTConfig(
            hidden_size=self.embed_dim,
            neck_hidden_sizes=list(options.neck_hidden_sizes or [self.embed_dim] * 4),
            fusion_hidden_size=options.fusion_hidden_size,
            reassemble_factors=[4, 2, 1, 0.5],
            readout_type=options.readout_type,
            num_labels=self.num_classes,
            head_in_index=-1,
            semantic_classifier_dropout=options.dropout,
            use_batch_norm_in_fusion_residual=options.use_batch_norm_in_fusion_residual,
        )
        self.neck = DPTNeck(self.config)
        self.head = DPTSemanticSegmentationHead(self.config)
        # The first fusion layer has no residual input, so its residual unit would never get a gradient.
        del self.neck.fusion_stage.layers[0].residual_layer1
        # fusion_hidden_size maps on the fusion stage's grid (8x the token grid), then the head's convolutions.
        self.end_decoder(split_dpt_classifier(self.head), options.fusion_hidden_size, stride=self.patch_size / 8)

    # Read-only views of the config, under the names of the DPT plan's model (code written against it reads them).
    @property
    def fusion_hidden_size(self) -> int:
        return self.config.fusion_hidden_size

    @property
    def readout_type(self) -> str:
        return self.config.readout_type

    @property
    def backbone_patch_size(self) -> int:
        return self.patch_size

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens, cls_tokens = self.backbone_features(x, self.feature_indices, return_cls=True, output_fmt="NLC")
        hidden_states: List[torch.Tensor] = [
            torch.cat([cls[:, None], patch_tokens], dim=1) for patch_tokens, cls in zip(tokens, cls_tokens)
        ]
        return self.head(self.neck(hidden_states, patch_height=grid_h, patch_width=grid_w))


def split_dpt_classifier(head: DPTSemanticSegmentationHead) -> nn.Sequential:
    """Take the classifier out of HF's DPT head and return it, so the head returns its features. The head is one
    ``nn.Sequential``: 3x3 conv, BN, ReLU, dropout (the features), then a 1x1 conv to the classes and a x2
    bilinear upsample (the classifier, which gives way to the detail path's when that is on)."""
    classifier = nn.Sequential(*head.head[4:])
    head.head = head.head[:4]
    return classifier


create_segmentation_model = make_factory(DPTSegmentationModel)
