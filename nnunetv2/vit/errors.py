"""Every error of the commands, in one module: the user errors, whose message tells the user what to fix (shown as one
line, exit code 2), and what errors of torch mean (``out_of_memory``).

The model layer's errors are defined in ``nnunetv2.model.errors`` (that layer runs without nnU-Net) and re-exported
here.
"""

from __future__ import annotations

import torch

from nnunetv2.model.errors import BackboneWeightsError, CheckpointReadError, UntrustedCheckpointError

__all__ = ["BackboneWeightsError", "CheckpointReadError", "CheckpointWriteError", "CompileError", "ConfigError",
           "NonFiniteTrainingError", "OutOfMemoryError", "TrainingStopped", "USER_ERRORS", "UntrustedCheckpointError",
           "out_of_memory"]


class ConfigError(ValueError):
    """A config problem, phrased for the user: where it is, what is wrong, how to fix it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, ...); the one before it is untouched."""


class NonFiniteTrainingError(FloatingPointError):
    """Too many training steps in a row had a non-finite loss or gradient; the last good checkpoint is kept."""


class CompileError(RuntimeError):
    """torch.compile failed on the model; training without it (train.compile: false) is the way out."""


class OutOfMemoryError(RuntimeError):
    """Training or validation ran out of memory; smaller batches, checkpointing or LoRA are the way out."""


class TrainingStopped(Exception):
    """Training stopped on a signal (SIGTERM, SIGUSR1: a cluster preempting the job or ending its time) after the
    step it was in, with ``checkpoint_latest.pth`` written: not an error, the command exits with its own code."""


# Errors whose message already tells the user what to fix: shown as one line, exit code 2.
# Only this project's own classes: a built-in error (FileNotFoundError, ...) is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, BackboneWeightsError, NonFiniteTrainingError, CheckpointReadError, CheckpointWriteError,
               CompileError, UntrustedCheckpointError, OutOfMemoryError)

# What the CPU and MPS allocators say when memory runs out: torch raises their failures as a plain RuntimeError
# (CUDA's caching allocator raises torch.OutOfMemoryError). The CPU's verified with torch 2.15 on Linux.
ALLOCATOR_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
                           "MPS backend out of memory")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch running out of memory: ``torch.OutOfMemoryError`` (CUDA; ``torch.cuda.OutOfMemoryError``
    is the same class), or the RuntimeError of the CPU or MPS allocator, which only its text tells apart."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in ALLOCATOR_OUT_OF_MEMORY)
