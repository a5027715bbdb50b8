"""CompileLog: what torch.compile does reaches the log, with torch's reasons (backend "eager": no codegen)."""

from __future__ import annotations

import pytest
import torch

from nnunetv2.vit.compiling import CompileLog
from nnunetv2.vit.errors import CompileError

CPU = torch.device("cpu")


@pytest.fixture
def log():
    torch._dynamo.reset()
    lines: list = []
    compile_log = CompileLog(lines.append)
    yield compile_log, lines
    compile_log.close()
    torch._dynamo.reset()


def test_first_call_is_announced_and_timed_later_calls_are_quiet(log):
    compile_log, lines = log
    double = torch.compile(lambda x: x * 2, backend="eager")
    for _ in range(2):
        with compile_log.first_call("training step", "a doubling", CPU):
            double(torch.ones(3))
    assert lines[0] == "torch.compile: compiling the training step (a doubling); this first one can take minutes"
    assert lines[1].startswith("torch.compile: the first training step took ") and "1 graph(s) compiled" in lines[1]
    assert len(lines) == 2


def test_recompilation_and_graph_break_are_logged_with_the_reason(log):
    compile_log, lines = log

    def broken(x):
        x = x + 1
        print("a print breaks the graph")
        return x * 2

    fn = torch.compile(lambda x: x.sum() * 2, backend="eager", dynamic=False)
    with compile_log.first_call("validation step", "a sum", CPU):
        fn(torch.ones(3))
    fn(torch.ones(5))  # another shape: dynamo recompiles
    compile_log.report("in epoch 1")
    assert any(line.startswith("torch.compile recompiled 1 graph(s) in epoch 1; reasons:") and "size mismatch" in line
               for line in lines), lines
    torch.compile(broken, backend="eager")(torch.ones(2))
    compile_log.report("in epoch 2")
    assert any(line.startswith("torch.compile graph break (1x) in epoch 2, that part runs eagerly:") for line in lines)


def test_dynamo_warnings_reach_the_log(log):
    compile_log, lines = log
    fn = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for size in (1, 2, 3):
            fn(torch.ones(size))  # the second shape hits the limit: dynamo runs the function eagerly from then on
    assert any(line.startswith("torch.compile warning:") and "recompile_limit" in line for line in lines), lines


def test_a_failing_compiler_is_one_clear_error(log):
    compile_log, _ = log

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    fn = torch.compile(lambda x: x * 3, backend=failing_backend)
    with pytest.raises(CompileError, match="torch.compile failed while compiling the training step: .*"
                                           "set train.compile: false") as err:
        with compile_log.first_call("training step", "a tripling", CPU):
            fn(torch.ones(2))
    assert "\n" not in str(err.value)
