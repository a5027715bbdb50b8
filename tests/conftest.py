"""Shared test set-up: offline hub (downloads fail fast), few CPU threads, fixed seeds."""

import os

# Set before timm / huggingface_hub are imported anywhere: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Likewise before nnunetv2 is imported: upstream reads it once, at import (nnunetv2.configuration.
# default_num_processes). Its default, 8, made each in-process training's final validation spawn 8 export and then 8
# evaluation processes, each importing torch, on 2-core test machines; commands the tests start get it too.
os.environ.setdefault("nnUNet_def_n_proc", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATASET_ID = 987

# One intra-op thread: the test machines have 2 cores shared with other work, and with the cores
# oversubscribed torch's 2-thread kernels ran 20-30x slower (threads stalling at barriers) than one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A raw demo dataset preprocessed by upstream nnU-Net, and the environment the commands need."""
    from nnunetv2.vit.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
        HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
    )
    dataset = write_demo_dataset(root / "raw", DATASET_ID, num_train=6, num_test=2, size=96, seed=3)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
         "-np", "1", "-npfp", "1"],
        env=dict(env, nnUNet_n_proc_DA="1"), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, env, dataset


@pytest.fixture
def nnunet_env(workspace, tmp_path, monkeypatch):
    """The session's preprocessed dataset, with a fresh results folder per test."""
    root, env, dataset = workspace
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(var, env[var])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return root, dataset, tmp_path / "results"


@pytest.fixture
def cpu_command():
    """For tests that run a command in-process with -device cpu, which takes every core: give them back."""
    yield
    torch.set_num_threads(1)
