"""Stopping a training cleanly when the cluster asks: SLURM's SIGTERM (preemption, scancel) and ``--signal=USR1``.

A signal only notes that the training should stop; the trainer asks ``StopSignals.agreed`` after each step, and in
DDP every process stops at the same step, so the checkpoint written then holds the weights all processes share.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

# What clusters send before they stop a job: SLURM's SIGTERM (preemption, scancel) and --signal=USR1@seconds.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_control_group: Optional[dist.ProcessGroup] = None


def control_group() -> dist.ProcessGroup:
    """A gloo group of all processes for small CPU-side agreements (stop votes, the resume choice): on NCCL
    they would need a device tensor and a host-device wait. Made on first use, which every process reaches in
    the same order."""
    global _control_group
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


class StopSignals:
    """SIGTERM and SIGUSR1, noted between ``catch`` and ``restore``: ``received`` is the signal (0: none)."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.received = 0
        self._previous_handlers: dict = {}
        self._pending_vote: Optional[tuple] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name

    def catch(self) -> None:
        """From now on SIGTERM and SIGUSR1 only note that the training should stop."""
        def note(signum: int, frame) -> None:
            self.received = signum

        for sig in STOP_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, note)

    def restore(self) -> None:
        """The handlers that were there before ``catch``."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def agreed(self, wait: bool = False) -> bool:
        """Whether every process stops now: one process's signal stops them all at the same step.

        In DDP the processes vote each step with an all-reduce (max) of one CPU integer over gloo, started without
        waiting and read one step later: a step never waits for the device nor for the network, and a signal stops
        the training one or two steps after it arrives. ``wait``: vote now and wait for the result."""
        if not self.distributed:
            return self.received != 0
        agreed = self._vote_result()
        if not agreed:
            flag = torch.tensor([self.received], dtype=torch.int32)
            self._pending_vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group(),
                                                        async_op=True))
            if wait:
                agreed = self._vote_result()
        if agreed:
            self.received = agreed  # the signal one of the processes received
        return bool(agreed)

    def _vote_result(self) -> int:
        """The largest signal number voted in the vote in flight (waiting for it), 0 for none."""
        if self._pending_vote is None:
            return 0
        flag, work = self._pending_vote
        self._pending_vote = None
        work.wait()
        return int(flag.numpy()[0])
