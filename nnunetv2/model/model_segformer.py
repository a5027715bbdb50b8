"""SegFormer's all-MLP decoder (https://arxiv.org/abs/2105.15203) on a timm ViT backbone.

Four intermediate block outputs become a 4x/2x/1x/0.5x pyramid (``ViTFeaturePyramid``), decoded
by HuggingFace's ``SegformerDecodeHead``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from nnunetv2.model.backbone import get_vit_features
from nnunetv2.model.common import ViTFeaturePyramid, ViTSegmentationModel, default_pyramid_channels, make_factory


class SegFormerSegmentationModel(ViTSegmentationModel):
    """ViT backbone + feature pyramid + HF SegFormer MLP decode head.

    Decoder options: ``decoder_hidden_size`` (MLP width), ``pyramid_channels`` (channels of the
    four pyramid levels, default ``[E/4, E/2, E, E]``) and ``dropout`` before the classifier.
    """

    token_grid_multiple = 2

    def __init__(
        self,
        *,
        decoder_hidden_size: int = 256,
        pyramid_channels: Optional[Sequence[int]] = None,
        dropout: float = 0.1,
        **backbone_kwargs,
    ) -> None:
        super().__init__(**backbone_kwargs)
        pyramid_channels = list(pyramid_channels or default_pyramid_channels(self.embed_dim))
        self.pyramid = ViTFeaturePyramid(self.embed_dim, pyramid_channels)
        self.config = SegformerConfig(
            num_encoder_blocks=4,
            hidden_sizes=pyramid_channels,
            decoder_hidden_size=decoder_hidden_size,
            classifier_dropout_prob=dropout,
            num_labels=self.num_classes,
        )
        self.head = SegformerDecodeHead(self.config)

    @property
    def classifier(self) -> nn.Module:
        return self.head.classifier

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pyramid(get_vit_features(self.backbone, x, self.feature_indices)))


create_segmentation_model = make_factory(SegFormerSegmentationModel)
