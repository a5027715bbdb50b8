"""A kill -9 of prediction or of the planner mid-way leaves none of their processes behind (forked and spawned
workers, multiprocessing's helpers): they lived on for minutes, still writing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Set

import pytest
import yaml

from conftest import DATASET_ID, REPO
from test_robustness import _write_results_folder, make_trainer

pytestmark = pytest.mark.slow

GRACE_S = 10  # what "ends with the command" allows


def process_table() -> Dict[int, tuple]:
    """pid -> (parent pid, state) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> Set[int]:
    table = process_table()
    found, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        children = [child for child, (ppid, _) in table.items() if ppid == parent]
        found.update(children)
        pending.extend(children)
    return found


def alive(pids: Set[int]) -> Dict[int, str]:
    """The still running ones (zombies are gone), with their command lines."""
    running = {}
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state != "Z":
            running[pid] = command
    return running


def kill_midway_and_check(argv: list, env: dict, started: Callable[[], bool], timeout_s: float = 240,
                          killed: Callable[[], None] = lambda: None, grace_s: float = GRACE_S) -> Set[int]:
    """Run a command, collecting its process tree until ``started()``; kill -9 it then (and call ``killed()``),
    and assert that every process of its tree has ended ``grace_s`` later. Returns the processes seen."""
    command = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: Set[int] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while not started():
            assert command.poll() is None, f"exited {command.returncode} before the kill: " \
                                           f"{command.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the command did not get far enough to be killed mid-way"
            seen |= descendants(command.pid)
            time.sleep(0.05)
        seen |= descendants(command.pid)
    finally:
        command.kill()
        command.wait()
    killed()
    deadline = time.monotonic() + grace_s
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(seen)
    for pid in left:  # do not leave them to the next test
        os.kill(pid, 9)
    assert not left, f"still running {grace_s} s after kill -9 of the command: {left}"
    return seen


def test_killed_prediction_leaves_no_process(nnunet_env, tmp_path):
    _, dataset, _ = nnunet_env
    _write_results_folder(make_trainer())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    images = sorted((dataset / "imagesTs").glob("*_0000.png"))
    for case in range(20):
        shutil.copy(images[case % len(images)], inputs / f"case{case:02d}_0000.png")
    out = tmp_path / "predictions"
    argv = [sys.executable, "nnUNetv2_predict_vit.py", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID),
            "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    seen = kill_midway_and_check(argv, dict(os.environ, PYTHONPATH=str(REPO)),
                                 lambda: any(out.glob("*.png")))
    assert len(seen) >= 3  # upstream's manager (forked), preprocessing and export workers (spawned)
    assert len(list(out.glob("*.png"))) < 20


def test_killed_planner_leaves_no_process_and_preprocesses_no_further(nnunet_env, tmp_path):
    root, dataset, _ = nnunet_env
    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    shutil.copytree(dataset, raw / dataset.name)
    shutil.copytree(root / "preprocessed" / dataset.name, preprocessed / dataset.name)
    # Enough cases that preprocessing them with one worker takes well over GRACE_S.
    images, labels = raw / dataset.name / "imagesTr", raw / dataset.name / "labelsTr"
    originals = sorted(labels.glob("*.png"))
    for copy in range(300):
        label = originals[copy % len(originals)]
        shutil.copy(label, labels / f"copy{copy:03d}.png")
        shutil.copy(images / f"{label.stem}_0000.png", images / f"copy{copy:03d}_0000.png")
    for folder in (raw / dataset.name, preprocessed / dataset.name):
        dataset_json = json.loads((folder / "dataset.json").read_text())
        dataset_json["numTraining"] = len(list(labels.glob("*.png")))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    config = tmp_path / "vit.yaml"  # backbone normalization: its own preprocessed data
    config.write_text(yaml.safe_dump({"model": {
        "model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3", "backbone_size": "small",
        "pretrained": False, "normalization": "backbone",
        "decoder": {"fusion_hidden_size": 16, "neck_hidden_sizes": [16, 16, 16, 16]}}}))
    argv = [sys.executable, "nnUNetv2_plan_vit.py", str(DATASET_ID), "--config", str(config), "-c", "2d_vit",
            "-np", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed))

    def written() -> int:
        return len(list(preprocessed.glob(f"{dataset.name}/nnUNetPlans_2d_backbone_*/*.pkl")))

    at_kill = []
    # Its worker, left alone, sometimes ended by itself within 10 s, sometimes ran for over a minute; ended with
    # the command, it is gone at once.
    kill_midway_and_check(argv, env, lambda: written() > 0, killed=lambda: at_kill.append(written()), grace_s=3)
    # Its worker used to go on with the cases already handed to it (a dozen here) for seconds.
    assert written() <= at_kill[0] + 1 < len(originals) + 300


@pytest.mark.parametrize("script", sorted(REPO.glob("nnUNetv2_*_vit.py")), ids=lambda path: path.name)
def test_spawned_workers_do_not_import_the_command_again(script):
    """Upstream's worker pools (validation export, metrics, prediction) spawn their processes, and each runs the
    command's script again as ``__mp_main__``: there it imports nothing (the ViT stack cost seconds per worker)."""
    code = (f"import runpy, sys; runpy.run_path({str(script)!r}, run_name='__mp_main__'); "
            f"print(sorted(name for name in sys.modules if name.startswith(('nnunetv2', 'torch'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout[-2000:] + result.stderr[-2000:]
