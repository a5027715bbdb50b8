"""The ViT planning step: backbone normalization, token-aligned patch size, batch size from the memory model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch
import yaml
from batchgenerators.utilities.file_and_folder_operations import load_json
from PIL import Image

from conftest import DATASET_ID
from nnunetv2.model.memory import _saved_bytes, _swap_in_fake_tensors, training_memory
from nnunetv2.vit import plan as plan_cli
from nnunetv2.vit import predict as predict_cli
from nnunetv2.vit import train as train_cli
from nnunetv2.vit.config import ViTConfig, build_model, validate_config
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.normalization import PARAMETERS_KEY, BackboneNormalization
from test_robustness import TINY_MODEL, run_cli

# Plans for the backbone's normalization, said explicitly: 'auto' plans it for pretrained weights only, and the tiny
# model has random ones (test_auto_plans_the_backbones_normalization_for_pretrained_weights_only).
PLANNED_MODEL = {**TINY_MODEL, "normalization": "backbone"}
TINY_TRAIN = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "optimizer": "adamw"}


def model_config(**model) -> ViTConfig:
    return validate_config({"model": {**PLANNED_MODEL, **model}})


def write_config(path: Path, **model) -> str:
    path.write_text(yaml.safe_dump({"model": {**PLANNED_MODEL, **model}, "train": TINY_TRAIN}))
    return str(path)


@pytest.fixture
def own_dataset(nnunet_env, tmp_path, monkeypatch):
    """The session's raw and preprocessed dataset, copied: plans written here change no other test's."""
    root, dataset, results = nnunet_env
    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    shutil.copytree(dataset, raw / dataset.name)
    shutil.copytree(root / "preprocessed" / dataset.name, preprocessed / dataset.name)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    return raw / dataset.name, preprocessed / dataset.name, results


def plans_of(folder: Path) -> dict:
    return load_json(str(folder / "nnUNetPlans.json"))


def vit_planner(config: ViTConfig, name: str = "2d_vit", target: float = 8,
                **dataset_json) -> plan_cli.ViTExperimentPlanner:
    """The planner of the test dataset for ``config``, with entries of its dataset.json changed (``numTraining``)."""
    planner = plan_cli.ViTExperimentPlanner(DATASET_ID, config, name, gpu_memory_target_in_gb=target)
    planner.dataset_json = {**planner.dataset_json, **dataset_json}
    return planner


# --- the memory model ---------------------------------------------------------------------------------------------

def tiny_build(**model):
    config = model_config(**model)
    return lambda: build_model(config, 3, 3, load_weights=False)


def test_memory_model_counts_what_a_real_forward_saves():
    """The fake-tensor count equals the bytes autograd saves in a real CPU forward of the same model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    build = tiny_build()
    with torch.device("meta"):
        fake_model = build()
    fake_model.train()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _swap_in_fake_tensors(fake_model, mode)
    counted = _saved_bytes(fake_model, mode, (2, 3, 64, 64), torch.bfloat16)

    real_model = build().train()
    seen, real = set(), 0

    def pack(tensor):
        nonlocal real
        if StorageWeakRef(tensor.untyped_storage()) not in seen:
            seen.add(StorageWeakRef(tensor.untyped_storage()))
            real += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        real_model(torch.randn(2, 3, 64, 64))
    assert counted == pytest.approx(real, rel=1e-3)  # a few hundred bytes of 56 MB differ (small buffers)


def test_memory_model_follows_the_configured_model():
    base = training_memory(tiny_build(), 3, (128, 128))
    bigger_patch = training_memory(tiny_build(), 3, (256, 256))
    assert 3.5 < bigger_patch.per_image_bytes / base.per_image_bytes < 4.5  # linear in pixels (flash attention)
    assert training_memory(tiny_build(), 3, (128, 128), precision="fp32").per_image_bytes > base.per_image_bytes
    assert training_memory(tiny_build(), 3, (128, 128), gradient_checkpointing=True).per_image_bytes \
        < base.per_image_bytes
    lora = validate_config({"model": PLANNED_MODEL, "lora": {"enabled": True}})
    with_lora = training_memory(lambda: build_model(lora, 3, 3, load_weights=False), 3, (128, 128))
    assert with_lora.fixed_bytes < base.fixed_bytes  # frozen backbone: no gradients, no AdamW state
    assert training_memory(tiny_build(), 3, (128, 128), optimizer="sgd").fixed_bytes < base.fixed_bytes
    with pytest.raises(ValueError, match="precision"):
        training_memory(tiny_build(), 3, (128, 128), precision="fp8")


def test_largest_batch_fits_the_budget():
    memory = training_memory(tiny_build(), 3, (128, 128))
    for budget in (memory.fixed_bytes - 1, memory.peak_bytes(3), memory.peak_bytes(3) + memory.per_image_bytes - 1):
        batch = memory.largest_batch(budget)
        assert memory.peak_bytes(batch) <= budget or batch == 0
        assert memory.peak_bytes(batch + 1) > budget
    assert memory.largest_batch(memory.fixed_bytes - 1) == 0


# --- planning -----------------------------------------------------------------------------------------------------

def test_patch_size_is_aligned_to_the_token_grid():
    assert plan_cli.aligned_patch_size([512, 512], 28) == [504, 504]  # dinov2 (patch 14) with DPT's 0.5x level
    assert plan_cli.aligned_patch_size([512, 512], 32) == [512, 512]  # dinov3 (patch 16)
    assert plan_cli.aligned_patch_size([500, 530], 32) == [512, 544]
    assert plan_cli.aligned_patch_size([10, 90], 14) == [14, 84]


@pytest.mark.parametrize("backbone, model_path, alignment", [
    ("dinov2", "nnunetv2.model.model_dpt", 28), ("dinov3", "nnunetv2.model.model_dpt", 32),
    ("dinov2", "nnunetv2.model.model_primus", 14),
])
def test_planned_patch_size_for_patch_14_and_16(own_dataset, backbone, model_path, alignment):
    _, folder, _ = own_dataset
    plans = plans_of(folder)
    decoder = PLANNED_MODEL["decoder"] if model_path.endswith("dpt") else {}
    config = model_config(backbone=backbone, model_path=model_path, decoder=decoder)
    planned = vit_planner(config).plan_configuration(plans)
    patch = planned["configurations"]["2d_vit"]["patch_size"]
    assert all(side % alignment == 0 and abs(side - base) <= alignment / 2
               for side, base in zip(patch, plans["configurations"]["2d"]["patch_size"]))


def test_batch_size_rises_with_the_memory_target_and_respects_the_cap(own_dataset):
    _, folder, _ = own_dataset
    plans = plans_of(folder)
    config = model_config()
    batches = []
    for target in (0.3, 0.5, 1, 2, 8):
        planner = vit_planner(config, target=target, numTraining=10 ** 6)  # the 5% cap far away
        entry = planner.plan_configuration(plans)["configurations"]["2d_vit"]
        memory = entry["vit_plan"]["memory_model"]
        if entry["batch_size"] > planner.UNet_min_batch_size:
            assert memory["fixed_bytes"] + entry["batch_size"] * memory["per_image_bytes"] <= target * 1e9
        batches.append(entry["batch_size"])
    assert batches == sorted(batches) and batches[-1] > batches[0]

    planner = vit_planner(config, target=70, numTraining=400)
    few_cases = planner.plan_configuration(plans)["configurations"]["2d_vit"]
    patch_pixels = np.prod(few_cases["patch_size"])
    cap = round(np.prod(plans["configurations"]["2d"]["median_image_size_in_voxels"]) * 400 * 0.05 / patch_pixels)
    assert few_cases["batch_size"] == max(cap, planner.UNet_min_batch_size) < batches[-1]


def test_rgb_plan_normalizes_each_channel_with_the_backbone_statistics(own_dataset):
    _, folder, _ = own_dataset
    plans = plans_of(folder)
    planned = vit_planner(model_config()).plan_configuration(plans)
    entry = planned["configurations"]["2d_vit"]
    assert entry["normalization_schemes"] == ["BackboneNormalization"] * 3
    assert entry["data_identifier"].startswith("nnUNetPlans_2d_backbone_")
    assert entry["data_identifier"] != plans["configurations"]["2d"]["data_identifier"]
    import timm

    cfg = timm.models.get_pretrained_cfg("vit_small_patch16_dinov3.lvd1689m")
    parameters = [planned["foreground_intensity_properties_per_channel"][str(c)][PARAMETERS_KEY] for c in range(3)]
    assert [(p["mean"], p["std"]) for p in parameters] == list(zip(cfg.mean, cfg.std))
    assert all((p["low"], p["high"], p["clip"]) == (0, 255, False) for p in parameters)  # 8-bit PNGs
    assert plans["configurations"].keys() == {"2d"}  # the input plans are left as they were


def test_zscore_plan_keeps_nnunets_normalization_and_data(own_dataset):
    _, folder, _ = own_dataset
    plans = plans_of(folder)
    planned = vit_planner(model_config(normalization="zscore")).plan_configuration(plans)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    entry = PlansManager(planned).get_configuration("2d_vit")
    assert entry.data_identifier == plans["configurations"]["2d"]["data_identifier"]
    assert entry.normalization_schemes == plans["configurations"]["2d"]["normalization_schemes"]


def test_auto_plans_the_backbones_normalization_for_pretrained_weights_only(own_dataset, tmp_path):
    """'auto' plans the backbone's pretraining normalization for a download or a weights file, and nnU-Net's z-score
    for random weights (nothing to match; they learned far slower on fixed statistics); training with 'auto' on a
    planned configuration takes what it was planned for."""
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"")  # only its existence is checked when the config is read
    assert plan_cli.planned_normalization(model_config(normalization="auto")) == "zscore"
    assert plan_cli.planned_normalization(model_config(normalization="auto", pretrained=True)) == "backbone"
    assert plan_cli.planned_normalization(model_config(normalization="auto", checkpoint_path=str(weights))) == \
        "backbone"
    assert plan_cli.planned_normalization(model_config(normalization="backbone")) == "backbone"
    assert plan_cli.planned_normalization(model_config(normalization="zscore", pretrained=True)) == "zscore"

    _, folder, _ = own_dataset
    planned = vit_planner(model_config()).plan_configuration(plans_of(folder))
    resolved, note = plan_cli.resolve_normalization(planned, "2d_vit", model_config(normalization="auto"),
                                                    str(DATASET_ID), "vit.yaml")
    assert resolved.model.normalization == "backbone" and "BackboneNormalization" in note


def test_one_channel_plans_average_the_rgb_statistics():
    statistics, why = plan_cli.channel_statistics((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1)
    assert statistics == [pytest.approx((0.449, 0.226), abs=1e-3)] and "grey" in why
    statistics, _ = plan_cli.channel_statistics((0.1, 0.2, 0.3), (1, 2, 3), 4)
    assert statistics == [(0.1, 1), (0.2, 2), (0.3, 3), (0.1, 1)]


def test_backbone_normalization_scales_refuses_and_clips():
    eight_bit = {PARAMETERS_KEY: {"low": 0, "high": 255, "clip": False, "mean": 0.5, "std": 0.25}}
    image = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    out = BackboneNormalization(False, eight_bit).run(image.copy())
    np.testing.assert_allclose(out, (image / 255 - 0.5) / 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="8-bit"):
        BackboneNormalization(False, eight_bit).run(np.array([0, 4095], dtype=np.float32))
    wide = {PARAMETERS_KEY: {"low": 100, "high": 1100, "clip": True, "mean": 0.0, "std": 1.0}}
    np.testing.assert_allclose(BackboneNormalization(False, wide).run(np.array([0, 600, 5000.0])), [0, 0.5, 1])
    with pytest.raises(RuntimeError, match="nnUNetv2_plan_vit.py"):
        BackboneNormalization(False, {"mean": 1.0}).run(image.copy())


def test_a_second_backbone_with_other_statistics_is_refused_in_the_same_plans(own_dataset, monkeypatch):
    _, folder, _ = own_dataset
    plans = plans_of(folder)
    plans = vit_planner(model_config(), "2d_a").plan_configuration(plans)
    import nnunetv2.model.backbone as backbone

    monkeypatch.setattr(backbone, "pretraining_statistics", lambda *_: (((0.5,) * 3, (0.5,) * 3), "test"))
    with pytest.raises(ConfigError, match="2d_a .*One plans file holds one backbone normalization"):
        vit_planner(model_config(), "2d_b").plan_configuration(plans)
    vit_planner(model_config(), "2d_a").plan_configuration(plans)  # re-planning it


def test_configs_stored_before_the_key_keep_nnunets_normalization():
    stored = model_config().to_dict()
    del stored["model"]["normalization"]
    assert ViTConfig.from_stored(stored).model.normalization == "zscore"
    unsaid = {key: value for key, value in PLANNED_MODEL.items() if key != "normalization"}
    assert validate_config({"model": unsaid}).model.normalization == "auto"


# --- commands: plan, preprocess, train, predict -------------------------------------------------------------------

def test_plan_preprocess_train_predict_on_the_demo_data(planned_vit, planned_vit_copy, tmp_path, capsys, cpu_command):
    """The workflow: plan and preprocess '2d_vit', train on it, predict with -c 2d_vit; upstream's predictor (spawned
    preprocessing worker) gives the network exactly the values training saw. (conftest's planned_vit plans and trains,
    with test_planning's tiny model and write_config, once for this test and test_upstream_commands.)"""
    raw, folder, results = planned_vit_copy
    out = planned_vit.plan_out
    assert "Planned configuration '2d_vit'" in out and "batch size 2" in out
    plans = load_json(str(folder / "nnUNetPlans.json"))
    data_folder = folder / plans["configurations"]["2d_vit"]["data_identifier"]
    assert sorted(p.name for p in data_folder.glob("*.pkl")) == sorted(
        f"{p.name[:-9]}.pkl" for p in (raw / "imagesTr").glob("*_0000.png"))

    explicit = write_config(tmp_path / "2d_vit.yaml", normalization="backbone")
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "--config", explicit, "-device", "cpu"], capsys)
    assert code == 2 and "nnU-Net's plan for its U-Net (ZScoreNormalization" in err
    assert f"nnUNetv2_plan_vit.py {DATASET_ID} --config {explicit} -c 2d_vit" in err

    assert "normalization: backbone (BackboneNormalization, " in planned_vit.train_out
    model_folder = results / "Dataset987_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d_vit"
    assert (model_folder / "fold_0" / "checkpoint_final.pth").is_file()
    stored = load_json(str(model_folder / "plans.json"))["configurations"]["2d_vit"]["vit_config"]
    assert stored["model"]["normalization"] == "backbone"  # what the model trained with is what it records

    from nnunetv2.vit.predict import predictor_from_trained_model

    predictor = predictor_from_trained_model(model_folder, device=torch.device("cpu"))
    case = sorted((raw / "imagesTr").glob("*_0000.png"))[0]
    seen = next(iter(predictor._internal_get_data_iterator_from_lists_of_filenames([[str(case)]], None, None, 1)))
    trained = blosc2.open(str(data_folder / f"{case.name[:-9]}.b2nd"))[:]
    np.testing.assert_array_equal(seen["data"].numpy(), trained)

    predictions = tmp_path / "predictions"
    predict_cli.main(["-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", str(DATASET_ID), "-c", "2d_vit",
                      "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"])
    written = sorted(p.name for p in predictions.glob("*.png"))
    assert written == sorted(p.name.replace("_0000", "") for p in (raw / "imagesTs").glob("*.png"))
    image = raw / "imagesTs" / f"{written[0][:-4]}_0000.png"
    assert Image.open(predictions / written[0]).size == Image.open(image).size


def test_the_plans_command_trains_a_shipped_config_on_2d_and_predicts(own_dataset, tmp_path, capsys, cpu_command):
    """`nnUNetv2_train_vit.py DATASET 2d FOLD --config dpt.yaml` after nnU-Net's own planning only (the DPT plan's
    command): dpt.yaml with a small backbone, no download and a short budget trains with nnU-Net's normalization on
    '2d', says so and how to plan the backbone's, records it, and '-c 2d' predicts; '2d's data stay as they were."""
    raw, folder, results = own_dataset
    data_2d = folder / load_json(str(folder / "nnUNetPlans.json"))["configurations"]["2d"]["data_identifier"]
    before = {p.name: p.stat().st_mtime_ns for p in data_2d.iterdir()}
    config = tmp_path / "dpt_small.yaml"
    config.write_text(yaml.safe_dump({"inherits": "dpt.yaml", "model": {"backbone_size": "small", "pretrained": False},
                                      "train": TINY_TRAIN}))
    capsys.readouterr()
    train_cli.main([str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu"])
    out = capsys.readouterr().out
    assert "normalization: nnU-Net's, as planned for '2d' (ZScoreNormalization" in out
    assert f"nnUNetv2_plan_vit.py {DATASET_ID} --config {config} -c 2d_dpt_small" in out
    model_folder = results / "Dataset987_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d"
    assert load_json(str(model_folder / "plans.json"))["configurations"]["2d"]["vit_config"]["model"][
        "normalization"] == "zscore"
    assert {p.name: p.stat().st_mtime_ns for p in data_2d.iterdir()} == before

    train_cli.main([str(DATASET_ID), "2d", "0", "--c", "-device", "cpu"])  # the stored config, resolved, resumes
    predictions = tmp_path / "predictions"
    predict_cli.main(["-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", str(DATASET_ID), "-c", "2d",
                      "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"])
    assert sorted(p.name for p in predictions.glob("*.png")) == sorted(
        p.name.replace("_0000", "") for p in (raw / "imagesTs").glob("*.png"))


def test_training_refuses_a_config_the_configuration_was_not_planned_for(own_dataset, tmp_path, capsys, cpu_command):
    config = write_config(tmp_path / "vit.yaml")
    plan_cli.main([str(DATASET_ID), "--config", config, "-c", "2d_vit", "--no_pp"])
    capsys.readouterr()
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planned = load_json(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset987_DemoFundus", "nnUNetPlans.json"))
    assert planned["configurations"]["2d_vit"]["vit_plan"]["memory_model"]["target_gb"] == \
        ExperimentPlanner(DATASET_ID).UNet_vram_target_GB  # without -gpu_memory_target: nnU-Net's target
    others = ((write_config(tmp_path / "base.yaml", backbone_size="base"), "backbone_size small (config: base)"),
              (write_config(tmp_path / "z.yaml", normalization="zscore"), "normalization backbone (config: zscore)"))
    for other, what in others:
        code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d_vit", "0", "--config", other, "-device", "cpu"],
                            capsys)
        assert code == 2 and "was planned for another model" in err and what in err
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d_vit", "0", "--config", config, "-device", "cpu"], capsys)
    assert code == 2 and "planned but not preprocessed" in err and "nnUNetv2_plan_vit.py" in err


def test_planning_errors_are_one_line(own_dataset, tmp_path, capsys):
    config = write_config(tmp_path / "vit.yaml")
    for argv, message in (
        ([str(DATASET_ID), "--config", config, "-c", "vit"], "must start with '2d_'"),
        ([str(DATASET_ID), "--config", config, "-gpu_memory_target", "0"], "must be positive"),
        ([str(DATASET_ID), "--config", config, "-p", "NoSuchPlans"], "plan the dataset with nnU-Net first"),
        ([str(DATASET_ID), "--config", str(tmp_path / "missing.yaml")], "Config file not found"),
    ):
        code, err = run_cli(plan_cli.main, argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_grey_16_bit_dataset_is_planned_from_its_percentiles(own_dataset, tmp_path, capsys, monkeypatch):
    """One channel beyond 8 bits (e.g. OCT B-scans): the foreground percentiles give the range, clipped."""
    raw, _, _ = own_dataset
    grey_raw = tmp_path / "grey_raw" / "Dataset988_Grey"
    for sub in ("imagesTr", "labelsTr"):
        (grey_raw / sub).mkdir(parents=True)
    for image in (raw / "imagesTr").glob("*.png"):
        grey = np.asarray(Image.open(image).convert("L"), dtype=np.uint16) * 200
        Image.fromarray(grey).save(grey_raw / "imagesTr" / image.name)
    for label in (raw / "labelsTr").glob("*.png"):
        shutil.copy(label, grey_raw / "labelsTr" / label.name)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    (grey_raw / "dataset.json").write_text(json.dumps({**dataset_json, "channel_names": {"0": "OCT"}}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "grey_raw"))
    result = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "988", "-c",
                             "2d", "-npfp", "1", "--no_pp"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, nnUNet_n_proc_DA="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    plan_cli.main(["988", "--config", write_config(tmp_path / "vit.yaml"), "-np", "1"])
    capsys.readouterr()
    folder = Path(os.environ["nnUNet_preprocessed"])
    plans = load_json(str(folder / "Dataset988_Grey" / "nnUNetPlans.json"))
    properties = plans["foreground_intensity_properties_per_channel"]["0"]
    parameters = properties[PARAMETERS_KEY]
    assert parameters["clip"] and (parameters["low"], parameters["high"]) == (
        properties["percentile_00_5"], properties["percentile_99_5"])
    assert parameters["mean"] == pytest.approx(np.mean((0.485, 0.456, 0.406)))
    entry = plans["configurations"]["2d_vit"]
    data = [blosc2.open(str(path))[:] for path in (folder / "Dataset988_Grey" / entry["data_identifier"]).glob(
        "*[0-9].b2nd")]
    assert data and all(d.shape[0] == 1 for d in data)
    low, high = (0 - parameters["mean"]) / parameters["std"], (1 - parameters["mean"]) / parameters["std"]
    assert min(d.min() for d in data) >= low - 1e-5 and max(d.max() for d in data) <= high + 1e-5
    assert entry["normalization_schemes"] == ["BackboneNormalization"]
