"""What torch.compile does, told in the training log: when it compiles and for how long, and when it recompiles,
breaks a graph or falls back to eager, and why. A first step can compile for minutes: without this a user cannot tell
a compile from a hang. The source is dynamo's bookkeeping (``counters``, ``guard_failures``) and its warnings.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Dict, Iterator, Tuple

import torch
from torch._dynamo.utils import counters, guard_failures

from nnunetv2.vit.errors import CompileError

DYNAMO_LOGGER = "torch._dynamo"


class _Forward(logging.Handler):
    """Sends dynamo's warnings (e.g. "hit config.recompile_limit", after which it runs eagerly) to the log."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(f"torch.compile warning: {' '.join(record.getMessage().split())}")


class CompileLog:
    """Logs torch.compile's work on one training or prediction run. ``close()`` when done."""

    def __init__(self, log: Callable[[str], None], forward_warnings: bool = True) -> None:
        """``forward_warnings``: also send dynamo's warnings to ``log`` (a log file; torch prints them anyway)."""
        self.log = log
        self.first_calls_done: set = set()
        self.handler = _Forward(log) if forward_warnings else None
        self.state = self._read_state()
        self.open()

    def open(self) -> None:
        """Start forwarding dynamo's warnings to the log (again)."""
        if self.handler is not None and self.handler not in logging.getLogger(DYNAMO_LOGGER).handlers:
            logging.getLogger(DYNAMO_LOGGER).addHandler(self.handler)

    def close(self) -> None:
        """Stop forwarding dynamo's warnings (the run is over; the logger is process-wide)."""
        if self.handler is not None:
            logging.getLogger(DYNAMO_LOGGER).removeHandler(self.handler)

    @staticmethod
    def _read_state() -> Tuple[int, Dict[object, int], Dict[str, int]]:
        return (counters["stats"]["unique_graphs"], {code: len(r) for code, r in guard_failures.items()},
                dict(counters["graph_break"]))

    @contextlib.contextmanager
    def first_call(self, phase: str, what: str, device: torch.device) -> Iterator[None]:
        """Around a call that may compile: the first time for ``phase``, say so before and how long it
        took after (waiting for the device once, for a true time); later calls pass through."""
        if phase in self.first_calls_done:
            yield
            return
        self.first_calls_done.add(phase)
        self.report(f"before the first {phase}")
        self.log(f"torch.compile: compiling the {phase} ({what}); this first one can take minutes")
        started = time.perf_counter()
        try:
            yield
        except torch._dynamo.exc.TorchDynamoException as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CompileError(f"torch.compile failed while compiling the {phase}: {first_line}. "
                               f"Train without compiling: set train.compile: false.") from err
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        graphs = counters["stats"]["unique_graphs"] - self.state[0]
        self.log(f"torch.compile: the first {phase} took {time.perf_counter() - started:.1f} s "
                 f"({graphs} graph(s) compiled)")
        self.report(f"in the first {phase}", expected_graphs=True)

    def first_forward(self, module: torch.nn.Module, phase: str, what: str, device: torch.device) -> None:
        """Make the next forward call of ``module`` the ``first_call`` of ``phase`` (for code that calls the
        network itself, such as nnU-Net's sliding-window predictor)."""
        if phase in self.first_calls_done:
            return
        stack = contextlib.ExitStack()

        def before(*_) -> None:
            stack.enter_context(self.first_call(phase, what, device))

        def after(*_) -> None:
            for handle in handles:
                handle.remove()
            stack.close()

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def report(self, when: str, expected_graphs: bool = False) -> None:
        """Log graph breaks and (unless ``expected_graphs``) recompilations since the last report, with dynamo's
        reasons: a recompiling or breaking graph costs time in every step, a user should see it."""
        graphs, failures, breaks = self._read_state()
        new_graphs = graphs - self.state[0]
        if new_graphs and not expected_graphs:
            reasons = sorted({" ".join(str(reason).split()) for code, reasons in guard_failures.items()
                              for reason in reasons[self.state[1].get(code, 0):]})
            self.log(f"torch.compile recompiled {new_graphs} graph(s) {when}; "
                     f"reasons: {'; '.join(reasons) or 'first call of another region'}")
        new_breaks = {reason: n - self.state[2].get(reason, 0) for reason, n in breaks.items()
                      if n > self.state[2].get(reason, 0)}
        for reason, n in new_breaks.items():
            self.log(f"torch.compile graph break ({n}x) {when}, that part runs eagerly: {' '.join(reason.split())}")
        self.state = (graphs, failures, breaks)
