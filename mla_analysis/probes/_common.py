"""Helpers shared by the probes: their checked options (``mla_analysis.config.probes``), locating the attention modules, figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..config.checks import plain
from ..config.probes import probe_config
from .plotting import figure  # noqa: F401  (re-exported for the probes)
from .plotting import save_figure as _save_figure


def options(probe: str, params: Any) -> dict:
    """The checked options of ``probe`` (its dataclass in ``mla_analysis.config.probes``) as a dict of plain values."""
    return plain(dataclasses.asdict(probe_config(probe, params)))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP / compiled wrapper."""
    while not hasattr(model, "layers") and hasattr(model, "module"):
        model = model.module
    inner = getattr(model, "_orig_mod", None)
    return inner if inner is not None else model


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, "MoE"]]:
    """(block index, MoE) for every DeepSeekMoE layer of the model."""
    from ..models.moe import MoE

    core = unwrap(model)
    return [(i, b.ffn) for i, b in enumerate(getattr(core, "layers", [])) if isinstance(b.ffn, MoE)]


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

