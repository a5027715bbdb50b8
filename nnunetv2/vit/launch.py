"""How the processes of one training start: torchrun's, or the ``-num_gpus`` processes that torch.distributed's own
launcher starts on this machine, so that both run alike; and how they end (exit codes). What each process does is
``nnunetv2.vit.train``'s."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import uuid
from typing import Callable

import torch
import torch.distributed as dist

from nnunetv2.vit.cli import USER_ERROR_EXIT_CODE, get_device, usable_cores
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.preemption import STOP_SIGNALS

# Exit codes besides 0 (done) and 2 (a user error, one line): SIGTERM/SIGUSR1 stopped the training with its checkpoint
# written (EX_TEMPFAIL: run again with --c); a process lost the others of its training (one died or hangs).
STOPPED_EXIT_CODE = 75
PEERS_LOST_EXIT_CODE = 3
# torchrun's environment for each process it starts (c10d and static rendezvous alike).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a collective (or a barrier while rank 0 unpacks data or writes a checkpoint) may wait for the others.
DDP_TIMEOUT_VARIABLE, DDP_TIMEOUT_DEFAULT_S = "nnUNet_ddp_timeout", 600


def torchrun_started() -> bool:
    """Whether torchrun (or -num_gpus, through torchrun's launcher) started this process: RANK and WORLD_SIZE
    are set, as upstream's unmerged cross-node branch reads them."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"RANK/WORLD_SIZE are set but not {', '.join(missing)}: start several processes with "
                          f"torchrun (see README, 'Training on several machines'), or unset RANK and WORLD_SIZE.")
    return True


def ddp_timeout() -> datetime.timedelta:
    value = os.environ.get(DDP_TIMEOUT_VARIABLE, str(DDP_TIMEOUT_DEFAULT_S))
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{DDP_TIMEOUT_VARIABLE} must be a number of seconds, got '{value}'.")
    return datetime.timedelta(seconds=int(value))


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the process group torchrun set up: NCCL on the GPU LOCAL_RANK of this node, or gloo on the CPU."""
    if args.num_gpus > 1:
        raise ConfigError("-num_gpus starts processes on one machine; under torchrun leave it out "
                          "(torchrun's --nproc_per_node sets the processes per machine).")
    device = get_device(args.device)
    local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.type == "mps":
        raise ConfigError("Several processes (DDP) run on CUDA GPUs (NCCL) or on the CPU (gloo), not on mps.")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"Process {local_rank} of this machine has no GPU: {torch.cuda.device_count()} are "
                              f"visible (CUDA_VISIBLE_DEVICES). Start at most that many processes per machine.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # the cores this process may use (SLURM's --cpus-per-task, taskset), shared by this machine's processes
        torch.set_num_threads(max(1, usable_cores() // local_world_size))
    # torchrun's store outlives its restarts (--max-restarts) with the keys of the start before: with env:// the
    # restarted processes' gloo/NCCL handshake read those and hung. Every process of every start counts itself in,
    # so the n-th WORLD_SIZE arrivals are start n, whose keys get a prefix of their own. (TORCHELASTIC_RESTART_COUNT
    # cannot tell starts apart: torchrun does not count a restart caused by another machine's processes.)
    timeout, world_size = ddp_timeout(), int(os.environ["WORLD_SIZE"])
    hosts_store = os.environ["RANK"] == "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=hosts_store,
                          timeout=timeout)
    start = (store.add("nnunet_vit/arrivals", 1) - 1) // world_size
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
        f"nnunet_vit/start_{start}", store), rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout)
    return device


def first_to_report() -> bool:
    """Whether this process is the first of its torchrun job to report an error: the others stay quiet, so a
    mistake every process makes reads as one line. Asked of torchrun's key-value store; if that is gone, report."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
        key = f"nnunet_vit/first_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return store.compare_set(key, "", os.environ["RANK"]) == os.environ["RANK"].encode()
    except (RuntimeError, ValueError, KeyError):
        return True


def lost_peers(err: BaseException) -> bool:
    """A collective failed because another process died or hangs (gloo's connection errors, NCCL's timeouts)."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def launch_processes(args: argparse.Namespace, worker: Callable[[argparse.Namespace], None], prog: str) -> None:
    """-num_gpus N: N processes on this machine running ``worker(args)``, started as ``torchrun --standalone
    --nproc_per_node N`` starts them (torch.distributed's launcher), so they run exactly as under torchrun. SIGTERM
    and SIGUSR1 reach them; this process ends with the exit code of the first that failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = get_device(args.device)
    if device.type == "mps":
        raise ConfigError("-num_gpus > 1 (DDP) runs on CUDA GPUs (NCCL) or on the CPU (gloo), not on mps.")
    if device.type == "cuda" and torch.cuda.device_count() < args.num_gpus:
        raise ConfigError(f"-num_gpus {args.num_gpus} asks for more GPUs than the {torch.cuda.device_count()} "
                          f"visible (CUDA_VISIBLE_DEVICES).")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.num_gpus, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn", signals_to_handle=",".join(
                              sig.name for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                                                   *STOP_SIGNALS[1:])))
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the processes say what happened
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, worker)(argparse.Namespace(**{**vars(args), "num_gpus": 1}))
    except SignalException:
        sys.exit(STOPPED_EXIT_CODE)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode not in (USER_ERROR_EXIT_CODE, STOPPED_EXIT_CODE, PEERS_LOST_EXIT_CODE):
            what = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"{prog}: error: process {rank} ended with {what} (its output above says why).", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
