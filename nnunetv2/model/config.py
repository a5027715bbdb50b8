"""Typed options of the model layer: dataclasses whose fields are checked against their type hints when made.

As HuggingFace's ``DPTConfig`` is for DPT: each decoder declares its options as a ``DecoderConfig`` next to its
model class, and ``LoraSettings`` holds the LoRA adapters under peft's ``LoraConfig`` names. The YAML config
(``nnunetv2/vit/config.py``) uses these same classes for its ``model.decoder`` and ``lora`` sections, so a value
goes from the file to the model under one name. A type hint says what a field takes: ``float`` also takes an int
(YAML writes ``16`` for 16.0), ``int`` not a bool, ``Literal`` lists the choices, and ``Annotated`` adds a
``Rule`` (``PositiveInt``, ...).
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, List, Literal, Mapping, Optional, Sequence, Union


class OptionError(ValueError):
    """A field's value that does not fit: ``key`` names the field, ``problem`` says what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key, self.problem = key, problem


class UnknownOptionError(OptionError):
    """A key that is no field; ``valid`` lists the fields."""

    def __init__(self, key: str, valid: Sequence[str]) -> None:
        super().__init__(key, f"is not an option; valid: {', '.join(valid)}")
        self.valid = list(valid)


@dataclass(frozen=True)
class Rule:
    """A constraint on a value beyond its type, for ``Annotated``: ``holds(value)``, else ``problem``."""

    label: str
    holds: Callable[[Any], bool]
    problem: str  # formatted with the value and the field's default

    def __repr__(self) -> str:
        return self.label


POSITIVE = Rule("positive", lambda value: value > 0, "must be positive, got {value!r}")
NON_NEGATIVE = Rule("non-negative", lambda value: value >= 0, "must not be negative, got {value!r}")
NON_EMPTY = Rule("non-empty", bool, "must name at least one; leave it out for {default}")
PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]


def entries(count: int, what: str) -> Rule:
    """A list (or None) of exactly ``count`` entries, ``what`` saying what each is."""
    return Rule(f"{count}-entry", lambda value: value is None or len(value) == count,
                f"needs {count} entries ({what}), got {{value!r}}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _fits(value, args[0]) and all(rule.holds(value) for rule in args[1:])
    if origin is Union:
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if origin is list:  # YAML gives lists for every sequence; Python callers may give tuples
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return " ".join([rule.label for rule in args[1:]] + [_name(args[0])])
    if origin is Union:
        return " or ".join(_name(arg) for arg in args)
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    if origin is list:
        return f"a list of {_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return "null" if hint is type(None) else hint.__name__


def problem(value: Any, hint: Any, default: Any = None) -> Optional[str]:
    """What is wrong with ``value`` for a field typed ``hint`` (None if nothing): the type first, then its rules."""
    if typing.get_origin(hint) is Annotated:
        base, *rules = typing.get_args(hint)
        return problem(value, base) or next(
            (rule.problem.format(value=value, default=default) for rule in rules if not rule.holds(value)), None)
    if not _fits(value, hint):
        if typing.get_origin(hint) is Literal:
            return f"must be {_name(hint)}, got {value!r}"
        return f"must be {_name(hint)}, got {value!r} ({type(value).__name__})"
    return None


def default_of(field_: dataclasses.Field) -> Any:
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default


@dataclass
class TypedConfig:
    """A dataclass that checks every field against its type hint (and rules) when made: ``OptionError``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for field_ in dataclasses.fields(self):
            issue = problem(getattr(self, field_.name), hints[field_.name], default_of(field_))
            if issue:
                raise OptionError(field_.name, issue)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TypedConfig":
        """The config of a mapping (a YAML section), refusing a key that is no field: ``UnknownOptionError``."""
        names = [field_.name for field_ in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise UnknownOptionError(key, names)
        return cls(**values)


@dataclass
class LoraSettings(TypedConfig):
    """peft LoRA adapters on the backbone (the YAML's ``lora``); the fields keep peft ``LoraConfig``'s names."""

    enabled: bool = False  # wrap the backbone with adapters; its own weights are frozen
    r: PositiveInt = 8  # rank
    lora_alpha: PositiveFloat = 16.0  # scaling
    # backbone modules that get adapters (timm's ViT: its attention's qkv projection)
    target_modules: Annotated[List[str], NON_EMPTY] = field(default_factory=lambda: ["qkv"])
    lora_dropout: NonNegativeFloat = 0.05  # dropout on the adapter path

    def peft_config(self):
        """peft's ``LoraConfig`` for these settings: the one place it is built."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.target_modules), bias="none")


@dataclass
class DecoderConfig(TypedConfig):
    """The options every decoder has (the YAML's ``model.decoder``): the high-resolution detail path
    (``detail.py``). A decoder's own config subclasses this and adds its fields."""

    detail_path: bool = False  # end the decoder in the detail path, for structures one or two pixels wide
    # widths at full, 1/2 and 1/4 resolution; None: detail.py's DEFAULT_DETAIL_CHANNELS (only with detail_path)
    detail_channels: Annotated[Optional[List[PositiveInt]], entries(3, "full, 1/2 and 1/4 resolution")] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detail_channels is not None and not self.detail_path:
            raise OptionError("detail_channels", "is set but detail_path is off: set detail_path: true, or drop it")
