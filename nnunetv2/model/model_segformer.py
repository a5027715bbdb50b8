"""SegFormer's all-MLP decoder (https://arxiv.org/abs/2105.15203) on a timm ViT backbone.

Four intermediate block outputs become a 4x/2x/1x/0.5x pyramid (``ViTFeaturePyramid``), decoded
by HuggingFace's ``SegformerDecodeHead``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from nnunetv2.model.common import ViTPyramidHeadModel, make_factory


class SegFormerSegmentationModel(ViTPyramidHeadModel):
    """ViT backbone + feature pyramid + HF SegFormer MLP decode head.

    Decoder options: ``decoder_hidden_size`` (MLP width), ``pyramid_channels`` (channels of the
    four pyramid levels, default ``[E/4, E/2, E, E]``) and ``dropout`` before the classifier.
    """

    def __init__(
        self,
        *,
        decoder_hidden_size: int = 256,
        pyramid_channels: Optional[Sequence[int]] = None,
        dropout: float = 0.1,
        **backbone_kwargs,
    ) -> None:
        super().__init__(**backbone_kwargs)
        pyramid_channels = self.add_pyramid(pyramid_channels)
        self.config = SegformerConfig(
            num_encoder_blocks=4,
            hidden_sizes=pyramid_channels,
            decoder_hidden_size=decoder_hidden_size,
            classifier_dropout_prob=dropout,
            num_labels=self.num_classes,
        )
        self.add_head(SegformerDecodeHead(self.config), decoder_hidden_size)


create_segmentation_model = make_factory(SegFormerSegmentationModel)
