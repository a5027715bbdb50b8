"""``nnUNetv2_train_vit.py``: upstream ``nnUNetv2_train`` plus ``--config`` for the ViT model.

Every input is checked before heavy work, the resolved config goes into the plans the trainer receives, then
upstream's training and validation run. Under torchrun or ``-num_gpus`` (``launch.py``), rank 0 checks, all train.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2.vit.cli import USER_ERROR_EXIT_CODE, dataset_name, get_device, run_main
from nnunetv2.vit.config import ViTConfig, load_config
from nnunetv2.vit.errors import (
    USER_ERRORS, CheckpointReadError, ConfigError, OutOfMemoryError, TrainingStopped, out_of_memory,
)
from nnunetv2.vit.launch import (
    PEERS_LOST_EXIT_CODE, STOPPED_EXIT_CODE, first_to_report, init_distributed, launch_processes, lost_peers,
    torchrun_started,
)
from nnunetv2.vit.lifetime import die_with_parent, end_forked_workers_with_this_process, process_alive
from nnunetv2.vit.plan import (
    PROG as PLAN_PROG, PARENT, PLAN_KEY, add_2d_configuration, default_configuration_name, resolve_normalization,
)
from nnunetv2.vit.preemption import control_group
from nnunetv2.vit.trained_model import (
    add_vit_config, load_pretrained_network, read_training_checkpoint, require_same_model, stored_config,
)
from nnunetv2.vit.trainer import nnUNetTrainer_vit
from nnunetv2.vit.upstream_adapter import find_trainer_class

PROG = "nnUNetv2_train_vit.py"
CHECKPOINT_PREFERENCE = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
LOCK_NAME = ".training.lock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a ViT segmentation model (DPT, UperNet, SegFormer, Primus) with nnU-Net v2.",
    )
    parser.add_argument("dataset_name_or_id", help="Dataset name or ID to train with")
    parser.add_argument("configuration", help="nnU-Net configuration; ViT models are 2D, so '2d'")
    parser.add_argument("fold", help="Fold of the 5-fold cross-validation (0-4) or 'all'")
    parser.add_argument("--config", default=None,
                        help="YAML model/training config (a path, or a built-in name such as 'dpt'). Required for "
                             "a new training; --c and --val reuse the config stored with the results if left out.")
    parser.add_argument("-tr", default="nnUNetTrainer_vit", help="Trainer class (default: nnUNetTrainer_vit)")
    parser.add_argument("-p", default="nnUNetPlans", help="Plans identifier (default: nnUNetPlans)")
    parser.add_argument("-pretrained_weights", default=None,
                        help="nnU-Net checkpoint whose network weights initialise the model")
    parser.add_argument("-num_gpus", type=int, default=1,
                        help="Number of DDP processes: GPUs (NCCL), or with -device cpu CPU processes (gloo)")
    parser.add_argument("--npz", action="store_true", help="Save softmax predictions of the final validation")
    parser.add_argument("--c", action="store_true", help="Continue training from the latest checkpoint")
    parser.add_argument("--val", action="store_true", help="Only run the validation (training must be finished)")
    parser.add_argument("--val_best", action="store_true",
                        help="Validate with checkpoint_best instead of checkpoint_final")
    parser.add_argument("--disable_checkpointing", action="store_true", help="Write no checkpoints")
    parser.add_argument("-device", default="cuda", help="cuda (default), cpu or mps")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load the checkpoints of --c, --val, --val_best and -pretrained_weights as full pickles, "
                             "which can run code: only for files whose source you trust")
    return parser


def load_plans(dataset_name_or_id: str, plans_identifier: str, configuration: str) -> tuple[str, dict, dict]:
    """Dataset name, plans and dataset.json of a preprocessed dataset, with errors saying what to run. An unplanned
    ``2d_<name>`` inherits ``2d``: same data, its own results folder, so several models sit side by side."""
    if not nnUNet_preprocessed.is_set():
        raise ConfigError("nnUNet_preprocessed is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results.")
    name = dataset_name(dataset_name_or_id)
    folder = Path(nnUNet_preprocessed.get()) / name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise ConfigError(
            f"{plans_file} does not exist: dataset {name} is not preprocessed with plans '{plans_identifier}'. "
            f"Run `nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} -c 2d` first."
        )
    plans = load_json(str(plans_file))
    if configuration not in plans["configurations"] and configuration.startswith(f"{PARENT}_") \
            and PARENT in plans["configurations"]:
        add_2d_configuration(plans, configuration)  # same data as '2d', its own results folder
    if configuration not in plans["configurations"]:
        raise ConfigError(f"Configuration '{configuration}' is not in {plans_file}. Available: "
                          f"{', '.join(plans['configurations'])}. ViT models use '2d', or '2d_<name>' to keep "
                          f"several models of one dataset apart.")
    planned = PlansManager(plans).get_configuration(configuration)
    if len(planned.patch_size) != 2:
        raise ConfigError(f"ViT models are 2D, but configuration '{configuration}' is {len(planned.patch_size)}D. "
                          f"Use '2d'.")
    return name, plans, load_json(str(folder / "dataset.json"))


def require_preprocessed(args: argparse.Namespace, dataset: str, plans: dict) -> None:
    """Refuse a configuration whose preprocessed data are missing, naming the command that makes them."""
    planned = PlansManager(plans).get_configuration(args.configuration)
    if not (Path(nnUNet_preprocessed.get()) / dataset / planned.data_identifier).is_dir():
        command = (f"python {PLAN_PROG} {args.dataset_name_or_id} --config {args.config or 'CONFIG.yaml'} "
                   f"-c {args.configuration}" if PLAN_KEY in planned.configuration else
                   f"nnUNetv2_plan_and_preprocess -d {args.dataset_name_or_id} -c {PARENT}")
        raise ConfigError(f"Configuration '{args.configuration}' of {dataset} is planned but not preprocessed. "
                          f"Run `{command}` first.")


def check_label_values(dataset: str, plans: dict, dataset_json: dict) -> None:
    """Refuse label values dataset.json does not list (in a worker they break training with "index 7 is out of
    bounds"), from the preprocessed copy of the labels."""
    folder = Path(nnUNet_preprocessed.get()) / dataset
    plans_manager = PlansManager(plans)
    labels = plans_manager.get_label_manager(dataset_json)
    allowed = {int(value) for value in labels.all_labels} | ({int(labels.ignore_label)} if labels.has_ignore_label
                                                                else set())
    reader = plans_manager.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    for label_file in sorted((folder / "gt_segmentations").glob(f"*{ending}")):
        found = set(np.unique(reader.read_seg(str(label_file))[0]).astype(int).tolist())
        if not found <= allowed:
            raise ConfigError(
                f"{label_file.name} holds label value(s) {sorted(found - allowed)}, which {folder / 'dataset.json'} "
                f"does not list (its labels: {sorted(allowed)}). Fix the label file in nnUNet_raw or add the label "
                f"to dataset.json, then run nnUNetv2_plan_and_preprocess again.")


def results_folder(dataset: str, trainer: str, plans_identifier: str, configuration: str, fold: str) -> Path:
    """Upstream's fold folder for these settings."""
    if not nnUNet_results.is_set():
        raise ConfigError("nnUNet_results is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results.")
    return Path(get_output_folder(dataset, trainer, plans_identifier, configuration, fold))


def resolve_config(args: argparse.Namespace, requested: Optional[ViTConfig], plans: dict,
                   fold_folder: Path) -> ViTConfig:
    """The config to train with, its normalization resolved on the plan (and said): the YAML file's, which must
    describe the model already in the results folder, or for --c/--val the one stored there."""
    stored = stored_config(fold_folder.parent / "plans.json", args.configuration)
    if requested is None and (stored is None or not (args.c or args.val)):
        raise ConfigError("--config is required (e.g. --config nnunetv2/configs/dpt.yaml)"
                          + (f"; nothing to continue in {fold_folder}." if args.c or args.val else "."))
    # 'auto' is resolved before the comparison: a stored config holds the normalization it trained with.
    config, note = resolve_normalization(plans, args.configuration, stored if requested is None else requested,
                                         args.dataset_name_or_id, args.config or "CONFIG.yaml")
    print(note)
    if requested is not None:
        name = default_configuration_name(args.config)
        example = f", e.g. '{name}' instead of '{args.configuration}'" if name != args.configuration else ""
        require_same_model(stored, config, str(fold_folder.parent), f"--config {args.config}",
                           f"Give this model its own configuration name{example}, or use the same config.")
    return config


def check_writable(folder: Path) -> None:
    """Refuse, before any work, a results folder that cannot be written (read-only disk, permissions)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write to {existing} (read-only or no permission), where {folder} would go. "
                          f"Set nnUNet_results to a folder you can write to.")


@contextlib.contextmanager
def fold_lock(fold_folder: Path, run_id: Optional[str] = None) -> Iterator[None]:
    """Hold ``.training.lock`` in the fold folder: a second training of the fold is refused. A lock of a dead process
    on this host, or of an earlier start of this torchrun job (``run_id``, whose rank 0 may have run on another node),
    is taken over. Folders made for the lock go again if nothing else was written."""
    lock = fold_folder / LOCK_NAME
    created = [folder for folder in (fold_folder, *fold_folder.parents) if not folder.exists()]
    fold_folder.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if run_id:
        me["run_id"] = run_id
    for _ in range(2):
        try:
            with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as handle:
                json.dump(me, handle)
            break
        except FileExistsError:
            holder = _read_lock(lock)
            pid = holder.get("pid")
            if holder.get("host") == me["host"] and not (isinstance(pid, int) and process_alive(pid)):
                print(f"Taking over {lock}: the training that left it (PID {pid}) is gone.")
                lock.unlink(missing_ok=True)
                continue
            if run_id and holder.get("run_id") == run_id:
                print(f"Taking over {lock}: an earlier start of this torchrun job (rendezvous id {run_id}) left it.")
                lock.unlink(missing_ok=True)
                continue
            raise ConfigError(
                f"Another training (PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}) "
                f"is writing to {fold_folder}. Wait for it to end or stop it; if it is not running, delete {lock}.")
    try:
        yield
    finally:
        if _read_lock(lock).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
        for folder in created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):  # vanished meanwhile, or half-written by a process killed while writing it
        return {}


def train_one_process(args: argparse.Namespace, plans: dict, dataset_json: dict, device: torch.device,
                      resume: Union[None, str, dict], resume_note: str = "") -> None:
    """What upstream's run_training does per process, for the ViT trainer; ``resume_note`` goes to the log."""
    trainer_class = find_trainer_class(args.tr)
    if not issubclass(trainer_class, nnUNetTrainer_vit):
        raise ConfigError(f"Trainer {args.tr} is not a subclass of nnUNetTrainer_vit.")
    fold = args.fold if args.fold == "all" else int(args.fold)
    plans = copy.deepcopy(plans)
    plans["continue_training"] = resume is not None
    trainer = trainer_class(plans=plans, configuration=args.configuration, fold=fold, dataset_json=dataset_json,
                            device=device)
    trainer.disable_checkpointing = args.disable_checkpointing
    trainer.trust_checkpoint = args.trust_checkpoint
    # Weights from a checkpoint (resume) or -pretrained_weights replace the backbone's: no download.
    trainer.load_pretrained_backbone = resume is None and not args.pretrained_weights
    if resume is not None:
        trainer.load_checkpoint(resume)
        if resume_note:
            trainer.print_to_log_file(f"{resume_note} (epoch {trainer.current_epoch})")
    elif args.pretrained_weights:
        trainer.initialize()
        load_pretrained_network(trainer.model, args.pretrained_weights, trust=args.trust_checkpoint)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    with out_of_memory_is_one_line(trainer):
        if not args.val:
            trainer.run_training()
        if args.val_best:
            trainer.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_best.pth"))
        trainer.perform_actual_validation(args.npz)


# What nnU-Net's data loader (batchgenerators) raises, as a plain RuntimeError, when a worker process died.
WORKERS_DIED = "background workers are no longer alive"


@contextlib.contextmanager
def out_of_memory_is_one_line(trainer: nnUNetTrainer_vit) -> Iterator[None]:
    """Out of memory (the model, or the augmentation workers) is one line naming the settings that lower it."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        workers_died = WORKERS_DIED in str(err)
        if not out_of_memory(err) and not workers_died:
            raise
        what = ("nnU-Net's data-augmentation workers died (the messages above say why; often memory)"
                if workers_died else f"Out of {trainer.device.type} memory")
        patch = "x".join(str(size) for size in trainer.configuration_manager.patch_size)
        raise OutOfMemoryError(
            f"{what} at batch size {trainer.batch_size} of {patch} patches: lower train.batch_size, set "
            f"train.gradient_checkpointing: true, use LoRA (lora.enabled: true) or a smaller model.backbone_size. "
            f"The last good checkpoint is kept; resume with --c.") from err


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse argument combinations that cannot work, before any work."""
    if args.c and args.val:
        raise ConfigError("--c and --val cannot be combined.")
    if args.val_best and args.disable_checkpointing:
        raise ConfigError("--val_best needs checkpoints; it cannot be combined with --disable_checkpointing.")
    if args.c and args.pretrained_weights:
        raise ConfigError("-pretrained_weights only applies to a new training, not with --c.")
    if args.pretrained_weights and not Path(args.pretrained_weights).is_file():
        raise ConfigError(f"-pretrained_weights file not found: {args.pretrained_weights}")
    if args.fold != "all" and not args.fold.isdigit():
        raise ConfigError(f"fold must be an integer or 'all', got '{args.fold}'.")


def prepare(args: argparse.Namespace) -> Tuple[dict, dict, Path]:
    """Plans (with the resolved ViT config in them), dataset.json and the fold folder, every input checked."""
    requested = load_config(args.config) if args.config else None
    dataset, plans, dataset_json = load_plans(args.dataset_name_or_id, args.p, args.configuration)
    fold_folder = results_folder(dataset, args.tr, args.p, args.configuration, args.fold)
    config = resolve_config(args, requested, plans, fold_folder)
    require_preprocessed(args, dataset, plans)
    if not (args.c or args.val):  # a resumed training passed this check when it started
        check_label_values(dataset, plans, dataset_json)
    check_writable(fold_folder)
    add_vit_config(plans, args.configuration, config)
    return plans, dataset_json, fold_folder


def find_resume(args: argparse.Namespace, fold_folder: Path) -> Optional[Tuple[Path, dict]]:
    """The checkpoint --val validates or --c continues from: the first of them that loads (an unreadable one is
    reported and skipped). None: a new training."""
    if not (args.c or args.val):
        return None
    for name in ["checkpoint_final.pth"] if args.val else CHECKPOINT_PREFERENCE:
        path = fold_folder / name
        if path.is_file():
            try:
                checkpoint = read_training_checkpoint(str(path), trust=args.trust_checkpoint)
            except CheckpointReadError as err:
                print(f"WARNING: {err} Trying the previous checkpoint.")
                continue
            if args.c:
                print(f"Continuing from {path}")
            return path, checkpoint
    if args.val:
        raise ConfigError(f"Cannot run validation: no readable checkpoint_final.pth in {fold_folder} "
                          f"(training not finished?).")
    print(f"WARNING: no checkpoint to continue from in {fold_folder}; starting a new training.")
    return None


def run(args: argparse.Namespace) -> None:
    """One process: the whole training here."""
    check_arguments(args)
    device = get_device(args.device)
    plans, dataset_json, fold_folder = prepare(args)
    with fold_lock(fold_folder):
        found = find_resume(args, fold_folder)
        train_one_process(args, plans, dataset_json, device, found[1] if found else None,
                          f"Continuing from {found[0]}" if found else "")


def run_distributed(args: argparse.Namespace, device: torch.device) -> None:
    """One of torchrun's processes: rank 0 checks the inputs, takes the fold lock and picks the checkpoint, all train.
    After a torchrun restart (``--max-restarts``) they continue from the latest checkpoint, as with --c."""
    rank = dist.get_rank()
    # torchrun counts restarts per machine, and not those it makes because another machine's processes restarted
    # (a "membership change"): the group restarted if any process says so.
    restarts = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))])
    dist.all_reduce(restarts, op=dist.ReduceOp.MAX, group=control_group())
    restart = int(restarts.numpy()[0])
    pretrained_weights, note = args.pretrained_weights, ""
    if restart and not (args.c or args.val):
        args.c, args.pretrained_weights = True, None
        note = f"torchrun restarted the processes (restart {restart}): "
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    with contextlib.ExitStack() as held:
        prepared: list = [None]
        if rank == 0:
            try:
                check_arguments(args)
                plans, dataset_json, fold_folder = prepare(args)
                held.enter_context(fold_lock(fold_folder, run_id if run_id not in ("", "none") else None))
                found = find_resume(args, fold_folder)
                prepared[0] = (plans, dataset_json, str(found[0]) if found else None)
            except USER_ERRORS as err:
                prepared[0] = err
        dist.broadcast_object_list(prepared, src=0, group=control_group())
        if isinstance(prepared[0], Exception):
            raise prepared[0]
        plans, dataset_json, resume = prepared[0]
        if resume is None:
            args.pretrained_weights = pretrained_weights
        train_one_process(args, plans, dataset_json, device, resume,
                          f"{note}continuing from {resume}" if note else f"Continuing from {resume}" if resume else "")


def run_launched(args: argparse.Namespace) -> None:
    """A process started by torchrun: init, train, and end with one line and a documented exit code."""
    rank = os.environ["RANK"]
    try:
        device = init_distributed(args)
        try:
            run_distributed(args, device)
        finally:
            dist.destroy_process_group()
    except USER_ERRORS as err:
        if first_to_report():
            print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except TrainingStopped as stop:
        if rank == "0":
            print(f"{PROG}: {stop}", file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)
    except (RuntimeError, dist.DistError) as err:
        if not lost_peers(err):
            raise
        cause = " ".join(str(err).split())[:300]
        print(f"{PROG}: error: process {rank} on {socket.gethostname()} lost the other processes of its training "
              f"({cause}). Another process ended or hangs: torchrun's report names its rank. The last checkpoint "
              f"is kept; resume with --c.", file=sys.stderr)
        sys.exit(PEERS_LOST_EXIT_CODE)


def _launched_worker(args: argparse.Namespace) -> None:
    """A process of -num_gpus: torchrun's launcher set its environment."""
    die_with_parent()
    run_main(PROG, lambda: main_in_process(args))


def main_in_process(args: argparse.Namespace) -> None:
    """Train in this process, in the processes torchrun started (this is one), or start -num_gpus processes."""
    if torchrun_started():
        run_launched(args)
    elif args.num_gpus > 1:
        check_arguments(args)
        launch_processes(args, _launched_worker, PROG)
    else:
        try:
            run(args)
        except TrainingStopped as stop:
            print(f"{PROG}: {stop}", file=sys.stderr)
            sys.exit(STOPPED_EXIT_CODE)


def main(argv: Optional[List[str]] = None) -> None:
    # As upstream's nnUNetv2_train: one thread per data-augmentation worker, or they oversubscribe the CPU.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ[var] = "1"
    args = build_parser().parse_args(argv)
    end_forked_workers_with_this_process()
    run_main(PROG, lambda: main_in_process(args))


if __name__ == "__main__":
    main()
