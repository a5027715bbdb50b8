"""A high-resolution detail path that any decoder can use, for structures one or two pixels wide.

A ViT sees the image through 14- or 16-pixel patches, and the finest map any of our decoders
builds from its tokens is 1/4 of the image (DPT's head: 1/2). Thin structures, such as retinal
vessels or layer boundaries in OCT, are lost there. ``DetailPath`` adds what a U-Net's first
encoder stages have: a few convolutions on the input image at full, 1/2 and 1/4 resolution. Its
maps are fused, coarse to fine, with the decoder's last features (UNETR's convolutional skips from
the input, on a ViT decoder instead of a ViT encoder), so the features at full resolution, which
the model classifies in place of the decoder's own, see image detail.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Channels of the full, 1/2 and 1/4 resolution levels. Few at full resolution: that is where the
# FLOPs are, and a handful of maps is enough to carry local contrast to the classifier.
DEFAULT_DETAIL_CHANNELS = (16, 24, 32)
DETAIL_STRIDES = (1, 2, 4)


class ConvNormAct(nn.Sequential):
    """3x3 convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DetailPath(nn.Module):
    """Image detail fused with a decoder's features into full-resolution features (``out_channels`` maps).

    ``forward(image, features)``: ``image`` is the (padded) model input, ``features`` the decoder's
    last map before its classifier, on a grid ``decoder_stride`` times coarser than the image.
    The image goes through two convolutions per level (full, 1/2, 1/4; the coarser levels start with
    a stride-2 convolution). Fusion runs from 1/4 to full resolution: at each level the upsampled
    result so far and the level's detail map are concatenated and convolved; the decoder's features,
    projected by a 1x1 convolution and resized, join at the level nearest to their own grid (1/4 for
    UperNet, SegFormer and Primus, 1/2 for DPT). Sizes need not divide by 4: every resize goes to the
    exact size of the map it joins.
    """

    def __init__(
        self,
        in_channels: int,
        decoder_channels: int,
        decoder_stride: float,
        channels: Sequence[int] = DEFAULT_DETAIL_CHANNELS,
    ) -> None:
        super().__init__()
        channels = list(channels)  # checked by DecoderConfig.detail_channels
        self.join_level = min(range(len(DETAIL_STRIDES)),
                              key=lambda i: abs(math.log(DETAIL_STRIDES[i] / decoder_stride)))
        self.stem = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(channels):
            self.stem.append(nn.Sequential(ConvNormAct(previous, width, stride=1 if level == 0 else 2),
                                           ConvNormAct(width, width)))
            previous = width
        self.project = nn.Conv2d(decoder_channels, channels[self.join_level], kernel_size=1)
        self.fuse = nn.ModuleList()
        for level, width in enumerate(channels):
            coarser = channels[level + 1] if level + 1 < len(channels) else 0
            joined = channels[level] if level == self.join_level else 0
            self.fuse.append(ConvNormAct(coarser + width + joined, width))
        self.out_channels = channels[0]

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        details: List[torch.Tensor] = []
        x = image
        for stage in self.stem:
            x = stage(x)
            details.append(x)
        fused = None
        for level in reversed(range(len(details))):
            detail = details[level]
            inputs = [detail]
            if fused is not None:
                inputs.insert(0, _resize(fused, detail))
            if level == self.join_level:
                inputs.append(_resize(self.project(features), detail))
            fused = self.fuse[level](torch.cat(inputs, dim=1))
        return fused


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` bilinearly resized to the spatial size of ``like`` (no-op if it already has it)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
