"""Checkpoints are data: a file that pickles code is refused with one line unless the user trusts it, for a
backbone checkpoint, --c, -pretrained_weights and prediction; real checkpoint formats load without trust."""

from __future__ import annotations

import argparse
import builtins
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DATASET_ID
from nnunetv2.model.checkpoint_io import UntrustedCheckpointError, read_checkpoint
from nnunetv2.vit import predict as predict_cli
from nnunetv2.vit import train as train_cli
from test_robustness import TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

TINY_TRAIN = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1}


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def poison(checkpoint_file: Path, marker: Path) -> None:
    """Add the payload to a checkpoint file (loaded as data: it is one of ours)."""
    checkpoint = read_checkpoint(checkpoint_file)
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, checkpoint_file)


def test_plain_data_loads_and_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3, blr=[1, 2]),
                "loss": np.float64(0.5), "epoch": np.int64(3), "dice": [np.float32(0.7)]}, plain)
    loaded = read_checkpoint(plain)
    assert loaded["args"].lr == 1e-3 and loaded["loss"] == 0.5
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Payload(marker)}, evil)
    with pytest.raises(UntrustedCheckpointError, match=rf"{evil} holds the Python object 'exec'.*If you trust this "
                                                       rf"file, do so\.$"):
        read_checkpoint(evil, opt_in="do so")
    assert not marker.exists()
    assert read_checkpoint(evil, trust=True)["model"]["w"].sum() == 2
    assert marker.read_text() == "ran"  # the payload works: refusing it above is what kept it from running


@pytest.fixture(scope="module")
def trained_tiny(workspace, tmp_path_factory):
    """One tiny training (1 epoch, checkpoint every epoch) on the session's dataset, shared by this module's tests:
    ``(results folder, config)``. Tests get a copy of the results (``copy_trained``): they poison its checkpoints."""
    root, env, _ = workspace
    folder = tmp_path_factory.mktemp("trained_tiny")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {**TINY_TRAIN, "save_every": 1}}))
    with pytest.MonkeyPatch.context() as patch:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
            patch.setenv(var, env[var])
        patch.setenv("nnUNet_results", str(folder / "results"))
        try:
            train_cli.main([str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu"])
        finally:
            torch.set_num_threads(1)  # as the cpu_command fixture: -device cpu takes every core
    return folder / "results", config


def copy_trained(trained_tiny: tuple, results: Path) -> Path:
    """The shared training's results, copied to ``results`` (this test's nnUNet_results); its config."""
    shutil.copytree(trained_tiny[0], results)
    return trained_tiny[1]


def fold_folder(results: Path) -> Path:
    return results / f"Dataset{DATASET_ID}_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d" / "fold_0"


def test_backbone_checkpoint_with_code_needs_trust(nnunet_env, tmp_path, capsys, cpu_command):
    from timm.models import create_model

    marker = tmp_path / "marker"
    weights = create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0).state_dict()
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": weights, "extra": Payload(marker)}, backbone)
    config = tmp_path / "backbone.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "checkpoint_path": str(backbone)}, "train": TINY_TRAIN}))
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu"],
                        capsys)
    assert code == 2 and "holds the Python object 'exec'" in err and str(backbone) in err
    assert "set model.trust_checkpoint: true in the config" in err and "Traceback" not in err
    assert not marker.exists()


def test_resume_and_pretrained_weights_with_code_need_trust(trained_tiny, nnunet_env, tmp_path, capsys, cpu_command):
    _, _, results = nnunet_env
    marker = tmp_path / "marker"
    config = copy_trained(trained_tiny, results)
    final = fold_folder(results) / "checkpoint_final.pth"
    poison(final, marker)

    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "--val", "-device", "cpu"], capsys)
    assert code == 2 and f"Checkpoint {final} holds the Python object 'exec'" in err
    assert "pass --trust_checkpoint to the command" in err
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu",
                                         "-pretrained_weights", str(final)], capsys)
    assert code == 2 and "-pretrained_weights" in err and "holds the Python object 'exec'" in err
    assert not marker.exists()

    latest = final.with_name("checkpoint_latest.pth")
    final.rename(latest)
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "--c", "-device", "cpu"], capsys)
    assert code == 2 and f"Checkpoint {latest} holds" in err  # never a silent fall back to another checkpoint
    assert not marker.exists()
    train_cli.main([str(DATASET_ID), "2d", "0", "--c", "-device", "cpu", "--trust_checkpoint"])
    assert marker.exists()  # the user's word: loaded as a full pickle


def test_prediction_with_code_in_the_checkpoint_needs_trust(trained_tiny, nnunet_env, tmp_path, capsys, cpu_command):
    _, dataset, results = nnunet_env
    marker = tmp_path / "marker"
    copy_trained(trained_tiny, results)
    poison(fold_folder(results) / "checkpoint_final.pth", marker)
    out = tmp_path / "predictions"
    argv = ["-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
            "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    code, err = run_cli(predict_cli.main, argv, capsys)
    assert code == 2 and "holds the Python object 'exec'" in err and "--trust_checkpoint" in err
    assert not marker.exists() and not out.exists()
    predict_cli.main([*argv, "--trust_checkpoint"])
    assert marker.exists() and len(list(out.glob("*.png"))) == len(list((dataset / "imagesTs").glob("*.png")))
