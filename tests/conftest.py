"""Shared test set-up: offline hub (downloads fail fast), few CPU threads, fixed seeds."""

import os

# Set before timm / huggingface_hub are imported anywhere: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Likewise before nnunetv2 is imported: upstream reads it once, at import (nnunetv2.configuration.
# default_num_processes). Its default, 8, made each in-process training's final validation start 8 export and then 8
# evaluation processes (spawned: fresh Pythons, those given a case importing torch) on 2-core test machines. Commands
# the tests start inherit it.
os.environ.setdefault("nnUNet_def_n_proc", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATASET_ID = 987

# One intra-op thread: the test machines have 2 cores shared with other work, and with the cores
# oversubscribed torch's 2-thread kernels ran 20-30x slower (threads stalling at barriers) than one.
torch.set_num_threads(1)
# Under pytest-xdist, each worker on a core of its own. What its tests start inherits the core, and the commands take
# as many threads as they have cores (cli.usable_cores): one, never two workers' threads on one core.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(os.environ["PYTEST_XDIST_WORKER"][2:]) % len(_cores)]})


def set_nnunet_folders(patch: pytest.MonkeyPatch, raw: Path, preprocessed: Path, results: Path,
                       workers: bool = True) -> None:
    """nnU-Net's three folders for this test and, with ``workers``, the tests' worker counts (no augmentation
    workers, one pool process): the environment the commands need."""
    values = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results}
    if workers:
        values.update(nnUNet_n_proc_DA=0, nnUNet_def_n_proc=1)
    for var, value in values.items():
        patch.setenv(var, str(value))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A raw demo dataset planned and preprocessed by upstream nnU-Net ('2d'), and the environment the commands need.
    Upstream's API, as nnUNetv2_plan_and_preprocess calls it, with one change: the fingerprint samples 10^5 foreground
    intensities per channel, not 10^8, which took 30 s on these 6 images of 96x96 (test_planning runs the command)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess
    from nnunetv2.vit.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
        HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
    )
    dataset = write_demo_dataset(root / "raw", DATASET_ID, num_train=6, num_test=2, size=96, seed=3)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        # Upstream's 2d planner sets torch's threads to nnUNet_n_proc_DA, which must not be 0 there.
        set_nnunet_folders(patch, root / "raw", root / "preprocessed", root / "results", workers=False)
        fingerprint = DatasetFingerprintExtractor(DATASET_ID, num_processes=1)
        fingerprint.num_foreground_voxels_for_intensitystats = 10 ** 5
        fingerprint.run()
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=("2d",), num_processes=(1,))
    return root, env, dataset


@pytest.fixture
def nnunet_env(workspace, tmp_path, monkeypatch):
    """The session's preprocessed dataset, with a fresh results folder per test."""
    root, _, dataset = workspace
    set_nnunet_folders(monkeypatch, root / "raw", root / "preprocessed", tmp_path / "results")
    return root, dataset, tmp_path / "results"


@pytest.fixture(scope="session")
def planned_vit(workspace, tmp_path_factory):
    """'2d_vit' planned and preprocessed by nnUNetv2_plan_vit.py for test_planning's tiny model, then trained on fold 0,
    on a copy of the session's dataset; done once for the tests that check this workflow (test_planning) and those
    that run upstream's commands on its result (test_upstream_commands). Use it through ``planned_vit_copy``.
    Holds the raw and preprocessed dataset folders, the results folder, the config, and what planning and training
    printed (``plan_out``, ``train_out``)."""
    from nnunetv2.vit import plan as plan_cli
    from nnunetv2.vit import train as train_cli
    from test_planning import write_config

    root, _, dataset = workspace
    base = tmp_path_factory.mktemp("planned_vit")
    raw, preprocessed, results = base / "raw" / dataset.name, base / "preprocessed" / dataset.name, base / "results"
    shutil.copytree(dataset, raw)
    shutil.copytree(root / "preprocessed" / dataset.name, preprocessed)
    config = write_config(base / "vit.yaml")
    plan_out, train_out = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        set_nnunet_folders(patch, raw.parent, preprocessed.parent, results)
        try:
            with contextlib.redirect_stdout(plan_out):
                plan_cli.main([str(DATASET_ID), "--config", config, "-c", "2d_vit", "-np", "1"])
            with contextlib.redirect_stdout(train_out):
                train_cli.main([str(DATASET_ID), "2d_vit", "0", "--config", config, "-device", "cpu"])
        finally:
            torch.set_num_threads(1)  # as cpu_command: -device cpu takes every core
    return SimpleNamespace(raw=raw, preprocessed=preprocessed, results=results, config=config,
                           plan_out=plan_out.getvalue(), train_out=train_out.getvalue())


@pytest.fixture
def planned_vit_copy(planned_vit, tmp_path, monkeypatch):
    """A copy of ``planned_vit``'s raw and preprocessed dataset and results, set as nnU-Net's folders for this test:
    (raw dataset folder, preprocessed dataset folder, results)."""
    raw, preprocessed, results = (tmp_path / "raw" / planned_vit.raw.name,
                                  tmp_path / "preprocessed" / planned_vit.preprocessed.name, tmp_path / "results")
    for source, copy in ((planned_vit.raw, raw), (planned_vit.preprocessed, preprocessed),
                         (planned_vit.results, results)):
        shutil.copytree(source, copy)
    set_nnunet_folders(monkeypatch, raw.parent, preprocessed.parent, results)
    return raw, preprocessed, results


@pytest.fixture
def cpu_command():
    """For tests that run a command in-process with -device cpu, which takes every core: give them back."""
    yield
    torch.set_num_threads(1)
