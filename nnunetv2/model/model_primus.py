"""Primus-style patch decoder (https://arxiv.org/abs/2503.01835) on a timm ViT backbone.

The token map is decoded straight to logits by ``PatchDecode`` from dynamic_network_architectures
(stacked 2x transposed convs with ``LayerNormNd``). ``multi_scale`` first fuses all four feature
levels with a 1x1 projection instead of decoding the last block only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd, PatchDecode

from nnunetv2.model.common import ViTSegmentationModel, make_factory
from nnunetv2.model.config import DecoderConfig


@dataclass
class PrimusDecoderConfig(DecoderConfig):
    """Primus's options (``model.decoder`` for ``model_primus``)."""

    multi_scale: bool = False  # fuse the four feature levels instead of decoding the last block only


class PrimusSegmentationModel(ViTSegmentationModel):
    """ViT backbone + Primus patch decoder, with the options of ``PrimusDecoderConfig``.

    ``PatchDecode`` only upsamples by powers of two, so for patch 14 the decoder works at the next
    power of two (16) and the base class rescales the aligned logits to the input grid.
    """

    config_class = PrimusDecoderConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.multi_scale = self.decoder_config.multi_scale
        if self.multi_scale:
            self.fuse = nn.Sequential(
                nn.Conv2d(4 * self.embed_dim, self.embed_dim, kernel_size=1), LayerNormNd(self.embed_dim), nn.GELU()
            )
        decode_stride = 1 << (self.patch_size - 1).bit_length()
        # PatchDecode derives every layer's width from num_classes: all of it is the classifier. With the detail
        # path, the token map goes to the detail path instead, and no PatchDecode is built.
        classifier = PatchDecode2d(decode_stride, self.embed_dim, self.num_classes) if self.detail_channels is None \
            else None
        self.end_decoder(classifier, self.embed_dim, stride=self.patch_size)

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.multi_scale:
            return self.fuse(torch.cat(self.backbone_features(x, self.feature_indices), dim=1))
        return self.backbone_features(x, self.feature_indices[-1:])[0]


class PatchDecode2d(PatchDecode):
    """dynamic_network_architectures' ``PatchDecode`` (written for 3D) on 2D maps: a singleton third axis with
    stride 1."""

    def __init__(self, stride: int, embed_dim: int, out_channels: int) -> None:
        super().__init__((stride, stride, 1), embed_dim, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[..., None])[..., 0]


create_segmentation_model = make_factory(PrimusSegmentationModel)
