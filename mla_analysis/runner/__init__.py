"""Running jobs and sweeps under Hydra: the root config schema, job checks, the run-dir lock, launchers, callbacks.

``schema`` registers the structured configs (the Hydra root schema) and validates a run; ``job_config``
checks a job's config before any compute and records it; ``lock`` locks a run or sweep directory before
Hydra writes into it; ``launcher`` is the joblib launcher with per-job worker isolation (the plugin package is
``hydra_plugins.mla_analysis_launchers``); ``callbacks`` are the Hydra callbacks (the tracking store before a
sweep, the comparison tables after it). The entry point itself is ``mla_analysis.run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .schema import RunConfig, validate_run
    from .job_config import check_config, record_config, job_objects
    from .lock import RunLock, LOCK_FILE
    from .callbacks import ComparisonTables, TrackingStore

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "schema": ("RunConfig", "validate_run"),
    "job_config": ("check_config", "record_config", "job_objects"),
    "lock": ("RunLock", "LOCK_FILE"),
    "callbacks": ("ComparisonTables", "TrackingStore"),
})
