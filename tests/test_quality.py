"""benchmarks/quality.py without training: its tables, panels, rows and options."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks import quality


def _row(name: str, crack: list, blob: list) -> quality.Row:
    row = quality.Row(name, "c.yaml", params=2_500_000, train_s=12.0)
    row.dice = {"crack": {f"c{i}": v for i, v in enumerate(crack)}, "blob": {f"c{i}": v for i, v in enumerate(blob)}}
    return row


def test_table_has_a_mean_and_per_case_column_for_every_class():
    rows = [_row("unet", [0.9, 0.8], [0.5, float("nan")]), quality.Row("bad", "x.yaml", error="ValueError: boom")]
    lines = quality.table(rows, ["crack", "blob"]).splitlines()
    assert lines[0] == ("| row | crack Dice | blob Dice | params (M) | train s | crack Dice per case | "
                        "blob Dice per case |")
    assert lines[2] == "| unet | 0.850 | 0.500 | 2.50 | 12 | 0.900 0.800 | 0.500 nan |"
    assert lines[3].startswith("| bad |") and lines[3].endswith("failed: ValueError: boom |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_panel_shows_every_test_case_and_row(tmp_path):
    dataset, predictions = tmp_path / "data", tmp_path / "pred"
    for folder in (dataset / "imagesTs", dataset / "labelsTs", predictions / "unet"):
        folder.mkdir(parents=True)
    for case in ("c0", "c1"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(dataset / "imagesTs" / f"{case}_0000.png")
        Image.fromarray(np.ones((32, 32), np.uint8)).save(dataset / "labelsTs" / f"{case}.png")
        Image.fromarray(np.ones((32, 32), np.uint8)).save(predictions / "unet" / f"{case}.png")
    out = tmp_path / "panel.png"
    quality.write_panel([_row("unet", [0.9, 0.8], [0.5, 0.4])], dataset, predictions, out,
                        {"background": 0, "crack": 1, "blob": 2})
    assert Image.open(out).size[1] > Image.open(out).size[0] / 2  # two lines of three panels


def test_detail_rows_use_the_demo_config_with_the_detail_path(tmp_path):
    config = yaml.safe_load(quality.row_config("upernet_detail", tmp_path).read_text())
    assert config["model"]["model_path"] == "nnunetv2.model.model_upernet"
    assert config["model"]["decoder"]["detail_path"] is True
    demo = yaml.safe_load(quality.DEMO_CONFIG.read_text())["model"]["decoder"]
    assert config["model"]["decoder"]["detail_channels"] == demo["detail_channels"]
    assert config["train"]["num_epochs"] == quality.BUDGET["num_epochs"]
    plain = yaml.safe_load(quality.row_config("dpt", tmp_path).read_text())
    assert "detail_path" not in plain["model"]["decoder"] and "detail_channels" not in plain["model"]["decoder"]


def test_a_failing_row_is_recorded_and_a_stop_signal_ends_the_run(tmp_path, monkeypatch):
    from nnunetv2.vit.errors import TrainingStopped

    def failing(error):
        def train(*args, **kwargs):
            raise error
        return train

    dataset = tmp_path / "Dataset998_SynthCracks"
    monkeypatch.setattr(quality, "train_unet", failing(RuntimeError("out of memory\nat step 3")))
    row = quality.train_and_score("unet", None, dataset, tmp_path / "pred", "cpu", {"crack": 1})
    assert row.error == "RuntimeError: out of memory at step 3" and row.dice == {}
    monkeypatch.setattr(quality, "train_unet", failing(TrainingStopped("Stopped by SIGTERM after step 2 of epoch 0.")))
    with pytest.raises(SystemExit, match="stopped in row unet .*SIGTERM.*the rows before it are kept"):
        quality.train_and_score("unet", None, dataset, tmp_path / "pred", "cpu", {"crack": 1})


def test_vit_rows_train_with_nnUNetTrainer_vit_found_by_name_and_skip_the_final_validation(monkeypatch):
    from nnunetv2.vit.trainer import nnUNetTrainer_vit
    from nnunetv2.vit.upstream_adapter import find_trainer_class

    trainer = quality.vit_trainer()
    assert issubclass(trainer, nnUNetTrainer_vit) and find_trainer_class(trainer.__name__) is trainer
    monkeypatch.setattr(nnUNetTrainer_vit, "perform_actual_validation", lambda *args: pytest.fail("validated"))
    trainer.perform_actual_validation(object.__new__(trainer))


def test_quick_and_rows_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--quick", "--rows", "unet"])
    assert "--quick chooses the rows itself" in capsys.readouterr().err


def test_against_unet_gives_the_gaps_and_the_failed_cases():
    rows = [_row("unet", [0.95, 0.8], [0.95, 0.3]), _row("vit", [0.9, 0.8], [0.1, 0.2])]
    assert quality.against_unet(rows, ["crack", "blob"]) == (
        "- vit against unet: crack -0.025, blob -0.475; below 0.5 where unet > 0.9: c0 blob 0.100 (unet 0.950)")
    assert quality.against_unet(rows[1:], ["crack"]) == ""


def test_repeats_are_compared_with_the_unet_of_their_own_repeat_and_summarised():
    rows = [_row("unet", [0.9, 0.9], [0.9, 0.9]), _row("vit", [0.8, 0.8], [0.9, 0.9]),
            _row("unet", [0.6, 0.6], [0.9, 0.9]), _row("vit", [0.7, 0.7], [0.2, 0.2]),
            quality.Row("vit", "c.yaml", error="RuntimeError: boom", repeat=2)]
    for row, repeat in zip(rows[2:4], (1, 1)):
        row.repeat = repeat
    assert [row.run_name for row in rows] == ["unet", "vit", "unet_r1", "vit_r1", "vit_r2"]
    assert quality.against_unet(rows, ["crack", "blob"]).splitlines() == [
        "- vit against unet: crack -0.100, blob +0.000; below 0.5 where unet > 0.9: none",
        "- vit_r1 against unet_r1: crack +0.100, blob -0.700; below 0.5 where unet > 0.9: none"]
    assert quality.over_repeats(rows, ["crack", "blob"]).splitlines()[2:] == [
        "| unet | 2 | 0.750 (0.600-0.900) | 0.900 (0.900-0.900) |",
        "| vit | 2 of 3 | 0.750 (0.700-0.800) | 0.550 (0.200-0.900) |"]
    assert "vit_r2 |" in quality.table(rows, ["crack", "blob"])


def test_repeats_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_the_reference_unet_rows_get_a_predictor(nnunet_env):
    """The benchmarks predict upstream's U-Net (plans without a ViT config, trained by a trainer of theirs) with
    ``predictor_from_trained_model`` and ``nnUNetTrainer``, as they predict the ViT rows."""
    import shutil

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2.vit.predict import predictor_from_trained_model

    root, dataset, results = nnunet_env
    preprocessed = root / "preprocessed" / dataset.name
    plans, dataset_json = load_json(str(preprocessed / "nnUNetPlans.json")), load_json(str(dataset / "dataset.json"))
    manager = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 3, 3, False)
    model_folder = results / "unet"
    (model_folder / "fold_0").mkdir(parents=True)
    shutil.copy(preprocessed / "nnUNetPlans.json", model_folder / "plans.json")
    shutil.copy(dataset / "dataset.json", model_folder / "dataset.json")
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer_budget",
                "init_args": {"plans": plans, "configuration": "2d", "fold": 0, "dataset_json": dataset_json},
                "inference_allowed_mirroring_axes": (0, 1)}, model_folder / "fold_0" / "checkpoint_final.pth")

    predictor = predictor_from_trained_model(model_folder, device=torch.device("cpu"), trainer_class=nnUNetTrainer)
    weights = predictor.list_of_parameters[0]
    assert weights.keys() == network.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in network.state_dict().items())
