"""Segmentation quality on the demo data: upstream nnU-Net's 2D U-Net next to every ViT decoder,
with and without the detail path, all trained with one budget.

A result of a ViT model means something only next to nnU-Net's own U-Net on the same data and
budget, so this measures both in one run: it writes the demo dataset (``nnunetv2/vit/demo_data.py``,
24 training and 6 test fundus images of 256x256), runs upstream's plan and preprocess, trains each
row on fold 0 for the same epochs, iterations and batch size, predicts the test split with
nnU-Net's predictor and prints vessel and optic-disc Dice (mean and per case), parameters and
training time.

- ``unet``: upstream's ``nnUNetTrainer`` and network untouched; only the epochs and iterations are set.
- ``dpt``, ``upernet``, ``segformer``, ``primus``: ViT-S/16 DINOv3 (random init: no model hub) with the
  demo's training settings (``nnunetv2/configs/dpt_demo.yaml``) and small decoders; ``<name>_detail``
  adds the detail path (``model.decoder.detail_path: true``).
- ``name=path/to/config.yaml``: any other config, trained with the same budget.

    .venv/bin/python benchmarks/quality.py                    # every row, ~40 min on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --rows unet dpt_detail mine=my.yaml

Data and preprocessing live in ``--workdir`` (default ``benchmarks/results/quality``) and are reused;
each run trains into a results folder of its own there. The table is printed and written as JSON
(and Markdown with ``--markdown``) after every row, so a killed run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATASET_ID = 999
DATASET_NAME = "DemoFundus"
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


@dataclass
class Row:
    name: str
    config: str  # "upstream nnUNetTrainer" or the YAML written for the row
    params: int = 0
    train_s: float = float("nan")
    vessel: Dict[str, float] = field(default_factory=dict)  # per test case
    disc: Dict[str, float] = field(default_factory=dict)
    error: str = ""

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
    if decoder_name != "dpt":
        config["model"].update(SMALL_DECODERS[decoder_name])
    decoder = config["model"]["decoder"] = dict(config["model"].get("decoder") or {})
    if suffix == "detail":
        decoder["detail_path"] = True
    else:
        decoder.pop("detail_path", None)
        decoder.pop("detail_channels", None)
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


def train_unet(device: str) -> Path:
    """Upstream's trainer and 2D U-Net with only the budget changed; returns the fold folder."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_budget(nnUNetTrainer):
        # Upstream records its __init__ arguments by name, so the signature is spelled out.
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = BUDGET["num_epochs"]
            self.num_iterations_per_epoch = BUDGET["num_iterations_per_epoch"]
            self.num_val_iterations_per_epoch = BUDGET["num_val_iterations_per_epoch"]

    folder = Path(nnUNet_preprocessed) / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what upstream's run_training passes its trainer
    trainer = nnUNetTrainer_budget(plans, "2d", 0, load_json(str(folder / "dataset.json")), torch.device(device))
    trainer.run_training()
    return Path(trainer.output_folder)


def train_vit(name: str, config: Path, device: str) -> Path:
    """``nnUNetv2_plan_vit.py 999 --config <config> -c 2d_<name>``, then ``nnUNetv2_train_vit.py 999 2d_<name> 0
    --config <config>``; returns the fold folder."""
    from nnunetv2.vit import plan as plan_cli
    from nnunetv2.vit.train import build_parser, results_folder, run

    configuration = f"2d_{name}"
    plan_cli.run(plan_cli.build_parser().parse_args([str(DATASET_ID), "--config", str(config), "-c", configuration,
                                                     "-np", os.environ["nnUNet_def_n_proc"]]))
    run(build_parser().parse_args([str(DATASET_ID), configuration, "0", "--config", str(config), "-device", device]))
    return results_folder(f"Dataset{DATASET_ID:03d}_{DATASET_NAME}", "nnUNetTrainer_vit", "nnUNetPlans",
                          configuration, "0")


def predict_and_score(trainer_class: type, fold_folder: Path, dataset: Path, out: Path, device: str, row: Row) -> None:
    """Predict the test split with the final checkpoint and fill the row's Dice and parameter count."""
    import numpy as np
    import torch
    from PIL import Image

    from nnunetv2.vit.demo import DISC, VESSEL, dice
    from nnunetv2.vit.predict import predictor_from_trained_model

    predictor = predictor_from_trained_model(fold_folder.parent, folds=(0,), device=torch.device(device),
                                             trainer_class=trainer_class)
    row.params = sum(p.numel() for p in predictor.network.parameters())
    predictor.predict_from_files(str(dataset / "imagesTs"), str(out), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    for label_file in sorted((dataset / "labelsTs").glob("*.png")):
        reference = np.asarray(Image.open(label_file))
        prediction = np.asarray(Image.open(out / label_file.name))
        row.vessel[label_file.stem] = dice(reference, prediction, VESSEL)
        row.disc[label_file.stem] = dice(reference, prediction, DISC)


def table(rows: List[Row]) -> str:
    """Markdown table: one line per row, per-case vessel Dice in the last column."""
    lines = ["| row | vessel Dice | disc Dice | params (M) | train s | vessel Dice per case |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name} | | | | | failed: {row.error} |")
            continue
        cases = " ".join(f"{v:.3f}" for v in row.vessel.values())
        lines.append(f"| {row.name} | {row.mean(row.vessel):.3f} | {row.mean(row.disc):.3f} | "
                     f"{row.params / 1e6:.2f} | {row.train_s:.0f} | {cases} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"rows to run (default: {' '.join(DEFAULT_ROWS)}); name=config.yaml adds a config")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "benchmarks" / "results" / "quality"),
                        help="data, preprocessing and results go here (reused between runs)")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    started_all = time.monotonic()  # the data and preprocessing (first run) count too

    workdir = Path(args.workdir).resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = workdir / "runs" / stamp
    for var, path in (("nnUNet_raw", workdir / "nnUNet_raw"), ("nnUNet_preprocessed", workdir / "nnUNet_preprocessed"),
                      ("nnUNet_results", run_dir / "nnUNet_results")):
        os.environ[var] = str(path)
        path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(4, (os.cpu_count() or 2) // 2))))

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.vit.demo import plan
    from nnunetv2.vit.demo_data import write_demo_dataset
    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    from nnunetv2.vit.cli import get_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    get_device(device)  # threads as nnUNetv2_train sets them, for every row alike
    dataset = write_demo_dataset(workdir / "nnUNet_raw", DATASET_ID, DATASET_NAME, num_train=24, num_test=6, size=256)
    plan(DATASET_ID, workdir / "nnUNet_preprocessed", dataset.name)
    if not (workdir / "nnUNet_preprocessed" / dataset.name / "nnUNetPlans_2d").is_dir():  # the U-Net's data
        preprocess([DATASET_ID], configurations=("2d",), num_processes=(int(os.environ["nnUNet_def_n_proc"]),))

    rows: List[Row] = []
    out_json = run_dir / "quality.json"
    planned = []  # every row's config written (and a typo in --rows refused) before the first training
    for spec in args.rows:
        name, _, path = spec.partition("=")
        planned.append((name, None if name == "unet" else (user_config(Path(path), name, run_dir) if path
                                                            else row_config(name, run_dir))))
    for name, config in planned:
        row = Row(name, "upstream nnUNetTrainer" if config is None else str(config))
        print(f"\n=== {name}: training ({'upstream U-Net' if config is None else config})", flush=True)
        started = time.monotonic()
        try:
            fold_folder = train_unet(device) if config is None else train_vit(name, config, device)
            row.train_s = time.monotonic() - started
            predict_and_score(nnUNetTrainer if config is None else nnUNetTrainer_vit, fold_folder, dataset,
                              run_dir / "predictions" / name, device, row)
        except Exception as err:  # one failing row (a bad config, out of memory) must not lose the others
            row.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        rows.append(row)
        print(f"=== {name}: vessel Dice {row.mean(row.vessel):.3f}, disc {row.mean(row.disc):.3f}, "
              f"{row.train_s:.0f} s{' ' + row.error if row.error else ''}", flush=True)
        out_json.write_text(json.dumps({"device": device, "budget": BUDGET, "torch": torch.__version__,
                                        "total_s": round(time.monotonic() - started_all),
                                        "rows": [asdict(r) for r in rows]}, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(table(rows) + "\n")
    print("\n" + table(rows))
    print(f"\nresults: {out_json} ({time.monotonic() - started_all:.0f} s in all)")


if __name__ == "__main__":
    # As nnUNetv2_train: one thread per data-augmentation worker, or they oversubscribe the CPU.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    main()
