"""Probes: measurements on a trained (or imported) model, run after training when ``probe=...`` is set.

Each probe is a function ``run(model, params, data_cfg, run_dir, device) -> dict`` registered in
``PROBES`` under the name of its config file in ``conf/probe/``; its numbers land in the run's
results.json under ``metrics["probe.<name>.<key>"]`` and its figures (PNG) in the run directory.
Its options (``params``, a dict) are those of its dataclass in ``mla_analysis.config.probes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError

class ProbeError(RuntimeError):
    """A probe cannot produce valid numbers (e.g. NaN activations); the message says which and where."""


ProbeFn = Callable[[torch.nn.Module, dict, Any, Path, torch.device], dict]
PROBES: dict[str, ProbeFn] = {}


def register(name: str) -> Callable[[ProbeFn], ProbeFn]:
    """Decorator adding a probe to the registry under ``name``."""

    def wrap(fn: ProbeFn) -> ProbeFn:
        PROBES[name] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    """Import the probe modules so they register themselves."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def check_probes(probe_cfg: dict, model_cfg: Any = None) -> None:
    """Raise ConfigError for an unknown probe, an invalid option of one, or a model it cannot probe (before training).

    Options are checked by their dataclass (``mla_analysis.config.probes``).

    A probe module may define ``check_model(model_cfg)`` raising ConfigError for models it does not apply to
    (e.g. ``experts`` on a dense model), so the error comes before the training it would otherwise waste.
    """
    import sys

    from ..config.probes import PROBE_CONFIGS, probe_config

    _load_builtin()
    for name, params in probe_cfg.items():
        if name not in PROBES:
            raise ConfigError(f"probe.{name}: unknown probe (allowed: {', '.join(sorted(PROBES)) or 'none'})")
        if name in PROBE_CONFIGS:  # every option but those that depend on the model (checked when it runs)
            probe_config(name, params)
        check_model = getattr(sys.modules[PROBES[name].__module__], "check_model", None)
        if check_model is not None and model_cfg is not None:
            check_model(model_cfg)


def run_probes(model: torch.nn.Module, probe_cfg: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Run every configured probe; returns flat metrics ``probe.<name>.<key>``."""
    check_probes(probe_cfg)
    out: dict[str, Any] = {}
    for name, params in probe_cfg.items():
        result = PROBES[name](model, dict(params or {}), data_cfg, Path(run_dir), device)
        out.update({f"probe.{name}.{k}": v for k, v in result.items()})
    return out
