"""YAML config schema for ViT training: load, validate (one clear error before any work), resolve.

A config has three sections. ``model`` names the model module and its backbone/decoder options,
``lora`` the peft adapters, ``train`` the optimisation settings. Keys left out keep the defaults
below, which for ``train`` are upstream nnU-Net's; ``inherits: other.yaml`` starts from another
config, so a file lists only what differs. Each field carries its type, default and constraint
(``option``); a resolved ``ViTConfig`` is read by attribute, and its ``to_dict()`` is what travels
with a trained model in its plans.json and checkpoints.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import importlib
import inspect
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import yaml

from nnunetv2.model.common import ViTSegmentationModel
from nnunetv2.vit.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
INHERITS = "inherits"  # top-level key of a config file: the file whose values it starts from

# The keywords every model factory takes (the model contract: the base model's positional parameters); all its
# other keywords are decoder options.
FACTORY_KEYWORDS = tuple(
    name for name, param in list(inspect.signature(ViTSegmentationModel.__init__).parameters.items())[1:]
    if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
)
MODEL_PACKAGE = "nnunetv2.model"
# auto: as the configuration trained on was planned (backbone on a nnUNetv2_plan_vit.py plan, nnU-Net's own on '2d').
NORMALIZATIONS = ("auto", "backbone", "zscore")
# Configs stored before model.normalization existed trained on nnU-Net's z-scored data: they keep that meaning.
STORED_BEFORE_NORMALIZATION = {"normalization": "zscore"}
# Configs stored before the parameter-group keys existed decayed every parameter: a resume (--c) keeps that, and the
# optimizer's one parameter group.
STORED_BEFORE_PARAMETER_GROUPS = {"decay_norms_and_biases": True}


def builtin_model_modules() -> List[str]:
    """The decoder modules of this package (``model_*.py``), for error messages."""
    folder = Path(__file__).resolve().parent.parent / "model"
    return sorted(f"{MODEL_PACKAGE}.{path.stem}" for path in folder.glob("model_*.py"))


def option(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None,
           choices: Tuple[Any, ...] = (), positive: bool = False, non_negative: bool = False,
           non_empty: bool = False) -> Any:
    """A config field: its default (or ``factory``) and the constraint its value must meet."""
    metadata = {"choices": choices, "positive": positive, "non_negative": non_negative, "non_empty": non_empty}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelSection:
    """``model``: which model module, backbone and weights; ``decoder`` holds the module's decoder options."""

    model_path: str = option("nnunetv2.model.model_dpt")  # a module with create_segmentation_model
    backbone: str = option("dinov3")  # a family of nnunetv2/model/backbone.py, checked there with its sizes
    backbone_size: str = option("large")
    checkpoint_path: Optional[str] = option(None)  # local backbone weights file or transformers folder; "" = none
    pretrained: bool = option(True)  # download timm weights when there is no checkpoint_path
    trust_checkpoint: bool = option(False)  # load checkpoint_path as a full pickle (it can run code)
    # Input intensities: as in the backbone's pretraining (on a configuration nnUNetv2_plan_vit.py planned), as nnU-Net
    # normalizes for its U-Net (zscore: '2d' and its data), or auto: whichever the configuration trained on was planned
    # for. A trained model stores the one it used.
    normalization: str = option("auto", choices=NORMALIZATIONS)
    # No gradients, no optimizer state and no saved activations for the backbone (with LoRA: only the adapters train).
    freeze_backbone: bool = option(False)
    drop_path_rate: float = option(0.0, non_negative=True)  # stochastic depth over the backbone's blocks (timm's)
    decoder: Dict[str, Any] = option(factory=dict)  # checked against the factory's keyword-only parameters


@dataclass
class LoraSection:
    """``lora``: peft LoRA adapters on the backbone."""

    enabled: bool = option(False)
    r: int = option(8, positive=True)
    lora_alpha: float = option(16.0, positive=True)
    target_modules: List[str] = option(factory=lambda: ["qkv"], non_empty=True)
    lora_dropout: float = option(0.05, non_negative=True)


@dataclass
class TrainSection:
    """``train``: optimisation settings; the defaults are upstream nnU-Net's."""

    initial_lr: float = option(1e-2, positive=True)
    weight_decay: float = option(3e-5, non_negative=True)
    gradient_clip: float = option(12.0, positive=True)
    num_epochs: int = option(1000, positive=True)
    num_iterations_per_epoch: int = option(250, positive=True)
    num_val_iterations_per_epoch: int = option(50, positive=True)
    optimizer: str = option("sgd", choices=("sgd", "adamw"))
    warmup_epochs: int = option(0, non_negative=True)
    # Parameter groups (timm's): the backbone's peak lr is initial_lr x backbone_lr_scale, times layer_decay per block
    # from its last block down to the patch embedding (1.0: off); decoder and detail path get initial_lr.
    backbone_lr_scale: float = option(1.0, positive=True)
    layer_decay: float = option(1.0, positive=True)
    # false: no weight decay on norms, biases, position embeddings and class/register tokens (timm's rule).
    decay_norms_and_biases: bool = option(False)
    precision: str = option("auto", choices=("auto", "fp32", "fp16", "bf16"))
    compile: str = option("auto", choices=("auto", "true", "false"))
    gradient_checkpointing: bool = option(False)
    batch_size: Optional[int] = option(None, positive=True)
    max_nonfinite_steps: int = option(25, positive=True)
    save_every: int = option(50, positive=True)


SECTIONS = {"model": ModelSection, "lora": LoraSection, "train": TrainSection}


@dataclass
class ViTConfig:
    """A resolved config: every key of every section, defaults filled in (``validate_config`` makes one from a
    YAML mapping). ``to_dict`` is what the plans and checkpoints store, ``from_stored`` reads it back."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_stored(cls, stored: Dict[str, Dict[str, Any]]) -> "ViTConfig":
        """A config stored with a trained model (validated when its training started); keys added since then take
        their defaults, except ``model.normalization`` and ``train.decay_norms_and_biases`` (see
        ``STORED_BEFORE_NORMALIZATION``, ``STORED_BEFORE_PARAMETER_GROUPS``). Not validated again: its backbone file
        need not exist where the model is used."""
        stored = {**stored, "model": {**STORED_BEFORE_NORMALIZATION, **stored.get("model", {})},
                  "train": {**STORED_BEFORE_PARAMETER_GROUPS, **stored.get("train", {})}}
        return cls(**{name: section(**{f.name: stored.get(name, {})[f.name] for f in dataclasses.fields(section)
                                       if f.name in stored.get(name, {})})
                      for name, section in SECTIONS.items()})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List, collections.abc.Sequence):  # YAML gives lists for both
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__


def _check_section(name: str, values: Any, source: str) -> Any:
    """A section's dataclass from its YAML mapping: every key known, of its field's type, meeting its constraint."""
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'. Valid keys in '{name}': {', '.join(fields)}.")
        if name == "train" and key == "compile" and isinstance(value, bool):
            value = values[key] = str(value).lower()
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{source}: '{name}.{key}' must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})."
            )
        rules = fields[key].metadata
        if rules["choices"] and value not in rules["choices"]:
            raise ConfigError(f"{source}: '{name}.{key}' must be one of {', '.join(rules['choices'])}, got {value!r}.")
        if rules["positive"] and value is not None and value <= 0:
            raise ConfigError(f"{source}: '{name}.{key}' must be positive, got {value!r}.")
        if rules["non_negative"] and value < 0:
            raise ConfigError(f"{source}: '{name}.{key}' must not be negative, got {value!r}.")
        if rules["non_empty"] and not value:
            default = fields[key].default_factory()
            raise ConfigError(f"{source}: '{name}.{key}' must name at least one; leave it out for {default}.")
    return cls(**values)


def import_model_module(model_path: str, source: str = "config"):
    """Import ``model.model_path`` and check it provides ``create_segmentation_model``."""
    try:
        module = importlib.import_module(model_path)
    except Exception as err:  # a user's module may fail to import in any way; each means the same here
        raise ConfigError(
            f"{source}: model.model_path '{model_path}' cannot be imported ({type(err).__name__}: "
            f"{_first_line(err)}). Built-in modules: {', '.join(builtin_model_modules())}."
        ) from err
    if not callable(getattr(module, "create_segmentation_model", None)):
        raise ConfigError(f"{source}: model.model_path '{model_path}' has no create_segmentation_model() factory.")
    return module


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def quiet_model_logs() -> Iterator[None]:
    """Silence the model layer's info lines ("initialised randomly") for builds that only look at the architecture."""
    model_logger = logging.getLogger(MODEL_PACKAGE)
    level = model_logger.level
    model_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        model_logger.setLevel(level)


def _check_builds(config: ViTConfig, source: str) -> None:
    """Build the architecture on the meta device (no memory, no weights, no download), so options no model can be
    built from (a negative width, a wrong count, LoRA targets the backbone lacks, a factory that raises) are one
    line here, before any work, and not a traceback when training starts."""
    try:
        with torch.device("meta"), quiet_model_logs():
            build_model(config, in_channels=3, num_classes=2, load_weights=False)
    except Exception as err:  # a factory (maybe a user's) can raise anything: each means this config builds nothing
        raise ConfigError(f"{source}: {config.model.model_path} cannot build this model from model.decoder and "
                          f"lora ({type(err).__name__}: {_first_line(err)}).") from err


def _check_model(model: ModelSection, source: str) -> None:
    from nnunetv2.model.backbone import get_family

    try:
        family = get_family(model.backbone, model.backbone_size)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err
    if model.checkpoint_path == "":
        model.checkpoint_path = None
    if model.checkpoint_path is not None:
        path = Path(model.checkpoint_path).expanduser()
        if not path.exists():  # a file, or the folder transformers writes (read by checkpoint_io)
            raise ConfigError(f"{source}: model.checkpoint_path '{model.checkpoint_path}' does not exist.")
        model.checkpoint_path = str(path.resolve())
    elif model.pretrained and family.pretrained_tag is None:
        raise ConfigError(
            f"{source}: backbone '{model.backbone}' has no public download: set model.checkpoint_path to your "
            f"checkpoint file, or model.pretrained: false to start from random weights."
        )
    factory = import_model_module(model.model_path, source).create_segmentation_model
    options = {k: p for k, p in inspect.signature(factory).parameters.items() if k not in FACTORY_KEYWORDS}
    for key, value in model.decoder.items():
        if key not in options:
            raise ConfigError(
                f"{source}: unknown key 'model.decoder.{key}' for {model.model_path}. "
                f"Valid decoder keys: {', '.join(options) or '(none)'}."
            )
        annotation = options[key].annotation
        if annotation is not inspect.Parameter.empty and not isinstance(annotation, str) \
                and not _type_ok(value, annotation):
            raise ConfigError(f"{source}: 'model.decoder.{key}' must be {_type_name(annotation)}, "
                              f"got {value!r} ({type(value).__name__}).")


def validate_config(raw: Any, source: str = "config") -> ViTConfig:
    """Check a parsed YAML mapping and return the resolved config (every key, defaults filled in)."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}."
        )
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{name}'. Valid sections: {', '.join(SECTIONS)}.")
    if "model_path" not in (raw.get("model") or {}):
        raise ConfigError(f"{source}: 'model.model_path' is required (e.g. nnunetv2.model.model_dpt).")
    sections = {name: _check_section(name, raw.get(name), source) for name in SECTIONS}
    _check_model(sections["model"], source)
    _check_builds(ViTConfig(**sections), source)
    train = sections["train"]
    if train.warmup_epochs >= train.num_epochs:
        raise ConfigError(f"{source}: 'train.warmup_epochs' ({train.warmup_epochs}) must be smaller than "
                          f"'train.num_epochs' ({train.num_epochs}): the learning rate decays after the warm-up.")
    return ViTConfig(**sections)


def resolve_config_path(path: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    """A config path as given (or, if ``relative_to`` is a folder, relative to it), or the bare name of a built-in
    config (``dpt`` -> nnunetv2/configs/dpt.yaml)."""
    path = Path(path)
    candidate = relative_to / path if relative_to is not None and not path.is_absolute() else path
    if candidate.is_dir():
        raise ConfigError(f"Config {candidate} is a directory; give a YAML file in it.")
    if candidate.is_file():
        return candidate
    builtin = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if builtin.is_file() and path.parent == Path("."):
        return builtin
    searched = [str(candidate.parent.resolve())]
    if path.parent == Path("."):
        searched.append(f"the built-in configs folder {CONFIG_DIR}")
    builtins = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"Config file not found: {path} (looked in {' and '.join(searched)}). "
                      f"Built-in configs: {builtins}.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key '{key}' is given twice, on lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}; keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, with one-line errors naming the file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err


def _merged(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    return {**base, **{key: _merged(base.get(key), value) for key, value in override.items()}}


def read_config_file(path: Path, children: Tuple[Path, ...] = ()) -> Any:
    """A config file's content with its ``inherits: <file>`` resolved: the file named there (relative to this
    one, or a built-in name) with this file's keys on top, so a config lists only what differs."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or INHERITS not in raw:
        return raw
    parent_name = raw.pop(INHERITS)
    if not isinstance(parent_name, str):
        raise ConfigError(f"{path}: '{INHERITS}' must name a config file, got {parent_name!r}.")
    try:
        parent = resolve_config_path(parent_name, relative_to=path.parent).resolve()
    except ConfigError as err:
        raise ConfigError(f"{path}: '{INHERITS}: {parent_name}': {err}") from err
    builtin = (CONFIG_DIR / (Path(parent_name).name if Path(parent_name).suffix else f"{parent_name}.yaml")).resolve()
    if parent == path.resolve() and Path(parent_name).parent == Path(".") and builtin.is_file():
        parent = builtin  # my/dpt.yaml saying 'inherits: dpt.yaml' starts from the built-in dpt.yaml, not from itself
    if parent in children + (path.resolve(),):
        raise ConfigError(f"{path}: '{INHERITS}: {parent_name}' makes a cycle; a config cannot inherit itself.")
    return _merged(read_config_file(parent, children + (path.resolve(),)), raw)


def load_config(path: Union[str, Path]) -> ViTConfig:
    """Read, validate and resolve a YAML config file."""
    path = resolve_config_path(path)
    return validate_config(read_config_file(path), str(path))


def model_kwargs(config: ViTConfig, in_channels: int, num_classes: int, load_weights: bool) -> Dict[str, Any]:
    """Keyword arguments for ``create_segmentation_model`` from a resolved config.

    ``load_weights=False`` builds the architecture only (prediction, resuming: the weights come
    from the nnU-Net checkpoint, so no download and no backbone file are needed).
    """
    model, lora = config.model, config.lora
    return dict(
        backbone_name=model.backbone,
        backbone_size=model.backbone_size,
        num_classes=num_classes,
        checkpoint_path=model.checkpoint_path if load_weights else None,
        pretrained=model.pretrained and load_weights,
        trust_checkpoint=model.trust_checkpoint and load_weights,
        in_channels=in_channels,
        freeze_backbone=model.freeze_backbone,
        drop_path_rate=model.drop_path_rate,
        use_lora=lora.enabled,
        lora_rank=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        lora_target_modules=lora.target_modules,
        **model.decoder,
    )


def build_model(config: ViTConfig, in_channels: int, num_classes: int, load_weights: bool):
    """Build the segmentation network a resolved config describes."""
    factory = import_model_module(config.model.model_path).create_segmentation_model
    return factory(**model_kwargs(config, in_channels, num_classes, load_weights))
