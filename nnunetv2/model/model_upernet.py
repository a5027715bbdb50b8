"""UperNet (https://arxiv.org/abs/1807.10221) on a timm ViT backbone.

Four intermediate block outputs become a 4x/2x/1x/0.5x pyramid (``ViTFeaturePyramid``), decoded
by HuggingFace's ``UperNetHead`` (pyramid pooling on the coarsest level + FPN).
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead

from nnunetv2.model.common import ViTPyramidHeadModel, make_factory


class UperNetSegmentationModel(ViTPyramidHeadModel):
    """ViT backbone + feature pyramid + HF UperNet head.

    Decoder options: ``hidden_size`` (channels of the PPM/FPN), ``pool_scales`` (pyramid pooling
    bins) and ``pyramid_channels`` (channels of the four pyramid levels, default ``[E/4, E/2, E, E]``).
    """

    def __init__(
        self,
        *,
        hidden_size: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        pyramid_channels: Optional[Sequence[int]] = None,
        **backbone_kwargs,
    ) -> None:
        super().__init__(**backbone_kwargs)
        # Pool scale 1 gives a 1x1 map, where BatchNorm in training needs at least two samples.
        self.min_train_batch_size = 2 if 1 in pool_scales else 1
        pyramid_channels = self.add_pyramid(pyramid_channels)
        self.config = UperNetConfig(
            hidden_size=hidden_size, pool_scales=list(pool_scales), num_labels=self.num_classes,
            use_auxiliary_head=False,
        )
        self.add_head(UperNetHead(self.config, in_channels=pyramid_channels), hidden_size)


create_segmentation_model = make_factory(UperNetSegmentationModel)
