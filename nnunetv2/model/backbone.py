"""ViT backbones for segmentation: a registry of foundation-model families built with timm.

Each family is one row of ``BACKBONES``: which timm architecture it is, which sizes exist, where
pretrained weights come from (a timm pretrained tag, or only a local checkpoint file) and which checkpoint
filter converts foreign checkpoint layouts: timm's own, or for DINOv2 / DINOv3 one that first renames
transformers' layout to Meta's original one, which timm's filter then converts. ``create_backbone`` is the
only way models get a backbone; ``get_vit_features`` is the only way decoders read multi-scale features from it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import adapt_input_conv, get_pretrained_cfg
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter

from nnunetv2.model.checkpoint_io import read_checkpoint
from nnunetv2.model.errors import BackboneWeightsError, CheckpointReadError

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Statistics = Tuple[Tuple[float, ...], Tuple[float, ...]]  # per-RGB-channel mean and std, intensities scaled to 0-1

# A checkpoint whose tensors cover less than this share of the backbone is refused: it is almost
# certainly the wrong file, and silently training from random weights would waste the user's run.
# 0.9, not lower: a checkpoint of a sibling family (dinov3 file into dinov2) still matches ~79%
# (blocks' linear layers) while its position embedding, biases and layer scales stay random.
MIN_MATCHED_FRACTION = 0.9


@dataclass(frozen=True)
class BackboneFamily:
    """How to build one family of ViT backbones with timm and load its weights."""

    timm_name: str  # format string with ``{size}``
    sizes: Tuple[str, ...]
    patch_size: int
    pretrained_tag: Optional[str]  # timm pretrained tag; None = weights only from a checkpoint file
    checkpoint_filter: Callable[[StateDict, nn.Module], StateDict]
    wrapper_keys: Tuple[str, ...] = ("model", "state_dict")  # dict keys a checkpoint may nest weights in
    drop_prefixes: Tuple[str, ...] = ()  # pretraining-only tensors (MAE decoder, iBOT mask embedding)
    # Input statistics of pretraining for a family without a timm tag; tagged ones read timm's pretrained_cfg.
    input_statistics: Optional[Statistics] = None
    formats: Tuple[str, ...] = ("timm's (.pth / .safetensors)",)  # checkpoint layouts it loads, for error messages


# transformers' names of DINOv2 / DINOv3 (as save_pretrained writes them, and as transformers 5 names the modules)
# to those of Meta's original checkpoints, which timm's checkpoint filters already convert. Rules apply in order;
# ``{q,k,v}`` and SwiGLU's gate/up halves are concatenated afterwards into Meta's fused tensors.
Rules = Tuple[Tuple[str, str], ...]
_DINOV2_FROM_TRANSFORMERS: Rules = (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.", ""),  # cls_token, mask_token, register_tokens: Meta's names
    (r"^encoder\.layer\.", "blocks."),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),  # SwiGLU (giant): gate and up halves packed, as Meta's w12
    (r"\.mlp\.(?:weights_out|down_proj)\.", ".mlp.w3."),
    (r"^layernorm\.", "norm."),
)
_DINOV3_FROM_TRANSFORMERS: Rules = (
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.", ""),  # cls_token, mask_token
    (r"^(?:model\.)?layer\.", "blocks."),
    (r"\.attention\.([qkv])_proj\.", r".attn.\1."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
)
_DINOV3_MLP_FROM_TRANSFORMERS: Dict[bool, Rules] = {  # by whether the MLP is gated (SwiGLU: small_plus, huge_plus, 7b)
    False: ((r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2.")),
    True: ((r"\.mlp\.gate_proj\.", ".mlp.w1."), (r"\.mlp\.up_proj\.", ".mlp.w2."), (r"\.mlp\.down_proj\.", ".mlp.w3.")),
}


def _rename(state_dict: StateDict, rules: Rules) -> StateDict:
    out = {}
    for name, tensor in state_dict.items():
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def _concatenate(state_dict: StateDict, parts: Sequence[str], fused: str) -> StateDict:
    """Concatenate each block's ``{part}.weight`` / ``.bias`` tensors, in ``parts`` order, into ``{fused}.*``.

    A missing bias part is zeros (DINOv3's key projection has no bias; Meta's fused one holds zeros there)."""
    out = dict(state_dict)
    for name in [k for k in state_dict if k.endswith(f".{parts[0]}.weight")]:
        stem = name[: -len(f"{parts[0]}.weight")]
        weights = [out.pop(f"{stem}{part}.weight") for part in parts]
        out[f"{stem}{fused}.weight"] = torch.cat(weights)
        biases = [out.pop(f"{stem}{part}.bias", None) for part in parts]
        if any(bias is not None for bias in biases):
            out[f"{stem}{fused}.bias"] = torch.cat([
                w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    return out


def dinov2_checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """timm's ViT filter (timm's and Meta's layouts), after renaming transformers' ``Dinov2Model`` layout to Meta's.

    DINOv2 with registers is refused: its position embedding has no CLS entry and would be left random, a loss
    the matched-tensor count (all but one) does not show."""
    if "embeddings.cls_token" in state_dict:
        state_dict = _rename(state_dict, _DINOV2_FROM_TRANSFORMERS)
        state_dict = _concatenate(state_dict, ("attn.q", "attn.k", "attn.v"), "attn.qkv")
        state_dict = _concatenate(state_dict, ("mlp.gate_proj", "mlp.up_proj"), "mlp.w12")
    registers = {"register_tokens", "reg_token"} & set(state_dict)
    if registers and "pos_embed" in state_dict and not getattr(model, "num_reg_tokens", 0):  # DINOv3 has no pos_embed
        raise BackboneWeightsError(
            f"it is a DINOv2 with registers ({registers.pop()}), which timm's {_architecture(model)} is not: use a "
            f"DINOv2 checkpoint without registers (facebook/dinov2-{{small,base,large,giant}}, Meta's "
            f"dinov2_vit*14_pretrain.pth).")
    return vit_checkpoint_filter(state_dict, model)


def dinov3_checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """timm's Eva filter (timm's and Meta's layouts), after renaming transformers' ``DINOv3ViTModel`` layout to Meta's.

    timm's DINOv3 models have no q/v bias where Meta's distilled checkpoints hold zeros: those are dropped, and a
    non-zero one, which the timm model could not hold, is refused rather than lost."""
    if "embeddings.cls_token" in state_dict:
        gated = any(".mlp.gate_proj." in name for name in state_dict)
        state_dict = _rename(state_dict, _DINOV3_FROM_TRANSFORMERS + _DINOV3_MLP_FROM_TRANSFORMERS[gated])
        state_dict = _concatenate(state_dict, ("attn.q", "attn.k", "attn.v"), "attn.qkv")
    if "storage_tokens" in state_dict and getattr(model.blocks[0].attn, "q_bias", None) is None:  # Meta's layout
        state_dict = dict(state_dict)
        for name in [k for k in state_dict if k.endswith("attn.qkv.bias")]:
            bias = state_dict.pop(name) * state_dict.get(name + "_mask", 1)
            if bias.any():
                raise BackboneWeightsError(
                    f"tensor {name} holds non-zero query/value biases, but timm's {_architecture(model)} has none: "
                    f"loading it without them would change the features.")
    return eva_checkpoint_filter(state_dict, model)


def file_only_vit16(size: str, **checkpoint_format) -> BackboneFamily:
    """A plain timm ViT/16 whose weights come only from a released checkpoint file (RETFound, VisionFM).

    Both were pretrained on inputs normalised with ImageNet's statistics (RETFound's MAE code and VisionFM's
    DINO/iBOT code), not with those of timm's ``vit_*_patch16_224`` tags (0.5, 0.5, 0.5)."""
    return BackboneFamily(timm_name="vit_{size}_patch16_224", sizes=(size,), patch_size=16, pretrained_tag=None,
                          checkpoint_filter=vit_checkpoint_filter,
                          input_statistics=(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), **checkpoint_format)


BACKBONES: Dict[str, BackboneFamily] = {
    "dinov3": BackboneFamily(
        timm_name="vit_{size}_patch16_dinov3",
        sizes=("small", "small_plus", "base", "large", "huge_plus", "7b"),
        patch_size=16,
        pretrained_tag="lvd1689m",
        checkpoint_filter=dinov3_checkpoint_filter,
        formats=("timm's (.pth / .safetensors)", "Meta's dinov3 repository (.pth)",
                 "transformers' DINOv3ViTModel (model.safetensors, or the folder with it and config.json)"),
    ),
    "dinov2": BackboneFamily(
        timm_name="vit_{size}_patch14_dinov2",
        sizes=("small", "base", "large", "giant"),
        patch_size=14,
        pretrained_tag="lvd142m",
        checkpoint_filter=dinov2_checkpoint_filter,
        formats=("timm's (.pth / .safetensors)", "Meta's dinov2 repository (.pth)",
                 "transformers' Dinov2Model (model.safetensors, or the folder with it and config.json)"),
    ),
    # MAE checkpoint: {"model": ...} with the MAE decoder and mask token next to the encoder.
    "retfound": file_only_vit16("large", drop_prefixes=("decoder_", "mask_token")),
    # DINO/iBOT checkpoint: {"teacher": ...} with module./backbone. prefixes, iBOT's mask embedding and DINO head.
    "visionfm": file_only_vit16("base", wrapper_keys=("teacher", "model", "state_dict"),
                                drop_prefixes=("masked_embed", "head.", "fc_norm.")),
}

_STRIP_PREFIXES = ("module.", "backbone.")


def get_family(model_name: str, model_size: str) -> BackboneFamily:
    """Look up a family and check the size, with an error that lists the valid choices."""
    if model_name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{model_name}'. Valid backbones: {', '.join(BACKBONES)}.")
    family = BACKBONES[model_name]
    if model_size not in family.sizes:
        raise ValueError(
            f"Unknown size '{model_size}' for backbone '{model_name}'. Valid sizes: {', '.join(family.sizes)}."
        )
    return family


def pretraining_statistics(model_name: str, model_size: str) -> Tuple[Statistics, str]:
    """The per-RGB-channel mean and std (of 0-1 intensities) the backbone's pretraining normalised its inputs
    with, and where they come from: timm's ``pretrained_cfg`` of the family's tag, or the family's row."""
    family = get_family(model_name, model_size)
    timm_name = family.timm_name.format(size=model_size)
    if family.pretrained_tag is None:
        return family.input_statistics, f"the {model_name} row of nnunetv2/model/backbone.py (its pretraining code)"
    tag = f"{timm_name}.{family.pretrained_tag}"
    cfg = get_pretrained_cfg(tag)
    return (tuple(cfg.mean), tuple(cfg.std)), f"timm's pretrained_cfg of {tag}"


def feature_indices_for_depth(depth: int) -> List[int]:
    """Blocks whose outputs feed the decoder: the ends of the four quarters of the network.

    12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23], 40 -> [9, 19, 29, 39] (as DPT, Depth-Anything and
    DINOv3's own heads use them).
    """
    if depth < 4:
        raise ValueError(f"A ViT needs at least 4 blocks to provide 4 feature levels, got {depth}.")
    return [round(depth * q / 4) - 1 for q in (1, 2, 3, 4)]


def create_backbone(
    model_name: str,
    model_size: str,
    checkpoint_path: Optional[Union[str, Path]] = None,
    pretrained: bool = True,
    in_channels: int = 3,
    trust_checkpoint: bool = False,
    drop_path_rate: float = 0.0,
) -> Tuple[nn.Module, int, str]:
    """Build a timm ViT backbone without classifier head and load its weights.

    Weights come from ``checkpoint_path`` if given (any family), else from timm's pretrained tag
    (dinov3, dinov2) when ``pretrained`` is true. ``trust_checkpoint`` loads that file as a full pickle
    (it can run code; see ``checkpoint_io``). ``drop_path_rate`` is timm's stochastic depth (rising linearly over
    the blocks to this rate; active in training mode only). Returns ``(module, patch_size, timm_model_name)``.
    """
    family = get_family(model_name, model_size)
    timm_name = family.timm_name.format(size=model_size)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    kwargs = dict(num_classes=0, in_chans=in_channels, dynamic_img_size=True, drop_path_rate=drop_path_rate)

    if checkpoint_path is not None:
        if not checkpoint_path.exists():
            raise BackboneWeightsError(
                f"Backbone checkpoint not found: {checkpoint_path}. Fix model.checkpoint_path in the config."
            )
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        load_backbone_checkpoint(model, checkpoint_path, family, in_channels, trust_checkpoint)
    elif pretrained and family.pretrained_tag is None:
        raise BackboneWeightsError(
            f"Backbone '{model_name}' has no public download: set model.checkpoint_path to your {model_name} "
            f"checkpoint file, or set model.pretrained: false to start from random weights."
        )
    elif pretrained:
        tag = f"{timm_name}.{family.pretrained_tag}"
        try:
            model = timm.create_model(tag, pretrained=True, **kwargs)
        # The hub's errors are all OSErrors (huggingface_hub 2.4: offline, no network and a missing cache entry are
        # LocalEntryNotFoundError; HTTP failures HfHubHTTPError, a gated repository GatedRepoError), as is a full cache.
        except OSError as err:
            raise BackboneWeightsError(
                f"Could not download pretrained weights for '{tag}' ({type(err).__name__}: {err}). "
                f"If this machine is offline, download the weights elsewhere and set model.checkpoint_path "
                f"to the file, or set model.pretrained: false to start from random weights."
            ) from err
        _logger.info("Loaded pretrained weights %s through timm", tag)
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        _logger.info("Backbone %s initialised randomly (pretrained: false)", timm_name)

    # Keep only what the decoder reads: drops the classifier head and pooling norm, so every
    # remaining parameter receives a gradient (DDP without find_unused_parameters).
    model.prune_intermediate_layers(feature_indices_for_depth(len(model.blocks)), prune_norm=False, prune_head=True)
    return model, family.patch_size, timm_name


def _unwrap_state_dict(checkpoint: dict, family: BackboneFamily) -> StateDict:
    """Take the backbone weights out of the checkpoint formats users have, keys in timm naming."""
    state_dict = checkpoint
    for key in family.wrapper_keys:
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        for prefix in _STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if family.drop_prefixes and name.startswith(family.drop_prefixes):
            continue
        out[name] = tensor
    return out


def load_backbone_checkpoint(model: nn.Module, path: Path, family: BackboneFamily, in_channels: int = 3,
                             trust: bool = False) -> None:
    """Load a local checkpoint (a file, or the folder transformers writes) into a timm backbone, reporting
    matched/missing/unexpected tensors.

    The file is read as data (``checkpoint_io``) unless ``trust``. Format glue this repository adds
    (wrapper dicts, DDP/DINO prefixes, pretraining-only keys) runs first; the family's filter then converts
    the layouts it knows (transformers', Meta's originals, pos-embed size). A file that fits less than
    ``MIN_MATCHED_FRACTION`` of the backbone is refused with what it looks like: another size, another
    family, or a format this family does not know.
    """
    try:
        checkpoint = read_checkpoint(path, trust=trust, opt_in="set model.trust_checkpoint: true in the config")
    except (CheckpointReadError, FileNotFoundError) as err:
        raise BackboneWeightsError(str(err)) from err
    state_dict = _unwrap_state_dict(checkpoint, family)
    file_keys = list(state_dict)[:5]
    name = _architecture(model)
    try:
        state_dict = family.checkpoint_filter(state_dict, model)
    except BackboneWeightsError as err:
        raise BackboneWeightsError(f"Checkpoint {path}: {err}") from err
    # timm's filters assume their own family's layout (e.g. dinov2's pos_embed in dinov3): another layout fails where
    # it meets their code, on a missing key (KeyError, or AttributeError of a ``.get`` that gave None), an index, a
    # type or a tensor shape.
    except (KeyError, AttributeError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise BackboneWeightsError(
            f"Checkpoint {path} does not fit backbone {name}: converting it failed ({type(err).__name__}: {err}). "
            f"Check that model.backbone names the model this file holds. {_file_formats(path, family, file_keys)}"
        ) from err
    proj = "patch_embed.proj.weight"
    if in_channels != 3 and proj in state_dict and state_dict[proj].shape[1] == 3:
        state_dict[proj] = adapt_input_conv(in_channels, state_dict[proj])

    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    wrong_shape = sorted(k for k in state_dict if k in own and own[k].shape != state_dict[k].shape)
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if k not in matched)
    _logger.info(
        "Checkpoint %s: %d tensors matched, %d missing, %d unexpected, %d with wrong shape",
        path, len(matched), len(missing), len(unexpected), len(wrong_shape),
    )
    if missing:
        _logger.info("Missing (left at initialisation): %s", ", ".join(missing[:20]))
    if len(matched) < MIN_MATCHED_FRACTION * len(own):
        fit = f"only {len(matched)} of {len(own)} tensors match"
        if len(matched) + len(wrong_shape) >= MIN_MATCHED_FRACTION * len(own):
            example = proj if proj in wrong_shape else wrong_shape[0]
            raise BackboneWeightsError(
                f"Checkpoint {path} holds another size of this backbone: {fit}, {len(wrong_shape)} have other "
                f"shapes (e.g. {example}: {tuple(state_dict[example].shape)} in the file, {tuple(own[example].shape)} "
                f"in {name}). Set model.backbone_size to the size of this file."
            )
        if len(matched) >= 0.5 * len(own):
            raise BackboneWeightsError(
                f"Checkpoint {path} does not fit backbone {name}: {fit} ({len(wrong_shape)} have a different shape, "
                f"{len(unexpected)} are unknown, e.g. {(wrong_shape + unexpected)[:3]}). It looks like a checkpoint "
                f"of another backbone with a similar layout (e.g. a dinov3 file for dinov2): check that "
                f"model.backbone names the model this file holds."
            )
        raise BackboneWeightsError(
            f"Checkpoint {path} is in no format known for backbone {name} ({fit}). "
            f"{_file_formats(path, family, file_keys)}"
        )
    model.load_state_dict(matched, strict=False)


def _file_formats(path: Path, family: BackboneFamily, file_keys: List[str]) -> str:
    """The family's known formats and what the file holds: its first keys, and the model_type of a transformers
    ``config.json`` beside it."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return (f"Known formats: {'; '.join(family.formats)}. The file's first keys: {file_keys}"
            + (f"; the config.json beside it says model_type '{model_type}'." if model_type else "."))


def _architecture(model: nn.Module) -> str:
    """timm's name of a model's architecture, for messages."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def get_vit_features(
    model: nn.Module,
    x: torch.Tensor,
    indices: Sequence[int],
    return_cls: bool = False,
    output_fmt: str = "NCHW",
) -> Union[List[torch.Tensor], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """Normalised outputs of the given blocks as ``(B, C, H/p, W/p)`` maps (``NLC``: ``(B, N, C)`` tokens).

    With ``return_cls`` also returns each block's CLS token ``(B, C)``; register tokens are dropped.
    ``x`` must be a multiple of the patch size (the models pad before calling this).
    """
    feats = model.forward_intermediates(
        x, indices=list(indices), norm=True, output_fmt=output_fmt, intermediates_only=True,
        return_prefix_tokens=return_cls, stop_early=True,
    )
    if not return_cls:
        return feats
    return [spatial for spatial, _ in feats], [prefix[:, 0] for _, prefix in feats]


class ProgressiveUpsampler(nn.Module):
    """Learned upsampling by a power of two: stride-2 transposed convs, each followed by BN + GELU.

    Channels shrink geometrically from ``in_channels`` to ``out_channels`` so a ViT token map can
    be turned into a fine-resolution feature map without one large, checkerboard-prone step.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int) -> None:
        super().__init__()
        num_stages = int(scale_factor).bit_length() - 1
        if scale_factor < 2 or 2**num_stages != scale_factor:
            raise ValueError(f"scale_factor must be a power of two >= 2, got {scale_factor}")
        ratio = (out_channels / in_channels) ** (1 / num_stages)
        channels = [in_channels] + [max(out_channels, round(in_channels * ratio ** (i + 1))) for i in range(num_stages)]
        channels[-1] = out_channels
        self.stages = nn.Sequential(*(
            nn.Sequential(
                nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2),
                nn.BatchNorm2d(c_out),
                nn.GELU(),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)
