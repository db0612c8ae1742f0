"""The ``logger`` group: which experiment trackers a run reports to (conf/logger/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TensorBoardConfig:
    """``logger=tensorboard``: event files in the run directory."""

    log_every: int = 10  # train scalars every N optimizer steps (eval metrics at every eval)


@dataclass
class MLflowConfig:
    """``logger=mlflow``: one MLflow run per job."""

    tracking_uri: Optional[str] = None  # null = sqlite:///<sweep dir (multirun) or run dir>/mlflow.db
    experiment_name: Optional[str] = None  # null = `experiment`, or the sweep / run directory when it is none
    log_every: int = 10  # train scalars every N optimizer steps (eval metrics at every eval)


@dataclass
class LoggerConfig:
    """``logger`` node: the selected trackers (``logger=none`` selects none)."""

    tensorboard: Optional[TensorBoardConfig] = None
    mlflow: Optional[MLflowConfig] = None
