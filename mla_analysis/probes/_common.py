"""Helpers shared by the probes: parameter checking, locating the attention modules, figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..analysis.figures import figure  # noqa: F401  (re-exported for the probes)
from ..analysis.figures import save_figure as _save_figure


def check_params(probe: str, params: dict, defaults: dict) -> dict:
    """Defaults overlaid with ``params``; ConfigError naming ``probe.<probe>.<key>`` for unknown keys."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"probe.{probe}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(defaults))})"
        )
    return {**defaults, **params}


def positive_int(probe: str, key: str, value: Any) -> int:
    """``value`` as an int > 0, else ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"probe.{probe}.{key}={value!r} is invalid (allowed: an integer > 0)")
    return value


def int_list(probe: str, key: str, value: Any) -> list[int]:
    """``value`` as a non-empty list of ints > 0, else ConfigError naming the key."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"probe.{probe}.{key}={value!r} is invalid (allowed: a non-empty list of integers > 0)")
    return [positive_int(probe, key, v) for v in value]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP / compiled wrapper."""
    while not hasattr(model, "layers") and hasattr(model, "module"):
        model = model.module
    inner = getattr(model, "_orig_mod", None)
    return inner if inner is not None else model


def model_config(model: torch.nn.Module) -> ModelConfig:
    """The model's ModelConfig (``Transformer.cfg``)."""
    cfg = getattr(unwrap(model), "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ConfigError("probe: the model has no ModelConfig (expected mla_analysis.models.Transformer)")
    return cfg


def lm_inputs(data_cfg: Any) -> torch.Tensor:
    """Inputs [N, L] of the held-out "lm" eval set (the task sets are not built)."""
    from ..data import build_eval_sets

    if dataclasses.is_dataclass(data_cfg) and not isinstance(data_cfg, type):
        data_cfg = dataclasses.replace(data_cfg, eval_tasks=[])  # "lm" does not depend on the task list
    return build_eval_sets(data_cfg)["lm"][0]


def save_figure(fig, path: Path) -> str:
    """Write ``fig`` as a PNG atomically (figures.save_figure); returns the file name."""
    return _save_figure(fig, Path(path)).name

