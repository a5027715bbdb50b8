"""YAML config for ViT training: read (with ``inherits:``), check (one clear error before any work), build the model.

Three sections, each a typed dataclass whose fields carry type, default and meaning: ``model`` (its ``decoder`` the
model module's ``DecoderConfig``), ``lora`` (``LoraSettings``, peft's names) and ``train`` (nnU-Net's defaults).
``inherits: other.yaml`` starts from another file. The resolved ``ViTConfig`` travels with a trained model as
``to_dict()`` and reads back with ``from_stored``: the same keys from the file to the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Union

import yaml

from nnunetv2.model.config import (
    DecoderConfig, LoraSettings, NonNegativeFloat, NonNegativeInt, OptionError, PositiveFloat, PositiveInt,
    TypedConfig, UnknownOptionError,
)
from nnunetv2.vit.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
INHERITS = "inherits"  # top-level key of a config file: the file whose values it starts from
MODEL_PACKAGE = "nnunetv2.model"
# Configs stored before model.normalization existed trained on nnU-Net's z-scored data: they keep that meaning.
STORED_BEFORE_NORMALIZATION = {"normalization": "zscore"}
# Configs stored before the parameter-group keys existed decayed every parameter: a resume (--c) keeps that, and the
# optimizer's one parameter group.
STORED_BEFORE_PARAMETER_GROUPS = {"decay_norms_and_biases": True}


def builtin_model_modules() -> List[str]:
    """The decoder modules of this package (``model_*.py``), for error messages."""
    folder = Path(__file__).resolve().parent.parent / "model"
    return sorted(f"{MODEL_PACKAGE}.{path.stem}" for path in folder.glob("model_*.py"))


@dataclass
class ModelSection(TypedConfig):
    """``model``: which model module, backbone and weights; ``decoder`` holds the module's decoder options."""

    model_path: str = "nnunetv2.model.model_dpt"  # a module with create_segmentation_model
    backbone: str = "dinov3"  # a family of nnunetv2/model/backbone.py, checked there with its sizes
    backbone_size: str = "large"
    checkpoint_path: Optional[str] = None  # local backbone weights file or transformers folder; "" = none
    pretrained: bool = True  # download timm weights when there is no checkpoint_path
    trust_checkpoint: bool = False  # load checkpoint_path as a full pickle (it can run code)
    # Input intensities: as in the backbone's pretraining (on a configuration nnUNetv2_plan_vit.py planned), as nnU-Net
    # normalizes for its U-Net (zscore: '2d' and its data), or auto: whichever the configuration trained on was planned
    # for (nnUNetv2_plan_vit.py plans backbone for pretrained weights, zscore for random ones). A trained model stores
    # the one it used.
    normalization: Literal["auto", "backbone", "zscore"] = "auto"
    # No gradients, no optimizer state and no saved activations for the backbone (with LoRA: only the adapters train).
    freeze_backbone: bool = False
    drop_path_rate: NonNegativeFloat = 0.0  # stochastic depth over the backbone's blocks (timm's)
    # The module's typed decoder options (its factory's config_class); a plain mapping for a module without one.
    decoder: Union[DecoderConfig, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class TrainSection(TypedConfig):
    """``train``: optimisation settings; the defaults are upstream nnU-Net's."""

    initial_lr: PositiveFloat = 1e-2
    weight_decay: NonNegativeFloat = 3e-5
    gradient_clip: PositiveFloat = 12.0
    num_epochs: PositiveInt = 1000
    num_iterations_per_epoch: PositiveInt = 250
    num_val_iterations_per_epoch: PositiveInt = 50
    optimizer: Literal["sgd", "adamw"] = "sgd"
    warmup_epochs: NonNegativeInt = 0
    # Parameter groups (timm's): the backbone's peak lr is initial_lr x backbone_lr_scale, times layer_decay per block
    # from its last block down to the patch embedding (1.0: off); decoder and detail path get initial_lr.
    backbone_lr_scale: PositiveFloat = 1.0
    layer_decay: PositiveFloat = 1.0
    # false: no weight decay on norms, biases, position embeddings and class/register tokens (timm's rule).
    decay_norms_and_biases: bool = False
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: Literal["auto", "true", "false"] = "auto"  # YAML's true/false are read as "true"/"false"
    gradient_checkpointing: bool = False
    batch_size: Optional[PositiveInt] = None
    max_nonfinite_steps: PositiveInt = 25
    save_every: PositiveInt = 50

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            self.compile = str(self.compile).lower()
        super().__post_init__()
        if self.warmup_epochs >= self.num_epochs:
            raise OptionError("warmup_epochs", f"({self.warmup_epochs}) must be smaller than 'train.num_epochs' "
                                               f"({self.num_epochs}): the learning rate decays after the warm-up.")


SECTIONS = {"model": ModelSection, "lora": LoraSettings, "train": TrainSection}


@dataclass
class ViTConfig:
    """A resolved config: every key of every section, defaults filled in (``validate_config`` makes one from a
    YAML mapping). ``to_dict`` is what the plans and checkpoints store, ``from_stored`` reads it back."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_stored(cls, stored: Dict[str, Dict[str, Any]]) -> "ViTConfig":
        """A config stored with a trained model: keys added since take their defaults (but see ``STORED_BEFORE_*``),
        keys since removed are ignored, and its backbone file need not exist."""
        stored = {**stored, "model": {**STORED_BEFORE_NORMALIZATION, **stored.get("model", {})},
                  "train": {**STORED_BEFORE_PARAMETER_GROUPS, **stored.get("train", {})}}
        known = {name: {f.name for f in dataclasses.fields(section)} for name, section in SECTIONS.items()}
        config = cls(**{name: _section(name, {k: v for k, v in (stored.get(name) or {}).items() if k in known[name]},
                                       "stored config") for name in SECTIONS})
        _typed_decoder(config.model, "stored config")
        return config

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


def _checked(make: Callable[[Dict[str, Any]], Any], values: Dict[str, Any], key: str, source: str) -> Any:
    """``make(values)`` for the config mapping at ``key``, its errors as one ConfigError line naming file and key."""
    try:
        return make(values)
    except UnknownOptionError as err:
        raise ConfigError(f"{source}: unknown key '{key}.{err.key}'. Valid keys in '{key}': "
                          f"{', '.join(err.valid) or '(none)'}.") from err
    except OptionError as err:
        raise ConfigError(f"{source}: '{key}.{err.key}' {err.problem}") from err


def _section(name: str, values: Any, source: str) -> Any:
    """A section's typed config from its mapping."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {type(values).__name__}.")
    return _checked(SECTIONS[name].from_dict, values, name, source)


def _typed_decoder(model: ModelSection, source: str) -> None:
    """Turn ``model.decoder`` into the model module's typed decoder options, if its factory declares them."""
    config_class = getattr(import_model_module(model.model_path, source).create_segmentation_model, "config_class",
                           None)
    if config_class is not None and isinstance(model.decoder, dict):
        model.decoder = _checked(config_class.from_dict, model.decoder, "model.decoder", source)


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


def _check_model(model: ModelSection, source: str) -> None:
    """What only the machine the training starts on can check: backbone family and size, the weights file."""
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
    config = ViTConfig(**{name: _section(name, raw.get(name), source) for name in SECTIONS})
    _check_model(config.model, source)
    _typed_decoder(config.model, source)
    return config


def builtin_config(path: Path) -> Optional[Path]:
    """The built-in config a bare name gives (``dpt`` or ``dpt.yaml`` -> nnunetv2/configs/dpt.yaml), if there is one."""
    builtin = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    return builtin if path.parent == Path(".") and builtin.is_file() else None


def resolve_config_path(path: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    """A config path as given (or, if ``relative_to`` is a folder, relative to it), or the bare name of a built-in
    config (``dpt`` -> nnunetv2/configs/dpt.yaml)."""
    path = Path(path)
    candidate = relative_to / path if relative_to is not None and not path.is_absolute() else path
    if candidate.is_dir():
        raise ConfigError(f"Config {candidate} is a directory; give a YAML file in it.")
    if candidate.is_file():
        return candidate
    builtin = builtin_config(path)
    if builtin is not None:
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
    builtin = builtin_config(Path(parent_name))
    if parent == path.resolve() and builtin is not None:
        parent = builtin.resolve()  # my/dpt.yaml saying 'inherits: dpt.yaml' starts from the built-in one, not itself
    if parent in children + (path.resolve(),):
        raise ConfigError(f"{path}: '{INHERITS}: {parent_name}' makes a cycle; a config cannot inherit itself.")
    return _merged(read_config_file(parent, children + (path.resolve(),)), raw)


def load_config(path: Union[str, Path]) -> ViTConfig:
    """Read, validate and resolve a YAML config file."""
    path = resolve_config_path(path)
    return validate_config(read_config_file(path), str(path))


def build_model(config: ViTConfig, in_channels: int, num_classes: int, load_weights: bool):
    """The network a resolved config describes; ``load_weights=False``: the architecture only (no download, no
    backbone file). What only the build can tell (LoRA targets the backbone lacks, ...) is one ConfigError line."""
    model = config.model
    factory = import_model_module(model.model_path).create_segmentation_model
    # The typed decoder options go as they are; a module without typed options takes the mapping as keywords.
    decoder = {"decoder": model.decoder} if isinstance(model.decoder, DecoderConfig) else model.decoder
    try:
        return factory(
            model.backbone, model.backbone_size, num_classes,
            checkpoint_path=model.checkpoint_path if load_weights else None,
            freeze_backbone=model.freeze_backbone,
            pretrained=model.pretrained and load_weights,
            in_channels=in_channels,
            trust_checkpoint=model.trust_checkpoint and load_weights,
            drop_path_rate=model.drop_path_rate,
            lora=config.lora,
            **decoder,
        )
    except (ValueError, TypeError, LookupError) as err:  # the model layer's option errors; a user factory's too
        raise ConfigError(f"{model.model_path} cannot build this model from model.decoder and lora "
                          f"({type(err).__name__}: {_first_line(err)}); change them in the config.") from err
