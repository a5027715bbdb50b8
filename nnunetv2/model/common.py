"""What every ViT segmentation model shares: backbone set-up, padding/cropping, detail path, LoRA, summaries.

Decoder files declare their options as a ``DecoderConfig`` subclass (``config_class``), subclass
``ViTSegmentationModel``, build their decoder after ``super().__init__`` from ``self.decoder_config``, implement
``decode_features`` (the decoder's last feature map) and end ``__init__`` with
``end_decoder(classifier, channels, stride)``: the base then composes ``classifier`` after the features, or the
detail path and its own classifier. ``make_factory`` turns the class into the module's
``create_segmentation_model``, the keyword front door of the model contract.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2.model.backbone import ProgressiveUpsampler, create_backbone, feature_indices_for_depth, get_vit_features
from nnunetv2.model.config import DecoderConfig, LoraSettings, PositiveInt, default_of, entries
from nnunetv2.model.detail import DEFAULT_DETAIL_CHANNELS, DetailPath

_logger = logging.getLogger(__name__)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad H and W at the bottom/right up to a multiple (reflect; replicate if the image is tinier than the pad)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class ViTSegmentationModel(nn.Module):
    """A timm ViT backbone plus a decoder; maps ``(B, C, H, W)`` to logits ``(B, num_classes, H, W)``.

    Any H, W works: the input is padded to a multiple of the patch size, decoded, the logits are
    resized to the padded size (decoders work on the token grid, which covers exactly the padded
    image, so this is a uniform rescale, never a shift) and cropped back. The backbone arguments have
    no defaults here: ``create_segmentation_model`` holds them; ``lora`` and ``decoder`` are typed.
    """

    config_class: Type[DecoderConfig] = DecoderConfig  # the decoder's options (``model.decoder``)

    # Decoders with a 0.5x pyramid level need an even token grid, or that level is misaligned.
    token_grid_multiple: int = 1
    # Training batches smaller than this fail in BatchNorm (e.g. on a 1x1 pooled map).
    min_train_batch_size: int = 1

    def __init__(
        self,
        backbone_name: str,
        backbone_size: str,
        num_classes: int,
        checkpoint_path: Optional[str],
        freeze_backbone: bool,
        lora: Optional[LoraSettings],
        pretrained: bool,
        in_channels: int,
        trust_checkpoint: bool,
        drop_path_rate: float,
        decoder: Optional[DecoderConfig] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.decoder_config = self.config_class() if decoder is None else decoder
        # Set when the decoder is to end in a DetailPath (built by end_decoder).
        self.detail_channels: Optional[List[int]] = (
            list(self.decoder_config.detail_channels or DEFAULT_DETAIL_CHANNELS)
            if self.decoder_config.detail_path else None
        )
        self.detail: Optional[DetailPath] = None
        self.classifier: nn.Module  # set by the subclass's end_decoder
        self.backbone, self.patch_size, self.backbone_model_name = create_backbone(
            backbone_name, backbone_size, checkpoint_path=checkpoint_path, pretrained=pretrained,
            in_channels=in_channels, trust_checkpoint=trust_checkpoint, drop_path_rate=drop_path_rate,
        )
        self.embed_dim: int = self.backbone.embed_dim
        self.feature_indices: List[int] = feature_indices_for_depth(len(self.backbone.blocks))
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        if lora is not None and lora.enabled:  # peft freezes the backbone's own weights whether or not frozen here
            self.enable_lora(lora)

    @property
    def backbone_trainable(self) -> bool:
        """Whether any backbone parameter (its own or a LoRA adapter) is trained."""
        return any(param.requires_grad for param in self.backbone.parameters())

    def backbone_features(self, x: torch.Tensor, indices: Sequence[int], **kwargs):
        """``get_vit_features`` of the backbone: every decoder reads it through here. A frozen backbone (no
        trainable parameter) runs without autograd, so its activations are not kept for a backward pass."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trainable):
            return get_vit_features(self.backbone, x, indices, **kwargs)

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's last feature map (before its classifier) for the patch-aligned ``x``, on a grid aligned
        with ``x``."""
        raise NotImplementedError

    def end_decoder(self, classifier: Optional[nn.Module], channels: int, stride: float) -> None:
        """End the decoder, whose ``decode_features`` gives ``channels`` maps ``stride`` times coarser than the
        input. Without the detail path, ``classifier`` (the decoder's own layers from those features to logits)
        is the model's classifier. With it, a ``DetailPath`` fuses the features with image detail and a 1x1
        convolution classifies at full resolution; the decoder's classifier is not used (pass None to skip
        building it)."""
        if self.detail_channels is None:
            if classifier is None:
                raise ValueError("a decoder without the detail path needs its classifier")
            self.classifier = classifier
        else:
            self.detail = DetailPath(self.in_channels, channels, stride, self.detail_channels)
            self.classifier = nn.Conv2d(self.detail.out_channels, self.num_classes, kernel_size=1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on a grid aligned with the patch-aligned ``x``: decoder features, the detail path if any, the
        classifier."""
        features = self.decode_features(x)
        if self.detail is not None:
            features = self.detail(x, features)
        return self.classifier(features)

    def classifier_keys(self) -> List[str]:
        """State-dict keys of ``classifier``, the only layers whose shapes depend on ``num_classes``: not
        transferred between datasets by ``-pretrained_weights``, like nnU-Net's seg layers."""
        return [f"classifier.{key}" for key in self.classifier.state_dict()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.patch_size * self.token_grid_multiple)
        logits = self.decode(x)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    @property
    def vit(self) -> nn.Module:
        """The timm backbone itself, also when wrapped by peft."""
        from peft import PeftModel

        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    def compile_regions(self, **compile_kwargs) -> List[str]:
        """``torch.compile`` each transformer block and each decoder part in place; returns the region names.

        Regional compilation: the blocks of a ViT run the same code, so dynamo traces and optimises one
        block and every other block reuses that graph (ViT-L's first step compiles 1 block, not 24).
        The decoder's parts (neck, head, pyramid, detail path) are regions of their own; the glue between
        them (patch embedding, padding, cropping) runs eagerly. Module names and state-dict keys stay.
        """
        for block in self.vit.blocks:
            block.compile(**compile_kwargs)
        regions = [f"backbone blocks (1 graph for {len(self.vit.blocks)})"]
        for name, child in self.named_children():
            if name != "backbone":
                child.compile(**compile_kwargs)
                regions.append(name)
        return regions

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in backward: much less memory, about 30% slower steps."""
        self.vit.set_grad_checkpointing(enable)

    def enable_lora(self, lora: Optional[LoraSettings] = None) -> None:
        """Wrap the backbone with peft LoRA adapters (default ``LoraSettings``); its own weights become frozen."""
        from peft import PeftModel, get_peft_model

        if isinstance(self.backbone, PeftModel):
            raise RuntimeError("LoRA is already enabled on this model.")
        lora = lora or LoraSettings(enabled=True)
        try:
            self.backbone = get_peft_model(self.backbone, lora.peft_config())
        except ValueError as err:
            raise ValueError(f"LoRA target_modules {set(lora.target_modules)} do not fit this backbone: {err}") from err
        _logger.info("LoRA enabled: rank=%d, alpha=%s, targets=%s", lora.r, lora.lora_alpha,
                     sorted(lora.target_modules))

    def disable_lora(self) -> None:
        """Merge the LoRA weights into the backbone and drop the adapters (outputs stay the same)."""
        from peft import PeftModel

        if isinstance(self.backbone, PeftModel):
            self.backbone = self.backbone.merge_and_unload()
            _logger.info("LoRA weights merged into the backbone")

    def parameter_summary(self, detailed: bool = False) -> str:
        """Total/trainable parameter counts, per top-level component if ``detailed``."""
        per_component: Dict[str, List[int]] = {}
        for name, param in self.named_parameters():
            counts = per_component.setdefault(name.split(".")[0], [0, 0])
            counts[0] += param.numel() * param.requires_grad
            counts[1] += param.numel()
        trainable = sum(c[0] for c in per_component.values())
        total = sum(c[1] for c in per_component.values())
        lines = [
            f"{type(self).__name__} ({self.backbone_model_name})",
            f"Total parameters:     {total:,}",
            f"Trainable parameters: {trainable:,} ({100 * trainable / max(total, 1):.2f}%)",
        ]
        if detailed:
            lines.append(f"{'component':<15}{'trainable':>15}{'total':>15}{'%':>9}")
            for component, (n_train, n_total) in per_component.items():
                lines.append(f"{component:<15}{n_train:>15,}{n_total:>15,}{100 * n_train / max(n_total, 1):>8.2f}%")
        return "\n".join(lines)

    def print_trainable_parameters(self, detailed: bool = False) -> None:
        print(self.parameter_summary(detailed))


def make_factory(model_cls: Type[ViTSegmentationModel]) -> Callable[..., ViTSegmentationModel]:
    """Module-level ``create_segmentation_model`` for a model class: the model contract's keywords (the one place
    their defaults live), then the decoder's options, the fields of ``model_cls.config_class``.

    LoRA comes either as ``lora``, the typed settings (as the YAML's ``lora`` section), or as the contract's five
    ``use_lora``/``lora_*`` keywords, which are mapped onto the same settings here. Likewise the decoder: either as
    ``decoder``, its typed config (as the YAML's ``model.decoder`` reads), or as keywords.
    """
    config_class = model_cls.config_class

    def create_segmentation_model(
        backbone_name: str,
        backbone_size: str,
        num_classes: int,
        checkpoint_path: Optional[str] = None,
        freeze_backbone: bool = False,
        use_lora: bool = False,
        lora_rank: int = LoraSettings.r,
        lora_alpha: float = LoraSettings.lora_alpha,
        lora_dropout: float = LoraSettings.lora_dropout,
        lora_target_modules: Optional[Sequence[str]] = None,
        pretrained: bool = True,
        in_channels: int = 3,
        trust_checkpoint: bool = False,
        drop_path_rate: float = 0.0,
        *,
        lora: Optional[LoraSettings] = None,
        decoder: Optional[DecoderConfig] = None,
        **decoder_options,
    ) -> ViTSegmentationModel:
        if lora is not None and (use_lora or lora_target_modules is not None or (lora_rank, lora_alpha, lora_dropout)
                                 != (LoraSettings.r, LoraSettings.lora_alpha, LoraSettings.lora_dropout)):
            raise TypeError("give LoRA either as lora=LoraSettings(...) or as the use_lora/lora_* keywords, not both")
        if lora is None:
            targets = {} if lora_target_modules is None else {"target_modules": list(lora_target_modules)}
            lora = LoraSettings(enabled=use_lora, r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                **targets)
        if decoder is None:
            decoder = config_class(**decoder_options)
        elif decoder_options:
            raise TypeError(f"give the decoder either as decoder={config_class.__name__}(...) or as keywords, not both")
        elif not isinstance(decoder, config_class):
            raise TypeError(f"decoder must be a {config_class.__name__}, got {type(decoder).__name__}")
        return model_cls(backbone_name, backbone_size, num_classes, checkpoint_path, freeze_backbone, lora,
                         pretrained, in_channels, trust_checkpoint, drop_path_rate, decoder)

    # The signature lists the decoder's options by name (a decoder's own first, then the detail path's).
    shared = [f.name for f in dataclasses.fields(DecoderConfig)]
    options = sorted(dataclasses.fields(config_class), key=lambda f: f.name in shared)
    signature = inspect.signature(create_segmentation_model)
    create_segmentation_model.__signature__ = signature.replace(parameters=[
        *[p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD],
        *[inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(f),
                            annotation=f.type)
          for f in options],
    ])
    create_segmentation_model.config_class = config_class
    create_segmentation_model.__doc__ = f"Build a {model_cls.__name__}. {model_cls.__doc__ or ''}"
    create_segmentation_model.__module__ = model_cls.__module__
    return create_segmentation_model


class ViTFeaturePyramid(nn.Module):
    """Turn four same-stride ViT maps into a pyramid at 4x, 2x, 1x and 0.5x the token grid.

    The fine levels use learned upsampling (``ProgressiveUpsampler``), the coarse one max-pooling:
    what convolutional decoders (UperNet, SegFormer) expect from a hierarchical encoder.
    """

    def __init__(self, embed_dim: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        c4, c2, c1, c05 = out_channels
        self.levels = nn.ModuleList([
            ProgressiveUpsampler(embed_dim, c4, 4),
            ProgressiveUpsampler(embed_dim, c2, 2),
            nn.Conv2d(embed_dim, c1, kernel_size=1),
            nn.Sequential(nn.Conv2d(embed_dim, c05, kernel_size=1), nn.MaxPool2d(2, ceil_mode=True)),
        ])

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [level(feat) for level, feat in zip(self.levels, features)]


# The widths of a ViTFeaturePyramid's four levels; None: default_pyramid_channels.
PyramidChannels = Annotated[Optional[List[PositiveInt]], entries(4, "one per level")]


def default_pyramid_channels(embed_dim: int) -> List[int]:
    """[E/4, E/2, E, E]: the channel widths DPT and ViT-Adapter use for the four levels."""
    return [embed_dim // 4, embed_dim // 2, embed_dim, embed_dim]


class ViTPyramidHeadModel(ViTSegmentationModel):
    """Base of the decoders that read a ``ViTFeaturePyramid`` with a HuggingFace head (``self.head``,
    last layer ``head.classifier``): UperNet and SegFormer. Subclasses call ``add_pyramid``, then ``add_head``."""

    token_grid_multiple = 2  # the 0.5x level

    def add_pyramid(self) -> List[int]:
        """Build ``self.pyramid`` (widths ``decoder_config.pyramid_channels``, default ``[E/4, E/2, E, E]``) and
        return its channel widths."""
        channels = list(self.decoder_config.pyramid_channels or default_pyramid_channels(self.embed_dim))
        self.pyramid = ViTFeaturePyramid(self.embed_dim, channels)
        return channels

    def add_head(self, head: nn.Module, hidden_size: int) -> None:
        """Set ``self.head``, a HuggingFace decode head whose last layer is ``head.classifier`` after
        ``hidden_size`` channels at the finest (1/4) level, and end the decoder there."""
        self.head = head
        self.end_decoder(split_classifier(head), hidden_size, stride=self.patch_size / 4)

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pyramid(self.backbone_features(x, self.feature_indices)))


def split_classifier(head: nn.Module) -> nn.Module:
    """Take the final layer (``head.classifier``) out of a HuggingFace decode head (UperNet, SegFormer) and leave
    an identity in its place, so the head returns its features. HF heads end in their classifier inside
    ``forward``; the model composes the classifier (or the detail path) after the features instead."""
    classifier = head.classifier
    head.classifier = nn.Identity()
    return classifier
