"""Training on several machines: torchrun with two "nodes" of one CPU process each (gloo, a c10d rendezvous on
localhost), stopped by SIGTERM and resumed, a killed process with and without torchrun restarts, and the batch
size per process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DATASET_ID, REPO
from test_robustness import TINY_MODEL, make_trainer

pytestmark = pytest.mark.slow

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TRAINER = "nnUNetTrainer_vit_probe"

# A trainer that records, per process, what the tests compare, and acts on PROBE_ACTION in process PROBE_RANK at the
# first step of epoch 1 of the first start (a SIGTERM to itself, or a SIGKILL as a crash would end it).
PROBE = '''
import hashlib
import json
import os
import signal
import time

from nnunetv2.vit.trainer import nnUNetTrainer_vit


def digest(tensors):
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


class nnUNetTrainer_vit_probe(nnUNetTrainer_vit):
    def train_step(self, batch):
        record = os.path.join(os.environ["PROBE_DIR"], f"batch_rank{self.local_rank}.txt")
        if not os.path.exists(record):
            with open(record, "w") as f:
                f.write(digest([batch["data"]]))
        action = os.environ.get("PROBE_ACTION")
        if action and self.local_rank == int(os.environ["PROBE_RANK"]) and self.current_epoch == 1 \\
                and self.steps_this_epoch == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            with open(os.path.join(os.environ["PROBE_DIR"], "signalled_at"), "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGKILL)
        return super().train_step(batch)

    def on_train_end(self):
        super().on_train_end()
        with open(os.path.join(os.environ["PROBE_DIR"], f"weights_rank{self.local_rank}.json"), "w") as f:
            json.dump({"epoch": self.current_epoch, "weights": digest(self.model.state_dict().values())}, f)
'''


@pytest.fixture
def two_nodes(nnunet_env, tmp_path):
    """``start(*args, max_restarts=0, **env)``: nnUNetv2_train_vit.py under two torchrun invocations ("nodes" of
    one process each, c10d rendezvous on localhost), returning the two Popen objects; plus the fold folder and
    the probe's folder."""
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / f"{TRAINER}.py").write_text(PROBE)
    probe = tmp_path / "probe"
    probe.mkdir()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {
        "num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "save_every": 1}}))
    fold = nnunet_env[2] / f"Dataset{DATASET_ID}_DemoFundus" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    started = []

    def start(*args: str, max_restarts: int = 0, machines: int = 2, **env: str) -> list:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        run_id = f"test{port}"
        nodes = []
        cores = sorted(os.sched_getaffinity(0))
        for node in range(machines):
            # Each "node" on cores of its own, as on two machines: two processes that each use every core of a
            # 2-core machine ran 3x slower (torch's threads stalling each other).
            own = {cores[node % len(cores)]} if machines == 2 else set(cores)
            # The first "node" hosts the rendezvous store, as the machine named in --rdzv_endpoint does on a cluster.
            # Left to chance (both are localhost), the node whose process a test kills could host it: its torchrun
            # exits and takes the store with it, and the survivor's torchrun then fails instead of its process.
            host = ["--rdzv_conf", f"is_host={int(node == 0)}"] if machines == 2 else []
            nodes.append(subprocess.Popen(
                [TORCHRUN, "--nnodes", str(machines), "--nproc_per_node", str(3 - machines), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port}", *host, "--rdzv_id", run_id, "--max-restarts",
                 str(max_restarts), "--monitor-interval", "0.5", "nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0",
                 "--config", str(config), "-tr", TRAINER, "-device", "cpu", *args],
                env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
                         OMP_NUM_THREADS="1", nnUNet_extTrainer=str(tmp_path / "trainers"), PROBE_DIR=str(probe),
                         **env),
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=lambda own=own: os.sched_setaffinity(0, own)))
        started.extend(nodes)
        return nodes

    yield start, fold, probe
    for node in started:  # the processes of torchrun first: a killed torchrun leaves them running
        for pid in [*children(node.pid), node.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()


def children(pid: int) -> list:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def finish(nodes: list, timeout: float = 1500) -> list:
    """(exit code, output) of each node."""
    return [(node.wait(timeout), node.stdout.read()) for node in nodes]


def training_log(fold: Path) -> str:
    return "".join(path.read_text() for path in sorted(fold.glob("training_log_*.txt")))


def weights(probe: Path) -> list:
    return [json.loads((probe / f"weights_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_sigterm_stops_both_nodes_at_one_step_and_continue_resumes_that_epoch(two_nodes):
    """SIGTERM to the process on the second node in epoch 1: both stop at the same step, rank 0 writes
    checkpoint_latest.pth saying epoch 1, both exit 75; --c continues at epoch 1 and ends with the same weights in
    both processes, one set of result files, and different augmented data in each process."""
    start, fold, probe = two_nodes
    results = finish(start(PROBE_ACTION="sigterm", PROBE_RANK="1"))
    outputs = "".join(output for _, output in results)
    assert "exitcode  : 75" in outputs, outputs[-4000:]
    stopped = [line for line in outputs.splitlines() if line.startswith("nnUNetv2_train_vit.py: Stopped by")]
    assert stopped == [f"nnUNetv2_train_vit.py: Stopped by SIGTERM after step 2 of epoch 1; checkpoint_latest.pth is "
                       f"written in {fold}. Resume with --c: it continues at the start of epoch 1."], outputs[-4000:]
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1
    assert all(len(values) == 1 for values in latest["logging"].values())  # epoch 0 only: epoch 1 runs again
    assert "global batch 4 = 2 per process x 2 processes" in training_log(fold)
    assert "SIGTERM received: all 2 processes stopped after step 2 of epoch 1" in training_log(fold)
    assert not (fold / "checkpoint_final.pth").exists() and not list(fold.glob("*.partial"))

    results = finish(start("--c"))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    log = training_log(fold)
    assert f"Continuing from {fold / 'checkpoint_latest.pth'} (epoch 1)" in log
    assert log.count("Epoch 1") == 2 and log.count("Epoch 0") == 1  # epoch 1 again from its start, 0 not again
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and len(final["logging"]["train_losses"]) == 2
    rank0, rank1 = weights(probe)
    assert rank0 == rank1 and rank0["epoch"] == 2  # DDP kept the two processes' weights identical
    batches = [(probe / f"batch_rank{rank}.txt").read_text() for rank in (0, 1)]
    assert batches[0] != batches[1]  # each process samples and augments its own batches
    # One set of results, written by rank 0 (the validation cases are shared out, their summary is one file).
    assert len(list(fold.glob("training_log_*.txt"))) == 2  # one per start, none from rank 1
    assert (fold / "validation" / "summary.json").is_file()
    assert sorted(path.name for path in fold.glob("*.pth")) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    assert not (fold / ".training.lock").exists()


@pytest.mark.parametrize("machines", [1, 2])
def test_killed_process_with_a_restart_left_resumes_from_the_latest_checkpoint(two_nodes, machines):
    """One torchrun with two processes, and two torchruns of one (torchrun restarts the surviving machine's process
    as a "membership change", TORCHELASTIC_RESTART_COUNT 0, the killed one's as restart 1)."""
    start, fold, probe = two_nodes
    results = finish(start(max_restarts=1, machines=machines, PROBE_ACTION="kill", PROBE_RANK="1"))
    assert [code for code, _ in results] == [0] * machines, results[0][1][-3000:]
    log = training_log(fold)
    assert (f"torchrun restarted the processes (restart 1): continuing from {fold / 'checkpoint_latest.pth'} "
            f"(epoch 1)") in log
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 2
    rank0, rank1 = weights(probe)
    assert rank0 == rank1


def test_killed_process_without_restarts_ends_the_other_with_one_line(two_nodes):
    """A process killed with no restart left: the other ends within 60 s, saying in one line what happened."""
    start, fold, probe = two_nodes
    nodes = start(PROBE_ACTION="kill", PROBE_RANK="1")
    ended = {}
    deadline = time.monotonic() + 1500
    while len(ended) < 2 and time.monotonic() < deadline:
        ended.update({index: time.time() for index, node in enumerate(nodes)
                      if index not in ended and node.poll() is not None})
        time.sleep(0.2)
    outputs = [output for _, output in finish(nodes, timeout=1)]
    survivor = next((index for index, output in enumerate(outputs) if "rank      : 0 " in output), None)
    assert survivor is not None, outputs[0][-3000:] + outputs[1][-3000:]
    assert ended[survivor] - float((probe / "signalled_at").read_text()) < 60
    lines = [line for line in outputs[survivor].splitlines() if line.startswith("nnUNetv2_train_vit.py: error:")]
    assert len(lines) == 1, outputs[survivor][-3000:]
    assert lines[0].startswith("nnUNetv2_train_vit.py: error: process 0 on ")
    assert "lost the other processes of its training" in lines[0] and "resume with --c" in lines[0]
    assert "exitcode  : 3 " in outputs[survivor] and "exitcode  : -9 " in outputs[1 - survivor]
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / ".training.lock").exists()


def test_the_planned_batch_is_per_process_and_logged(nnunet_env):
    """One process: the global batch is the planned batch, said in the log (the two-node tests check 2 x 2)."""
    trainer = make_trainer()
    assert trainer.batch_size == trainer.configuration_manager.batch_size == 2
    try:
        trainer.on_train_start()
    finally:
        trainer.stop_signals.restore()
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert "global batch 2 = 2 per process x 1 process (learning rates" in open(trainer.log_file).read()
