"""Training a model and the run directory it writes.

``trainer`` is the loop (AdamW, warmup + cosine, clipping, evaluation, resume, SIGINT/SIGTERM, DDP);
``checkpoint`` the safetensors checkpoints of a run directory; ``results`` its ``results.json`` record and the
atomic file writes every stage uses; ``loggers`` the experiment trackers (TensorBoard, MLflow);
``forward_hooks`` runs a model over inputs with torch forward hooks attached (calibration statistics, probes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .trainer import train, evaluate, resolve_device, total_steps, TrainingInterrupted, NonFiniteLoss, StopFlag
    from .checkpoint import CheckpointError, save_checkpoint, load_checkpoint, latest_checkpoint, save_model_config
    from .results import (RESULTS_FILE, ResultsError, atomic_write_bytes, atomic_write_text, atomic_write_json,
        read_json, flatten, make_record, load_record, is_finished, find_run_dirs)
    from .loggers import Tracker, start_tracking
    from .forward_hooks import run_hooked

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "trainer": ("train", "evaluate", "resolve_device", "total_steps", "TrainingInterrupted", "NonFiniteLoss",
        "StopFlag"),
    "checkpoint": ("CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_model_config"),
    "results": ("RESULTS_FILE", "ResultsError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
        "read_json", "flatten", "make_record", "load_record", "is_finished", "find_run_dirs"),
    "loggers": ("Tracker", "start_tracking"),
    "forward_hooks": ("run_hooked",),
})
