"""Check the whole pipeline on a CUDA machine: the demo, and the seed DPT (ViT-L/16) trained compiled and eager.

Stages, each in a subprocess with its own time limit, each writing its results as soon as it ends:

- ``demo``: ``python -m nnunetv2.vit.demo`` end to end (ViT-S DPT, 256x256, compile on), with the time of each
  phase (dataset, plan and preprocess, training, prediction, Dice) and, from the training log, the first
  compiled training step, steady-state throughput, the first validation step and the test Dice.
- ``vitl_compiled``: the seed DPT (``nnunetv2/configs/dpt.yaml``, ViT-L/16, ``pretrained: false``) on a 512x512
  demo dataset, batch 8, bf16, ``compile: true``, a few short epochs: first-step time, steady-state img/s,
  peak GPU memory; then ``nnUNetv2_predict_vit.py`` on the test images.
- ``vitl_eager``: the same with ``compile: false``.

It prints one table and writes ``gpu_trainer_check.json`` (plus each stage's output) to ``--out``. It needs the
project's dependencies, no network and no model hub.

    python benchmarks/gpu_trainer_check.py --out $OUT/trainer          # on the GPU machine, under 8 min
    python benchmarks/gpu_trainer_check.py --dry-run --out /tmp/check  # CPU, tiny settings: that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SEED_CONFIG = REPO / "nnunetv2" / "configs" / "dpt.yaml"
DATASET_ID, DATASET_NAME = 998, "DemoFundus512"


@dataclass
class Settings:
    """What the stages run; ``dry_run`` shrinks everything so that a CPU gets through it in minutes."""

    device: str = "cuda"
    demo_args: Tuple[str, ...] = ()
    size: int = 512
    num_train: int = 16
    num_test: int = 4
    backbone_size: str = "large"
    batch_size: int = 8
    epochs: int = 3
    iterations: int = 30
    limits: Dict[str, int] = field(default_factory=lambda: {"demo": 180, "vitl_compiled": 170, "vitl_eager": 90})

    @classmethod
    def for_run(cls, dry_run: bool) -> "Settings":
        if not dry_run:
            return cls()
        return cls(device="cpu", demo_args=("--num-train", "6", "--num-test", "2", "--size", "64"), size=64,
                   num_train=6, num_test=2, backbone_size="small", batch_size=2, epochs=2, iterations=2,
                   limits={"demo": 900, "vitl_compiled": 600, "vitl_eager": 300})


def run_stage(name: str, command: List[str], limit: int, out: Path, env: dict) -> dict:
    """Run ``command`` for at most ``limit`` s; its output goes to ``out/<name>.log``."""
    started = time.monotonic()
    log = out / f"{name}.log"
    with log.open("w") as handle:
        try:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"exit": code, "wall_s": round(time.monotonic() - started, 1), "log": str(log)}


def training_figures(log_text: str, batch_size: int) -> dict:
    """First compiled steps, steady-state throughput (epochs after the first) and peak memory from a training log."""
    figures: dict = {}
    for phase, key in (("training step", "first_train_step_s"), ("validation step", "first_val_step_s"),
                       ("final validation tile", "first_final_val_tile_s")):
        if match := re.search(rf"the first {phase} took ([\d.]+) s", log_text):
            figures[key] = float(match.group(1))
    epochs = re.findall(r"training: (\d+) steps in ([\d.]+) s \(([\d.]+) steps/s, ([\d.]+) img/s per process\)"
                        r"(?:, peak GPU memory ([\d.]+) GiB)?", log_text)
    if epochs:
        figures["first_epoch_train_s"] = float(epochs[0][1])
    steady = epochs[1:]
    if steady:
        steps = sum(int(e[0]) for e in steady)
        seconds = sum(float(e[1]) for e in steady)
        figures["steady_steps_per_s"] = round(steps / seconds, 2)
        figures["steady_img_per_s"] = round(steps * batch_size / seconds, 1)
    if epochs and epochs[-1][4]:
        figures["peak_gib"] = float(epochs[-1][4])
    figures["recompiles_logged"] = log_text.count("torch.compile recompiled")
    figures["graph_breaks_logged"] = log_text.count("torch.compile graph break")
    return figures


def demo_stage(settings: Settings, out: Path, env: dict) -> dict:
    work = out / "demo_work"
    stage_env = dict(env, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                     nnUNet_results=str(work / "results"))
    result = run_stage("demo", [sys.executable, "-m", "nnunetv2.vit.demo", "-device", settings.device,
                                "--output", str(out / "demo_output"), *settings.demo_args],
                       settings.limits["demo"], out, stage_env)
    text = Path(result["log"]).read_text()
    result["phases_s"] = {f"step {n}": float(s) for n, s in re.findall(r"=== step (\S+) took ([\d.]+) s", text)}
    if match := re.search(r"mean vessel Dice: ([\d.]+)", text):
        result["vessel_dice"] = float(match.group(1))
    logs = sorted((work / "results").rglob("training_log_*.txt"))
    if logs:
        plans_file = next((work / "results").rglob("plans.json"))
        configuration = plans_file.parent.name.split("__")[-1]  # Trainer__Plans__Configuration
        batch = json.loads(plans_file.read_text())["configurations"][configuration]
        result.update(training_figures("".join(p.read_text() for p in logs), batch["batch_size"]))
    return result


def vitl_stage(name: str, compiled: bool, settings: Settings, out: Path, env: dict) -> dict:
    """Train the seed DPT for a few short epochs on the 512x512 dataset, then predict its test images."""
    config = yaml.safe_load(SEED_CONFIG.read_text())
    config["model"].update(pretrained=False, backbone_size=settings.backbone_size)
    config["train"].update(num_epochs=settings.epochs, num_iterations_per_epoch=settings.iterations,
                           num_val_iterations_per_epoch=2, batch_size=settings.batch_size,
                           precision="bf16" if settings.device == "cuda" else "fp32",
                           compile="true" if compiled else "false", save_every=settings.epochs + 1)
    config_file = out / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    configuration = f"2d_{name}"
    started = time.monotonic()
    planned = run_stage(f"{name}_plan", [sys.executable, "nnUNetv2_plan_vit.py", str(DATASET_ID), "--config",
                                         str(config_file), "-c", configuration], settings.limits[name], out, env)
    if planned["exit"] != 0:
        return planned
    command = [sys.executable, "nnUNetv2_train_vit.py", str(DATASET_ID), configuration, "0", "--config",
               str(config_file), "-device", settings.device]
    left = max(30, settings.limits[name] - int(time.monotonic() - started))
    result = run_stage(name, command, left, out, env)
    results = Path(env["nnUNet_results"]) / f"Dataset{DATASET_ID}_{DATASET_NAME}"
    logs = sorted(results.glob(f"nnUNetTrainer_vit__nnUNetPlans__{configuration}/fold_0/training_log_*.txt"))
    if logs:
        result.update(training_figures(logs[-1].read_text(), settings.batch_size))
    if result["exit"] == 0:
        left = max(30, settings.limits[name] - int(time.monotonic() - started))
        raw = Path(env["nnUNet_raw"]) / f"Dataset{DATASET_ID}_{DATASET_NAME}"
        predicted = run_stage(f"{name}_predict", [
            sys.executable, "nnUNetv2_predict_vit.py", "-i", str(raw / "imagesTs"), "-o", str(out / f"{name}_pred"),
            "-d", str(DATASET_ID), "-c", configuration, "-f", "0", "-device", settings.device, "-npp", "2",
            "-nps", "2", "--disable_progress_bar"], left, out, env)
        result["predict"] = predicted
    return result


def prepare_512(settings: Settings, env: dict) -> None:
    """The demo generator at 512x512 (or the dry run's size), planned by upstream (each stage plans its own)."""
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunetv2.vit.demo import plan
    from nnunetv2.vit.demo_data import write_demo_dataset

    dataset = write_demo_dataset(Path(env["nnUNet_raw"]), DATASET_ID, DATASET_NAME, num_train=settings.num_train,
                                 num_test=settings.num_test, size=settings.size)
    plan(DATASET_ID, Path(env["nnUNet_preprocessed"]), dataset.name)


def table(results: Dict[str, dict]) -> str:
    columns = ["exit", "wall_s", "first_train_step_s", "first_val_step_s", "first_epoch_train_s",
               "steady_steps_per_s", "steady_img_per_s", "peak_gib", "recompiles_logged", "vessel_dice"]
    lines = ["| stage | " + " | ".join(columns) + " | predict s | phases |", "|---" * (len(columns) + 3) + "|"]
    for name, result in results.items():
        cells = [str(result.get(c, "")) for c in columns]
        predict = result.get("predict", {}).get("wall_s", "")
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("phases_s", {}).items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {predict} | {phases} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_trainer_check"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that every stage runs")
    parser.add_argument("--stages", nargs="+", default=["demo", "vitl_compiled", "vitl_eager"])
    args = parser.parse_args(argv)
    settings = Settings.for_run(args.dry_run)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", nnUNet_raw=str(work / "raw"),
               nnUNet_preprocessed=str(work / "preprocessed"), nnUNet_results=str(work / "results"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

    results: Dict[str, dict] = {}
    started = time.monotonic()
    for stage in args.stages:
        print(f"== {stage} ({time.monotonic() - started:.0f} s so far)", flush=True)
        if stage == "demo":
            results[stage] = demo_stage(settings, out, env)
        else:
            if not (work / "preprocessed" / f"Dataset{DATASET_ID}_{DATASET_NAME}").is_dir():
                prep_started = time.monotonic()
                prepare_512(settings, env)
                results["prepare_512"] = {"exit": 0, "wall_s": round(time.monotonic() - prep_started, 1)}
            results[stage] = vitl_stage(stage, stage == "vitl_compiled", settings, out, env)
        (out / "gpu_trainer_check.json").write_text(json.dumps(results, indent=1))
        print(table({stage: results[stage]}).splitlines()[-1], flush=True)
    print("\n" + table(results))
    print(f"\ntotal {time.monotonic() - started:.0f} s; JSON and logs in {out}")


if __name__ == "__main__":
    main()
