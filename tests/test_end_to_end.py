"""A user's whole workflow on a tiny generated dataset: raw data -> upstream plan and preprocess ->
train (killed and resumed) -> predict without the YAML -> upstream metrics; plus a LoRA training.

Runs the real commands in subprocesses, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATASET_ID, REPO
from nnunetv2.vit.demo import dice

pytestmark = pytest.mark.slow

TRAIN_TIMEOUT = 300

TINY_DPT = """
model:
  model_path: nnunetv2.model.model_dpt
  backbone: dinov3
  backbone_size: small
  pretrained: false
  normalization: zscore  # nnU-Net's '2d' configuration
  decoder:
    fusion_hidden_size: 32
    neck_hidden_sizes: [24, 48, 96, 192]
lora:
  enabled: {lora}
  r: 4
train:
  optimizer: adamw
  initial_lr: 0.0003
  num_epochs: {epochs}
  num_iterations_per_epoch: 2
  num_val_iterations_per_epoch: 1
  save_every: 1
"""


def run(args, env, timeout=TRAIN_TIMEOUT):
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def fold_folder(root: Path) -> Path:
    return root / "results" / f"Dataset{DATASET_ID}_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d" / "fold_0"


def training_losses(log_text: str) -> list[float]:
    return [float(line.split("train_loss")[1]) for line in log_text.splitlines() if "train_loss" in line]


def test_train_kill_resume_predict_evaluate(workspace, tmp_path):
    root, env, dataset = workspace
    config = tmp_path / "tiny_dpt.yaml"
    config.write_text(TINY_DPT.format(lora="false", epochs=3))
    folder = fold_folder(root)

    # Start training and kill it hard once the first periodic checkpoint exists.
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0", "--config", str(config),
         "-device", "cpu"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    latest = folder / "checkpoint_latest.pth"
    while not latest.is_file() and proc.poll() is None and time.monotonic() - started < TRAIN_TIMEOUT:
        time.sleep(0.2)
    assert latest.is_file(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(latest, weights_only=False)["current_epoch"]
    assert 1 <= epoch_at_kill < 3

    # Resume without the YAML: the stored config is used; training finishes and validates.
    config.unlink()
    resumed = run(["nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0", "--c", "-device", "cpu"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3
    assert final["trainer_name"] == "nnUNetTrainer_vit"
    logs = "\n".join(p.read_text() for p in sorted(folder.glob("training_log_*.txt")))
    losses = training_losses(logs)
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    # The final validation covers fold 0's validation cases, once each, and its Dice is what its files give.
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    splits = json.loads((root / "preprocessed" / f"Dataset{DATASET_ID}_DemoFundus" / "splits_final.json").read_text())
    cases = summary["metric_per_case"]
    assert sorted(Path(case["prediction_file"]).stem for case in cases) == sorted(splits[0]["val"])
    for case in cases:
        reference, prediction = (np.asarray(Image.open(case[key])) for key in ("reference_file", "prediction_file"))
        for label in (1, 2):
            assert case["metrics"][str(label)]["Dice"] == pytest.approx(dice(reference, prediction, label), nan_ok=True)
    assert (folder / "progress.png").is_file()

    # Predict the test images with the trained model: no YAML, no network, no training data needed.
    out = tmp_path / "predictions"
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    predict_env = dict(env, nnUNet_raw=str(elsewhere), nnUNet_preprocessed=str(elsewhere))
    predicted = run(["nnUNetv2_predict_vit.py", "-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                     "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                    predict_env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    for label_file in sorted((dataset / "labelsTs").glob("*.png")):
        truth = np.asarray(Image.open(label_file))
        prediction = np.asarray(Image.open(out / label_file.name))
        assert prediction.shape == truth.shape
        assert set(np.unique(prediction)) <= {0, 1, 2}

    # Upstream's own nnUNetv2_predict works too once it can import this package and find the trainer.
    upstream_out = tmp_path / "upstream_predictions"
    upstream_env = dict(predict_env, PYTHONPATH=str(REPO),
                        nnUNet_extTrainer=str(REPO / "nnunetv2" / "vit" / "ext_trainers"))
    upstream = run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o",
                    str(upstream_out), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainer_vit",
                    "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], upstream_env)
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    for prediction in sorted(out.glob("*.png")):
        upstream_prediction = upstream_out / prediction.name
        assert np.array_equal(np.asarray(Image.open(prediction)), np.asarray(Image.open(upstream_prediction)))

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    metrics = compute_metrics_on_folder(
        str(dataset / "labelsTs"), str(out), str(tmp_path / "summary.json"), NaturalImage2DIO(), ".png", [1, 2],
        num_processes=1,
    )
    # What the demo prints (its own Dice) is what upstream's evaluation computes, case by case.
    for case in metrics["metric_per_case"]:
        reference, prediction = (np.asarray(Image.open(case[key])) for key in ("reference_file", "prediction_file"))
        assert case["metrics"][1]["Dice"] == pytest.approx(dice(reference, prediction, 1), nan_ok=True)
    print(f"test-split vessel Dice after 3 tiny epochs: {metrics['mean'][1]['Dice']:.3f}")


def test_lora_training_run(workspace, tmp_path):
    root, env, _ = workspace
    env = dict(env, nnUNet_results=str(tmp_path / "results"))
    config = tmp_path / "tiny_lora.yaml"
    config.write_text(TINY_DPT.format(lora="true", epochs=1))
    result = run(["nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "results" / f"Dataset{DATASET_ID}_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d" / "fold_0"
    weights = torch.load(folder / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert any("lora_A" in key for key in weights)
    log = next(folder.glob("training_log_*.txt")).read_text()
    backbone_line = next(line for line in log.splitlines() if line.split(": ", 1)[-1].startswith("backbone"))
    trainable, total = (int(x.replace(",", "")) for x in backbone_line.split()[-3:-1])
    assert 0 < trainable < 0.05 * total
    assert np.isfinite(training_losses(log)).all()
