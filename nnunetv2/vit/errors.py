"""Errors whose message tells the user what to fix; the commands show them as one line, exit code 2."""


class ConfigError(ValueError):
    """A config problem, phrased for the user: where it is, what is wrong, how to fix it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, ...); the one before it is untouched."""


class CheckpointReadError(RuntimeError):
    """An nnU-Net checkpoint file cannot be read: missing, corrupt or truncated."""


class NonFiniteTrainingError(FloatingPointError):
    """Too many training steps in a row had a non-finite loss or gradient; the last good checkpoint is kept."""


class CompileError(RuntimeError):
    """torch.compile failed on the model; training without it (train.compile: false) is the way out."""


class OutOfMemoryError(RuntimeError):
    """Training or validation ran out of memory; smaller batches, checkpointing or LoRA are the way out."""


class TrainingStopped(Exception):
    """Training stopped on a signal (SIGTERM, SIGUSR1: a cluster preempting the job or ending its time) after the
    step it was in, with ``checkpoint_latest.pth`` written: not an error, the command exits with its own code."""
