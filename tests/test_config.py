"""YAML config validation: every bad config gives one clear error before any heavy work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nnunetv2.model.model_dpt import DPTDecoderConfig
from nnunetv2.vit.config import CONFIG_DIR, ViTConfig, build_model, load_config, validate_config
from nnunetv2.vit.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

GOOD = {
    "model": {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3", "backbone_size": "small",
              "pretrained": False, "decoder": {"fusion_hidden_size": 32}},
    "lora": {"enabled": False},
    "train": {"initial_lr": 0.001},
}


def with_change(section: str, key: str, value) -> dict:
    config = yaml.safe_load(yaml.safe_dump(GOOD))
    config.setdefault(section, {})[key] = value
    return config


BAD_CONFIGS = {
    "unknown section": ({**GOOD, "optim": {}}, "unknown section 'optim'"),
    "section not a mapping": ({**GOOD, "train": [1, 2]}, "section 'train' must be a mapping"),
    "unknown model key": (with_change("model", "backbone_name", "dinov3"), "unknown key 'model.backbone_name'"),
    "unknown lora key": (with_change("lora", "rank", 8), "unknown key 'lora.rank'"),
    "unknown train key": (with_change("train", "lr", 0.1), "unknown key 'train.lr'"),
    "unknown decoder option": (with_change("model", "decoder", {"fusion_size": 64}), "model.decoder.fusion_size"),
    "decoder option of another decoder": (
        with_change("model", "decoder", {"pool_scales": [1, 2]}),
        "unknown key 'model.decoder.pool_scales'. Valid keys in 'model.decoder': detail_path, detail_channels, "
        "fusion_hidden_size, readout_type"),
    "missing model_path": ({"model": {"backbone": "dinov3"}}, "model.model_path' is required"),
    "model_path not importable": (with_change("model", "model_path", "nnunetv2.model.model_dtp"), "cannot be imported"),
    "model_path without factory": (
        with_change("model", "model_path", "nnunetv2.model.backbone"), "no create_segmentation_model"),
    "unknown backbone": (
        with_change("model", "backbone", "dinov4"), "Valid backbones: dinov3, dinov2, retfound, visionfm"),
    "unknown backbone size": (with_change("model", "backbone_size", "tiny"), "Valid sizes: small, small_plus"),
    "missing checkpoint file": (with_change("model", "checkpoint_path", "/nonexistent/weights.pth"), "does not exist"),
    "retfound without checkpoint": ({**GOOD, "model": {"model_path": "nnunetv2.model.model_dpt", "backbone": "retfound",
                                                        "backbone_size": "large"}}, "no public download"),
    "lr as string": (with_change("train", "initial_lr", "fast"), "'train.initial_lr' must be float"),
    "negative lr": (with_change("train", "initial_lr", -0.1), "'train.initial_lr' must be positive"),
    "zero epochs": (with_change("train", "num_epochs", 0), "'train.num_epochs' must be positive"),
    "float epochs": (with_change("train", "num_epochs", 10.5), "'train.num_epochs' must be int"),
    "warm-up as long as training": ({**GOOD, "train": {"num_epochs": 5, "warmup_epochs": 5}},
                                    "'train.warmup_epochs' (5) must be smaller than 'train.num_epochs' (5)"),
    "negative weight decay": (with_change("train", "weight_decay", -1e-5), "must not be negative"),
    "unknown optimizer": (with_change("train", "optimizer", "adam"), "must be one of sgd, adamw"),
    "unknown precision": (with_change("train", "precision", "fp8"), "must be one of auto, fp32, fp16, bf16"),
    "bool as string": (with_change("lora", "enabled", "yes"), "'lora.enabled' must be bool"),
    "target_modules not a list": (with_change("lora", "target_modules", "qkv"), "'lora.target_modules' must be"),
    "not a mapping": ([1, 2, 3], "expected a mapping"),
    "negative neck width": (with_change("model", "decoder", {"neck_hidden_sizes": [-96, 192, 384, 384]}),
                            "'model.decoder.neck_hidden_sizes' must be a list of positive int or null, "
                            "got [-96, 192, 384, 384]"),
    "three neck widths": (with_change("model", "decoder", {"neck_hidden_sizes": [96, 192, 384]}),
                          "'model.decoder.neck_hidden_sizes' needs 4 entries (one per feature level), got [96, 192, "
                          "384]"),
    "bogus readout": (with_change("model", "decoder", {"readout_type": "bogus"}),
                      "'model.decoder.readout_type' must be one of project, add, ignore, got 'bogus'"),
    "detail_channels without the detail path": (with_change("model", "decoder", {"detail_channels": [8, 16, 24]}),
                                                "'model.decoder.detail_channels' is set but detail_path is off"),
    "zero LoRA rank": (with_change("lora", "r", 0), "'lora.r' must be positive, got 0"),
    "no LoRA target": ({**GOOD, "lora": {"target_modules": []}},
                       "'lora.target_modules' must name at least one; leave it out for ['qkv']"),
    "decoder width as string": (with_change("model", "decoder", {"fusion_hidden_size": "64"}),
                                "'model.decoder.fusion_hidden_size' must be int, got '64' (str)"),
    "detail_path as string": (with_change("model", "decoder", {"detail_path": "yes"}),
                              "'model.decoder.detail_path' must be bool, got 'yes'"),
    "detail_channels of floats": (with_change("model", "decoder", {"detail_path": True, "detail_channels": [8.5]}),
                                  "'model.decoder.detail_channels' must be"),
}


@pytest.mark.parametrize("raw,expected", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_is_one_clear_error(tmp_path, raw, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  model_path: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file_lists_builtins(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found.*dpt_lora"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_filled_and_empty_checkpoint_means_none():
    config = validate_config({"model": {"model_path": "nnunetv2.model.model_dpt", "checkpoint_path": ""}})
    assert config.model.checkpoint_path is None
    assert config.to_dict()["train"] == {
        "initial_lr": 0.01, "weight_decay": 3e-5, "gradient_clip": 12.0, "num_epochs": 1000,
        "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50, "optimizer": "sgd",
        "warmup_epochs": 0, "backbone_lr_scale": 1.0, "layer_decay": 1.0, "decay_norms_and_biases": False,
        "precision": "auto", "compile": "auto", "gradient_checkpointing": False,
        "batch_size": None, "max_nonfinite_steps": 25, "save_every": 50,
    }
    assert config.lora.target_modules == ["qkv"]


def test_a_stored_config_reads_back_and_one_from_an_older_version_gets_the_new_defaults():
    """What the plans and checkpoints store (to_dict) reads back as the same config; keys added since a model
    was trained (trust_checkpoint, detail options) take their defaults, and nothing is re-checked (the backbone
    file of a trained model need not exist where it predicts)."""
    config = validate_config({**GOOD, "train": {"num_epochs": 5, "compile": True}})
    assert config.train.compile == "true"
    assert ViTConfig.from_stored(config.to_dict()) == config
    older = config.to_dict()
    del older["model"]["trust_checkpoint"]
    older["model"]["checkpoint_path"] = "/gone/weights.pth"
    older["model"]["decoder"] = {"fusion_hidden_size": 32}  # stored as written, before options were stored resolved
    restored = ViTConfig.from_stored(older)
    assert restored.model.trust_checkpoint is False and restored.model.checkpoint_path == "/gone/weights.pth"
    assert restored.model.decoder == config.model.decoder == DPTDecoderConfig(fusion_hidden_size=32)
    assert config.to_dict()["model"]["decoder"]["readout_type"] == "project"  # stored with every default


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_builtin_configs_are_valid(path):
    config = load_config(path)
    assert config.model.model_path.startswith("nnunetv2.model.model_")


def test_seed_configs_keep_the_plan_values():
    for name, iterations, validation in (("dpt", 250, 50), ("dpt_test_dinov3", 10, 10)):
        config = load_config(name)
        assert config.model.backbone == "dinov3" and config.model.backbone_size == "large"
        assert config.model.decoder == DPTDecoderConfig(fusion_hidden_size=256, readout_type="project")
        assert config.train.initial_lr == 0.001 and config.train.gradient_clip == 12.0
        assert config.train.num_iterations_per_epoch == iterations
        assert config.train.num_val_iterations_per_epoch == validation
    assert load_config("dpt_lora").lora.enabled is True


def test_config_builds_the_model_it_describes():
    """The typed sections reach the model unchanged: decoder options, LoRA settings (peft's names), and without
    load_weights no download is tried even where the config asks for pretrained weights (none is reachable here)."""
    config = validate_config({**GOOD, "model": {**GOOD["model"], "pretrained": True},
                              "lora": {"enabled": True, "r": 4, "lora_alpha": 8}})
    model = build_model(config, in_channels=1, num_classes=3, load_weights=False)
    assert model.num_classes == 3 and model.backbone_model_name == "vit_small_patch16_dinov3"
    assert model.vit.patch_embed.proj.in_channels == 1 and model.fusion_hidden_size == 32
    assert model.decoder_config is config.model.decoder  # the typed object itself, not a copy rebuilt from a dict
    peft_config = model.backbone.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.target_modules) == (4, 8, {"qkv"})


@pytest.mark.parametrize("lora,code,expected", [
    ({"enabled": True, "target_modules": ["q_proj"]}, None,
     "nnunetv2.model.model_dpt cannot build this model from model.decoder and lora (ValueError: LoRA target_modules "
     "{'q_proj'} do not fit this backbone"),
    ({}, "def create_segmentation_model(*args, **kwargs):\n    raise KeyError('head')",
     "my_factory cannot build this model from model.decoder and lora (KeyError: 'head'); change them in the config."),
])
def test_what_only_the_build_can_tell_is_one_line(tmp_path, monkeypatch, lora, code, expected):
    """LoRA targets the backbone lacks, or a user's factory that raises: found when the model is built (training
    start, planning), as one line naming the keys to change."""
    model = GOOD["model"]
    if code is not None:
        (tmp_path / "my_factory.py").write_text(code + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        model = {**model, "model_path": "my_factory", "decoder": {}}
    config = validate_config({**GOOD, "model": model, "lora": lora})
    with pytest.raises(ConfigError) as err:
        build_model(config, in_channels=3, num_classes=2, load_weights=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_train_command_rejects_bad_config_with_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_change("train", "initial_lr", -1)))
    env = {"PATH": "/usr/bin:/bin", "nnUNet_preprocessed": str(tmp_path), "nnUNet_raw": str(tmp_path),
           "nnUNet_results": str(tmp_path)}
    result = subprocess.run([sys.executable, "nnUNetv2_train_vit.py", "1", "2d", "0", "--config", str(path),
                             "-device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "'train.initial_lr' must be positive" in errors[0]


def test_a_config_inherits_another_and_lists_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "child.yaml").write_text("inherits: base.yaml\nmodel:\n  decoder:\n    readout_type: add\n"
                                         "train:\n  num_epochs: 3\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.model.decoder == DPTDecoderConfig(fusion_hidden_size=32, readout_type="add")  # mappings merge
    assert config.train.num_epochs == 3 and config.train.initial_lr == 0.001
    assert config.model.backbone_size == "small"
    builtin = load_config("dpt_test_dinov3")  # inherits dpt.yaml, a built-in, by name
    assert builtin.model == load_config("dpt").model and builtin.train.num_iterations_per_epoch == 10


@pytest.mark.parametrize("files,expected", [
    ({"a.yaml": "inherits: b.yaml\n", "b.yaml": "inherits: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "inherits: [b.yaml]\n"}, "'inherits' must name a config file"),
    ({"a.yaml": "model:\n  backbone_size: small\n  backbone_size: large\n"},
     "a.yaml: key 'backbone_size' is given twice, on lines 2 and 3; keep one"),
])
def test_inheritance_and_duplicate_keys_are_checked(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(tmp_path / "a.yaml")


def test_a_missing_inherited_file_names_the_referring_file_and_the_folders_searched(tmp_path):
    from nnunetv2.vit.config import CONFIG_DIR

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("inherits: does_not_exist.yaml\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "sub" / "a.yaml")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'sub' / 'a.yaml'}: 'inherits: does_not_exist.yaml': Config file not found")
    assert f"(looked in {tmp_path / 'sub'} and the built-in configs folder {CONFIG_DIR})" in message
    assert "Built-in configs: " in message and "dpt_lora" in message and "\n" not in message

    (tmp_path / "b.yaml").write_text("inherits: sub/missing.yaml\n")  # a path: not a built-in name
    with pytest.raises(ConfigError, match=re.escape(f"(looked in {tmp_path / 'sub'}). Built-in configs")):
        load_config(tmp_path / "b.yaml")


def test_unreadable_config_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# réglages\nmodel:\n  model_path: x\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text .* save it as UTF-8"):
        load_config(latin)
    with pytest.raises(ConfigError, match="is a directory; give a YAML file in it"):
        load_config(tmp_path)
    # A UTF-8 comment reads in any locale (read_text() without an encoding failed under a C locale).
    commented = tmp_path / "commented.yaml"
    commented.write_text("# Gefäße, réseau vasculaire\n" + yaml.safe_dump(GOOD), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", f"from nnunetv2.vit.config import load_config; "
                             f"load_config({str(commented)!r})"], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
                                 "PYTHONCOERCECLOCALE": "0",
                                 "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_user_model_module_that_does_not_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_decoder.py").write_text("raise RuntimeError('no GPU library here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "model": {**GOOD["model"], "model_path": "my_decoder", "decoder": {}}}))
    with pytest.raises(ConfigError, match=re.escape("cannot be imported (RuntimeError: no GPU library here)")) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_config_named_as_a_built_in_inherits_the_built_in(tmp_path):
    """A copy of dpt.yaml kept under its own name, listing what differs, starts from the built-in, not a cycle."""
    mine = tmp_path / "dpt.yaml"
    mine.write_text("inherits: dpt.yaml\nmodel:\n  backbone_size: small\n  pretrained: false\n")
    config = load_config(mine)
    assert config.model.backbone_size == "small" and config.model.model_path == "nnunetv2.model.model_dpt"
    assert config.train.initial_lr == load_config("dpt").train.initial_lr
