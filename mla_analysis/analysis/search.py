"""Objective for hyperparameter searches (``+experiment=rank_search``, Hydra's Optuna sweeper).

The question "what is the smallest ``kv_lora_rank`` whose quality stays within a tolerance of MHA?"
is a constrained minimisation: minimise the cost key (the rank) subject to
``metric`` >= reference - tolerance (``mode=max``, e.g. exact match) or
``metric`` <= reference + tolerance (``mode=min``, e.g. loss). Hydra's Optuna sweeper optimises one
scalar that the task function returns, so the constraint becomes a penalty: a feasible run scores its
cost; an infeasible one scores ``PENALTY + shortfall``, worse than every feasible run and better
the closer it comes (which keeps TPE's density estimate informative). ``tolerance`` is absolute, or
a fraction of the reference with ``relative=true``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, SearchConfig  # SearchConfig: importable from here as before
from ..config.search import MODES

PENALTY = 1e6


def resolve_reference(search: SearchConfig) -> float:
    """The reference value: ``search.reference`` as a number, or ``metric`` read from that run's results.json."""
    from ..training.results import ResultsError, load_record

    if search.mode not in MODES:
        raise ConfigError(f"search.mode={search.mode!r} is invalid (allowed: {' | '.join(MODES)})")
    if search.tolerance < 0:
        raise ConfigError(f"search.tolerance={search.tolerance} is invalid (allowed: a number >= 0)")
    ref = search.reference
    if ref is None:
        raise ConfigError("search.reference is unset (allowed: a number, or the run directory of the reference model)")
    try:
        value = float(ref)
    except (TypeError, ValueError):
        path = Path(str(ref))
        if not path.is_dir():
            raise ConfigError(f"search.reference={ref!r}: neither a number nor a run directory") from None
        try:
            metrics = load_record(path)["metrics"]
        except ResultsError as e:
            raise ConfigError(f"search.reference={ref!r}: {e}") from None
        if not isinstance(metrics.get(search.metric), (int, float)):
            raise ConfigError(f"search.metric={search.metric!r} is not in {path}/results.json")
        value = float(metrics[search.metric])
    if not math.isfinite(value):
        raise ConfigError(f"search.reference={ref!r} is not a finite number")
    return value


def objective(search: SearchConfig, reference: float, flat_config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict:
    """Search metrics of one run: reference, shortfall (>= 0), feasible, objective (what the sweeper minimises)."""
    value = metrics.get(search.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
        raise ConfigError(f"search.metric={search.metric!r} is not a metric of this run (available: {available})")
    cost = flat_config.get(search.cost)
    if not isinstance(cost, (int, float)) or isinstance(cost, bool):
        raise ConfigError(f"search.cost={search.cost!r} is not a numeric config key of this run")
    tol = search.tolerance * abs(reference) if search.relative else search.tolerance
    if search.mode == "max":
        shortfall = max(0.0, (reference - tol) - value)
    else:
        shortfall = max(0.0, value - (reference + tol))
    feasible = shortfall == 0.0
    return {
        "search.reference": reference,
        "search.shortfall": shortfall,
        "search.feasible": feasible,
        "search.objective": float(cost) if feasible else PENALTY + shortfall,
    }
