"""Fine-tuning regimes: parameter groups (backbone lr, layer decay, no weight decay on norms/biases/tokens), the
per-group schedule and its resume, a frozen backbone without autograd state, LoRA with freeze, stochastic depth."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import DATASET_ID
from nnunetv2.model import model_dpt
from nnunetv2.model.memory import training_memory
from nnunetv2.vit import train as train_cli
from nnunetv2.vit.config import TrainSection, ViTConfig, build_model, load_config, validate_config
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.optim import describe_parameter_groups, parameter_groups
from nnunetv2.vit.trained_model import add_vit_config
from nnunetv2.vit.trainer import nnUNetTrainer_vit

DEPTH = 12  # ViT-S
TINY_DECODER = {"fusion_hidden_size": 16, "neck_hidden_sizes": [16, 16, 16, 16]}
TINY_MODEL = {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3", "backbone_size": "small",
              "pretrained": False, "normalization": "zscore", "decoder": TINY_DECODER}


def small_model(**kwargs) -> model_dpt.DPTSegmentationModel:
    return model_dpt.create_segmentation_model("dinov3", "small", num_classes=3, pretrained=False, **TINY_DECODER,
                                               **kwargs)


def rates(model, train: TrainSection) -> dict:
    """name -> (lr_scale, weight_decay) of every parameter in the groups; each parameter in exactly one group."""
    by_id = {}
    for group in parameter_groups(model, train):
        for param in group["params"]:
            assert id(param) not in by_id, "a parameter is in two groups"
            by_id[id(param)] = (group["lr_scale"], group["weight_decay"])
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_parameter_groups_give_each_parameter_its_rate_and_decay():
    model = small_model(detail_path=True)
    train = TrainSection(weight_decay=0.05, backbone_lr_scale=0.1, layer_decay=0.65)
    got = rates(model, train)
    assert set(got) == {name for name, p in model.named_parameters() if p.requires_grad}
    backbone = 0.1 * 0.65 ** (DEPTH + 1)  # the stem: layer 0 of d + 2
    assert got["backbone.patch_embed.proj.weight"] == pytest.approx((backbone, 0.05))
    assert got["backbone.patch_embed.proj.bias"] == pytest.approx((backbone, 0.0))
    assert got["backbone.cls_token"] == pytest.approx((backbone, 0.0))
    assert got["backbone.reg_token"] == pytest.approx((backbone, 0.0))  # timm's group_matcher leaves it out
    assert got["backbone.blocks.0.attn.qkv.weight"] == pytest.approx((0.1 * 0.65 ** DEPTH, 0.05))  # near the input
    assert got["backbone.blocks.0.norm1.weight"] == pytest.approx((0.1 * 0.65 ** DEPTH, 0.0))
    assert got["backbone.blocks.0.gamma_1"] == pytest.approx((0.1 * 0.65 ** DEPTH, 0.0))  # layer scale
    assert got["backbone.blocks.11.mlp.fc1.weight"] == pytest.approx((0.1 * 0.65, 0.05))
    assert got["backbone.blocks.11.mlp.fc1.bias"] == pytest.approx((0.1 * 0.65, 0.0))
    assert got["backbone.norm.weight"] == pytest.approx((0.1 * 0.65, 0.0))
    decoder = {name: value for name, value in got.items() if not name.startswith("backbone.")}
    assert any(name.startswith("detail.") for name in decoder) and any(name.startswith("neck.") for name in decoder)
    for name, (scale, decay) in decoder.items():  # decoder and detail path: the full rate
        assert scale == 1.0
        assert decay == (0.0 if name.endswith(".bias") or model.get_parameter(name).ndim == 1 else 0.05), name
    groups = parameter_groups(model, train)
    assert groups[0]["name"] == "decoder" and groups[0]["lr_scale"] == 1.0  # upstream logs group 0's lr
    description = describe_parameter_groups(torch.optim.AdamW(groups, 1e-3), 1e-3)
    assert description.count("\n") == len(groups)
    assert "group 0 (decoder): " in description and f"peak lr {1e-3 * backbone:.3g}, weight decay 0\n" in description


def test_parameter_groups_without_options():
    model = small_model()
    assert {scale for scale, _ in rates(model, TrainSection()).values()} == {1.0}
    assert len(parameter_groups(model, TrainSection())) == 2  # decayed, and not (norms, biases, tokens)
    one = parameter_groups(model, TrainSection(decay_norms_and_biases=True))  # as before these keys existed
    assert len(one) == 1 and one[0]["weight_decay"] == TrainSection().weight_decay
    assert len(one[0]["params"]) == len(list(model.parameters()))


def test_frozen_backbone_has_no_optimizer_state():
    model = small_model(freeze_backbone=True).train()
    groups = parameter_groups(model, TrainSection(backbone_lr_scale=0.1, layer_decay=0.65))
    backbone = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) not in backbone for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, 1e-3)
    features = model.backbone_features(torch.randn(2, 3, 64, 64), model.feature_indices)
    assert all(f.grad_fn is None for f in features)  # nothing saved for a backward pass
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    assert optimizer.state and all(id(p) not in backbone for p in optimizer.state)
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("freeze", [False, True])
def test_lora_trains_only_adapters_with_or_without_freeze(freeze):
    model = small_model(use_lora=True, freeze_backbone=freeze).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    with_grad = {name for name, p in model.backbone.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert with_grad == {name for name, p in model.backbone.named_parameters() if "lora_" in name}
    assert model.backbone_trainable
    lora_count = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n)
    backbone_line = next(line for line in model.parameter_summary(detailed=True).splitlines()
                         if line.startswith("backbone"))
    assert backbone_line.split()[1] == f"{lora_count:,}"  # the summary's trainable backbone: the adapters only
    layer = rates(model, TrainSection(layer_decay=0.5))  # adapters at their block's depth
    assert layer["backbone.base_model.model.blocks.0.attn.qkv.lora_A.default.weight"][0] == 0.5 ** DEPTH


def test_drop_path_active_in_training_only():
    x = torch.randn(2, 3, 64, 64)
    for rate, differs in ((0.5, True), (0.0, False)):
        model = small_model(drop_path_rate=rate)
        model.train()
        first, second = (model.backbone_features(x, model.feature_indices)[-1] for _ in range(2))
        assert (not torch.equal(first, second)) == differs
        model.eval()
        with torch.no_grad():
            assert torch.equal(*(model.backbone_features(x, model.feature_indices)[-1] for _ in range(2)))
    assert model.backbone.blocks[-1].drop_path1.__class__.__name__ == "Identity"
    assert small_model(drop_path_rate=0.2).backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_memory_model_counts_a_frozen_backbone():
    def build(**model):
        config = validate_config({"model": {**TINY_MODEL, **model}})
        return lambda: build_model(config, 3, 3, load_weights=False)

    full = training_memory(build(), 3, (128, 128))
    frozen = training_memory(build(freeze_backbone=True), 3, (128, 128))
    assert frozen.per_image_bytes < 0.5 * full.per_image_bytes  # the backbone's activations are not saved
    assert frozen.fixed_bytes < 0.5 * full.fixed_bytes  # no gradients, no AdamW state for the backbone


def test_config_keys_and_stored_defaults():
    config = validate_config({"model": {**TINY_MODEL, "freeze_backbone": True, "drop_path_rate": 0.2},
                              "train": {"backbone_lr_scale": 0.1, "layer_decay": 0.65}})
    assert config.model.freeze_backbone and config.model.drop_path_rate == 0.2
    for model, train, error in (({"drop_path_rate": -0.1}, {}, "'model.drop_path_rate' must not be negative"),
                                ({}, {"layer_decay": 0}, "'train.layer_decay' must be positive"),
                                ({}, {"backbone_lr_scale": -1.0}, "'train.backbone_lr_scale' must be positive")):
        with pytest.raises(ConfigError, match=error):
            validate_config({"model": {**TINY_MODEL, **model}, "train": train})
    older = config.to_dict()
    for section, key in (("model", "freeze_backbone"), ("model", "drop_path_rate"), ("train", "backbone_lr_scale"),
                         ("train", "layer_decay"), ("train", "decay_norms_and_biases")):
        del older[section][key]
    restored = ViTConfig.from_stored(older)
    assert not restored.model.freeze_backbone and restored.model.drop_path_rate == 0.0
    assert restored.train.decay_norms_and_biases  # a config stored before it decayed every parameter
    assert not validate_config({"model": TINY_MODEL}).train.decay_norms_and_biases


@pytest.mark.parametrize("name,expected", [
    ("dpt_finetune_layer_decay", {"layer_decay": 0.65, "drop_path_rate": 0.2, "weight_decay": 0.05}),
    ("dpt_finetune_frozen", {"freeze_backbone": True}),
    ("dpt_finetune_lora", {"lora": True}),
    ("dpt_finetune_full", {"backbone_lr_scale": 0.1, "weight_decay": 0.01}),
])
def test_regime_configs(name, expected):
    config = load_config(name)
    values = {"layer_decay": config.train.layer_decay, "drop_path_rate": config.model.drop_path_rate,
              "weight_decay": config.train.weight_decay, "freeze_backbone": config.model.freeze_backbone,
              "lora": config.lora.enabled, "backbone_lr_scale": config.train.backbone_lr_scale}
    assert {key: values[key] for key in expected} == expected


# ------------------------------------------------------------------------------------- trainer (demo dataset)


def make_trainer(model: dict = TINY_MODEL, **train) -> nnUNetTrainer_vit:
    _, plans, dataset_json = train_cli.load_plans(str(DATASET_ID), "nnUNetPlans", "2d")
    add_vit_config(plans, "2d", validate_config({"model": model, "train": train}))
    plans["continue_training"] = False
    trainer = nnUNetTrainer_vit(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    return trainer


def one_step(trainer: nnUNetTrainer_vit) -> None:
    size = trainer.configuration_manager.patch_size
    trainer.train_step({"data": torch.randn(trainer.batch_size, trainer.num_input_channels, *size),
                        "target": torch.randint(0, 3, (trainer.batch_size, 1, *size)).float()})


def group_values(trainer: nnUNetTrainer_vit) -> list:
    return [(g["name"], g["lr"], g["lr_scale"], g["weight_decay"], len(g["params"]))
            for g in trainer.optimizer.param_groups]


FINETUNE = dict(optimizer="adamw", initial_lr=1e-3, weight_decay=0.05, warmup_epochs=2, num_epochs=6,
                backbone_lr_scale=0.1, layer_decay=0.65)


def test_schedule_scales_each_group_and_resumes(nnunet_env):
    trainer = make_trainer(**FINETUNE)
    groups = trainer.optimizer.param_groups
    assert len(groups) > 2 and groups[0]["name"] == "decoder"
    trainer.lr_scheduler.step(0)  # warm-up: half of each group's peak after the first of 2 epochs
    assert [g["lr"] for g in groups] == pytest.approx([0.5e-3 * g["lr_scale"] for g in groups])
    trainer.lr_scheduler.step(2)  # the first epoch after warm-up: each group at its own peak
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * g["lr_scale"] for g in groups])
    trainer.lr_scheduler.step(4)  # nnU-Net's poly decay over the 4 epochs after warm-up, per group
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * g["lr_scale"] * (1 - 2 / 4) ** 0.9 for g in groups])

    one_step(trainer)
    trainer.current_epoch = 4
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    resumed = make_trainer(**FINETUNE)
    resumed.load_checkpoint(path)
    assert group_values(resumed) == group_values(trainer)
    for new, old in zip(resumed.optimizer.param_groups, trainer.optimizer.param_groups):
        for p_new, p_old in zip(new["params"], old["params"]):
            assert torch.equal(resumed.optimizer.state[p_new]["exp_avg"], trainer.optimizer.state[p_old]["exp_avg"])
    resumed.lr_scheduler.step(5)
    trainer.lr_scheduler.step(5)
    assert group_values(resumed) == group_values(trainer)

    other = make_trainer(**{**FINETUNE, "layer_decay": 1.0})
    with pytest.raises(ConfigError, match="other parameter groups"):
        other.load_checkpoint(path)


def test_frozen_backbone_trainer_step(nnunet_env):
    trainer = make_trainer({**TINY_MODEL, "freeze_backbone": True}, optimizer="adamw")
    backbone = {id(p) for p in trainer.model.backbone.parameters()}
    one_step(trainer)
    assert trainer.optimizer.state and all(id(p) not in backbone for p in trainer.optimizer.state)
    assert all(p.grad is None for p in trainer.model.backbone.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_exported_backbone_loads_with_the_same_features(tmp_path, lora, capsys):
    """nnUNetv2_export_backbone_vit.py writes a timm state dict that model.checkpoint_path loads back: the same
    backbone features as the trained model's (LoRA merged in)."""
    from nnunetv2.vit import export_backbone

    config = validate_config({"model": TINY_MODEL, "lora": {"enabled": lora}})
    model = build_model(config, 3, 3, load_weights=False).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # adapters that change the output (peft starts them at zero)
    checkpoint = {"init_args": {"configuration": "2d", "plans": {"configurations": {"2d": {
        "vit_config": config.to_dict()}}}}, "network_weights": model.state_dict()}
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    export_backbone.main([str(tmp_path / "checkpoint_final.pth"), str(tmp_path / "backbone.pth")])
    assert "Wrote" in capsys.readouterr().out
    loaded = validate_config({"model": {**TINY_MODEL, "checkpoint_path": str(tmp_path / "backbone.pth")}})
    reloaded = build_model(loaded, 3, 3, load_weights=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone_features(x, model.feature_indices),
                                reloaded.backbone_features(x, reloaded.feature_indices)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_planner_gives_a_frozen_backbone_larger_batches(nnunet_env):
    from nnunetv2.vit import plan as plan_cli

    _, plans, _ = train_cli.load_plans(str(DATASET_ID), "nnUNetPlans", "2d")
    planned = {}
    for freeze in (False, True):
        config = validate_config({"model": {**TINY_MODEL, "normalization": "backbone", "freeze_backbone": freeze}})
        planner = plan_cli.ViTExperimentPlanner(DATASET_ID, config, "2d_vit", gpu_memory_target_in_gb=0.5)
        planner.dataset_json = {**planner.dataset_json, "numTraining": 10 ** 6}  # the 5% cap far away
        entry = planner.plan_configuration(plans)["configurations"]["2d_vit"]
        planned[freeze] = entry
        assert entry["vit_plan"]["memory_model"]["freeze_backbone"] is freeze
    assert planned[True]["batch_size"] > 2 * planned[False]["batch_size"]
