"""Primus-style patch decoder (https://arxiv.org/abs/2503.01835) on a timm ViT backbone.

The token map is decoded straight to logits by ``PatchDecode`` from dynamic_network_architectures
(stacked 2x transposed convs with ``LayerNormNd``). ``multi_scale`` first fuses all four feature
levels with a 1x1 projection instead of decoding the last block only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd, PatchDecode

from nnunetv2.model.common import ViTSegmentationModel, make_factory


class PrimusSegmentationModel(ViTSegmentationModel):
    """ViT backbone + Primus patch decoder.

    ``PatchDecode`` only upsamples by powers of two, so for patch 14 the decoder works at the next
    power of two (16) and the base class rescales the aligned logits to the input grid.
    Decoder option: ``multi_scale`` (fuse the four feature levels, default False).
    """

    def __init__(self, *, multi_scale: bool = False, **backbone_kwargs) -> None:
        super().__init__(**backbone_kwargs)
        self.multi_scale = multi_scale
        if multi_scale:
            self.fuse = nn.Sequential(
                nn.Conv2d(4 * self.embed_dim, self.embed_dim, kernel_size=1), LayerNormNd(self.embed_dim), nn.GELU()
            )
        if self.detail_channels is not None:
            # The detail path decodes the token map itself, in place of PatchDecode.
            self.add_detail_path(self.embed_dim, decoder_stride=self.patch_size)
        else:
            decode_stride = 1 << (self.patch_size - 1).bit_length()
            # PatchDecode is written for 3D; a singleton third axis with stride 1 makes it 2D.
            self.decoder = PatchDecode((decode_stride, decode_stride, 1), self.embed_dim, self.num_classes)

    @property
    def decoder_classifier(self) -> nn.Module:
        return self.decoder  # PatchDecode derives every layer's width from num_classes

    def decode_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.multi_scale:
            tokens = self.fuse(torch.cat(self.backbone_features(x, self.feature_indices), dim=1))
        else:
            tokens = self.backbone_features(x, self.feature_indices[-1:])[0]
        return tokens if self.detail is not None else self.decoder(tokens[..., None])[..., 0]


create_segmentation_model = make_factory(PrimusSegmentationModel)
