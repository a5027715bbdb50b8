"""Checkpoint files read as data: nothing in a file runs code unless the user trusts that file.

``torch.load(weights_only=False)`` unpickles whatever a file holds, and an unpickled object can run any
code; backbone weights come from the internet and trained models from colleagues or model zoos.
``read_checkpoint`` loads with ``weights_only=True`` (tensors, containers, numbers, strings) plus the
few plain objects that real checkpoints hold (``SAFE_GLOBALS``). Anything else is refused with an
error naming the file, the object and how to opt in for a trusted file; the opt-in is logged.
``.safetensors`` files (tensors only, by construction) are read with the ``safetensors`` package, also from
the folder transformers' ``save_pretrained`` / ``hf download`` writes (``model.safetensors`` or its shards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, List, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from nnunetv2.model.errors import CheckpointReadError, UntrustedCheckpointError

_logger = logging.getLogger(__name__)


def _numpy_globals() -> List[Any]:
    """numpy scalars and dtypes, under the module names numpy 1 (``numpy.core``) and 2 (``numpy._core``) pickle."""
    try:
        from numpy._core.multiarray import scalar  # numpy 2
    except ImportError:
        from numpy.core.multiarray import scalar  # numpy 1
    dtypes = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


# What real checkpoints hold besides tensors and plain containers, and where each comes from:
SAFE_GLOBALS: List[Any] = [
    # RETFound (MAE's save_model) and VisionFM (DINO / iBOT's save_on_master) store their training arguments.
    argparse.Namespace,
    # nnU-Net's checkpoints: its logger records losses and Dice as numpy floats ("logging", "_best_ema").
    *_numpy_globals(),
]


def read_checkpoint(path: Union[str, Path], trust: bool = False, opt_in: str = "", mmap: bool = False) -> Any:
    """Load a checkpoint on the CPU as data; with ``trust`` (the user's word for this file) as a full pickle.

    ``opt_in`` tells the user how to trust the file (e.g. "set model.trust_checkpoint: true"). Raises
    ``UntrustedCheckpointError`` or ``CheckpointReadError`` with one-line messages naming the file
    (``FileNotFoundError`` for a file that is not there).
    A folder is read as transformers writes one; a safetensors file (told by its header, not its name) holds only
    tensors, so ``trust`` and ``mmap`` do not apply to it.
    """
    path = Path(path)
    if path.is_dir():
        return _read_transformers_folder(path)
    if _is_safetensors(path):
        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError) as err:  # a broken header or data, or the file system's failure
            raise _corrupt(path, err) from err
    if trust:
        _logger.warning("Loading %s as a full pickle (trusted by the user): it can run code.", path)
    try:
        with contextlib.nullcontext() if trust else torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as err:
        if trust:
            raise _corrupt(path, err) from err
        fix = f"If you trust this file, {opt_in or 'load it with trust'}."
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UntrustedCheckpointError(
                f"Checkpoint {path} holds the Python object '{unsafe[0].removeprefix('builtins.')}', which is not "
                f"plain data: loading it could run code. {fix}") from None
        if not zipfile.is_zipfile(path):  # torch lists the objects of its zip format only
            raise CheckpointReadError(
                f"Checkpoint {path} is not in torch's zip format (written by torch < 1.6, or no checkpoint) and does "
                f"not load as plain data: it holds other objects or is corrupt. {fix}") from None
        raise _corrupt(path, err) from err
    except FileNotFoundError:
        raise
    except OSError as err:  # permissions, a vanished share: the system's own words
        raise CheckpointReadError(f"Cannot read checkpoint {path}: {err}") from err
    # Any other failure means the same, that the bytes are no checkpoint: unpickling garbage raises whatever the
    # bytes happen to trigger (EOFError, IndexError, KeyError, RuntimeError of the zip reader, ...), and a trusted
    # file runs its own code, which may raise anything.
    except Exception as err:
        raise _corrupt(path, err) from err


def _unsafe_globals(path: Path) -> List[str]:
    """The objects beyond ``SAFE_GLOBALS`` a checkpoint's pickle names (``module.name``), as torch lists them;
    none for a file torch cannot list (the legacy format of torch < 1.6, or garbage)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, pickle.UnpicklingError, OSError):
        return []


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of a JSON header, then the header."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False  # torch.load reports it, as for any file
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_transformers_folder(path: Path) -> dict:
    """The weights of a folder written by ``save_pretrained`` / ``hf download``: one file or shards and their index."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return read_checkpoint(single)
    if not index.is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(
            f"Checkpoint folder {path} holds no model.safetensors (nor model.safetensors.index.json); it holds "
            f"{found or 'nothing'}. Give the folder transformers wrote (hf download / save_pretrained) or the "
            f"weights file itself.")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupt(index, err) from err
    state_dict = {}
    for shard in shards:
        state_dict.update(read_checkpoint(path / shard))
    return state_dict


def _corrupt(path: Union[str, Path], err: Exception) -> CheckpointReadError:
    """The one-line error for a file that is no checkpoint, with the reader's reason."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return CheckpointReadError(f"Cannot read checkpoint {path}: {reason}. The file is corrupt or truncated.")
