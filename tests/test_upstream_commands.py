"""Upstream's own commands find nnUNetTrainer_vit and this repository's normalization in this environment, with no
PYTHONPATH or nnUNet_extTrainer: the command nnUNetv2_find_best_configuration prints for our model runs as printed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATASET_ID

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def plain_environment(results: Path) -> dict:
    """What a user's shell has: the environment's bin on PATH and nnU-Net's three folders, nothing of ours."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "nnUNet_extTrainer") and not key.startswith("NNUNET_VIT")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", nnUNet_results=str(results))
    return env


def run(command: list, env: dict, cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_upstream_commands_find_our_trainer_and_normalization_the_printed_predict_command_runs(
        planned_vit_copy, tmp_path):
    """A configuration planned with backbone normalization: upstream's prediction workers must find the scheme.
    (conftest's planned_vit: test_planning's tiny model planned as '2d_vit' and trained on fold 0.)"""
    raw, _, results = planned_vit_copy

    env = plain_environment(results)
    printed = run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d_vit", "-tr", "nnUNetTrainer_vit",
                   "-f", "0", "-np", "1"], env, cwd=tmp_path)
    commands = [line for line in printed.splitlines() if line.startswith("nnUNetv2_predict ")]
    assert len(commands) == 1 and "-tr nnUNetTrainer_vit -c 2d_vit -p nnUNetPlans" in commands[0], printed

    out = tmp_path / "predictions"
    places = {"INPUT_FOLDER": str(raw / "imagesTs"), "OUTPUT_FOLDER": str(out)}
    # As printed, its folders filled in; on this machine's CPU (upstream's default device is cuda), light.
    command = [places.get(word, word) for word in shlex.split(commands[0])]
    run([*command, "-device", "cpu", "-npp", "1", "-nps", "1"], env, cwd=tmp_path)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").glob("*.png"))
