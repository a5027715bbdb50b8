"""nnUNetTrainer_vit: upstream nnU-Net training for ViT segmentation models configured by YAML.

The resolved YAML config lives in the plans (``trained_model.py``): upstream copies the plans into the
results folder and every checkpoint, so prediction and ``--val`` rebuild the network from there,
without the YAML file or any download.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2.vit.compiling import CompileLog
from nnunetv2.vit.config import build_model
from nnunetv2.vit.errors import CheckpointWriteError, ConfigError, NonFiniteTrainingError, TrainingStopped
from nnunetv2.vit.optim import WarmupPolyLRScheduler, build_optimizer, describe_parameter_groups
from nnunetv2.vit.preemption import StopSignals, control_group
from nnunetv2.vit.trained_model import (
    network_weights, read_training_checkpoint, require_same_model, required_config, stored_config,
)


class nnUNetTrainer_vit(nnUNetTrainer):
    """Trains the ViT model named by the plans' ``vit_config``; 2D only, no deep supervision."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """Upstream's, then the training settings of the plans' ViT config (as upstream's variants set theirs)."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise ConfigError(
                f"ViT models are 2D, but configuration '{configuration}' has a "
                f"{len(self.configuration_manager.patch_size)}D patch size. Use the '2d' configuration."
            )
        self.vit_config = required_config(self.configuration_manager)
        train = self.vit_config.train
        self.initial_lr = train.initial_lr
        self.weight_decay = train.weight_decay
        self.num_epochs = train.num_epochs
        self.num_iterations_per_epoch = train.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = train.num_val_iterations_per_epoch
        self.save_every = train.save_every
        self.enable_deep_supervision = False
        if self.is_ddp:
            # The launcher's device (LOCAL_RANK), not upstream's cuda:<global rank>, which is wrong past the first node
            # and moves CPU processes to a GPU. self.local_rank stays upstream's global rank (who writes, val shares).
            self.device = device
        self.precision = self._resolve_precision(train.precision)
        # Loss scaling for fp16 only (upstream scales on any CUDA device); the other precisions step through a scaler
        # held at 1, whose flag of non-finite gradients makes the fused optimizer skip on the device (train_step).
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.unit_scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0)
        # Set to False (resume, --val) to build the architecture only: the weights come from a checkpoint.
        self.load_pretrained_backbone = True
        # The user's word (--trust_checkpoint) that the checkpoints this trainer loads may be full pickles.
        self.trust_checkpoint = False
        # Skipped steps, counted on the device (no wait per step): per epoch [non-finite, fp16 overflow], and runs.
        self.skip_counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.longest_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_total = 0
        self.fp16_overflows = 0
        self.compile_log: Optional[CompileLog] = None
        self.epoch_train_start = time.perf_counter()
        self.stop_signals = StopSignals(self.is_ddp)  # preemption: caught from on_train_start to the end
        self.steps_this_epoch = 0

    def _resolve_precision(self, precision: str) -> str:
        """``auto``: bf16 on GPUs that have it, else fp16; fp32 elsewhere (as upstream). Explicit values are kept."""
        bf16_gpu = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "auto":
            return "fp32" if self.device.type != "cuda" else "bf16" if bf16_gpu else "fp16"
        if precision == "bf16" and self.device.type == "cuda" and not bf16_gpu:
            raise ConfigError(f"train.precision: bf16 needs a GPU with bf16 support (Ampere or newer); "
                              f"{torch.cuda.get_device_name(self.device)} has none. Use precision auto or fp16.")
        return precision

    def _autocast(self):
        """Autocast to the training precision (none for fp32)."""
        if self.precision == "fp32":
            return dummy_context()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        """Architecture only (no weight download); used by upstream's predictor."""
        return build_model(required_config(configuration_manager), num_input_channels, num_output_channels,
                           load_weights=False)

    def initialize(self) -> None:
        """Upstream's steps with ``_training_network``. Hook missing upstream: its network is built only by the static
        (predictor's) ``build_network_architecture``, compiled whole and DDP-wrapped on the global rank's GPU. A test
        watches upstream's for changes."""
        if self.was_initialized:
            raise RuntimeError("The trainer is already initialized.")
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self._training_network()
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss = self._build_loss()
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True
        self.logger.update_config({"hparas": {
            "initial_lr": self.initial_lr, "weight_decay": self.weight_decay,
            "oversample_foreground_percent": self.oversample_foreground_percent,
            "probabilistic_oversampling": self.probabilistic_oversampling,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch, "num_epochs": self.num_epochs,
            "enable_deep_supervision": self.enable_deep_supervision,
            "batch_size": self.configuration_manager.batch_size,
        }})

    def _training_network(self) -> torch.nn.Module:
        """The pretrained network (architecture only when resuming), compiled region by region, and in DDP wrapped on
        this process's device, with SyncBatchNorm on CUDA only."""
        network = build_model(self.vit_config, self.num_input_channels, self.label_manager.num_segmentation_heads,
                              load_weights=self.load_pretrained_backbone)
        self._check_batch_size(network)
        if self.vit_config.train.gradient_checkpointing:
            network.set_grad_checkpointing(True)
        network.to(self.device)
        if self._do_i_compile():
            regions = network.compile_regions()
            self.compile_log = CompileLog(self.print_to_log_file)
            self.print_to_log_file(f"torch.compile (inductor), one region at a time: {', '.join(regions)}")
        if self.is_ddp and self.device.type == "cuda":
            return DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(network), device_ids=[self.device.index])
        if self.is_ddp:
            return DDP(network)  # SyncBatchNorm is CUDA-only: BatchNorm uses per-process batches
        return network

    @property
    def world_size(self) -> int:
        """The number of training processes (1 without DDP)."""
        return dist.get_world_size() if self.is_ddp else 1

    def _set_batch_size_and_oversample(self) -> None:
        """The planned batch is per process (the plan is for one GPU): upstream would split it across N processes."""
        self.batch_size = self.configuration_manager.batch_size

    def batch_description(self) -> str:
        """The global batch and how it is made, for the log."""
        return (f"global batch {self.batch_size * self.world_size} = {self.batch_size} per process x "
                f"{self.world_size} process{'es' if self.world_size > 1 else ''}")

    def _check_batch_size(self, network: torch.nn.Module) -> None:
        """Refuse batches too small for the model's BatchNorm before training crashes inside it."""
        sync_bn = self.is_ddp and self.device.type == "cuda"  # SyncBatchNorm normalises over all GPUs' samples
        batch = self.batch_size * self.world_size if sync_bn else self.batch_size
        if batch < network.min_train_batch_size:
            where = "per process" if self.is_ddp else "per step"
            raise ConfigError(
                f"{type(network).__name__} needs training batches of at least {network.min_train_batch_size} "
                f"(BatchNorm on its 1x1 pyramid-pooling map), but gets {batch} {where}. Raise train.batch_size, "
                f"or leave 1 out of model.decoder.pool_scales.")

    @property
    def model(self) -> torch.nn.Module:
        """The ViT segmentation model without DDP / torch.compile wrappers."""
        network = self.network.module if isinstance(self.network, DDP) else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def _do_i_compile(self) -> bool:
        """``train.compile``: ``auto`` is upstream's rule (CUDA unless ``nnUNet_compile`` says no); ``true``: CUDA
        and CPU (inductor)."""
        setting = self.vit_config.train.compile
        if setting == "auto":
            return super()._do_i_compile()
        return setting == "true" and self.device.type in ("cuda", "cpu")

    def configure_optimizers(self):
        """AdamW or upstream's SGD over this model's parameter groups, warm-up then upstream's poly decay."""
        train = self.vit_config.train
        optimizer = build_optimizer(self.model, train, self.initial_lr, self.weight_decay,
                                    fused=self.device.type in ("cuda", "cpu"))
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, train.warmup_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """ViT models have a single output; nothing to switch."""

    def on_train_start(self) -> None:
        """Catches the stop signals, then upstream's start, then logs the batch, precision and parameters."""
        # Before upstream forks the augmentation workers: they inherit the handler, so a signal sent to every
        # process of the job (as SLURM does) leaves them running until the training has finished its step.
        self.stop_signals.catch()
        super().on_train_start()
        self.print_to_log_file(f"{self.batch_description()} (learning rates are not scaled with the number of "
                               f"processes)")
        self.print_to_log_file(f"ViT config: {self.vit_config}", also_print_to_console=False)
        compiled = "on" if self._do_i_compile() else "off"
        if compiled == "off" and self.vit_config.train.compile == "true":
            compiled += f" (train.compile: true applies to CUDA and CPU; this is {self.device.type})"
        self.print_to_log_file(f"precision: {self.precision}, torch.compile: {compiled}\n"
                               f"{self.model.parameter_summary(detailed=True)}\n"
                               f"{describe_parameter_groups(self.optimizer, self.initial_lr)}")
        if self.precision == "fp16" and self.device.type == "cpu":
            self.print_to_log_file("WARNING: fp16 on CPU is very slow (PyTorch's CPU fp16 convolution backward is "
                                   "not optimised); use train.precision bf16 or fp32 there.")

    def on_train_epoch_start(self) -> None:
        """Upstream's, and the epoch's step counters and clock start."""
        super().on_train_epoch_start()
        self.epoch_train_start = time.perf_counter()
        self.steps_this_epoch = 0
        self.skip_counts.zero_()
        self.longest_streak.copy_(self.nonfinite_streak)  # a run of non-finite steps goes on across epochs

    def _first_call(self, phase: str):
        """Context of a training or validation step: the first one logs that it compiles, and how long it took."""
        if self.compile_log is None:
            return dummy_context()
        what = f"forward{' and backward' if phase == 'training step' else ''} of {type(self.model).__name__}, " \
               f"batch {self.batch_size} x {tuple(self.configuration_manager.patch_size)}"
        return self.compile_log.first_call(phase, what, self.device)

    def train_step(self, batch: dict) -> dict:
        """Upstream's step with the configured precision and clip; a non-finite loss or gradient changes nothing
        (weights, optimizer state, BatchNorm statistics) in any DDP process, and no step waits for the device.

        A ``GradScaler`` (``unit_scaler`` at scale 1 unless fp16) flags non-finite gradients, a non-finite loss made
        NaN gradients, and an overflowing norm; the fused optimizer then skips on the device. DDP averages gradients
        before the check, so every process skips alike. Loss and counts stay on the device until the epoch ends.
        """
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        scaler = self.grad_scaler if self.grad_scaler is not None else self.unit_scaler
        self.optimizer.zero_grad(set_to_none=True)
        running_stats = self._running_stats()
        saved_stats = [buffer.clone() for buffer in running_stats]
        with self._first_call("training step"):
            with self._autocast():
                loss = self.loss(self.network(data), target)
            loss_finite = torch.isfinite(loss.detach())
            scaler.scale(loss * torch.where(loss_finite, 1.0, float("nan"))).backward()
        if scaler is self.grad_scaler:  # fp16: clip the true gradients (fp16's cannot overflow a float32 norm)
            scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.vit_config.train.gradient_clip)
        skip = ~torch.isfinite(grad_norm)
        if scaler is self.unit_scaler:
            # Finite gradients whose norm overflows were scaled to zero by clipping: one NaN makes unscale_ flag them.
            grad = next(param.grad for param in self.network.parameters() if param.grad is not None)
            grad.mul_(torch.where(skip, float("nan"), 1.0))
            scaler.unscale_(self.optimizer)
        for buffer, saved in zip(running_stats, saved_stats):  # a skipped batch must not change BatchNorm
            buffer.copy_(torch.where(skip, saved, buffer))
        scaler.step(self.optimizer)
        scaler.update(None if scaler is self.grad_scaler else 1.0)  # fp16: lower the scale after an overflow
        # An fp16 overflow (finite loss, overflowing gradient) is GradScaler's business, not a non-finite step.
        overflow = skip & loss_finite if self.grad_scaler is not None else torch.zeros_like(skip)
        nonfinite = skip & ~overflow
        self.skip_counts += torch.stack([nonfinite, overflow]).to(torch.int64)
        self.nonfinite_streak.add_(1).mul_(nonfinite)
        torch.maximum(self.longest_streak, self.nonfinite_streak, out=self.longest_streak)
        self.steps_this_epoch += 1
        if self.stop_signals.agreed():
            raise TrainingStopped()
        return {"loss": loss.detach()}

    def run_training(self) -> None:
        """Upstream's training; SIGTERM or SIGUSR1 stops every process after the same step (``_stop``), or, in the
        last epoch's end, before the final validation."""
        try:
            super().run_training()
        except TrainingStopped:
            self._stop()
        finally:
            self.stop_signals.restore()
        if self.stop_signals.agreed(wait=True):
            name = self.stop_signals.name
            self.print_to_log_file(f"Stopped by {name} after the training, before the final validation; --c runs it.",
                                   also_print_to_console=False)
            raise TrainingStopped(f"Stopped by {name} before the final validation; checkpoint_final.pth is written. "
                                  f"Resume with --c to run the validation.")

    def _stop(self) -> None:
        """Stopped in epoch E: rank 0 writes ``checkpoint_latest.pth`` with this step's weights and the log before E,
        so ``--c`` runs E again; no process ends before it is written."""
        name = self.stop_signals.name
        epoch = self.current_epoch
        for values in self.logger.get_checkpoint().values():
            del values[epoch:]  # epoch E's lr and start time: logged again when E runs again
        self.current_epoch -= 1  # upstream's save_checkpoint writes current_epoch + 1, the epoch to resume at
        try:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        finally:
            self.current_epoch += 1
        if self.is_ddp:
            dist.barrier(group=control_group())
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
        processes = f"all {self.world_size} processes" if self.is_ddp else "the training"
        written = "checkpoint_latest.pth is written" if not self.disable_checkpointing else "checkpointing is disabled"
        self.print_to_log_file(f"{name} received: {processes} stopped after step {self.steps_this_epoch} of epoch "
                               f"{epoch}; {written}. --c continues at the start of epoch {epoch}.",
                               also_print_to_console=False)
        raise TrainingStopped(f"Stopped by {name} after step {self.steps_this_epoch} of epoch {epoch}; {written} in "
                              f"{self.output_folder}. Resume with --c: it continues at the start of epoch "
                              f"{epoch}.") from None

    def validation_step(self, batch: dict) -> dict:
        """Upstream's, the first one logged as compiling."""
        with self._first_call("validation step"):
            return super().validation_step(batch)

    def _running_stats(self) -> List[torch.Tensor]:
        """BatchNorm running statistics: the only state a forward pass changes."""
        return [buffer for module in self.model.modules() if isinstance(module, _BatchNorm)
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
                if buffer is not None]

    def on_train_epoch_end(self, train_outputs: List[dict]) -> None:
        """Upstream's epoch loss without skipped steps, read from the device once; ends the training after
        ``max_nonfinite_steps`` non-finite steps in a row."""
        losses = torch.stack([output["loss"].float() for output in train_outputs]).cpu().numpy()  # waits for the device
        self._log_throughput(len(train_outputs), time.perf_counter() - self.epoch_train_start)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = np.concatenate([np.atleast_1d(x) for x in gathered])
        finite = losses[np.isfinite(losses)]
        self.logger.log("train_losses", float(finite.mean()) if finite.size else float("nan"), self.current_epoch)

        nonfinite, overflows = (int(n) for n in self.skip_counts.cpu())
        self.nonfinite_total += nonfinite
        self.fp16_overflows += overflows
        if nonfinite or overflows:
            scale = f" (loss scale now {self.grad_scaler.get_scale()})" if self.grad_scaler is not None else ""
            self.print_to_log_file(
                f"Skipped training steps in this epoch: {nonfinite} with a non-finite loss or gradient, {overflows} "
                f"fp16 gradient overflows{scale}. They changed nothing. So far: {self.nonfinite_total} and "
                f"{self.fp16_overflows}.")
        limit = self.vit_config.train.max_nonfinite_steps
        if int(self.longest_streak) >= limit:
            raise NonFiniteTrainingError(
                f"Training stopped: {limit} consecutive steps had a non-finite loss or gradient. The last good "
                f"checkpoint in {self.output_folder} is kept; lower train.initial_lr, use train.precision: bf16 "
                f"or fp32, or check the data, then resume with --c.")

    def _log_throughput(self, steps: int, seconds: float) -> None:
        """Training speed of this epoch (the first one includes compiling), and peak GPU memory so far."""
        memory = ""
        if self.device.type == "cuda":
            memory = f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f} GiB"
        self.print_to_log_file(f"training: {steps} steps in {seconds:.1f} s ({steps / seconds:.2f} steps/s, "
                               f"{steps * self.batch_size / seconds:.1f} img/s per process){memory}")

    def on_epoch_end(self) -> None:
        """Reports what torch.compile did in this epoch, then upstream's."""
        if self.compile_log is not None:
            self.compile_log.report(f"in epoch {self.current_epoch}")
        super().on_epoch_end()

    def on_train_end(self) -> None:
        """Upstream's, then closes the compile log."""
        super().on_train_end()
        if self.compile_log is not None:
            self.compile_log.close()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Upstream's final validation; with torch.compile its first sliding-window tile (batch 1, eval) compiles."""
        if self.compile_log is not None:
            self.compile_log.open()
            self.compile_log.first_forward(self.model, "final validation tile",
                                           f"sliding window, 1 x {tuple(self.configuration_manager.patch_size)}",
                                           self.device)
        super().perform_actual_validation(save_probabilities)
        if self.compile_log is not None:
            self.compile_log.report("in the final validation")
            self.compile_log.close()

    def save_checkpoint(self, filename: str) -> None:
        """Upstream's checkpoint, written to a temporary file and renamed: a kill never leaves a half-written one. We
        open the file, so a failed write raises OSError (``torch.save`` given a path raises RuntimeError)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (only rank 0 writes; upstream logs a disabled one)
            return
        partial = f"{filename}.partial"
        try:
            with open(partial, "wb") as file:
                super().save_checkpoint(file)
            os.replace(partial, filename)
        except OSError as err:  # a full disk, a quota, a vanished share
            raise CheckpointWriteError(
                f"Cannot write checkpoint {filename}: {err}. The previous checkpoint is intact; free disk space (or "
                f"fix the folder), then resume with --c.") from err
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)  # what a failed write left (after the rename there is nothing to remove)

    def load_checkpoint(self, filename_or_checkpoint: Union[str, dict]) -> None:
        """Upstream's steps on a checkpoint read as data, refused if it holds another model or parameter groups.
        Hook missing upstream: its own reads the file as a full pickle, and fails given a read checkpoint."""
        if isinstance(filename_or_checkpoint, str):
            name = filename_or_checkpoint
            checkpoint = read_training_checkpoint(filename_or_checkpoint, trust=self.trust_checkpoint)
        else:
            name, checkpoint = "checkpoint", filename_or_checkpoint
        require_same_model(stored_config(checkpoint, self.configuration_name), self.vit_config, name,
                           "the config")
        if not self.was_initialized:
            self.initialize()
        saved = [len(group["params"]) for group in checkpoint["optimizer_state"]["param_groups"]]
        built = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved != built:
            raise ConfigError(
                f"{name} was trained with other parameter groups (parameters per group {saved}, this config makes "
                f"{built}): train.backbone_lr_scale, layer_decay or decay_norms_and_biases changed. Resume with the "
                f"train section it started with.")
        self.model.load_state_dict(network_weights(checkpoint))
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])  # its parameter groups' lr scales included
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
