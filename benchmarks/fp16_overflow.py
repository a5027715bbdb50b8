"""How often fp16 loss scaling overflows when the demo trains with ``train.precision: fp16``.

Runs the built-in demo (``dpt_demo.yaml``, synthetic fundus data, nnU-Net's GradScaler defaults) with
fp16 in a results folder of its own, then counts from the training log the steps GradScaler skipped
(gradient overflow) and the steps skipped for a non-finite loss, per epoch. Needs nnunetv2.

On a GPU this measures the real thing. On a CPU, PyTorch's fp16 convolution backward is a naive
kernel (about 100x slower than fp32), so convolutions are computed the way cuDNN computes them in
fp16 -- fp16 inputs, weights and outputs, fp32 accumulation -- through fp32 kernels; matmuls and
attention run in PyTorch's own CPU fp16 kernels. Overflow is a question of value ranges, which this
keeps.

    uv run python benchmarks/fp16_overflow.py [-device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F
import yaml
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _fp16_rounded(value: Any) -> Any:
    return value.half().float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class CudnnLikeFp16Convolutions(TorchFunctionMode):
    """Under CPU fp16 autocast, run convolutions with fp16 inputs and outputs but fp32 kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fp16_autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        if func in CONVOLUTIONS and fp16_autocast:
            args = tuple(_fp16_rounded(a) for a in args)
            kwargs = {k: _fp16_rounded(v) for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs).half()
        return func(*args, **kwargs)


def count_skips(log_text: str) -> Dict[str, Any]:
    """Per-epoch counts of fp16 overflows and non-finite-loss skips in an nnU-Net training log."""
    epoch, per_epoch = 0, {}
    scales = []
    for line in log_text.splitlines():
        counts = per_epoch.setdefault(epoch, {"fp16_overflows": 0, "nonfinite_loss_skips": 0})
        if match := re.search(r"Epoch (\d+)\s*$", line):
            epoch = int(match.group(1))
        elif match := re.search(r"Skipped training steps in this epoch: (\d+) with a non-finite loss or gradient, "
                                r"(\d+) fp16 gradient overflows(?: \(loss scale now ([\d.e+]+)\))?", line):
            counts["nonfinite_loss_skips"] += int(match.group(1))
            counts["fp16_overflows"] += int(match.group(2))
            if match.group(3):
                scales.append(float(match.group(3)))
    return {
        "fp16_overflows": sum(e["fp16_overflows"] for e in per_epoch.values()),
        "nonfinite_loss_skips": sum(e["nonfinite_loss_skips"] for e in per_epoch.values()),
        "per_epoch": per_epoch,
        "loss_scale_after_each_epoch": scales,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fp16_overflow"))
    parser.add_argument("--num-epochs", type=int, default=None, help="override the demo config's num_epochs")
    args = parser.parse_args()

    output = Path(args.output).resolve()
    shutil.rmtree(output / "nnUNet_results", ignore_errors=True)  # always a fresh training
    output.mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_results"] = str(output / "nnUNet_results")

    from nnunetv2.vit import demo

    config = yaml.safe_load(demo.DEFAULT_CONFIG.read_text())
    config["train"]["precision"] = "fp16"
    if args.num_epochs is not None:
        config["train"]["num_epochs"] = args.num_epochs
    config_file = output / "dpt_demo_fp16.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    emulation = CudnnLikeFp16Convolutions() if args.device == "cpu" else contextlib.nullcontext()
    with emulation:
        demo.main(["--config", str(config_file), "-device", args.device, "--output", str(output / "demo")])

    logs = sorted((output / "nnUNet_results").rglob("training_log_*.txt"))
    counts = count_skips("".join(path.read_text() for path in logs))
    steps = config["train"]["num_epochs"] * config["train"]["num_iterations_per_epoch"]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (cuDNN-like fp16 convolutions)",
              "torch": torch.__version__, "training_steps": steps, **counts}
    (output / "fp16_overflow.json").write_text(json.dumps(result, indent=2))
    print(f"\nfp16 on the demo ({result['device']}): {counts['fp16_overflows']} of {steps} steps skipped by "
          f"GradScaler (gradient overflow), {counts['nonfinite_loss_skips']} skipped for a non-finite loss.")
    print(f"per epoch: {counts['per_epoch']}")
    print(f"loss scale after each epoch with a skipped step: {counts['loss_scale_after_each_epoch']}")
    print(f"written: {output / 'fp16_overflow.json'}")


if __name__ == "__main__":
    main()
