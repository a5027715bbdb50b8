"""The optimizer of a ViT training: parameter groups (layer-wise lr decay, no weight decay on norms and tokens),
AdamW or nnU-Net's SGD, and nnU-Net's schedules scaled per group. Used by ``nnUNetTrainer_vit.configure_optimizers``.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from nnunetv2.model.common import ViTSegmentationModel
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.vit.config import TrainSection

# timm's ViT/Eva group_matcher puts cls_token, pos_embed and patch_embed in the stem (layer 0), not reg_token.
STEM_EXTRA = ("reg_token",)
# timm's no_weight_decay() names cls_token and pos_embed; the register tokens are 3-D, so the 1-D rule misses them.
NO_WEIGHT_DECAY_EXTRA = ("reg_token",)


def parameter_groups(model: ViTSegmentationModel, train: TrainSection) -> List[dict]:
    """The optimizer's parameter groups, each with a ``name``, its ``lr_scale`` (peak lr = initial_lr x lr_scale)
    and ``weight_decay``; trainable parameters only, the decoder's groups first (upstream logs group 0's lr).

    Layer-wise decay as BEiT and RETFound (``lr_decay.py``) do it: with ``d`` blocks, the stem (patch embedding,
    class/register tokens, position embedding) is layer 0, block ``i`` layer ``i + 1`` (timm's ``group_matcher``,
    which adds the final norm to the last block), the decoder layer ``d + 1``; a backbone layer's scale is
    ``backbone_lr_scale * layer_decay ** (d + 1 - layer)``, the decoder's and detail path's 1. LoRA adapters are in
    their block's layer. Not timm's ``param_groups_layer_decay``: it counts layers up to the highest id it finds, so
    the unmatched reg_token (dinov3) becomes a top layer of its own and shifts every scale by one power, and the last
    block gets scale 1 where BEiT gives it ``layer_decay``. Weight decay as timm's ``param_groups_weight_decay``
    (unless ``decay_norms_and_biases``): none on 1-D parameters (norms, biases, layer scales), ``no_weight_decay()``
    (position embedding, class token) and register tokens. Groups with the same rate and decay are merged, so a
    config without these options trains with one or two groups."""
    from timm.models import group_parameters

    vit = model.vit
    depth = len(vit.blocks)
    layer_of = group_parameters(vit, vit.group_matcher(coarse=False), reverse=True)
    no_decay = set(getattr(vit, "no_weight_decay", set)()) | set(NO_WEIGHT_DECAY_EXTRA)
    backbone_names = {id(param): name for name, param in vit.named_parameters()}

    merged: Dict[tuple, dict] = {}
    # The decoder's parameters first: named_parameters lists the backbone first, so take them in two passes.
    ordered = [(n, p) for n, p in model.named_parameters() if id(p) not in backbone_names]
    ordered += [(backbone_names[id(p)], p) for p in vit.parameters()]
    for name, param in ordered:
        if not param.requires_grad:
            continue
        if id(param) in backbone_names:
            layer = 0 if name in STEM_EXTRA else layer_of.get(name, depth)
            part = "backbone" if train.layer_decay == 1 else f"backbone layer {layer}"
            scale = train.backbone_lr_scale * train.layer_decay ** (depth + 1 - layer)
            decayed = train.decay_norms_and_biases or not (param.ndim <= 1 or name in no_decay)
        else:
            part, scale = "decoder", 1.0
            decayed = train.decay_norms_and_biases or not (param.ndim <= 1 or name.endswith(".bias"))
        weight_decay = train.weight_decay if decayed else 0.0
        group = merged.setdefault((scale, weight_decay), {"name": part, "params": [], "lr_scale": scale,
                                                          "weight_decay": weight_decay})
        if part not in group["name"].split(" + "):
            group["name"] += f" + {part}"
        group["params"].append(param)
    return list(merged.values())


def describe_parameter_groups(optimizer: torch.optim.Optimizer, initial_lr: float) -> str:
    """One line per parameter group: its parameters, peak learning rate and weight decay."""
    lines = [f"{len(optimizer.param_groups)} parameter groups (peak lr = initial_lr {initial_lr:g} x lr_scale):"]
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        lines.append(f"  group {i} ({group.get('name', 'all')}): {count:,} parameters, peak lr "
                     f"{initial_lr * group.get('lr_scale', 1.0):.3g}, weight decay {group['weight_decay']:g}")
    return "\n".join(lines)


def build_optimizer(model: ViTSegmentationModel, train: TrainSection, lr: float, weight_decay: float,
                    fused: bool) -> torch.optim.Optimizer:
    """AdamW with the betas of upstream's Primus trainers, or upstream's SGD, over ``parameter_groups``: frozen
    parameters get no state. ``fused``: one kernel for all parameters, which also skips a step on the device when
    ``torch.amp.GradScaler`` found non-finite gradients."""
    groups = parameter_groups(model, train)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr, weight_decay=weight_decay, betas=(0.9, 0.98), fused=fused)
    optimizer = torch.optim.SGD(groups, lr, weight_decay=weight_decay, momentum=0.99, nesterov=True, fused=fused)
    # torch's fused SGD allocates its momentum buffers uninitialised (empty_like) in its first step and leaves them so
    # if that step is skipped (found_inf): start them at zero, where a first step's momentum starts (dampening 0), so
    # a skipped first step cannot leave garbage behind.
    for group in groups:
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


class WarmupPolyLRScheduler:
    """Linear warm-up to the peak for ``warmup_steps`` epochs, then nnU-Net's poly decay: upstream's schedulers
    give the factor (they set one lr for every group), and each group gets it times its own ``lr_scale``, kept in
    the optimizer's groups so a resumed optimizer (``--c``) brings its peaks back."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.warmup = Lin_incr_LRScheduler(optimizer, initial_lr, warmup_steps) if warmup_steps else None
        self.decay = (
            PolyLRScheduler_offset(optimizer, initial_lr, max_steps, warmup_steps)
            if warmup_steps
            else PolyLRScheduler(optimizer, initial_lr, max_steps)
        )
        self.step(0)

    def step(self, current_step: int) -> None:
        in_warmup = self.warmup is not None and current_step < self.warmup.max_steps
        (self.warmup if in_warmup else self.decay).step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
