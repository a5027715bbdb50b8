"""GPU memory of a training step as a function of the batch size: the memory model behind planned batch sizes.

A training step holds
- per parameter: its fp32 value, and for trainable ones the gradient and the optimizer's state (AdamW: two
  tensors, SGD: one momentum buffer), so 16 bytes per trainable and 4 per frozen parameter with AdamW;
- the tensors autograd saves for the backward pass: activations, which grow with the batch, and per-step
  ones such as the 16-bit copies of the weights under autocast.

The second part is counted, not estimated: the model is built on the meta device, its tensors are replaced by
fake tensors (shapes and dtypes only, no memory, no compute), it runs a forward pass under the training
precision, and every tensor autograd saves is added up, for two batch sizes. The difference gives the bytes per
image, the rest the per-step part. This follows the model as configured: backbone size, decoder and its
options, LoRA (frozen parameters), a frozen backbone (``freeze_backbone``: it runs without autograd, so it saves
nothing and its parameters count 4 bytes each), gradient checkpointing (recomputed blocks save nothing), precision.

Calibration, against peaks measured with ``torch.cuda.max_memory_allocated`` on an H200 (512x512 unless noted,
batch 4, bf16, AdamW; ``benchmarks/memory_model.py`` prints the model's figures for these rows):

| model (ViT-L/16 DINOv3 DPT) | measured GiB | modelled GiB |
|---|---:|---:|
| seed neck ``[E]*4``, fused AdamW | 10.8 | 11.9 |
| seed neck, fp32 | 16.1 | 17.6 |
| neck ``[E/4, E/2, E, E]`` | 11.7 | 11.4 |
| seed neck, LoRA r8 on qkv | 7.4 | 7.4 |
| neck ``[E/4..]``, 1024x1024, batch 3 | 22.0, 23.5 | 22.7 |
| same, gradient checkpointing | 10.1, 11.6 | 10.3 |

The measured peaks are 0.91 to 1.13 times the modelled ones; no correction factor is applied. The model
leaves out what ``max_memory_allocated`` does not see either (the CUDA context, about 0.5 GiB, and the
allocator's cached blocks), which nnU-Net's memory target leaves out as well.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # fp32 tensors of optimizer state per trainable parameter
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Two batch sizes to count at. Not 1: BatchNorm refuses a batch of one on a 1x1 map (UperNet's pooling).
_COUNTED_BATCHES = (2, 4)


@dataclass(frozen=True)
class TrainingMemory:
    """Peak bytes of a training step: ``fixed_bytes + batch_size * per_image_bytes``."""

    fixed_bytes: int  # parameters, gradients, optimizer state, tensors saved once per step
    per_image_bytes: int  # activations saved for the backward pass, per image

    def peak_bytes(self, batch_size: int) -> int:
        return self.fixed_bytes + batch_size * self.per_image_bytes

    def largest_batch(self, budget_bytes: float) -> int:
        """The largest batch whose peak fits ``budget_bytes`` (0 if not even one image fits)."""
        return max(0, math.floor((budget_bytes - self.fixed_bytes) / self.per_image_bytes))


def _swap_in_fake_tensors(model: nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of a meta-device model by a fake CPU tensor of its shape and dtype.

    CPU, whatever the caller's default device: its kernels save what CUDA's save (e.g. flash attention keeps
    O(tokens), where the meta device's reference attention would keep the full attention matrix)."""
    with mode:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="cpu"),
                                                            requires_grad=param.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")


def _saved_bytes(model: nn.Module, mode: FakeTensorMode, shape: Sequence[int], autocast_dtype) -> int:
    """Bytes of the distinct storages autograd saves in one training forward pass of an input of ``shape``."""
    seen = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = StorageWeakRef(tensor.untyped_storage())
        if storage not in seen:
            seen.add(storage)
            total += tensor.untyped_storage().nbytes()
        return tensor

    precision = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), precision:
        model(torch.empty(*shape, device="cpu"))
    return total


def training_memory(build: Callable[[], nn.Module], in_channels: int, patch_size: Sequence[int],
                    precision: str = "bf16", optimizer: str = "adamw",
                    gradient_checkpointing: bool = False) -> TrainingMemory:
    """The memory model of a training step of the network ``build()`` makes, at ``patch_size``.

    ``build`` is called under the meta device (no weights, no download). ``precision`` is the autocast dtype
    (fp32, bf16, fp16), ``optimizer`` adamw or sgd, ``gradient_checkpointing`` as ``train.gradient_checkpointing``.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    with torch.device("meta"):
        model = build()
    if gradient_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _swap_in_fake_tensors(model, mode)
    small, large = _COUNTED_BATCHES
    saved = [_saved_bytes(model, mode, (batch, in_channels, *patch_size), AUTOCAST_DTYPES[precision])
             for batch in _COUNTED_BATCHES]
    per_image = max(1, (saved[1] - saved[0]) // (large - small))
    per_step = max(0, saved[0] - small * per_image)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    parameter_bytes = 4 * (frozen + trainable * (2 + OPTIMIZER_STATES[optimizer]))
    return TrainingMemory(fixed_bytes=parameter_bytes + per_step, per_image_bytes=per_image)
