"""Segmentation quality on synthetic dataset families: upstream nnU-Net's 2D U-Net next to every ViT
decoder, with and without the detail path, all trained with one budget.

A result of a ViT model means something only next to nnU-Net's own U-Net on the same data and
budget, so this measures both in one run. For each family (``--families``: ``demo``, the fundus data
of ``nnunetv2/vit/demo_data.py``; ``cracks`` and ``oct``, grey images of ``benchmarks/synthetic_data.py``;
24 training and 6 test images of 192x192 each, ``--size``) it writes the dataset, runs upstream's plan and
preprocess, trains each row on fold 0 for the same epochs, iterations and batch size, predicts the
test split with nnU-Net's predictor and prints a table per family: Dice of every class (mean and per
case), parameters and training time. A panel per family (image, ground truth and every row's
prediction for each test case) is written next to the JSON after the family's last row.

- ``unet``: upstream's ``nnUNetTrainer`` and network untouched; only the epochs and iterations are set.
- ViT rows: planned with ``nnUNetv2_plan_vit.py`` and trained with ``nnUNetv2_train_vit.py``; like the U-Net row,
  without the final validation on fold 0's validation cases (the test split is what is scored).
- ``dpt``, ``upernet``, ``segformer``, ``primus``: ViT-S/16 DINOv3 (random init: no model hub) with the
  demo's training settings (``nnunetv2/configs/dpt_demo.yaml``) and small decoders; ``<name>_detail``
  adds the detail path as the demo config has it (``model.decoder.detail_path: true``, its ``detail_channels``).
- ``name=path/to/config.yaml``: any other config, trained with the same budget.

``--repeats N`` trains every row N times (the U-Net too; augmentation is not seeded, so runs differ) and adds a
table of each row's mean Dice over the repeats with its range; each repeat is compared with the U-Net of its own.

    .venv/bin/python benchmarks/quality.py                    # the demo, every row
    .venv/bin/python benchmarks/quality.py --families all     # every family, U-Net and detail rows (35 min, 2 cores)
    .venv/bin/python benchmarks/quality.py --families all --quick   # the U-Net and dpt_detail only
    .venv/bin/python benchmarks/quality.py --families cracks --rows unet dpt_detail mine=my.yaml
    .venv/bin/python benchmarks/quality.py --quick --repeats 3     # the spread between runs

Data and preprocessing live in ``--workdir`` (default ``benchmarks/results/quality``) and are reused;
each run trains into a results folder of its own there. The table is printed and written as JSON
(and Markdown with ``--markdown``) after every row, so a killed run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Each family's nnU-Net dataset (id, name); the demo's is the one the demo itself uses.
FAMILY_DATASETS: Dict[str, Tuple[int, str]] = {"demo": (999, "DemoFundus"), "cracks": (998, "SynthCracks"),
                                               "oct": (997, "SynthOCT")}
# 192x192: --families all (15 rows) fits 40 minutes on 2 CPU cores; at 256x256 (--size 256) it took about an hour.
DEFAULT_SIZE = 192
DEMO_CONFIG = REPO_ROOT / "nnunetv2" / "configs" / "dpt_demo.yaml"
# The demo's budget: 10 epochs of 20 iterations (4 validation iterations), the plans' batch size.
BUDGET = {"num_epochs": 10, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 4}
# Small decoders for ViT-S, comparable in size with the demo's DPT (which comes from dpt_demo.yaml).
SMALL_DECODERS: Dict[str, dict] = {
    "upernet": {"model_path": "nnunetv2.model.model_upernet", "decoder": {"hidden_size": 64}},
    "segformer": {"model_path": "nnunetv2.model.model_segformer", "decoder": {"decoder_hidden_size": 64}},
    "primus": {"model_path": "nnunetv2.model.model_primus", "decoder": {}},
}
DECODERS = ("dpt", "upernet", "segformer", "primus")
DEFAULT_ROWS = ("unet", *(f"{d}{suffix}" for d in DECODERS for suffix in ("", "_detail")))
DETAIL_ROWS = ("unet", *(f"{d}_detail" for d in DECODERS))  # the default with a family besides the demo
QUICK_ROWS = ("unet", "dpt_detail")  # the U-Net and the default small config


@dataclass
class Row:
    name: str
    config: str  # "upstream nnUNetTrainer" or the YAML written for the row
    params: int = 0
    train_s: float = float("nan")
    dice: Dict[str, Dict[str, float]] = field(default_factory=dict)  # class name -> test case -> Dice
    error: str = ""
    repeat: int = 0  # which of --repeats this is

    @property
    def run_name(self) -> str:
        """The row's name for this repeat: its configuration, results and predictions folder, its line in a table."""
        return self.name if self.repeat == 0 else f"{self.name}_r{self.repeat}"

    @staticmethod
    def mean(scores: Dict[str, float]) -> float:
        import numpy as np

        return float(np.nanmean(list(scores.values()))) if scores else float("nan")


def row_config(name: str, workdir: Path) -> Path:
    """The YAML of a built-in ViT row: the demo config with the row's decoder and the budget."""
    import yaml

    config = yaml.safe_load(DEMO_CONFIG.read_text())
    decoder_name, _, suffix = name.partition("_")
    if decoder_name not in DECODERS or suffix not in ("", "detail"):
        raise SystemExit(f"Unknown row '{name}'. Built-in rows: {', '.join(DEFAULT_ROWS)}; or name=config.yaml.")
    detail = {key: value for key, value in (config["model"].get("decoder") or {}).items() if key.startswith("detail_")}
    if decoder_name != "dpt":
        config["model"].update(SMALL_DECODERS[decoder_name])
    decoder = config["model"]["decoder"] = dict(config["model"].get("decoder") or {})
    for key in detail:  # every decoder's detail path as the demo config has it, or none
        decoder.pop(key, None)
    if suffix == "detail":
        decoder.update({**detail, "detail_path": True})
    config["train"].update(BUDGET)
    path = workdir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def user_config(path: Path, name: str, workdir: Path) -> Path:
    """A user's config (a file or a built-in name; ``inherits`` resolved) with the budget applied."""
    import yaml

    from nnunetv2.vit.config import read_config_file, resolve_config_path

    config = read_config_file(resolve_config_path(path))
    config.setdefault("train", {}).update(BUDGET)
    out = workdir / "configs" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def nnunet_folders(workdir: Path) -> Path:
    """Point nnU-Net at ``workdir`` (before anything imports ``nnunetv2.paths``, which reads the variables once): raw
    data and preprocessing shared between runs, results in a folder of this run's own, ``runs/<time>``, returned."""
    run_dir = workdir / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for var, path in (("nnUNet_raw", workdir / "nnUNet_raw"), ("nnUNet_preprocessed", workdir / "nnUNet_preprocessed"),
                      ("nnUNet_results", run_dir / "nnUNet_results")):
        os.environ[var] = str(path)
        path.mkdir(parents=True, exist_ok=True)
    from nnunetv2.vit.cli import usable_cores  # imports neither nnunetv2.paths nor nnunetv2.configuration

    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(4, usable_cores() // 2))))
    return run_dir


def train_unet(dataset: str, device: str, budget: Optional[Dict[str, int]] = None,
               batch_size: Optional[int] = None, suffix: str = "") -> Path:
    """Upstream's trainer and 2D U-Net with only the budget (default ``BUDGET``) and, if given, the batch size
    changed; returns the fold folder (the trainer's name, ``nnUNetTrainer_budget<suffix>``, names its folder)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_budget(nnUNetTrainer):
        # Upstream records its __init__ arguments by name, so the signature is spelled out.
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = steps["num_epochs"]
            self.num_iterations_per_epoch = steps["num_iterations_per_epoch"]
            self.num_val_iterations_per_epoch = steps["num_val_iterations_per_epoch"]

    steps = budget or BUDGET
    folder = Path(nnUNet_preprocessed) / dataset
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what upstream's run_training passes its trainer
    if batch_size is not None:
        plans["configurations"]["2d"]["batch_size"] = batch_size
    trainer_class = type(f"nnUNetTrainer_budget{suffix}", (nnUNetTrainer_budget,), {}) if suffix else \
        nnUNetTrainer_budget
    trainer = trainer_class(plans, "2d", 0, load_json(str(folder / "dataset.json")), torch.device(device))
    trainer.run_training()
    return Path(trainer.output_folder)


@functools.cache
def vit_trainer() -> type:
    """``nnUNetTrainer_vit`` without the final validation on fold 0's validation cases, which upstream's U-Net row
    (``run_training`` alone) does not run either: the rows are scored on the test split, and time the same work."""
    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    class nnUNetTrainer_vit_quality(nnUNetTrainer_vit):
        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            """Nothing: the test split is scored instead."""

    return nnUNetTrainer_vit_quality


def train_vit(name: str, config: Path, dataset: str, device: str) -> Path:
    """``nnUNetv2_plan_vit.py <id> --config <config> -c 2d_<name>``, then ``nnUNetv2_train_vit.py <id> 2d_<name> 0
    --config <config>`` (with ``vit_trainer()``); returns the fold folder."""
    from nnunetv2.vit import plan as plan_cli
    from nnunetv2.vit.train import build_parser, results_folder, run

    configuration = f"2d_{name}"
    dataset_id = dataset[len("Dataset"):len("Dataset") + 3]
    plan_cli.run(plan_cli.build_parser().parse_args([dataset_id, "--config", str(config), "-c", configuration,
                                                     "-np", os.environ["nnUNet_def_n_proc"]]))
    trainer = vit_trainer().__name__
    run(build_parser().parse_args([dataset_id, configuration, "0", "--config", str(config), "-device", device,
                                   "-tr", trainer]))
    return results_folder(dataset, trainer, "nnUNetPlans", configuration, "0")


def predict_and_score(trainer_class: type, fold_folder: Path, dataset: Path, out: Path, device: str, row: Row,
                      labels: Dict[str, int]) -> None:
    """Predict the test split with the final checkpoint and fill the row's Dice per class and parameter count."""
    import numpy as np
    import torch
    from PIL import Image

    from nnunetv2.vit.demo import dice
    from nnunetv2.vit.predict import predictor_from_trained_model

    predictor = predictor_from_trained_model(fold_folder.parent, folds=(0,), device=torch.device(device),
                                             trainer_class=trainer_class)
    row.params = sum(p.numel() for p in predictor.network.parameters())
    # In this process: six small test images do not repay starting worker processes (each imports torch).
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(dataset / "imagesTs"), str(out), save_probabilities=False,
                                            overwrite=True)
    for label_file in sorted((dataset / "labelsTs").glob("*.png")):
        reference = np.asarray(Image.open(label_file))
        prediction = np.asarray(Image.open(out / label_file.name))
        for name, value in labels.items():
            row.dice.setdefault(name, {})[label_file.stem] = dice(reference, prediction, value)


def train_and_score(name: str, config: Optional[Path], dataset: Path, predictions: Path, device: str,
                    labels: Dict[str, int], repeat: int = 0) -> Row:
    """One row (its ``repeat``-th run): train (the U-Net if ``config`` is None), predict the test split into
    ``predictions/<run name>``, score it. A row that fails (a bad config, out of memory) keeps its error and the run
    goes on; a stop signal (SIGTERM, SIGUSR1) ends the run."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2.vit.errors import TrainingStopped
    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    row = Row(name, "upstream nnUNetTrainer" if config is None else str(config), repeat=repeat)
    suffix = row.run_name[len(name):]
    started = time.monotonic()
    try:
        fold_folder = (train_unet(dataset.name, device, suffix=suffix) if config is None else
                       train_vit(row.run_name, config, dataset.name, device))
        row.train_s = time.monotonic() - started
        predict_and_score(nnUNetTrainer if config is None else nnUNetTrainer_vit, fold_folder, dataset,
                          predictions / row.run_name, device, row, labels)
    except TrainingStopped as stop:
        raise SystemExit(f"quality.py: stopped in row {row.run_name} ({stop}); the rows before it are kept.") from None
    except Exception as err:  # one failing row must not lose the others
        row.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return row


def foreground(labels: Dict[str, int]) -> Dict[str, int]:
    """The classes Dice is reported for: every label but the background."""
    return {name: value for name, value in labels.items() if value != 0}


def table(rows: List[Row], classes: List[str]) -> str:
    """Markdown table: one line per row, mean Dice per class, then Dice per test case per class."""
    lines = ["| row | " + " | ".join(f"{c} Dice" for c in classes) + " | params (M) | train s | "
             + " | ".join(f"{c} Dice per case" for c in classes) + " |",
             "|---|" + "---:|" * (len(classes) + 2) + "---|" * len(classes)]
    for row in rows:
        if row.error:
            lines.append(f"| {row.run_name} |" + " |" * (len(classes) * 2 + 1) + f" failed: {row.error} |")
            continue
        means = " | ".join(f"{row.mean(row.dice.get(c, {})):.3f}" for c in classes)
        cases = " | ".join(" ".join(f"{v:.3f}" for v in row.dice.get(c, {}).values()) for c in classes)
        lines.append(f"| {row.run_name} | {means} | {row.params / 1e6:.2f} | {row.train_s:.0f} | {cases} |")
    return "\n".join(lines)


def over_repeats(rows: List[Row], classes: List[str]) -> str:
    """Markdown table of each row's mean Dice per class over its repeats, with the lowest and highest repeat, and
    how many repeats finished."""
    import numpy as np

    names = list(dict.fromkeys(row.name for row in rows))
    lines = ["| row | repeats | " + " | ".join(f"{c} Dice (min-max)" for c in classes) + " |",
             "|---|---:|" + "---:|" * len(classes)]
    for name in names:
        done = [row for row in rows if row.name == name and not row.error]
        cells = []
        for c in classes:
            means = [row.mean(row.dice[c]) for row in done]
            cells.append(f"{np.mean(means):.3f} ({min(means):.3f}-{max(means):.3f})" if means else "")
        total = sum(row.name == name for row in rows)
        lines.append(f"| {name} | {len(done)}{f' of {total}' if len(done) < total else ''} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def against_unet(rows: List[Row], classes: List[str]) -> str:
    """Each row next to the ``unet`` row of its repeat (the issue's target): its gap in mean Dice per class, and the
    test cases where it falls below 0.5 while the U-Net is above 0.9."""
    references = {r.repeat: r for r in rows if r.name == "unet" and not r.error}
    lines = []
    for row in rows:
        reference = references.get(row.repeat)
        if reference is None or row is reference or row.error:
            continue
        gaps = ", ".join(f"{c} {row.mean(row.dice[c]) - reference.mean(reference.dice[c]):+.3f}" for c in classes)
        failed = [f"{case} {c} {score:.3f} (unet {reference.dice[c][case]:.3f})" for c in classes
                  for case, score in row.dice[c].items() if score < 0.5 and reference.dice[c].get(case, 0.0) > 0.9]
        lines.append(f"- {row.run_name} against {reference.run_name}: {gaps}; below 0.5 where unet > 0.9: "
                     f"{', '.join(failed) or 'none'}")
    return "\n".join(lines)


def write_panel(rows: List[Row], dataset: Path, predictions: Path, out_file: Path, labels: Dict[str, int]) -> None:
    """One line per test case: the image, the ground truth and each row's prediction with its Dice per class."""
    import numpy as np
    from PIL import Image

    from nnunetv2.vit.demo import save_panels

    rows = [r for r in rows if not r.error and r.repeat == 0]
    cases = sorted(p.stem for p in (dataset / "labelsTs").glob("*.png"))
    labelled = dict(cmap="viridis", vmin=0, vmax=max(labels.values()))
    lines = []
    for case in cases:
        line = [(np.asarray(Image.open(dataset / "imagesTs" / f"{case}_0000.png")), dict(cmap="gray"), case),
                (np.asarray(Image.open(dataset / "labelsTs" / f"{case}.png")), labelled, "ground truth")]
        for row in rows:
            scores = " ".join(f"{c[:6]} {row.dice[c][case]:.2f}" for c in foreground(labels))
            line.append((np.asarray(Image.open(predictions / row.name / f"{case}.png")), labelled,
                         f"{row.name}\n{scores}"))
        lines.append(line)
    save_panels(lines, out_file, panel_size=(2.6, 2.8), fontsize=8, dpi=80)


def write_dataset(family: str, raw: Path, size: int) -> Path:
    """The family's raw dataset (24 training and 6 test images of ``size`` x ``size``), written once and reused."""
    dataset_id, name = FAMILY_DATASETS[family]
    if family == "demo":
        from nnunetv2.vit.demo_data import write_demo_dataset

        return write_demo_dataset(raw, dataset_id, name, num_train=24, num_test=6, size=size)
    from benchmarks.synthetic_data import write_synthetic_dataset

    return write_synthetic_dataset(raw, family, dataset_id, num_train=24, num_test=6, size=size)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["demo"], choices=[*FAMILY_DATASETS, "all"],
                        help="dataset families to measure, each with its own table (default: demo; all: "
                             f"{' '.join(FAMILY_DATASETS)})")
    parser.add_argument("--rows", nargs="+", default=None,
                        help=f"rows to run (default: {' '.join(DEFAULT_ROWS)} on the demo alone, else "
                             f"{' '.join(DETAIL_ROWS)}); name=config.yaml adds a config")
    parser.add_argument("--quick", action="store_true", help=f"a look: only the rows {' '.join(QUICK_ROWS)}")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image size of every family (default {DEFAULT_SIZE}; the U-Net's plan changes with it, "
                             f"so compare rows of one size only; a workdir holds one size)")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "benchmarks" / "results" / "quality"),
                        help="data, preprocessing and results go here (reused between runs)")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train every row this many times and add a table of the means and ranges (default 1)")
    args = parser.parse_args(argv)
    if args.quick and args.rows:
        parser.error("--quick chooses the rows itself; give --rows or --quick, not both")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    families = list(FAMILY_DATASETS) if "all" in args.families else list(dict.fromkeys(args.families))
    specs = args.rows or list(QUICK_ROWS if args.quick else DEFAULT_ROWS if families == ["demo"] else DETAIL_ROWS)
    started_all = time.monotonic()  # the data and preprocessing (first run) count too

    workdir = Path(args.workdir).resolve()
    run_dir = nnunet_folders(workdir)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    from nnunetv2.vit.cli import get_device
    from nnunetv2.vit.demo import plan

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    get_device(device)  # threads as nnUNetv2_train sets them, for every row alike
    planned = []  # every row's config written (and a typo in --rows refused) before the first training
    for spec in specs:
        name, _, path = spec.partition("=")
        planned.append((name, None if name == "unet" else (user_config(Path(path), name, run_dir) if path
                                                            else row_config(name, run_dir))))

    results: Dict[str, List[Row]] = {}
    tables: List[str] = []
    out_json = run_dir / "quality.json"
    for family in families:
        dataset = write_dataset(family, workdir / "nnUNet_raw", args.size)
        dataset_id = FAMILY_DATASETS[family][0]
        plan(dataset_id, workdir / "nnUNet_preprocessed", dataset.name)
        if not (workdir / "nnUNet_preprocessed" / dataset.name / "nnUNetPlans_2d").is_dir():  # the U-Net's data
            preprocess([dataset_id], configurations=("2d",), num_processes=(int(os.environ["nnUNet_def_n_proc"]),))
        labels = foreground(json.loads((dataset / "dataset.json").read_text())["labels"])
        rows = results[family] = []
        for repeat, (name, config) in ((r, row) for r in range(args.repeats) for row in planned):
            label = f"{family} / {Row(name, '', repeat=repeat).run_name}"
            print(f"\n=== {label}: training ({'upstream U-Net' if config is None else config})", flush=True)
            row = train_and_score(name, config, dataset, run_dir / "predictions" / family, device, labels, repeat)
            rows.append(row)
            means = ", ".join(f"{c} {row.mean(row.dice.get(c, {})):.3f}" for c in labels)
            print(f"=== {label}: Dice {means}, {row.train_s:.0f} s{' ' + row.error if row.error else ''}", flush=True)
            out_json.write_text(json.dumps({"device": device, "budget": BUDGET, "torch": torch.__version__,
                                            "total_s": round(time.monotonic() - started_all),
                                            "families": {f: [asdict(r) for r in rs] for f, rs in results.items()}},
                                           indent=1))
            if args.markdown:
                Path(args.markdown).write_text("\n\n".join([*tables, f"### {family}\n\n{table(rows, list(labels))}"])
                                               + "\n")
        if any(not row.error for row in rows):  # once per family: drawing every row's predictions takes seconds
            write_panel(rows, dataset, run_dir / "predictions" / family, run_dir / f"panel_{family}.png", labels)
        summary = f"\n\nOver {args.repeats} repeats:\n\n{over_repeats(rows, list(labels))}" if args.repeats > 1 else ""
        tables.append(f"### {family}\n\n{table(rows, list(labels))}{summary}\n\n{against_unet(rows, list(labels))}"
                      .rstrip())
        print("\n" + tables[-1], flush=True)
    print("\n" + "\n\n".join(tables))
    print(f"\nresults: {out_json} (panels: {run_dir}/panel_<family>.png; {time.monotonic() - started_all:.0f} s "
          f"in all)")


if __name__ == "__main__":
    # As nnUNetv2_train: one thread per data-augmentation worker, or they oversubscribe the CPU.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    main()
