"""What travels with a trained model: its resolved ViT config in the plans, and its nnU-Net checkpoints.

The config is stored under ``plans["configurations"][<name>]["vit_config"]``, which upstream copies into the results
folder's ``plans.json`` and every checkpoint; one reader (``stored_config``) and one check (``require_same_model``)
serve training, ``--c``, ``--val`` and prediction. Checkpoints are read as data (``checkpoint_io``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2.model.checkpoint_io import read_checkpoint
from nnunetv2.vit.config import ViTConfig
from nnunetv2.vit.errors import CheckpointReadError, ConfigError, UntrustedCheckpointError

VIT_CONFIG_KEY = "vit_config"
WEIGHT_SOURCES = ("checkpoint_path", "pretrained", "trust_checkpoint")  # where weights come from, not the network

_logger = logging.getLogger(__name__)


def add_vit_config(plans: dict, configuration: str, config: ViTConfig) -> None:
    """Store the resolved ViT config in the plans (where the trainer, results and checkpoints read it)
    and apply its ``train.batch_size`` override to the planned batch size."""
    planned = plans["configurations"][configuration]
    planned[VIT_CONFIG_KEY] = config.to_dict()
    if config.train.batch_size is not None:
        planned["batch_size"] = config.train.batch_size


def stored_config(source: Union[dict, Path], configuration: str) -> Optional[ViTConfig]:
    """The ViT config stored for ``configuration`` in a plans dict, a checkpoint (its trainer's init args) or a
    results folder's ``plans.json`` (a path; None if the file does not exist)."""
    if isinstance(source, Path):
        if not source.is_file():
            return None
        source = load_json(str(source))
    plans = source["init_args"].get("plans", {}) if "init_args" in source else source
    stored = plans.get("configurations", {}).get(configuration, {}).get(VIT_CONFIG_KEY)
    return None if stored is None else ViTConfig.from_stored(stored)


def required_config(configuration: ConfigurationManager) -> ViTConfig:
    """The ViT config of a configuration that must hold one (the trainer's, the predictor's)."""
    stored = configuration.configuration.get(VIT_CONFIG_KEY)
    if stored is None:
        raise ConfigError(
            "These plans hold no ViT model config for this configuration: train with "
            "`nnUNetv2_train_vit.py ... --config CONFIG.yaml`, which stores it in the plans and checkpoints.")
    return ViTConfig.from_stored(stored)


def require_same_model(stored: Optional[ViTConfig], config: ViTConfig, holder: str, other: str,
                       fix: str = "") -> None:
    """Refuse to mix models: ``holder`` (a folder or file) holds ``stored``, ``other`` asks for ``config``; they may
    differ only in where the weights come from."""
    def architecture(c: ViTConfig) -> tuple:
        return {k: v for k, v in dataclasses.asdict(c.model).items() if k not in WEIGHT_SOURCES}, c.lora

    def described(c: ViTConfig) -> str:
        return (f"{c.model.model_path}, {c.model.backbone} {c.model.backbone_size}, decoder {c.model.decoder}"
                f"{' + LoRA' if c.lora.enabled else ''}")

    if stored is not None and architecture(stored) != architecture(config):
        raise ConfigError(f"{holder} holds a model trained with a different config ({described(stored)}) than "
                          f"{other} ({described(config)}).{' ' + fix if fix else ''}")


def read_training_checkpoint(path: Union[str, Path], mmap: bool = False, trust: bool = False) -> dict:
    """Load an nnU-Net checkpoint as data (``trust``: as a full pickle, which can run code), with an error naming
    the file if it is corrupt or truncated, or holds more than data.

    ``mmap`` maps the tensors instead of reading them: cheap when only the metadata is needed.
    """
    try:
        return read_checkpoint(path, trust=trust, mmap=mmap, opt_in="pass --trust_checkpoint to the command")
    except FileNotFoundError as err:
        raise CheckpointReadError(f"Checkpoint {path} not found.") from err


def network_weights(checkpoint: dict) -> dict:
    """A checkpoint's network weights, without the ``module.`` prefix of a DDP-wrapped network."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}


def load_pretrained_network(model: torch.nn.Module, path: str, trust: bool = False) -> None:
    """Initialise ``model`` from the network weights of another nnU-Net training of the same model (e.g. on
    another dataset), as upstream's ``-pretrained_weights``: every tensor but the classifier's is copied,
    and must exist with the same shape."""
    try:
        checkpoint = read_training_checkpoint(path, mmap=True, trust=trust)
    except (CheckpointReadError, UntrustedCheckpointError) as err:
        raise ConfigError(f"-pretrained_weights: {err}") from err
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ConfigError(f"-pretrained_weights {path} is not an nnU-Net checkpoint (no 'network_weights'); "
                          f"backbone weights (timm, DINOv3, RETFound, ...) go into model.checkpoint_path instead.")
    weights = network_weights(checkpoint)
    own = model.state_dict()
    classifier = model.classifier_keys()
    transfer = [k for k in own if k not in classifier]
    misfits = [k for k in transfer if k not in weights or weights[k].shape != own[k].shape]
    if misfits:
        raise ConfigError(
            f"-pretrained_weights {path} does not fit this model: {len(misfits)} of {len(transfer)} tensors are "
            f"missing or have another shape (e.g. {', '.join(misfits[:3])}). It must come from a training with the "
            f"same model config (backbone, size, decoder, LoRA); only the number of classes may differ.")
    model.load_state_dict({k: weights[k] for k in transfer}, strict=False)
    _logger.info("Loaded %d tensors from %s; classifier (%s) left at initialisation.",
                 len(transfer), path, ", ".join(classifier))
