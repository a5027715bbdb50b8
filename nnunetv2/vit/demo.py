"""The whole workflow on a built-in synthetic fundus dataset, in one command.

``uv run python -m nnunetv2.vit.demo`` generates the demo dataset, plans it (upstream's fingerprint and
2d plan, then ``nnUNetv2_plan_vit.py`` for the model's configuration ``2d_<config name>``) and preprocesses it,
trains a small DPT (ViT-S DINOv3), predicts the test split, prints per-case and mean vessel Dice and writes a
PNG panel. Every step is skipped when its result already exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
DATASET_ID = 999
DATASET_NAME = "DemoFundus"
DEFAULT_CONFIG = REPO / "nnunetv2" / "configs" / "dpt_demo.yaml"
VESSEL, DISC = 1, 2


def setup_paths(base: Path) -> Dict[str, Path]:
    """nnU-Net's three folders: the environment's if set, else inside ``base``."""
    paths = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, str(base / var))
        paths[var] = Path(os.environ[var])
        paths[var].mkdir(parents=True, exist_ok=True)
    return paths


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Print a step's header, and after it how long it took."""
    print(f"\n=== {message}", flush=True)
    started = time.monotonic()
    yield
    print(f"=== step {message.split()[0]} took {time.monotonic() - started:.1f} s", flush=True)


def plan(dataset_id: int, preprocessed: Path, dataset_folder_name: str, num_processes: int) -> None:
    """Upstream's fingerprint and plans (the 2d configuration the ViT's is planned from), unless already done."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    if (preprocessed / dataset_folder_name / "nnUNetPlans.json").is_file():
        print(f"already planned: {preprocessed / dataset_folder_name / 'nnUNetPlans.json'}")
        return
    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    plan_experiments([dataset_id])


def dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    ref, pred = reference == label, prediction == label
    denominator = ref.sum() + pred.sum()
    return float(2 * np.logical_and(ref, pred).sum() / denominator) if denominator else float("nan")


Panel = Tuple[np.ndarray, dict, str]  # an image, its imshow style and its title


def save_panels(lines: List[List[Panel]], out_file: Path, panel_size: Tuple[float, float], fontsize: int,
                dpi: int) -> None:
    """A grid of images without axes, one line of panels per test case, written to ``out_file``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(line) for line in lines)
    fig, axes = plt.subplots(len(lines), width, figsize=(panel_size[0] * width, panel_size[1] * len(lines)),
                             squeeze=False)
    for line_axes, line in zip(axes, lines):
        for ax, (array, style, title) in zip(line_axes, line):
            ax.imshow(array, interpolation="nearest", **style)
            ax.set_title(title, fontsize=fontsize)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)


def write_panel(cases: List[str], dataset: Path, predictions: Path, out_file: Path, scores: Dict[str, float]) -> None:
    """Image, ground truth and prediction side by side for a few test cases."""
    from matplotlib.colors import ListedColormap
    from PIL import Image

    colours = dict(cmap=ListedColormap(["black", "red", "yellow"]), vmin=0, vmax=2)
    lines = [[(np.asarray(Image.open(dataset / "imagesTs" / f"{case}_0000.png")), {}, case),
              (np.asarray(Image.open(dataset / "labelsTs" / f"{case}.png")), colours, "ground truth"),
              (np.asarray(Image.open(predictions / f"{case}.png")), colours,
               f"prediction (vessel Dice {scores[case]:.3f})")] for case in cases]
    save_panels(lines, out_file, panel_size=(3.0, 3.0), fontsize=9, dpi=100)


def demo_config(config_path: Path, pretrained: bool, output: Path) -> Path:
    """The config to train with; ``--pretrained`` switches on the timm download of DINOv3 weights."""
    if not pretrained:
        return config_path
    raw = yaml.safe_load(config_path.read_text())
    raw["model"]["pretrained"] = True
    derived = output / f"{config_path.stem}_pretrained.yaml"
    derived.write_text(yaml.safe_dump(raw, sort_keys=False))
    return derived


def run(args: argparse.Namespace) -> None:
    import torch

    from nnunetv2.vit.cli import usable_cores

    started = time.monotonic()
    # Worker pools for validation export and preprocessing (read by nnunetv2.configuration at import):
    # upstream's default of 8 spawned processes costs more than it gives on a small machine.
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(4, usable_cores() // 2))))
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    paths = setup_paths(REPO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print("nnU-Net folders (set nnUNet_raw / nnUNet_preprocessed / nnUNet_results to change):")
    for var, path in paths.items():
        print(f"  {var} = {path}")
    print(f"device: {device}")

    from nnunetv2.vit.demo_data import write_demo_dataset
    from nnunetv2.vit.errors import ConfigError

    with step("1/5 demo dataset"):
        try:
            dataset = write_demo_dataset(paths["nnUNet_raw"], DATASET_ID, DATASET_NAME, num_train=args.num_train,
                                         num_test=args.num_test, size=args.size)
        except FileExistsError as err:  # another dataset with the demo's id, or the demo's with other settings
            raise ConfigError(str(err)) from err
        print(dataset)

    from nnunetv2.vit import plan as plan_cli

    with step("2/5 plan: nnU-Net's fingerprint and 2d plan, then the ViT's (nnUNetv2_plan_vit.py), and preprocess"):
        plan(DATASET_ID, paths["nnUNet_preprocessed"], dataset.name, num_processes=min(4, usable_cores()))
        config_file = demo_config(Path(args.config), args.pretrained, output)
        configuration = plan_cli.default_configuration_name(str(config_file))
        plan_cli.run(plan_cli.build_parser().parse_args(
            [str(DATASET_ID), "--config", str(config_file), "-c", configuration,
             "-np", os.environ["nnUNet_def_n_proc"]]))

    from nnunetv2.vit.config import load_config
    from nnunetv2.vit.predict import predictor_from_trained_model
    from nnunetv2.vit.trained_model import require_same_model, stored_config
    from nnunetv2.vit.train import build_parser, results_folder, run as run_training

    with step(f"3/5 train DPT on {configuration} (nnUNetv2_train_vit.py)"):
        fold_folder = results_folder(dataset.name, "nnUNetTrainer_vit", "nnUNetPlans", configuration, "0")
        if (fold_folder / "checkpoint_final.pth").is_file():
            require_same_model(stored_config(fold_folder.parent / "plans.json", configuration),
                               load_config(config_file), str(fold_folder.parent), str(config_file),
                               "Delete that folder to retrain the demo.")
            print(f"already trained: {fold_folder / 'checkpoint_final.pth'}")
        else:
            train_args = [str(DATASET_ID), configuration, "0", "--config", str(config_file), "-device", device]
            if (fold_folder / "checkpoint_latest.pth").is_file():
                train_args.append("--c")
            run_training(build_parser().parse_args(train_args))

    with step("4/5 predict the test split (nnU-Net predictor)"):
        predictions = output / "predictions"
        predictor = predictor_from_trained_model(fold_folder.parent, folds=(0,), device=torch.device(device))
        predictor.predict_from_files(str(dataset / "imagesTs"), str(predictions), save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)

    from PIL import Image

    with step("5/5 vessel Dice on the test split"):
        scores = {}
        for label_file in sorted((dataset / "labelsTs").glob("*.png")):
            case = label_file.name[:-4]
            reference = np.asarray(Image.open(label_file))
            prediction = np.asarray(Image.open(predictions / label_file.name))
            scores[case] = dice(reference, prediction, VESSEL)
            print(f"  {case}: vessel Dice {scores[case]:.3f}   optic disc Dice {dice(reference, prediction, DISC):.3f}")
        print(f"mean vessel Dice: {np.nanmean(list(scores.values())):.3f} over {len(scores)} test cases")

    panel = output / "demo_panel.png"
    write_panel(sorted(scores)[:3], dataset, predictions, panel, scores)
    print(f"panel (image | ground truth | prediction): {panel}")
    print(f"training progress plot: {fold_folder / 'progress.png'}")
    print(f"total time: {time.monotonic() - started:.0f} s")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2.vit.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: dpt_demo.yaml)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from DINOv3 ViT-S weights downloaded through timm (needs network access)")
    parser.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--output", default=str(REPO / "demo_output"), help="predictions and panel go here")
    parser.add_argument("--num-train", type=int, default=24, help="training images to generate")
    parser.add_argument("--num-test", type=int, default=6, help="test images to generate")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    args = parser.parse_args(argv)
    from nnunetv2.vit.cli import run_main

    run_main("nnunetv2.vit.demo", lambda: run(args))


if __name__ == "__main__":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    main()
