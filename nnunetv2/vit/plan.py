"""``nnUNetv2_plan_vit.py``: plan a 2d configuration for a ViT model, then preprocess its data with upstream.

nnU-Net plans ``2d`` for its U-Net. This command adds ``2d_<name>``, inheriting ``2d`` (spacing, resampling,
splits), with what the ViT needs: the backbone's pretraining normalization (or nnU-Net's), a patch size aligned to
the token grid, and the batch that fits a GPU memory target by the model's memory model. ``ViTExperimentPlanner`` is
an nnU-Net ``ExperimentPlanner``, so the target, dataset cap and minimum batch stay nnU-Net's. What was chosen, and
why, is recorded in the configuration's ``vit_plan``, which training checks its config against.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2.model.memory import TrainingMemory, training_memory
from nnunetv2.vit.cli import dataset_name, run_main
from nnunetv2.vit.config import ViTConfig, build_model, load_config, quiet_model_logs
from nnunetv2.vit.errors import ConfigError
from nnunetv2.vit.lifetime import end_workers_with_this_process
from nnunetv2.vit.normalization import PARAMETERS_KEY, BackboneNormalization

PROG = "nnUNetv2_plan_vit.py"
PARENT = "2d"  # the nnU-Net configuration every ViT configuration inherits from (its inherits_from)
PLAN_KEY = "vit_plan"  # a configuration's record of what this command chose, and why
PLANNED_FOR = ("backbone", "backbone_size", "normalization")  # what a config must keep to train on the plan
EIGHT_BIT = (0.0, 255.0)
GB = 1e9  # -gpu_memory_target is in GB (10^9 bytes), as nnU-Net's


def default_configuration_name(config_path: str) -> str:
    """``2d_<config file stem>``: ``dpt.yaml`` plans ``2d_dpt``."""
    stem = Path(config_path).stem
    return stem if stem.startswith(f"{PARENT}_") else f"{PARENT}_{stem}"


def channel_statistics(mean: Sequence[float], std: Sequence[float], num_channels: int) -> Tuple[List[Tuple], str]:
    """Pretraining (mean, std) for each input channel, and why: the statistics of the RGB channel whose patch
    embedding kernel timm gives that input channel when it adapts pretrained weights (``adapt_input_conv``)."""
    if num_channels == 3:
        return list(zip(mean, std)), "per RGB channel"
    if num_channels == 1:
        return ([(float(np.mean(mean)), float(np.mean(std)))],
                "the average over R, G, B (one grey channel: timm sums the RGB kernels of the patch embedding)")
    return ([(mean[c % 3], std[c % 3]) for c in range(num_channels)],
            f"channel c takes RGB channel c mod 3 ({num_channels} channels: timm repeats the RGB kernels)")


def backbone_normalization(plans: dict, config: ViTConfig, num_channels: int) -> Tuple[List[Dict], str]:
    """``BackboneNormalization`` parameters per channel, and why they are what they are."""
    from nnunetv2.model.backbone import pretraining_statistics

    (mean, std), source = pretraining_statistics(config.model.backbone, config.model.backbone_size)
    statistics, mapping = channel_statistics(mean, std, num_channels)
    parameters, ranges = [], []
    for c, (channel_mean, channel_std) in enumerate(statistics):
        properties = plans["foreground_intensity_properties_per_channel"][str(c)]
        if properties["min"] >= EIGHT_BIT[0] and properties["max"] <= EIGHT_BIT[1]:
            (low, high), clip, what = EIGHT_BIT, False, "8-bit"
        else:
            low, high, clip = properties["percentile_00_5"], properties["percentile_99_5"], True
            what = f"foreground 0.5-99.5 percentiles {low:g}-{high:g}"
        if high <= low:
            raise ConfigError(f"Channel {c} has constant foreground intensities ({low:g}); it cannot be scaled to 0-1. "
                              f"Use model.normalization: zscore.")
        parameters.append({"low": float(low), "high": float(high), "clip": clip, "mean": float(channel_mean),
                           "std": float(channel_std)})
        ranges.append(what)
    why = (f"intensities scaled to 0-1 from their range ({', '.join(ranges)}), then (x - mean) / std with the "
           f"pretraining statistics from {source}: {mapping}")
    return parameters, why


def aligned_patch_size(patch_size: Sequence[int], alignment: int) -> List[int]:
    """Each side rounded to the nearest multiple of ``alignment`` (at least one)."""
    return [max(alignment, alignment * math.floor(side / alignment + 0.5)) for side in patch_size]


def planned_precision(config: ViTConfig) -> str:
    """The autocast dtype the memory model counts with: ``auto`` trains in 16 bits on any GPU (bf16 or fp16)."""
    return "bf16" if config.train.precision in ("auto", "bf16", "fp16") else "fp32"


def add_2d_configuration(plans: dict, name: str, **planned: Any) -> None:
    """Add ``name`` to ``plans`` inheriting ``2d`` (nnU-Net's ``inherits_from``), except what ``planned`` sets."""
    plans["configurations"][name] = {"inherits_from": PARENT, **planned}


class ViTExperimentPlanner(ExperimentPlanner):
    """nnU-Net's planner for one ViT configuration ``2d_<name>`` on top of ``2d``: the U-Net's memory estimate is
    replaced by the configured network's memory model; the target (``UNet_vram_target_GB``), dataset cap
    (``max_dataset_covered``) and minimum batch (``UNet_min_batch_size``) stay upstream's attributes."""

    def __init__(self, dataset_name_or_id: Union[str, int], config: ViTConfig, configuration_name: str,
                 plans_name: str = "nnUNetPlans", **kwargs: Any) -> None:
        """``kwargs`` go to upstream's planner (``gpu_memory_target_in_gb``, ...); left out, its defaults hold."""
        super().__init__(dataset_name_or_id, plans_name=plans_name, **kwargs)
        self.config = config
        self.configuration_name = configuration_name

    @property
    def plans_file(self) -> Path:
        """The plans file upstream's planner wrote, which this one adds its configuration to."""
        return Path(nnUNet_preprocessed.get()) / self.dataset_name / f"{self.plans_identifier}.json"

    def plan_experiment(self) -> dict:
        """Add the configuration to the plans file (replaced: nnU-Net's configurations stay as it planned them, and
        the command prints its own summary instead of ``save_plans``'s)."""
        self.load_plans(str(self.plans_file))
        self.plans = self.plan_configuration(self.plans)
        save_json(self.plans, str(self.plans_file), sort_keys=False)
        return self.plans

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self) -> Tuple[List[str], List[bool]]:
        """``BackboneNormalization`` on every channel, unmasked (overridden: pretraining normalized whole images)."""
        num_channels = len(self.dataset_json["channel_names"])
        return [BackboneNormalization.__name__] * num_channels, [False] * num_channels

    def plan_configuration(self, plans: dict) -> dict:
        """``plans`` with the configuration planned for the config (a new dict; ``plans`` is left as it is)."""
        self.check_plannable(plans)
        plans = copy.deepcopy(plans)
        manager = PlansManager(plans)
        base = manager.get_configuration(PARENT).configuration
        num_channels = determine_num_input_channels(manager, PARENT, self.dataset_json)  # as the trainer counts them
        num_classes = manager.get_label_manager(self.dataset_json).num_segmentation_heads
        build = functools.partial(build_model, self.config, num_channels, num_classes, load_weights=False)
        with quiet_model_logs():
            with torch.device("meta"):
                model = build()
            patch_size, patch_why = self.determine_patch_size(base["patch_size"], model)
            memory = training_memory(build, num_channels, patch_size, planned_precision(self.config),
                                     self.config.train.optimizer, self.config.train.gradient_checkpointing)
        batch_size, batch_why = self.determine_batch_size(memory, base, patch_size, model.min_train_batch_size)
        normalization, normalization_why = self.determine_normalization(plans, base)
        record = self.record(patch_why, batch_why, memory, normalization_why)
        add_2d_configuration(plans, self.configuration_name, patch_size=patch_size, batch_size=batch_size,
                             **normalization, **{PLAN_KEY: record})
        return plans

    def check_plannable(self, plans: dict) -> None:
        """Refuse a name that would replace one of nnU-Net's configurations, plans without ``2d``, no memory."""
        name = self.configuration_name
        if not name.startswith(f"{PARENT}_"):
            raise ConfigError(f"Configuration name '{name}' must start with '{PARENT}_' (e.g. '{PARENT}_dpt'): "
                              f"'{PARENT}' and nnU-Net's other configurations stay as nnU-Net planned them.")
        if PARENT not in plans["configurations"]:
            raise ConfigError(f"The plans have no '{PARENT}' configuration to start from. Run "
                              f"`nnUNetv2_plan_and_preprocess -d DATASET -c {PARENT}` first.")
        if self.UNet_vram_target_GB <= 0:
            raise ConfigError(f"-gpu_memory_target must be positive, got {self.UNet_vram_target_GB:g}.")

    def determine_patch_size(self, base_patch_size: Sequence[int], model: torch.nn.Module) -> Tuple[List[int], str]:
        """``2d``'s patch rounded to the model's alignment, so no pixel of a patch is padding; and why."""
        alignment = model.patch_size * model.token_grid_multiple
        patch_size = aligned_patch_size(base_patch_size, alignment)
        why = (f"'{PARENT}' patch {list(base_patch_size)} rounded to a multiple of {alignment} (patch "
               f"{model.patch_size} x token grid multiple {model.token_grid_multiple}): {patch_size}")
        return patch_size, why

    def determine_batch_size(self, memory: TrainingMemory, base: dict, patch_size: Sequence[int],
                             model_minimum: int) -> Tuple[int, str]:
        """nnU-Net's rule on the memory model's batch: the dataset cap, never below the minimum; and why."""
        target = self.UNet_vram_target_GB
        by_memory = memory.largest_batch(target * GB)
        approximate_n_pixels_dataset = (float(np.prod(base["median_image_size_in_voxels"], dtype=np.float64))
                                        * self.dataset_json["numTraining"])
        cap = round(approximate_n_pixels_dataset * self.max_dataset_covered
                    / float(np.prod(patch_size, dtype=np.float64)))
        minimum = max(self.UNet_min_batch_size, model_minimum)
        batch_size = max(min(by_memory, cap), minimum)
        why = (f"{by_memory} fit {target:g} GB by the memory model ({memory.fixed_bytes / GB:.2f} GB + "
               f"{memory.per_image_bytes / GB:.3f} GB per image); {self.max_dataset_covered * 100:g}% of the dataset's "
               f"pixels allow {cap}, and a batch holds at least {minimum}: {batch_size} (modelled peak "
               f"{memory.peak_bytes(batch_size) / GB:.2f} GB)")
        if by_memory < minimum:
            why += (f". Batch {minimum} exceeds the target: set train.gradient_checkpointing: true, enable LoRA or "
                    f"model.freeze_backbone, or use a smaller model.backbone_size")
        return batch_size, why

    def determine_normalization(self, plans: dict, base: dict) -> Tuple[Dict[str, Any], str]:
        """The entries the planned normalization changes from ``2d`` (none for nnU-Net's own), and why. The backbone's
        parameters go into ``plans``, where upstream hands them to the scheme."""
        if planned_normalization(self.config) != "backbone":
            return {}, (f"nnU-Net's, as planned for '{PARENT}' ({', '.join(base['normalization_schemes'])}), on its "
                        f"preprocessed data")
        schemes, use_mask = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        parameters, why = backbone_normalization(plans, self.config, len(schemes))
        _store_parameters(plans, parameters, self.configuration_name)
        digest = hashlib.sha1(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:8]
        return {"data_identifier": self.generate_data_identifier(f"{PARENT}_backbone_{digest}"),
                "normalization_schemes": schemes, "use_mask_for_norm": use_mask}, why

    def record(self, patch_why: str, batch_why: str, memory: TrainingMemory, normalization_why: str) -> dict:
        """The ``vit_plan`` record: what the configuration was planned for, what was chosen and why."""
        config = self.config
        return {
            "planned_for": {**{key: getattr(config.model, key) for key in PLANNED_FOR},
                            "normalization": planned_normalization(config)},
            "model": f"{config.model.model_path} {config.model.backbone} {config.model.backbone_size}",
            "patch_size": patch_why,
            "batch_size": batch_why,
            "memory_model": {"fixed_bytes": memory.fixed_bytes, "per_image_bytes": memory.per_image_bytes,
                             "target_gb": float(self.UNet_vram_target_GB), "precision": planned_precision(config),
                             "optimizer": config.train.optimizer,
                             "gradient_checkpointing": config.train.gradient_checkpointing,
                             "freeze_backbone": config.model.freeze_backbone, "lora": config.lora.enabled},
            "normalization": normalization_why,
        }


def _store_parameters(plans: dict, parameters: List[Dict], name: str) -> None:
    """Put each channel's parameters where upstream hands them to the scheme, refusing to change them under
    another configuration that was planned with others."""
    properties = plans["foreground_intensity_properties_per_channel"]
    for c, channel in enumerate(parameters):
        existing = properties[str(c)].get(PARAMETERS_KEY)
        if existing is not None and existing != channel:
            users = [other for other, entry in plans["configurations"].items()
                     if other != name and BackboneNormalization.__name__ in entry.get("normalization_schemes", [])]
            if users:
                raise ConfigError(
                    f"These plans normalize channel {c} for {', '.join(users)} with {existing}; this backbone needs "
                    f"{channel}. One plans file holds one backbone normalization: copy the plans file to a new name "
                    f"(e.g. nnUNetPlans_vit.json) and plan into it with -p nnUNetPlans_vit.")
        properties[str(c)][PARAMETERS_KEY] = channel


def planned_normalization(config: ViTConfig) -> str:
    """The explicit ``model.normalization``; ``auto``: the backbone's for pretrained weights, nnU-Net's z-score for
    random ones, which learned far slower on fixed statistics (cracks: Dice 0.31/0.41 vs 0.69/0.90, RESULTS.md)."""
    model = config.model
    if model.normalization != "auto":
        return model.normalization
    return "backbone" if model.pretrained or model.checkpoint_path else "zscore"


def resolve_normalization(plans: dict, configuration: str, config: ViTConfig, dataset: str,
                          config_file: str) -> Tuple[ViTConfig, str]:
    """``config`` with the normalization training on ``configuration`` applies, and a line saying which and how to
    get the other. ``auto`` takes the plan's (nnU-Net's on ``2d``); a config that differs from its plan is refused."""
    planned = PlansManager(plans).get_configuration(configuration).configuration
    record = planned.get(PLAN_KEY)
    model = config.model
    name = configuration if configuration != PARENT else default_configuration_name(config_file)
    plan_command = f"`python {PROG} {dataset} --config {config_file} -c {name}`"
    schemes = ", ".join(planned["normalization_schemes"])
    if record is None:
        if model.normalization == "backbone":
            raise ConfigError(
                f"Configuration '{configuration}' is nnU-Net's plan for its U-Net ({schemes}), but {config_file} asks "
                f"for model.normalization: backbone. Plan a configuration for it with {plan_command} and train "
                f"'{name}', or set model.normalization: auto (or zscore) to train on '{configuration}' with nnU-Net's "
                f"normalization.")
        used = "zscore"
        note = (f"normalization: nnU-Net's, as planned for '{configuration}' ({schemes}). For the backbone's "
                f"pretraining normalization (usually better from pretrained weights), plan a configuration with "
                f"{plan_command} and train '{name}'.")
    else:
        wanted = {key: getattr(model, key) for key in PLANNED_FOR}
        if model.normalization == "auto":
            wanted["normalization"] = record["planned_for"]["normalization"]
        if record["planned_for"] != wanted:
            differs = ", ".join(f"{key} {record['planned_for'][key]} (config: {wanted[key]})" for key in PLANNED_FOR
                                if record["planned_for"][key] != wanted[key])
            raise ConfigError(
                f"Configuration '{configuration}' was planned for another model: {differs}. Plan one for "
                f"{config_file} (`python {PROG} {dataset} --config {config_file} -c "
                f"{default_configuration_name(config_file)}`), or train with the config it was planned for.")
        used = wanted["normalization"]
        other = (f"nnU-Net's: train on '{PARENT}'" if used == "backbone" else
                 "the backbone's: plan with model.normalization: backbone under another name")
        note = (f"normalization: {used} ({schemes}), as {PROG} planned '{configuration}'. For {other}.")
    return dataclasses.replace(config, model=dataclasses.replace(model, normalization=used)), note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plan a 2d configuration for a ViT config (normalization, patch size, batch size) in a dataset's "
                    "nnU-Net plans, and preprocess its data.")
    parser.add_argument("dataset_name_or_id",
                        help="Dataset name or ID, planned by nnU-Net (nnUNetv2_plan_and_preprocess)")
    parser.add_argument("--config", required=True, help="YAML config (a path, or a built-in name such as 'dpt')")
    parser.add_argument("-c", default=None, dest="configuration",
                        help="name of the new configuration (default: 2d_<config file name>, e.g. 2d_dpt)")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="GPU memory (GB) the batch size fills (default: what nnU-Net's planner targets for its "
                             "U-Net)")
    parser.add_argument("-p", default="nnUNetPlans", help="Plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=None,
                        help="Preprocessing processes (default: nnU-Net's default_num_processes)")
    parser.add_argument("--no_pp", action="store_true", help="Plan only; do not preprocess")
    return parser


def run(args: argparse.Namespace) -> None:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    config = load_config(args.config)
    name = args.configuration or default_configuration_name(args.config)
    if not nnUNet_preprocessed.is_set() or not nnUNet_raw.is_set():
        raise ConfigError("nnUNet_raw and nnUNet_preprocessed must be set: export nnUNet_raw, nnUNet_preprocessed "
                          "and nnUNet_results.")
    dataset = dataset_name(args.dataset_name_or_id)
    folder = Path(nnUNet_preprocessed.get()) / dataset
    plans_file = folder / f"{args.p}.json"
    if not plans_file.is_file():
        raise ConfigError(f"{plans_file} does not exist: plan the dataset with nnU-Net first "
                          f"(`nnUNetv2_plan_and_preprocess -d {args.dataset_name_or_id} -c {PARENT} --no_pp`).")
    target = {} if args.gpu_memory_target is None else {"gpu_memory_target_in_gb": args.gpu_memory_target}
    planner = ViTExperimentPlanner(dataset, config, name, plans_name=args.p, **target)
    plans = planner.plan_experiment()

    entry = plans["configurations"][name]
    print(f"Planned configuration '{name}' in {plans_file}:")
    print(f"  patch size {entry['patch_size']}, batch size {entry['batch_size']}")
    for key in ("normalization", "patch_size", "batch_size"):
        print(f"  {key}: {entry[PLAN_KEY][key]}")
    if config.train.batch_size is not None:
        print(f"  note: train.batch_size: {config.train.batch_size} in {args.config} overrides the planned batch size")

    data_folder = folder / PlansManager(plans).get_configuration(name).data_identifier
    if args.no_pp:
        print("Not preprocessed (--no_pp): run this command again without --no_pp before training.")
    elif all((data_folder / f"{case}.pkl").is_file() for case in planner.dataset):  # upstream writes it last
        print(f"Preprocessed data already there: {data_folder}")
    else:
        preprocess_dataset(convert_dataset_name_to_id(dataset), args.p, (name,), (args.np or default_num_processes,))
    print(f"Train with: python nnUNetv2_train_vit.py {args.dataset_name_or_id} {name} FOLD --config {args.config}")


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    end_workers_with_this_process()  # upstream's preprocessing workers
    run_main(PROG, lambda: run(args))


if __name__ == "__main__":
    main()
