"""Transfer benchmark: does a backbone pretrained with this project help on a different, small dataset?

1. Source task: the demo's colour-fundus data (``nnunetv2/vit/demo_data.py``, 24 training images, drawn at
   128x128). A ViT-S/16 DINOv3-architecture DPT (random init: no model hub here) trains on it for
   ``SOURCE_BUDGET`` (twice the target rows' budget), without the detail path, so that the backbone alone has to
   learn the source's structures.
2. Its backbone is exported as a timm state dict with ``nnUNetv2_export_backbone_vit.py`` (the file a user brings
   as ``model.checkpoint_path``).
3. Target task: a different synthetic family (``make_target_case``): grey angiogram-like images, BRIGHT vessels on
   a dark background (the source's are dark on orange), 1.6x wider, no optic-disc label, 128x128; 8 labelled
   cases (fold 0 trains on 6, validates on 2) and 8 held-out test cases. ``--target fundus``: the source's own
   kind of images instead (other cases, vessel and disc scored), to see whether the backbone helps where the
   structures are the very same.
4. Every row trains on the target with one budget (``TARGET_BUDGET``, batch 2) and predicts the test split:
   - ``random``: the demo's DPT (detail path on) from random weights;
   - ``full``: pretrained, every parameter at the same learning rate;
   - ``backbone_lr``: pretrained, the backbone at 0.1 x the decoder's learning rate (Depth-Anything-V2;
     ``dpt_finetune_full.yaml``);
   - ``layer_decay``: pretrained, backbone lr 0.1 x (Depth-Anything-V2) and layer decay 0.65 (RETFound);
   - ``frozen``: pretrained, ``model.freeze_backbone: true`` (DINOv3's evaluation regime);
   - ``frozen_random``: the control for ``frozen``: the same, with a frozen random backbone;
   - ``lora``: pretrained + LoRA r8 on qkv;
   - ``unet``: upstream's ``nnUNetTrainer`` and 2D U-Net, the same data and budget.
   The ViT rows use the demo's settings (AdamW 1e-3, 1 warm-up epoch) and its detail path: without it a patch-16
   ViT resolves these vessels too coarsely for its backbone to matter (at 128x128 every row, a frozen random
   backbone included, ended at 0.50-0.52 Dice: ``benchmarks/RESULTS.md``). Rows are trained as
   ``nnUNetv2_train_vit.py`` trains them but without the final validation of fold 0 (the U-Net row likewise), and
   the test split is predicted in this process: worker start-ups cost minutes on a busy CPU. ``--seeds N``
   trains each row N times (seeds 0..N-1), each run repeatable: augmentation runs in this process, seeded.

Printed per row: test Dice per class (mean, per seed, per case), trainable parameters, training time. What the
rows showed, and why the pretrained ones did not beat random init here: ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/transfer.py --seeds 2   # all rows (~37 min on 2 CPU cores; RESULTS.md)
    .venv/bin/python benchmarks/transfer.py --rows random frozen frozen_random --markdown table.md
    .venv/bin/python benchmarks/transfer.py --target fundus --rows random full frozen_random

Data, preprocessing and the exported backbone live in ``--workdir`` (default ``benchmarks/results/transfer``)
and are reused; each run trains into a results folder of its own there. The table is written as JSON after every
row, so a killed run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from quality import nnunet_folders, train_unet  # noqa: E402  (benchmarks/quality.py)

SOURCE_ID, SOURCE_NAME = 996, "TransferSource"
VESSEL = 1


@dataclass(frozen=True)
class Target:
    """A target dataset: its nnU-Net id and name, and the classes scored on its test split."""
    dataset_id: int
    name: str
    classes: Dict[str, int]

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


# ``angio``: the transfer target. ``fundus``: the source's own kind of images (other cases, fewer labels), a check
# that a backbone which has learned the structures helps when they are the same.
TARGETS = {"angio": Target(997, "TransferTarget", {"vessel": VESSEL}),
           "fundus": Target(995, "TransferFundus", {"vessel": VESSEL, "disc": 2})}
# The source runs 3x the demo's budget; every target row the demo's (10 x 20 iterations, batch 2).
SOURCE_BUDGET = {"num_epochs": 20, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 2}
TARGET_BUDGET = {"num_epochs": 10, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 2}
BATCH_SIZE = 2
SOURCE_SIZE, TARGET_SIZE, TARGET_TRAIN, TARGET_TEST = 128, 128, 8, 8
SMOKE = {"source_epochs": 2, "target_epochs": 2, "iterations": 2, "size": 64, "train": 5, "test": 2}

# The demo's DPT (nnunetv2/configs/dpt_demo.yaml) as RESULTS.md's transfer tables measured it, its detail path at the
# library's widths (the demo config's are twice those since): every target row with its detail path, the source
# without it, so that the backbone alone has to learn the source's structures.
DECODER = {"fusion_hidden_size": 64, "neck_hidden_sizes": [48, 96, 192, 384], "readout_type": "project"}
BASE_CONFIG = {
    "model": {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3", "backbone_size": "small",
              "pretrained": False, "decoder": {**DECODER, "detail_path": True}},
    "train": {"optimizer": "adamw", "initial_lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1, "gradient_clip": 1.0,
              "batch_size": BATCH_SIZE},
}
SOURCE = {"model": {"decoder": DECODER}}
# What each pretrained row changes; {backbone} is the exported file.
ROWS: Dict[str, dict] = {
    "random": {},
    "full": {"model": {"checkpoint_path": "{backbone}"}},
    "backbone_lr": {"model": {"checkpoint_path": "{backbone}"}, "train": {"backbone_lr_scale": 0.1}},
    "layer_decay": {"model": {"checkpoint_path": "{backbone}"},
                    "train": {"backbone_lr_scale": 0.1, "layer_decay": 0.65}},
    "frozen": {"model": {"checkpoint_path": "{backbone}", "freeze_backbone": True}},
    "frozen_random": {"model": {"freeze_backbone": True}},  # the control: what the frozen row owes its backbone
    "lora": {"model": {"checkpoint_path": "{backbone}"}, "lora": {"enabled": True, "r": 8, "target_modules": ["qkv"]}},
    "unet": {},
}


@dataclass
class Row:
    name: str
    trainable: int = 0
    train_s: List[float] = field(default_factory=list)  # per seed
    dice: List[Dict[str, Dict[str, float]]] = field(default_factory=list)  # per seed: class -> test case -> Dice
    error: str = ""

    def mean(self, cls: str) -> float:
        """Test Dice of ``cls`` over every case of every seed."""
        values = [v for run in self.dice for v in run[cls].values()]
        return float(np.mean(values)) if values else float("nan")

    def seed_means(self, cls: str) -> List[float]:
        return [float(np.mean(list(run[cls].values()))) for run in self.dice]

    def case_means(self, cls: str) -> List[float]:
        """Each test case's Dice of ``cls``, averaged over the seeds."""
        return [float(np.mean([run[cls][case] for run in self.dice])) for case in self.dice[0][cls]] if self.dice \
            else []


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """A repeatable training run on the CPU: augmentation in this process (``nnUNet_n_proc_DA=0``, upstream's
    single-threaded augmenter) and every random generator it and the model draw from seeded. The variable is
    restored afterwards: upstream's planner cannot plan with it at 0 (``torch.set_num_threads(0)``)."""
    import random

    import torch

    previous = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["nnUNet_n_proc_DA"]
        else:
            os.environ["nnUNet_n_proc_DA"] = previous


def make_target_case(rng: np.random.Generator, size: int) -> tuple:
    """A grey angiogram-like image (RGB, R = G = B) and its vessel label (1 = vessel): the demo's vessel trees
    1.6x wider, drawn bright on a dark, unevenly lit field of view, with a faint unlabelled bright disc."""
    from nnunetv2.vit.demo_data import blur121, grow_vessels, rasterise, smooth_field, fundus_anatomy

    c, yy, xx, fov_r, rr, fov, side, (disc_x, disc_y, disc_rx, disc_ry), (mac_x, mac_y, mac_sigma) = \
        fundus_anatomy(rng, size)

    img = rng.uniform(0.12, 0.2) * (1.0 - rng.uniform(0.3, 0.5) * rr ** 2) + 0.08 * smooth_field(rng, size, 12)
    ell = np.hypot((xx - disc_x) / disc_rx, (yy - disc_y) / disc_ry)
    img += rng.uniform(0.15, 0.25) * np.clip(1.2 - ell, 0.0, 1.0)
    segs = grow_vessels(rng, size, c, fov_r, (disc_x, disc_y, disc_rx, disc_ry), (mac_x, mac_y, 0.7 * mac_sigma),
                         side)
    segs[:, 4:6] *= 1.6
    cov, mask = rasterise(segs, size)
    vessels = blur121(np.maximum(cov[0], cov[1]))
    img += vessels * rng.uniform(0.2, 0.3) * (1.0 + 0.3 * smooth_field(rng, size, 4))
    img += rng.normal(0.0, 0.05, size=img.shape)
    grey = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    grey[~fov] = 0
    label = (mask & fov).astype(np.uint8) * VESSEL
    return np.repeat(grey[..., None], 3, axis=2), label


def write_target_dataset(raw_root: Path, size: int, num_train: int, num_test: int) -> Path:
    """The target dataset in nnU-Net's raw format (written once; reused when complete)."""
    from PIL import Image

    folder = raw_root / TARGETS["angio"].folder_name
    record = {"size": size, "num_train": num_train, "num_test": num_test}
    written = folder / "dataset.json"
    if written.is_file() and json.loads(written.read_text()).get("record") == record:
        return folder
    for split, count, offset in (("Tr", num_train, 0), ("Ts", num_test, 1000)):
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = make_target_case(np.random.default_rng([7, offset + index]), size)
            case = f"angio_{split.lower()}{index:03d}"
            Image.fromarray(image).save(folder / f"images{split}" / f"{case}_0000.png")
            Image.fromarray(label).save(folder / f"labels{split}" / f"{case}.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "vessel": VESSEL},
        "numTraining": num_train, "file_ending": ".png", "name": TARGETS["angio"].name, "record": record,
        "description": "Synthetic grey angiogram-like images with bright vessels (benchmarks/transfer.py)."},
        indent=1))
    return folder


def write_config(config: dict, path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def merged(base: dict, override: dict) -> dict:
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for section, values in override.items():
        out.setdefault(section, {}).update(values)
    return out


def train_vit(dataset_id: int, configuration: str, config: Path, device: str, seed: int = 0) -> Path:
    """``nnUNetv2_plan_vit.py``, then fold 0 trained as ``nnUNetv2_train_vit.py`` trains it, without the final
    validation (the test split is scored instead; the U-Net row skips it alike); returns the fold folder."""
    import torch

    from nnunetv2.vit import plan as plan_cli
    from nnunetv2.vit.config import load_config
    from nnunetv2.vit.trained_model import add_vit_config
    from nnunetv2.vit.train import load_plans
    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    plan_cli.run(plan_cli.build_parser().parse_args([str(dataset_id), "--config", str(config), "-c", configuration,
                                                     "-np", os.environ["nnUNet_def_n_proc"]]))
    _, plans, dataset_json = load_plans(str(dataset_id), "nnUNetPlans", configuration)
    add_vit_config(plans, configuration, load_config(config))
    plans["continue_training"] = False
    with seeded(seed):
        trainer = nnUNetTrainer_vit(plans, configuration, 0, dataset_json, torch.device(device))
        trainer.run_training()
    return Path(trainer.output_folder)


def predict_and_score(trainer_class: type, fold_folder: Path, dataset: Path, classes: Dict[str, int], out: Path,
                      device: str, row: Row) -> None:
    """Predict the test split with the final checkpoint; add the run's Dice per class and case to the row, and set its
    trainable parameter count."""
    import torch
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from PIL import Image

    from nnunetv2.vit.demo import dice
    from nnunetv2.vit.predict import predictor_from_trained_model

    predictor = predictor_from_trained_model(fold_folder.parent, folds=(0,), device=torch.device(device),
                                             trainer_class=trainer_class)
    row.trainable = sum(p.numel() for p in predictor.network.parameters() if p.requires_grad)
    out.mkdir(parents=True, exist_ok=True)
    scores: Dict[str, Dict[str, float]] = {cls: {} for cls in classes}
    for label_file in sorted((dataset / "labelsTs").glob("*.png")):  # in this process: no worker start-up costs
        image, properties = NaturalImage2DIO().read_images([str(dataset / "imagesTs" / f"{label_file.stem}_0000.png")])
        prediction = predictor.predict_single_npy_array(image, properties)[0].astype(np.uint8)
        Image.fromarray(prediction).save(out / label_file.name)
        label = np.asarray(Image.open(label_file))
        for cls, value in classes.items():
            scores[cls][label_file.stem] = dice(label, prediction, value)
    row.dice.append(scores)


def table(rows: List[Row], classes: Sequence[str]) -> str:
    head = "".join(f" {cls} Dice | per seed |" for cls in classes)
    lines = [f"| row |{head} trainable params (M) | train s per run | Dice per test case (mean over seeds) |",
             "|---|" + "---:|---|" * len(classes) + "---:|---:|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name} |" + " | |" * len(classes) + f" | | failed: {row.error} |")
            continue
        scores = "".join(f" {row.mean(cls):.3f} | {' '.join(f'{v:.3f}' for v in row.seed_means(cls))} |"
                         for cls in classes)
        cases = "; ".join((f"{cls}: " if len(classes) > 1 else "") + " ".join(f"{v:.3f}" for v in row.case_means(cls))
                          for cls in classes)
        lines.append(f"| {row.name} |{scores} {row.trainable / 1e6:.2f} | {np.mean(row.train_s):.0f} | {cases} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "benchmarks" / "results" / "transfer"),
                        help="data, preprocessing, the exported backbone and results go here (reused between runs)")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--target", default="angio", choices=list(TARGETS),
                        help="angio: the transfer target (default); fundus: the source's kind of images, other cases")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train and score each row this many times, with seeds 0, 1, ... (default: 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest setting (64x64 images, 1 epoch of 2 iterations): checks that it runs")
    args = parser.parse_args(argv)
    started_all = time.monotonic()

    source_budget, target_budget = dict(SOURCE_BUDGET), dict(TARGET_BUDGET)
    size, num_train, num_test, source_size = TARGET_SIZE, TARGET_TRAIN, TARGET_TEST, SOURCE_SIZE
    if args.smoke:
        source_budget = {"num_epochs": SMOKE["source_epochs"], "num_iterations_per_epoch": SMOKE["iterations"],
                         "num_val_iterations_per_epoch": 1}
        target_budget = dict(source_budget, num_epochs=SMOKE["target_epochs"])
        size = source_size = SMOKE["size"]
        num_train, num_test = SMOKE["train"], SMOKE["test"]
    workdir = Path(args.workdir).resolve()
    run_dir = nnunet_folders(workdir)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2.vit.cli import get_device
    from nnunetv2.vit.demo import plan
    from nnunetv2.vit.demo_data import write_demo_dataset
    from nnunetv2.vit.errors import TrainingStopped
    from nnunetv2.vit.export_backbone import export_backbone
    from nnunetv2.vit.trainer import nnUNetTrainer_vit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    get_device(device)
    if device == "cpu":
        # One intra-op thread, for every row alike: on a CPU shared with other work, torch's multi-threaded
        # kernels stall at their barriers (measured 20-30x slower with the cores oversubscribed; tests/conftest.py).
        torch.set_num_threads(1)
    preprocessed = workdir / "nnUNet_preprocessed"
    pretrained_rows = [name for name in args.rows if "checkpoint_path" in ROWS[name].get("model", {})]

    backbone = workdir / f"source_backbone{'_smoke' if args.smoke else ''}.pth"
    if pretrained_rows and not backbone.is_file():
        print(f"\n=== source: pretraining on the demo fundus data ({source_budget})", flush=True)
        source = write_demo_dataset(workdir / "nnUNet_raw", SOURCE_ID, SOURCE_NAME, num_train=24 if not args.smoke
                                    else num_train, num_test=0, size=source_size)
        plan(SOURCE_ID, preprocessed, source.name)
        config = write_config(merged(merged(BASE_CONFIG, SOURCE), {"train": source_budget}),
                              run_dir / "configs" / "source.yaml")
        started = time.monotonic()
        fold = train_vit(SOURCE_ID, "2d_source", config, device)
        print(f"=== source: trained in {time.monotonic() - started:.0f} s", flush=True)
        export_backbone(fold / "checkpoint_final.pth", backbone)
        print(f"=== source: backbone exported to {backbone}", flush=True)

    target = TARGETS[args.target]
    if args.target == "angio":
        dataset = write_target_dataset(workdir / "nnUNet_raw", size, num_train, num_test)
    else:  # seed 1: other cases than the source's (seed 0)
        dataset = write_demo_dataset(workdir / "nnUNet_raw", target.dataset_id, target.name, num_train=num_train,
                                     num_test=num_test, size=size, seed=1)
    plan(target.dataset_id, preprocessed, dataset.name)
    if "unet" in args.rows and not (preprocessed / dataset.name / "nnUNetPlans_2d").is_dir():
        preprocess([target.dataset_id], configurations=("2d",), num_processes=(int(os.environ["nnUNet_def_n_proc"]),))

    rows: List[Row] = []
    out_json = run_dir / "transfer.json"
    for name in args.rows:
        row = Row(name)
        try:
            for seed in range(args.seeds):
                print(f"\n=== {name}, seed {seed}: training on the target data", flush=True)
                started = time.monotonic()
                if name == "unet":
                    with seeded(seed):
                        fold = train_unet(target.folder_name, device, target_budget, BATCH_SIZE)
                else:
                    override = json.loads(json.dumps(ROWS[name]).replace("{backbone}", str(backbone)))
                    config = write_config(merged(merged(BASE_CONFIG, override), {"train": target_budget}),
                                          run_dir / "configs" / f"{name}.yaml")
                    fold = train_vit(target.dataset_id, f"2d_{name}", config, device, seed)
                row.train_s.append(time.monotonic() - started)
                predict_and_score(nnUNetTrainer if name == "unet" else nnUNetTrainer_vit, fold, dataset,
                                  target.classes, run_dir / "predictions" / name / f"seed{seed}", device, row)
                scores = ", ".join(f"{cls} {row.seed_means(cls)[-1]:.3f}" for cls in target.classes)
                print(f"=== {name}, seed {seed}: test Dice {scores}, {row.trainable:,} trainable parameters, "
                      f"{row.train_s[-1]:.0f} s", flush=True)
        except TrainingStopped as stop:  # SIGTERM/SIGUSR1 end the run, not one row
            raise SystemExit(f"transfer.py: stopped in row {name} ({stop}); the rows before it are kept.") from None
        except Exception as err:  # one failing row must not lose the others
            row.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            print(f"=== {name}: {row.error}", flush=True)
        rows.append(row)
        out_json.write_text(json.dumps({"device": device, "target": args.target, "source_budget": source_budget,
                                        "target_budget": target_budget, "batch_size": BATCH_SIZE,
                                        "seeds": args.seeds, "total_s": round(time.monotonic() - started_all),
                                        "rows": [asdict(r) for r in rows]}, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(table(rows, list(target.classes)) + "\n")
    print("\n" + table(rows, list(target.classes)))
    print(f"\nresults: {out_json} ({time.monotonic() - started_all:.0f} s in all)")
    if any(math.isnan(row.mean(cls)) or row.error for row in rows for cls in target.classes):
        sys.exit(1)


if __name__ == "__main__":
    # As nnUNetv2_train: one thread per data-augmentation worker, or they oversubscribe the CPU.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    main()
