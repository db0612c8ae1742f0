"""Shared by every config group: closed choices (``Choice``), and no NaN or infinity anywhere in a config."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from .model import ConfigError


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
