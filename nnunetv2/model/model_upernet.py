"""UperNet (https://arxiv.org/abs/1807.10221) on a timm ViT backbone.

Four intermediate block outputs become a 4x/2x/1x/0.5x pyramid (``ViTFeaturePyramid``), decoded
by HuggingFace's ``UperNetHead`` (pyramid pooling on the coarsest level + FPN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead

from nnunetv2.model.common import PyramidChannels, ViTPyramidHeadModel, make_factory
from nnunetv2.model.config import DecoderConfig, PositiveInt


@dataclass
class UperNetDecoderConfig(DecoderConfig):
    """UperNet's options (``model.decoder`` for ``model_upernet``)."""

    hidden_size: PositiveInt = 256  # channels of the pyramid pooling module and the FPN
    pool_scales: List[PositiveInt] = field(default_factory=lambda: [1, 2, 3, 6])  # pyramid pooling bins
    pyramid_channels: PyramidChannels = None  # channels of the four pyramid levels; None: [E/4, E/2, E, E]


class UperNetSegmentationModel(ViTPyramidHeadModel):
    """ViT backbone + feature pyramid + HF UperNet head, with the options of ``UperNetDecoderConfig``."""

    config_class = UperNetDecoderConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        options = self.decoder_config
        # Pool scale 1 gives a 1x1 map, where BatchNorm in training needs at least two samples.
        self.min_train_batch_size = 2 if 1 in options.pool_scales else 1
        pyramid_channels = self.add_pyramid()
        self.config = UperNetConfig(
            hidden_size=options.hidden_size, pool_scales=list(options.pool_scales), num_labels=self.num_classes,
            use_auxiliary_head=False,
        )
        self.add_head(UperNetHead(self.config, in_channels=pyramid_channels), options.hidden_size)


create_segmentation_model = make_factory(UperNetSegmentationModel)
