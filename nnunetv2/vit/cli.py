"""Pieces shared by the commands: dataset lookup, device choice, error exit."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import torch

from nnunetv2.vit.errors import USER_ERRORS, ConfigError


def dataset_name(dataset_name_or_id: str) -> str:
    """Upstream's dataset id/name lookup, with its failure as a user error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(
            dataset_name_or_id if dataset_name_or_id.startswith("Dataset") else int(dataset_name_or_id))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"Dataset '{dataset_name_or_id}' not found: {err}") from err


def usable_cores() -> int:
    """The cores this process may run on (SLURM's --cpus-per-task, taskset, a container's cpuset), not the machine's:
    threads beyond them stall each other at every barrier."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def get_device(name: str) -> torch.device:
    """Upstream's -device handling (one thread per usable core on the CPU, one with CUDA)."""
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"-device must be cpu, cuda or mps, got '{name}'.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("-device cuda was requested but no CUDA GPU is available; pass -device cpu.")
    if name == "cpu":
        torch.set_num_threads(usable_cores())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


USER_ERROR_EXIT_CODE = 2


def run_main(prog: str, main: Callable[[], None]) -> None:
    """Run a command; user errors become one ``prog: error: ...`` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
