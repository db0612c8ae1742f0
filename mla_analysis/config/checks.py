"""Shared by every config group: closed choices (``Choice``), and no NaN or infinity anywhere in a config."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class Choice(str, enum.Enum):
    """A closed set of strings for a config field: OmegaConf rejects any other value when the config is composed.

    Members are named by their values (YAML and the command line give the name), compare equal to them,
    and print and serialise (JSON, YAML, records) as them.
    """

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed strings, in declaration order."""
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: Any, key: str) -> "Choice":
        """The member named ``value``, else ConfigError naming ``key`` and the allowed values."""
        try:
            return cls(value.value if isinstance(value, enum.Enum) else value)
        except (ValueError, TypeError):
            raise ConfigError(f"{key}={value!r} is invalid (allowed: {' | '.join(cls.values())})") from None


def _choice_of(hint: Any) -> tuple[Any, bool]:
    """(the Choice class in a field's type hint or None, whether the field is a list of them)."""
    if isinstance(hint, type) and issubclass(hint, Choice):
        return hint, False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, tuple, typing.List, typing.Tuple) and args:
        inner, _ = _choice_of(args[0])
        return inner, inner is not None
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        for a in args:
            if a is not type(None):
                return _choice_of(a)
    return None, False


@functools.lru_cache(maxsize=None)
def choice_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (its Choice class, is a list) for every closed-choice field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        choice, many = _choice_of(hints[f.name])
        if choice is not None:
            out[f.name] = (choice, many)
    return out


def coerce_choices(obj: Any, prefix: str, strict: bool = True) -> None:
    """Turn the plain strings a config was built from (Python, records) into its Choice members, in place.

    ``strict``: a value outside its choice raises ConfigError naming ``prefix.field`` (the validators);
    otherwise it is left as it is for them to report (``__post_init__``: building a config never raises,
    and a dataclass built in Python holds the same members as one OmegaConf composed).
    """
    if not dataclasses.is_dataclass(obj):
        return  # a DictConfig of the dataclass: OmegaConf already holds its choices as members
    for name, (choice, many) in choice_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None or (many and not isinstance(value, (list, tuple))):
            continue  # a list field given one value: its validator says what is allowed
        try:
            if many:
                value = [choice.parse(v, f"{prefix}.{name}") for v in value]
            else:
                value = choice.parse(value, f"{prefix}.{name}")
        except ConfigError:
            if strict:
                raise
            continue
        object.__setattr__(obj, name, value)


def plain(obj: Any) -> Any:
    """A copy of a nested dict/list with every Enum member replaced by its value (records hold plain strings)."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def check_finite(obj: Any, prefix: str) -> None:
    """Raise ConfigError naming the first NaN/inf number anywhere in a config (dataclass, dict or list)."""
    if dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ConfigError(f"{prefix}={obj} is invalid (allowed: a finite number)")
        return
    for name, value in items:
        check_finite(value, f"{prefix}.{name}" if prefix else str(name))


# ---- value checks shared by the validators (each raises ConfigError naming the key) -----------------------


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error for ``key=value`` outside ``allowed``."""
    return ConfigError(f"{key}={plain(value)!r} is invalid (allowed: {allowed})")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(key: str, value: Any) -> int:
    """``value`` as an int > 0, else ConfigError naming the key."""
    if not is_int(value) or value <= 0:
        raise invalid(key, value, "an integer > 0")
    return value


def non_negative_int(key: str, value: Any) -> int:
    """``value`` as an int >= 0, else ConfigError naming the key."""
    if not is_int(value) or value < 0:
        raise invalid(key, value, "an integer >= 0")
    return value


def check_bool(key: str, value: Any) -> bool:
    """``value`` if it is a bool, else ConfigError naming the key."""
    if not isinstance(value, bool):
        raise invalid(key, value, "true | false")
    return value


def as_list(value: Any) -> Any:
    """One value given where a list is expected becomes a list of it; anything else is returned as it is."""
    if isinstance(value, (str, int, float, enum.Enum)) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, tuple) else value


def int_list(key: str, value: Any) -> list[int]:
    """``value`` as a non-empty list of ints > 0 (one int: a list of it), else ConfigError naming the key."""
    value = as_list(value)
    if not isinstance(value, list) or not value or not all(is_int(v) and v > 0 for v in value):
        raise invalid(key, value, "a non-empty list of integers > 0")
    return value
