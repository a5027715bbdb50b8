"""Pieces shared by the train and predict commands: dataset lookup, device choice, error exit, worker lifetime."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Optional

import torch

from nnunetv2.model.backbone import BackboneWeightsError
from nnunetv2.model.checkpoint_io import UntrustedCheckpointError
from nnunetv2.vit.errors import (
    CheckpointReadError, CheckpointWriteError, CompileError, ConfigError, NonFiniteTrainingError, OutOfMemoryError,
)

# Errors whose message already tells the user what to fix: shown as one line, exit code 2.
# Only this project's own classes: a built-in error (FileNotFoundError, ...) is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, BackboneWeightsError, NonFiniteTrainingError, CheckpointReadError, CheckpointWriteError,
               CompileError, UntrustedCheckpointError, OutOfMemoryError)


def dataset_name(dataset_name_or_id: str) -> str:
    """Upstream's dataset id/name lookup, with its failure as a user error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(
            dataset_name_or_id if dataset_name_or_id.startswith("Dataset") else int(dataset_name_or_id))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"Dataset '{dataset_name_or_id}' not found: {err}") from err


def get_device(name: str) -> torch.device:
    """Upstream's -device handling: thread settings as nnUNetv2_train/predict make them."""
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"-device must be cpu, cuda or mps, got '{name}'.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("-device cuda was requested but no CUDA GPU is available; pass -device cpu.")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


USER_ERROR_EXIT_CODE = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_fork_hook_registered = False


def end_forked_workers_with_this_process() -> None:
    """Make every process this one forks from its main thread (nnU-Net's data-augmentation workers) end when this
    process dies: after a ``kill -9`` of a training, no worker lives on holding memory (Linux only). This process
    itself may outlive its parent (a training started with nohup from a shell that closed)."""
    global _fork_hook_registered
    if not sys.platform.startswith("linux") or _fork_hook_registered:
        return
    _fork_hook_registered = True
    main_thread = threading.main_thread().ident
    forked_from_main = []

    def before_fork() -> None:
        forked_from_main[:] = [threading.get_ident() == main_thread, os.getpid()]

    def in_child() -> None:
        # The signal follows the forking *thread*: only a fork from the main thread lives as long as its process.
        if forked_from_main and forked_from_main[0]:
            _set_parent_death_signal(parent=forked_from_main[1])

    os.register_at_fork(before=before_fork, after_in_child=in_child)


def die_with_parent() -> None:
    """For helper processes (DDP workers): end when the process that started them dies, and so do their workers."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
        end_forked_workers_with_this_process()


def _set_parent_death_signal(parent: Optional[int] = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def exit_with_user_error(prog: str, message: str) -> None:
    """Print ``prog: error: message`` and exit with the user-error code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def run_main(prog: str, main: Callable[[], None]) -> None:
    """Run a command; user errors become one ``prog: error: ...`` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except USER_ERRORS as err:
        exit_with_user_error(prog, str(err))
