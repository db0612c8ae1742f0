"""Checks shared by every config group: no NaN or infinity anywhere in a config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .model import ConfigError


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
