"""Nothing lost: non-finite steps, interrupted checkpoint writes, unreadable or foreign checkpoints,
bad datasets and inputs, and DDP gradient synchronisation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from PIL import Image

from benchmarks import fp16_overflow
from conftest import DATASET_ID, REPO
from nnunetv2.vit import cli
from nnunetv2.vit import predict as predict_cli
from nnunetv2.vit import train as train_cli
from nnunetv2.vit.config import build_model, validate_config
from nnunetv2.vit.errors import CheckpointReadError, ConfigError, NonFiniteTrainingError
from nnunetv2.vit.trained_model import add_vit_config, load_pretrained_network
from nnunetv2.vit.trainer import nnUNetTrainer_vit

pytestmark = pytest.mark.slow

# Trains on nnU-Net's own '2d' configuration, so with nnU-Net's normalization (test_planning.py covers the rest).
TINY_MODEL = {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3", "backbone_size": "small",
              "pretrained": False, "normalization": "zscore",
              "decoder": {"fusion_hidden_size": 16, "neck_hidden_sizes": [16, 16, 16, 16]}}


def make_trainer(model: dict = TINY_MODEL, lora: Optional[dict] = None, **train) -> nnUNetTrainer_vit:
    _, plans, dataset_json = train_cli.load_plans(str(DATASET_ID), "nnUNetPlans", "2d")
    add_vit_config(plans, "2d", validate_config({"model": model, "lora": lora or {}, "train": train}))
    plans["continue_training"] = False
    trainer = nnUNetTrainer_vit(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    return trainer


def batch(trainer: nnUNetTrainer_vit, value: float = 0.0) -> dict:
    size = trainer.configuration_manager.patch_size
    data = torch.full((trainer.batch_size, trainer.num_input_channels, *size), value)
    return {"data": data, "target": torch.randint(0, 3, (trainer.batch_size, 1, *size)).float()}


def run_ddp_command(config, *args: str, **env: str) -> subprocess.CompletedProcess:
    """nnUNetv2_train_vit.py on the session's dataset, fold 0, with 2 CPU DDP processes (gloo)."""
    return subprocess.run(
        [sys.executable, "nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0", "--config", str(config),
         "-num_gpus", "2", "-device", "cpu", *args],
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **env),
        cwd=REPO, capture_output=True, text=True, timeout=300)


def run_cli(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_nonfinite_steps_are_skipped_then_training_stops(nnunet_env):
    trainer = make_trainer(max_nonfinite_steps=3, optimizer="adamw", initial_lr=1e-3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch(trainer, float("nan"))) for _ in range(2)]
    assert all(torch.isnan(output["loss"]) for output in outputs)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"a NaN step changed {changed[:5]}"
    assert not trainer.optimizer.state[next(iter(trainer.optimizer.state))]["step"]  # AdamW never stepped
    outputs.append(trainer.train_step(batch(trainer)))  # a good step: it changes the weights, resets the run
    assert torch.isfinite(outputs[-1]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    outputs += [trainer.train_step(batch(trainer, float("inf"))) for _ in range(2)]
    trainer.on_train_epoch_end(outputs)  # 4 skipped, at most 2 in a row: training goes on
    assert trainer.logger.get_value("train_losses", step=-1) == pytest.approx(float(outputs[2]["loss"]))
    assert trainer.nonfinite_total == 4

    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch(trainer, float("nan")))]  # the third in a row, across the epoch boundary
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps.*last good checkpoint"):
        trainer.on_train_epoch_end(outputs)
    log = open(trainer.log_file).read()
    assert "Skipped training steps in this epoch: 4 with a non-finite loss or gradient, 0 fp16" in log
    assert fp16_overflow.count_skips(log)["nonfinite_loss_skips"] == 5


@pytest.mark.parametrize("term", ["infinite loss", "overflowing gradient norm"])
def test_a_step_with_finite_gradients_but_a_nonfinite_loss_or_norm_changes_nothing(nnunet_env, term):
    """An infinite term that no parameter feeds leaves the gradients finite; gradients of 1e20, each finite, have a
    float32 norm of inf (clipping would scale them to zero and let the optimizer step). Both steps are skipped."""
    trainer = make_trainer(optimizer="adamw", initial_lr=1e-3)
    loss = trainer.loss
    weight = next(trainer.model.classifier.parameters())
    extra = (lambda: torch.tensor(float("inf"))) if term == "infinite loss" else (lambda: 1e20 * weight.sum())
    trainer.loss = lambda output, target: loss(output, target) + extra()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch(trainer))]
    assert torch.isinf(outputs[0]["loss"]) == (term == "infinite loss")
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"a step with an {term} changed {changed[:5]}"
    assert not trainer.optimizer.state[next(iter(trainer.optimizer.state))]["step"]
    trainer.on_train_epoch_end(outputs)
    assert trainer.nonfinite_total == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_skipped_first_step_leaves_the_optimizer_as_new(nnunet_env, monkeypatch, optimizer):
    """A good step after a skipped first step moves the weights exactly as a first good step would (torch's fused
    SGD left its momentum buffers uninitialised after a skipped first step: NaN weights one step later)."""
    trainer = make_trainer(optimizer=optimizer)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    good = batch(trainer)
    with monkeypatch.context() as patch:  # uninitialised memory, made visible: what DDP processes met
        patch.setattr(torch, "empty_like", lambda t, **kwargs: torch.full_like(t, float("nan"), **kwargs))
        trainer.train_step(batch(trainer, float("nan")))

    def good_step() -> dict:
        torch.manual_seed(1)  # the same dropout masks
        trainer.train_step(good)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    after_skip = good_step()
    trainer.model.load_state_dict(start)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    direct = good_step()
    assert all(torch.isfinite(v).all() for v in after_skip.values() if v.is_floating_point())
    for key, value in direct.items():
        torch.testing.assert_close(after_skip[key], value, rtol=0, atol=0, msg=key)


def count_host_reads(step) -> int:
    """How often ``step()`` reads a tensor value on the host (``.item()``, ``bool()``, ``float()``): on a GPU each
    such read waits for every kernel queued so far."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.reads


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_step_never_waits_for_the_device(nnunet_env, precision):
    """No host read of a device value in a training step, for a good, a NaN and an overflowing step: the
    skip decision, the loss and the skip counts stay on the device until the epoch ends."""
    trainer = make_trainer(optimizer="adamw", precision=precision)
    trainer.on_train_epoch_start()
    outputs = []
    for value in (0.0, float("nan"), 0.0):
        assert count_host_reads(lambda: outputs.append(trainer.train_step(batch(trainer, value)))) == 0
    assert isinstance(outputs[0]["loss"], torch.Tensor)
    trainer.on_train_epoch_end(outputs)
    assert trainer.nonfinite_total == 1


@pytest.mark.parametrize("device,bf16_gpu,requested,expected", [
    ("cpu", False, "auto", "fp32"), ("cpu", False, "fp16", "fp16"), ("cpu", False, "bf16", "bf16"),
    ("cuda", True, "auto", "bf16"), ("cuda", False, "auto", "fp16"), ("cuda", True, "fp32", "fp32"),
    ("cuda", False, "bf16", "needs a GPU with bf16 support"),
])
def test_precision_choice(monkeypatch, device, bf16_gpu, requested, expected):
    """auto: bf16 where the GPU has it natively (pre-Ampere GPUs only emulate it, slowly), else fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_gpu or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    trainer = SimpleNamespace(device=torch.device(device))
    if expected.startswith("needs"):
        with pytest.raises(ConfigError, match="Tesla V100 has none. Use precision auto or fp16"):
            nnUNetTrainer_vit._resolve_precision(trainer, requested)
    else:
        assert nnUNetTrainer_vit._resolve_precision(trainer, requested) == expected


def test_fp16_overflow_skips_the_update_and_is_counted(nnunet_env):
    trainer = make_trainer(precision="fp16", optimizer="adamw")  # explicit precision holds on any device
    assert trainer.precision == "fp16" and trainer.grad_scaler is not None
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # scaled gradients overflow fp16
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch(trainer))]
    assert torch.isfinite(outputs[0]["loss"])
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"an overflowed step changed {changed[:5]}"
    trainer.on_train_epoch_end(outputs)
    assert trainer.fp16_overflows == 1 and trainer.nonfinite_total == 0 and trainer.grad_scaler.get_scale() == 2.0 ** 59
    counts = fp16_overflow.count_skips(open(trainer.log_file).read())  # what benchmarks/fp16_overflow.py reports
    assert counts["fp16_overflows"] == 1 and counts["loss_scale_after_each_epoch"] == [2.0 ** 59]


@pytest.fixture
def interrupted_checkpoint_write(nnunet_env, monkeypatch):
    """The path of a good checkpoint (epoch 5) and ``write(error)``, which starts the next checkpoint
    write over it, gets half-way and raises ``error`` (``None``: writes the whole checkpoint)."""
    trainer = make_trainer()
    target = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.current_epoch = 4
    trainer.save_checkpoint(target)

    def write(error: Optional[BaseException]) -> None:
        def failing_save(obj, file, *args, **kwargs):
            file.write(b"half a checkp")
            raise error

        trainer.current_epoch = 9
        with monkeypatch.context() as patch:
            if error is not None:
                patch.setattr(torch, "save", failing_save)
            trainer.save_checkpoint(target)

    return target, write


def test_killed_checkpoint_write_keeps_the_previous_checkpoint(interrupted_checkpoint_write):
    target, write = interrupted_checkpoint_write
    with pytest.raises(KeyboardInterrupt):
        write(KeyboardInterrupt("killed while writing"))
    assert torch.load(target, weights_only=False)["current_epoch"] == 5


def test_full_disk_during_checkpoint_write_is_one_clear_error(interrupted_checkpoint_write, capsys):
    target, write = interrupted_checkpoint_write
    full_disk = OSError(28, "No space left on device")
    code, err = run_cli(lambda argv: cli.run_main("nnUNetv2_train_vit.py", lambda: write(full_disk)), [], capsys)
    assert code == 2
    assert f"error: Cannot write checkpoint {target}: [Errno 28] No space left on device" in err
    assert "previous checkpoint is intact" in err and "--c" in err and err.count("\n") == 1
    assert not os.path.exists(f"{target}.partial")  # no half-written file left to fill the disk
    assert torch.load(target, weights_only=False)["current_epoch"] == 5


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, where every write fails")
def test_full_disk_met_by_torch_save_is_one_clear_error_too(interrupted_checkpoint_write, capsys):
    """The real torch.save meets a real ENOSPC (the temporary file is /dev/full): given our file object, it raises
    the system's OSError (given a path, it raised an internal RuntimeError); the user sees the same line."""
    target, write = interrupted_checkpoint_write
    os.symlink("/dev/full", f"{target}.partial")
    code, err = run_cli(lambda argv: cli.run_main("nnUNetv2_train_vit.py", lambda: write(None)), [], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"error: Cannot write checkpoint {target}: [Errno 28] No space left on device" in err
    assert not os.path.lexists(f"{target}.partial")
    assert torch.load(target, weights_only=False)["current_epoch"] == 5
    write(None)  # the next write, with space again, replaces it
    assert torch.load(target, weights_only=False)["current_epoch"] == 10


def test_resume_skips_an_unreadable_checkpoint(nnunet_env, capsys):
    trainer = make_trainer()
    folder = trainer.output_folder
    trainer.current_epoch = 2
    trainer.save_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))
    with open(os.path.join(folder, "checkpoint_final.pth"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    path, checkpoint = train_cli.find_resume(SimpleNamespace(c=True, val=False, trust_checkpoint=False), Path(folder))
    assert path.name == "checkpoint_latest.pth" and checkpoint["current_epoch"] == 3
    assert "checkpoint_final.pth" in capsys.readouterr().out


def test_checkpoint_of_another_model_is_refused(nnunet_env):
    trainer = make_trainer()
    path = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(path)
    other = make_trainer(model={**TINY_MODEL, "decoder": {"fusion_hidden_size": 8}})
    with pytest.raises(ConfigError, match="checkpoint_final.pth holds a model trained with a different config"):
        other.load_checkpoint(path)
    with pytest.raises(CheckpointReadError, match=r"missing.pth not found\.$"):  # not "corrupt": it is not there
        other.load_checkpoint(os.path.join(trainer.output_folder, "missing.pth"))


def _write_results_folder(trainer: nnUNetTrainer_vit) -> None:
    """What on_train_start and on_train_end leave behind, without training."""
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"))
    save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"))
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def test_prediction_input_errors_write_nothing(nnunet_env, tmp_path, capsys):
    _, dataset, results = nnunet_env
    trainer = make_trainer()
    _write_results_folder(trainer)
    out = tmp_path / "predictions"
    base = ["-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-device", "cpu", "-o", str(out)]

    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(grey / "case_0000.png")
    code, err = run_cli(predict_cli.main, ["-i", str(grey), *base], capsys)
    assert code == 2 and "expects 3 input channel(s)" in err and "case: 1 channel(s) in case_0000.png" in err

    extra = tmp_path / "extra_channels_last"  # the first case is fine; upstream's workers failed on the last
    extra.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(extra / "cTs000_0000.png")
    for channel in range(6):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(extra / f"cTs001_{channel:04d}.png")
    code, err = run_cli(predict_cli.main, ["-i", str(extra), *base], capsys)
    assert code == 2 and err.count("\n") == 1 and "cTs001: 18 channel(s) in 6 file(s)" in err and "cTs000" not in err

    unsuffixed = tmp_path / "unsuffixed"
    unsuffixed.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(unsuffixed / "case.png")
    code, err = run_cli(predict_cli.main, ["-i", str(unsuffixed), *base], capsys)
    assert code == 2 and "case.png: not named CASE_XXXX.png" in err

    code, err = run_cli(predict_cli.main, ["-i", str(dataset / "imagesTs"), *base[:4], "-f", "1", *base[6:]], capsys)
    assert code == 2 and "fold_1" in err and "not found" in err

    other = make_trainer(model={**TINY_MODEL, "decoder": {"fusion_hidden_size": 8}})
    other.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    code, err = run_cli(predict_cli.main, ["-i", str(dataset / "imagesTs"), *base], capsys)
    assert code == 2 and "checkpoint_final.pth holds a model trained with a different config" in err

    code, err = run_cli(predict_cli.main, ["-i", str(dataset / "imagesTs"), *base[:2], "-c", "2d", "-tr", "Other",
                                           *base[4:]], capsys)
    assert code == 2 and "No trained model" in err
    assert not out.exists()


def test_prediction_reads_each_checkpoint_once(nnunet_env, tmp_path, monkeypatch):
    """The model check and the predictor share one read of each fold's checkpoint."""
    from nnunetv2.vit import trained_model

    _, dataset, results = nnunet_env
    trainer = make_trainer()
    _write_results_folder(trainer)
    reads = []
    read = trained_model.read_checkpoint
    monkeypatch.setattr(trained_model, "read_checkpoint",
                        lambda path, **kwargs: reads.append(str(path)) or read(path, **kwargs))
    out = tmp_path / "predictions"
    predict_cli.main(["-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
                      "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"])
    assert reads == [os.path.join(trainer.output_folder, "checkpoint_final.pth")]
    assert len(list(out.glob("*.png"))) == len(list((dataset / "imagesTs").glob("*.png")))

def test_dataset_errors_write_nothing(nnunet_env, tmp_path, capsys):
    root, _, results = nnunet_env
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {TINY_MODEL}\n")
    common = ["--config", str(config), "-device", "cpu"]

    code, err = run_cli(train_cli.main, ["555", "2d", "0", *common], capsys)
    assert code == 2 and "Dataset '555' not found" in err

    raw_only = root / "raw" / "Dataset556_RawOnly"
    shutil.copytree(root / "raw" / f"Dataset{DATASET_ID}_DemoFundus", raw_only)
    code, err = run_cli(train_cli.main, ["556", "2d", "0", *common], capsys)
    assert code == 2 and "not preprocessed" in err and "nnUNetv2_plan_and_preprocess -d 556" in err

    code, err = run_cli(train_cli.main, [str(DATASET_ID), "3d_fullres", "0", *common], capsys)
    assert code == 2 and "Configuration '3d_fullres' is not in" in err and "ViT models use '2d'" in err

    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d", "0", "-device", "cpu"], capsys)
    assert code == 2 and "--config is required" in err
    assert len(err.strip().splitlines()) == 1
    assert not results.exists() or not any(results.rglob("*.pth"))


def test_upernet_batch_of_one_is_refused_before_training(nnunet_env):
    upernet = {**TINY_MODEL, "model_path": "nnunetv2.model.model_upernet", "decoder": {"hidden_size": 16}}
    expected = "needs training batches of at least 2 .* gets 1 per step. Raise train.batch_size"
    with pytest.raises(ConfigError, match=expected):
        make_trainer(upernet, batch_size=1)
    without_global_pool = {**upernet, "decoder": {"hidden_size": 16, "pool_scales": [2, 3]}}
    trainer = make_trainer(without_global_pool, batch_size=1)
    assert trainer.batch_size == 1
    trainer.train_step(batch(trainer))


def test_pretrained_weights_from_another_dataset_transfer_all_but_the_classifier(nnunet_env, tmp_path):
    source = build_model(validate_config({"model": TINY_MODEL}), 3, 5, load_weights=False)  # 5 labels elsewhere
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.5)
    torch.save({"network_weights": source.state_dict()}, tmp_path / "other_dataset.pth")
    trainer = make_trainer()  # this dataset: 3 labels
    classifier = set(trainer.model.classifier_keys())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if k in classifier}

    load_pretrained_network(trainer.model, str(tmp_path / "other_dataset.pth"))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key] if key in classifier else source.state_dict()[key]), key

    wider = build_model(validate_config({"model": {**TINY_MODEL, "decoder": {"fusion_hidden_size": 32}}}), 3, 3,
                        load_weights=False)
    torch.save({"network_weights": wider.state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(ConfigError, match="does not fit this model: .* missing or have another shape"):
        load_pretrained_network(trainer.model, str(tmp_path / "wider.pth"))
    torch.save(source.state_dict(), tmp_path / "bare_state_dict.pth")
    with pytest.raises(ConfigError, match="is not an nnU-Net checkpoint .* model.checkpoint_path"):
        load_pretrained_network(trainer.model, str(tmp_path / "bare_state_dict.pth"))


def test_training_from_pretrained_weights_downloads_nothing(nnunet_env, tmp_path, caplog, cpu_command):
    """-pretrained_weights replaces the backbone's weights, so pretrained: true must not reach the (offline) hub."""
    source = build_model(validate_config({"model": TINY_MODEL}), 3, 3, load_weights=False)
    torch.save({"network_weights": source.state_dict()}, tmp_path / "weights.pth")
    config = tmp_path / "pretrained.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "pretrained": True}, "train": {
        "num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1}}))
    caplog.set_level("INFO")
    train_cli.main([str(DATASET_ID), "2d", "0", "--config", str(config), "-device", "cpu",
                    "-pretrained_weights", str(tmp_path / "weights.pth")])
    assert "Loaded" in caplog.text and "classifier (classifier.0.weight, classifier.0.bias) left at" in caplog.text
    assert (nnunet_env[2] / f"Dataset{DATASET_ID}_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d" / "fold_0"
            / "checkpoint_final.pth").is_file()


def test_cpu_threads_follow_the_cores_the_process_may_use(monkeypatch, cpu_command):
    """-device cpu: one thread per core of the process's affinity (SLURM's --cpus-per-task, taskset), not per core of
    the machine, whose threads would stall each other at every barrier."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert cli.get_device("cpu") == torch.device("cpu") and torch.get_num_threads() == 3


def test_3d_configuration_is_refused_by_the_trainer(nnunet_env):
    _, plans, dataset_json = train_cli.load_plans(str(DATASET_ID), "nnUNetPlans", "2d")
    plans["configurations"]["3d_fullres"] = {**plans["configurations"]["2d"], "patch_size": [32, 32, 32],
                                             "spacing": [1, 1, 1]}
    plans["configurations"]["3d_fullres"]["vit_config"] = validate_config({"model": TINY_MODEL})
    plans["continue_training"] = False
    with pytest.raises(ConfigError, match="ViT models are 2D"):
        nnUNetTrainer_vit(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def _ddp_step(rank: int, world_size: int, port: int, results: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunetv2.model.model_dpt import create_segmentation_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_segmentation_model("dinov3", "small", 3, pretrained=False, fusion_hidden_size=16,
                                      neck_hidden_sizes=[16, 16, 16, 16], use_lora=True, lora_rank=4)
    ddp = DDP(model)  # as nnU-Net wraps it: no find_unused_parameters
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(rank)  # different data per rank
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    results[rank] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).sum().item()
    dist.destroy_process_group()


def test_ddp_two_processes_keep_weights_in_sync():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    # fork: the children reuse the imported modules (spawn re-imports torch, timm, transformers per process)
    mp.start_processes(_ddp_step, args=(2, port, results), nprocs=2, join=True, start_method="fork")
    assert results[0] == pytest.approx(results[1], rel=0, abs=1e-6)


def test_train_section_is_honoured(nnunet_env, monkeypatch):
    trainer = make_trainer(optimizer="sgd", initial_lr=0.02, weight_decay=1e-4, num_epochs=7, warmup_epochs=2,
                           num_iterations_per_epoch=3, num_val_iterations_per_epoch=2, gradient_clip=0.5,
                           save_every=4, gradient_checkpointing=True)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.save_every) == (7, 3, 2, 4)
    assert not trainer.enable_deep_supervision and trainer.precision == "fp32" and trainer.grad_scaler is None
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert trainer.model.vit.grad_checkpointing
    lrs = []
    for epoch in range(7):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([0.01, 0.02, 0.02])  # linear warm-up, then nnU-Net's poly decay
    assert lrs[2] > lrs[3] > lrs[6] > 0

    clip_values = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: clip_values.append(max_norm) or real_clip(params, max_norm))
    trainer.train_step(batch(trainer))
    assert clip_values == [0.5]

    adamw = make_trainer(optimizer="adamw", initial_lr=3e-4)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.optimizer.param_groups[0]["betas"] == (0.9, 0.98)


NAN_ON_RANK_1 = '''
from nnunetv2.vit.trainer import nnUNetTrainer_vit


class nnUNetTrainer_vit_nanrank1(nnUNetTrainer_vit):
    """DDP process 1 gets a NaN loss in its first step; process 0's loss stays finite."""

    def train_step(self, batch):
        if self.local_rank != 1 or getattr(self, "poisoned", False):
            return super().train_step(batch)
        self.poisoned = True
        loss = self.loss
        self.loss = lambda output, target: loss(output, target) * float("nan")
        try:
            return super().train_step(batch)
        finally:
            self.loss = loss
'''


def test_ddp_training_over_gloo_survives_an_epoch_and_a_nan_loss_on_one_process(nnunet_env, tmp_path):
    """Two CPU processes (gloo) train an epoch through the real command, one of them hitting a NaN loss:
    both skip that step together (else the gradient all-reduce waits forever), and rank 0 writes the
    same checkpoint format as a single process."""
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "nnUNetTrainer_vit_nanrank1.py").write_text(NAN_ON_RANK_1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "lora": {"enabled": True, "r": 4}, "train": {
        "num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1}}))
    result = run_ddp_command(config, "-tr", "nnUNetTrainer_vit_nanrank1", nnUNet_extTrainer=str(tmp_path / "trainers"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    dataset_results = tmp_path / "results" / f"Dataset{DATASET_ID}_DemoFundus"
    fold = dataset_results / "nnUNetTrainer_vit_nanrank1__nnUNetPlans__2d" / "fold_0"
    log = "".join(path.read_text() for path in fold.glob("training_log_*.txt"))
    assert "Skipped training steps in this epoch: 1 with a non-finite loss or gradient" in log
    assert "precision: fp32, torch.compile: off" in log
    assert "global batch 4 = 2 per process x 2 processes" in log  # the planned batch (2) is per process
    assert (fold / "validation" / "summary.json").is_file()
    assert not list(fold.glob("*.partial"))

    ddp_checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    trainer = make_trainer(lora={"enabled": True, "r": 4})
    reference = trainer.model.state_dict()
    assert ddp_checkpoint.keys() >= {"network_weights", "optimizer_state", "init_args", "current_epoch", "logging"}
    assert ddp_checkpoint["network_weights"].keys() == reference.keys()  # no "module." prefix from DDP
    assert all(ddp_checkpoint["network_weights"][k].shape == v.shape for k, v in reference.items())
    assert ddp_checkpoint["current_epoch"] == 1
    assert np.isfinite(ddp_checkpoint["logging"]["train_losses"]).all()


def test_user_error_in_ddp_processes_is_one_line(nnunet_env, tmp_path):
    """An error raised inside the DDP processes reads as in one process: one line, exit code 2."""
    config = tmp_path / "upernet.yaml"
    config.write_text(yaml.safe_dump({
        "model": {**TINY_MODEL, "model_path": "nnunetv2.model.model_upernet", "decoder": {"hidden_size": 16}},
        "train": {"batch_size": 1, "num_epochs": 1}}))
    result = run_ddp_command(config)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["nnUNetv2_train_vit.py: error: UperNetSegmentationModel needs training batches of at least 2 "
                      "(BatchNorm on its 1x1 pyramid-pooling map), but gets 1 per process. Raise train.batch_size, "
                      "or leave 1 out of model.decoder.pool_scales."], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_named_2d_configurations_keep_models_of_one_dataset_apart(nnunet_env, tmp_path, capsys, cpu_command):
    """'2d_<name>' trains on the 2d data into its own results folder; predicting with -c 2d_<name> works."""
    _, dataset, results = nnunet_env
    train = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1}
    configs = {"2d_dpt": {"model": TINY_MODEL, "train": train},
               "2d_primus": {"model": {**TINY_MODEL, "model_path": "nnunetv2.model.model_primus", "decoder": {}},
                             "train": train}}
    for name, config in configs.items():
        (tmp_path / f"{name[3:]}.yaml").write_text(yaml.safe_dump(config))
        train_cli.main([str(DATASET_ID), name, "0", "--config", str(tmp_path / f"{name[3:]}.yaml"), "-device", "cpu"])
    code, err = run_cli(train_cli.main, [str(DATASET_ID), "2d_dpt", "0", "--config", str(tmp_path / "primus.yaml"),
                                         "-device", "cpu"], capsys)
    assert code == 2 and "holds a model trained with a different config" in err and "--config" in err
    assert "own configuration name, e.g. '2d_primus' instead of '2d_dpt'" in err
    predict_cli.main(["-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "predictions"), "-d", str(DATASET_ID),
                      "-c", "2d_primus", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"])
    for name, config in configs.items():
        folder = results / f"Dataset{DATASET_ID}_DemoFundus" / f"nnUNetTrainer_vit__nnUNetPlans__{name}"
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
        stored = load_json(str(folder / "plans.json"))["configurations"][name]
        assert stored["inherits_from"] == "2d"
        assert stored["vit_config"]["model"]["model_path"] == config["model"]["model_path"]
    assert len(list((tmp_path / "predictions").glob("*.png"))) == len(list((dataset / "imagesTs").glob("*.png")))


def test_compiled_training_compiles_each_phase_once_and_says_so(nnunet_env, monkeypatch):
    """train.compile: true on CPU (inductor), 2 epochs x 3 iterations: the training graphs compile in the
    first step, the validation graphs in the first validation step, and nothing recompiles afterwards
    (dynamo's counters); the log says what compiles and how long it took."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    trainer = make_trainer(compile="true", num_epochs=2, num_iterations_per_epoch=3, num_val_iterations_per_epoch=1)
    graphs_after = []
    for name in ("train_step", "validation_step"):
        step = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda batch, step=step, name=name: (
            step(batch), graphs_after.append((name, counters["stats"]["unique_graphs"])))[0])
    trainer.run_training()

    train_graphs, val_graphs = graphs_after[0][1], graphs_after[3][1]
    assert [name for name, _ in graphs_after] == (["train_step"] * 3 + ["validation_step"]) * 2
    assert 0 < train_graphs < val_graphs
    assert [n for _, n in graphs_after] == [train_graphs] * 3 + [val_graphs] * 5
    log = open(trainer.log_file).read()
    assert "torch.compile (inductor), one region at a time: backbone blocks (1 graph for 12), neck, head" in log
    for phase in ("training step", "validation step"):
        assert f"torch.compile: compiling the {phase}" in log and "this first one can take minutes" in log
        assert re.search(rf"torch.compile: the first {phase} took [\d.]+ s \(\d+ graph\(s\) compiled\)", log)
    assert "recompiled" not in log and "graph break" not in log


class LazyAliasModule(types.ModuleType):
    """As transformers 5.17's lazy alias modules: reading ``__file__`` or ``__path__`` imports another module."""

    imported = 0

    def __getattr__(self, name: str):
        if name in ("__file__", "__path__"):
            LazyAliasModule.imported += 1
            name = f"planted_lazy_target_{LazyAliasModule.imported}"
            sys.modules[name] = types.ModuleType(name)
        raise AttributeError(name)


# sha256 of nnUNetTrainer.initialize's source in nnunetv2 2.8.1, whose steps nnUNetTrainer_vit.initialize repeats.
UPSTREAM_INITIALIZE_SHA256 = "5732dd44ffbbbf7452c834b4f0dc5b7562fc0467a6e61cd50891a1f795a56949"


def test_initialize_follows_upstreams(nnunet_env, monkeypatch):
    """Ours repeats upstream's initialize with three differences (see its docstring): when upstream's changes,
    ours must be reviewed; and it leaves what upstream's leaves, the logger's hyperparameters included."""
    import hashlib
    import inspect

    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    source = inspect.getsource(nnUNetTrainer.initialize)
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_INITIALIZE_SHA256, \
        "upstream's nnUNetTrainer.initialize changed: review nnUNetTrainer_vit.initialize, then update the hash"
    configs = []
    monkeypatch.setattr(MetaLogger, "update_config", lambda self, config: configs.append(config))
    trainer = make_trainer(initial_lr=0.02, num_epochs=7)
    assert trainer.was_initialized and trainer.dataset_class is not None and trainer.loss is not None
    assert [config for config in configs if "hparas" in config] == [{"hparas": {
        "initial_lr": 0.02, "weight_decay": 3e-5, "oversample_foreground_percent": 0.33,
        "probabilistic_oversampling": False, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50,
        "num_epochs": 7, "enable_deep_supervision": False, "batch_size": 2}}]


def tiny_config(tmp_path, **train) -> str:
    config = tmp_path / "tiny_config.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {
        "num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1, **train}}))
    return str(config)


def test_a_second_training_of_a_fold_is_refused_while_the_first_runs_and_no_upstream_module_scan_is_needed(
        nnunet_env, tmp_path, capsys, monkeypatch, cpu_command):
    """Two checks on one tiny training (each needs a training; one serves both):

    Two trainings into one fold interleaved their checkpoints; the second is refused while the first's process lives,
    and a lock left by a killed training is taken over.

    The first GPU run died in upstream's trainer lookup, whose scan of sys.modules broke on a lazy alias module. With
    one planted, upstream's lookup fails the same way, and training (the one taking the lock over) and prediction
    still work."""
    import json
    import socket

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    _, dataset, results = nnunet_env
    monkeypatch.setitem(sys.modules, "planted_lazy_alias", LazyAliasModule("planted_lazy_alias"))
    monkeypatch.setenv("nnUNet_extTrainer", str(REPO / "nnunetv2" / "vit" / "ext_trainers"))
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        recursive_find_trainer_class_by_name("nnUNetTrainer_vit")

    fold = results / f"Dataset{DATASET_ID}_DemoFundus" / "nnUNetTrainer_vit__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (fold / ".training.lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname(),
                                                         "started": "2026-11-27 10:00:00"}))
        argv = [str(DATASET_ID), "2d", "0", "--config", tiny_config(tmp_path), "-device", "cpu"]
        code, err = run_cli(train_cli.main, argv, capsys)
        assert code == 2 and f"Another training (PID {first.pid} on {socket.gethostname()}" in err
        assert f"is writing to {fold}" in err and err.count("\n") == 1
        assert [p.name for p in fold.iterdir()] == [".training.lock"]  # nothing written
    finally:
        first.kill()
        first.wait()
    train_cli.main(argv)  # the first is gone (as after a kill -9): its lock is taken over
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / ".training.lock").exists()

    out = tmp_path / "predictions"
    predict_cli.main(["-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
                      "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (dataset / "labelsTs").glob("*.png"))


def test_unwritable_results_out_of_memory_and_unknown_labels_are_one_line(nnunet_env, tmp_path, capsys,
                                                                         monkeypatch, cpu_command):
    root, _, results = nnunet_env
    argv = [str(DATASET_ID), "2d", "0", "--config", tiny_config(tmp_path), "-device", "cpu"]
    with monkeypatch.context() as patch:  # as on a read-only file system (root may write anywhere here)
        patch.setattr(train_cli.os, "access", lambda path, mode: False)
        code, err = run_cli(train_cli.main, argv, capsys)
    assert code == 2 and "(read-only or no permission)" in err and "Set nnUNet_results" in err
    assert not results.exists()

    def out_of_memory(self, batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 98765432100 bytes.")

    with monkeypatch.context() as patch:
        patch.setattr(nnUNetTrainer_vit, "train_step", out_of_memory)
        code, err = run_cli(train_cli.main, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "Out of cpu memory at batch size 2 of 96x96 patches: lower train.batch_size" in err

    bad = root / "preprocessed" / "Dataset557_BadLabel"
    shutil.copytree(root / "preprocessed" / f"Dataset{DATASET_ID}_DemoFundus", bad)
    try:
        label_file = sorted((bad / "gt_segmentations").glob("*.png"))[1]
        label = np.asarray(Image.open(label_file)).copy()
        label[0, 0] = 7
        Image.fromarray(label).save(label_file)
        code, err = run_cli(train_cli.main, ["557", *argv[1:]], capsys)
        assert code == 2 and f"{label_file.name} holds label value(s) [7], which" in err
        assert "(its labels: [0, 1, 2])" in err
    finally:
        shutil.rmtree(bad)


def test_augmentation_workers_end_with_a_killed_training(nnunet_env, tmp_path):
    """After kill -9 of a training, its data-augmentation worker processes end too (they lived on for minutes)."""
    def children(pid: int) -> list:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    config = tiny_config(tmp_path, num_epochs=50, num_iterations_per_epoch=50)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", nnUNet_n_proc_DA="2")
    training = subprocess.Popen([sys.executable, "nnUNetv2_train_vit.py", str(DATASET_ID), "2d", "0", "--config",
                                 config, "-device", "cpu"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        workers = []
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and training.poll() is None:
            time.sleep(0.5)
            workers = children(training.pid)
        assert len(workers) >= 2, f"no augmentation workers appeared (exit code {training.poll()})"
    finally:
        training.kill()
        training.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if alive(pid)]
