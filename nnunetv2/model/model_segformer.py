"""SegFormer's all-MLP decoder (https://arxiv.org/abs/2105.15203) on a timm ViT backbone.

Four intermediate block outputs become a 4x/2x/1x/0.5x pyramid (``ViTFeaturePyramid``), decoded
by HuggingFace's ``SegformerDecodeHead``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from nnunetv2.model.common import PyramidChannels, ViTPyramidHeadModel, make_factory
from nnunetv2.model.config import DecoderConfig, NonNegativeFloat, PositiveInt


@dataclass
class SegFormerDecoderConfig(DecoderConfig):
    """SegFormer's options (``model.decoder`` for ``model_segformer``)."""

    decoder_hidden_size: PositiveInt = 256  # width of the MLP
    pyramid_channels: PyramidChannels = None  # channels of the four pyramid levels; None: [E/4, E/2, E, E]
    dropout: NonNegativeFloat = 0.1  # before the classifier


class SegFormerSegmentationModel(ViTPyramidHeadModel):
    """ViT backbone + feature pyramid + HF SegFormer MLP decode head, with the options of
    ``SegFormerDecoderConfig``."""

    config_class = SegFormerDecoderConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        options = self.decoder_config
        self.config = SegformerConfig(
            num_encoder_blocks=4,
            hidden_sizes=self.add_pyramid(),
            decoder_hidden_size=options.decoder_hidden_size,
            classifier_dropout_prob=options.dropout,
            num_labels=self.num_classes,
        )
        self.add_head(SegformerDecodeHead(self.config), options.decoder_hidden_size)


create_segmentation_model = make_factory(SegFormerSegmentationModel)
