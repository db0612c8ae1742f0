"""Running jobs and sweeps under Hydra: the root config schema, job checks, the run-dir lock, launchers, callbacks.

``schema`` registers the structured configs (the Hydra root schema) and validates a run; ``job_config``
checks a job's config before any compute and records it; ``lock`` locks a run or sweep directory before
Hydra writes into it; ``launcher`` is the joblib launcher with per-job worker isolation (the plugin package is
``hydra_plugins.mla_analysis_launchers``); ``callbacks`` are the Hydra callbacks (the tracking store before a
sweep, the comparison tables after it). The entry point itself is ``mla_analysis.run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .schema import RunConfig, validate_run
    from .job_config import check_config, record_config, job_objects
    from .lock import RunLock, LOCK_FILE
    from .callbacks import ComparisonTables, TrackingStore

_EXPORTS = {name: module for module, names in {
    "schema": ("RunConfig", "validate_run"),
    "job_config": ("check_config", "record_config", "job_objects"),
    "lock": ("RunLock", "LOCK_FILE"),
    "callbacks": ("ComparisonTables", "TrackingStore"),
}.items() for name in names}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy, so that importing one submodule (or `import mla_analysis`) does not import the whole stage
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
