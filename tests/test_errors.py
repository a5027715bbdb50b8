"""Errors told apart by type: torch's out of memory, the system's OSError of a checkpoint write (test_robustness.py),
the hub's errors of a download, a checkpoint's objects as torch lists them."""

from __future__ import annotations

import argparse
import builtins
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch

from nnunetv2.model.backbone import create_backbone
from nnunetv2.model.checkpoint_io import read_checkpoint
from nnunetv2.vit import errors
from nnunetv2.vit.train import WORKERS_DIED, out_of_memory_is_one_line

FAKE_TRAINER = SimpleNamespace(device=torch.device("cuda"), batch_size=8,
                               configuration_manager=SimpleNamespace(patch_size=(512, 512)))


def fake_step(error: BaseException) -> None:
    """A training step that fails as ``error``."""
    raise error


def test_out_of_memory_is_told_by_its_type():
    with pytest.raises(errors.OutOfMemoryError) as err:
        with out_of_memory_is_one_line(FAKE_TRAINER):
            fake_step(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."))
    message = str(err.value)
    assert message.startswith("Out of cuda memory at batch size 8 of 512x512 patches: lower train.batch_size")
    assert "resume with --c" in message and "\n" not in message
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # so CUDA's is caught by the same type


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 4611686018427387904 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 7.64 GiB, other allocations: 68.91 GiB). Tried to "
                 "allocate 33.92 GiB on private pool."),
])
def test_allocators_without_a_type_of_their_own_are_out_of_memory_too(error):
    """torch raises the CPU allocator's failure as a plain RuntimeError (torch 2.15, checked below), MPS's too."""
    assert errors.out_of_memory(error)
    with pytest.raises(RuntimeError) as real:
        torch.empty(2 ** 62, dtype=torch.uint8)
    assert type(real.value) is RuntimeError and errors.out_of_memory(real.value)


def test_other_errors_pass_unchanged():
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    with pytest.raises(RuntimeError) as err:
        with out_of_memory_is_one_line(FAKE_TRAINER):
            fake_step(bug)
    assert err.value is bug and not errors.out_of_memory(bug)
    with pytest.raises(errors.OutOfMemoryError, match="data-augmentation workers died"):
        with out_of_memory_is_one_line(FAKE_TRAINER):
            fake_step(RuntimeError(f"One or more {WORKERS_DIED}. Exiting."))


def test_every_user_error_is_in_the_errors_module():
    from nnunetv2.model import errors as model_errors

    for name in ("BackboneWeightsError", "CheckpointReadError", "UntrustedCheckpointError"):
        assert getattr(errors, name) is getattr(model_errors, name) and getattr(errors, name) in errors.USER_ERRORS


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1, or no network at all) timm's download raises huggingface_hub's
    LocalEntryNotFoundError, an OSError, as every hub error is."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(errors.BackboneWeightsError) as err:
        create_backbone("dinov3", "small", pretrained=True)
    message = str(err.value)
    assert message.startswith("Could not download pretrained weights for 'vit_small_patch16_dinov3.lvd1689m' "
                              "(LocalEntryNotFoundError: ")
    assert "set model.checkpoint_path" in message and "model.pretrained: false" in message and "\n" not in message


class Payload:
    """Unpickling this runs ``exec``."""

    def __reduce__(self):
        return builtins.exec, ("pass",)


def test_objects_of_a_checkpoint_are_named_as_torch_lists_them(tmp_path: Path):
    zipped, legacy = tmp_path / "zipped.pth", tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(), "run": Payload()}, zipped)
    torch.save({"w": torch.ones(1), "run": Payload()}, legacy, _use_new_zipfile_serialization=False)
    untrusted = rf"^Checkpoint {zipped} holds the Python object 'exec', which is not plain data.*If you trust this file"
    with pytest.raises(errors.UntrustedCheckpointError, match=untrusted):
        read_checkpoint(zipped, opt_in="ok")
    unknown = rf"^Checkpoint {legacy} is not in torch's zip format .* holds other objects or is corrupt\. If you trust"
    with pytest.raises(errors.CheckpointReadError, match=unknown):
        read_checkpoint(legacy, opt_in="ok")
    assert read_checkpoint(legacy, trust=True)["w"].sum() == 1
