"""Experiment trackers (``logger`` config group): TensorBoard event files and MLflow runs.

``logger=tensorboard`` writes event files in the run directory (``tensorboard --logdir SWEEP_OR_RUN_DIR``);
``logger=mlflow`` logs to a tracking store, by default ``sqlite:///<sweep or run dir>/mlflow.db``
(``mlflow ui --backend-store-uri ...``); ``logger=[tensorboard,mlflow]`` does both. The libraries are
optional extras (``pip install "mla-analysis[tensorboard]"`` / ``[mlflow]``): asking for one that is
not installed ends at start-up with one line naming the extra, exit code 2.

What is logged:
- every ``log_every`` steps ``train/loss``, ``train/lr``, ``train/grad_norm`` (before clipping) and
  ``train/tokens_per_s``; at every eval ``eval/<metric>`` (``eval/val_loss``, ``eval/mqar.exact_match``, ...);
- at the end, every numeric metric of the run record (probe scalars included) at the last step:
  TensorBoard ``summary/<metric>``, MLflow ``<metric>`` (so ``mlflow.search_runs`` columns are the
  record's metrics), and the run's figures (``*.png`` in the run dir) as images / artifacts;
- MLflow also gets the flattened config as params, ``results.json`` as an artifact, and tags: the git
  commit, the job's overrides, the run and sweep directories.
A sweep is one MLflow experiment (named by ``experiment``, or by the sweep directory for ad-hoc sweeps)
with one run per job; ``prepare_sweep`` (the ``TrackingStore`` Hydra callback) creates the store and
the experiment once before jobs start, since concurrent SQLite schema creation races.

Resume (``train.resume=true``): the MLflow run id is kept in ``<run dir>/mlflow_run.json`` and the
resumed job reopens that run and skips the points it already holds (a resumed run is bitwise the
uninterrupted one on CPU, so those points are the same); TensorBoard purges the events past the
checkpoint's step (``SummaryWriter(purge_step=...)``). No curve gets duplicate points.

The run record stays the source of truth: a tracker that fails (store unreachable, disk full) is
switched off with a warning, the run goes on, and its ``results.json`` lists ``logging_errors``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..config import ConfigError, LoggerConfig, MLflowConfig, TensorBoardConfig  # noqa: F401  (importable from here)
from .results import TRACKER_DIRS, atomic_write_json, flatten, git_commit, read_json

RUN_ID_FILE = "mlflow_run.json"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = TRACKER_DIRS[0]  # next to a local store; find_run_dirs skips it (its results.json copies are no runs)


EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> the pyproject extra that installs it


def require(name: str) -> None:
    """Import the library behind logger ``name``; ConfigError naming the extra when it is absent."""
    try:
        if name == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import mlflow  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"logger={name}: the {EXTRAS[name]} package is not installed ({e}); "
            f"install the extra: pip install \"mla-analysis[{EXTRAS[name]}]\""
        ) from None


def selected(cfg: Any) -> list[str]:
    """Names of the loggers a ``logger`` node selects (a LoggerConfig, DictConfig or dict)."""
    if cfg is None:
        return []
    get = cfg.get if hasattr(cfg, "get") else (lambda k: getattr(cfg, k, None))
    return [name for name in EXTRAS if get(name) is not None]


def default_tracking_uri(store_dir: str | os.PathLike) -> str:
    """The local SQLite store of a sweep or run directory (``mlflow ui --backend-store-uri`` serves it)."""
    return f"sqlite:///{(Path(store_dir) / STORE_FILE).resolve()}"


def experiment_name(cfg: MLflowConfig | Mapping, experiment: Optional[str], root_dir: str | os.PathLike) -> str:
    """The MLflow experiment of a job: configured, else the study's name, else its sweep / run directory."""
    name = cfg.get("experiment_name") if isinstance(cfg, Mapping) else cfg.experiment_name
    if name:
        return str(name)
    return str(experiment) if experiment and experiment != "none" else str(root_dir)


def _sqlite_dir(uri: str) -> Optional[Path]:
    """The directory holding a ``sqlite:///PATH`` store (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent


def _quiet_mlflow() -> None:
    """Keep the store's schema migrations (alembic INFO lines) out of the job's output."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # an unreachable tracking server fails after a few tries, not mlflow's default 7 with backoff (minutes)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create (once) the store and the experiment ``name``; returns its id. A local SQLite store keeps
    its artifacts next to it, in ``mlartifacts/``."""
    _quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    store_dir = _sqlite_dir(tracking_uri)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (store_dir / ARTIFACTS_DIR).resolve().as_uri() if store_dir is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def prepare_sweep(config: Any) -> None:
    """Before a sweep's jobs start: check the loggers' packages (exit 2) and create the MLflow store once."""
    names = selected(config.get("logger"))
    try:
        for name in names:
            require(name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if "mlflow" not in names:
        return
    ml = config.logger.mlflow
    sweep_dir = Path(config.hydra.sweep.dir)
    uri = ml.tracking_uri or default_tracking_uri(sweep_dir)
    try:
        ensure_experiment(uri, experiment_name(ml, config.get("experiment"), sweep_dir))
    except Exception as e:  # the jobs record the failure; the sweep itself goes on
        print(f"warning: mlflow store {uri} not prepared: {type(e).__name__}: {str(e).splitlines()[0]}",
              file=sys.stderr)


def _number(value: Any) -> Optional[float]:
    """A loggable scalar (bools as 0/1), or None for non-numbers and NaN/inf."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):  # numpy scalars too
        return float(value)
    return None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric leaves of a (nested) metrics mapping, dotted keys."""
    out = {}
    for key, value in flatten(dict(metrics)).items():
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def start_step(run_dir: Path, resume: bool) -> int:
    """The step training starts from: the latest checkpoint's when resuming (as train() does), else 0."""
    if not resume:
        return 0
    from .checkpoint import latest_checkpoint

    try:
        folder = latest_checkpoint(run_dir)
        return int(read_json(folder / "state.json")["step"]) if folder is not None else 0
    except Exception:  # train() reports a broken checkpoint itself
        return 0


@dataclass
class JobContext:
    """Where a job stands: its directories, its Hydra overrides and whether it resumes."""

    run_dir: Path
    root_dir: Path  # the sweep directory in a sweep, else the run directory
    experiment: str
    overrides: list[str] = field(default_factory=list)
    start_step: int = 0
    resume: bool = False


class TensorBoardLogger:
    """Scalars and figures through ``torch.utils.tensorboard.SummaryWriter`` into the run directory."""

    name = "tensorboard"

    def __init__(self, cfg: TensorBoardConfig, ctx: JobContext):
        from torch.utils.tensorboard import SummaryWriter

        self.log_every = max(1, cfg.log_every)
        # events an earlier (interrupted or failed) attempt wrote past the start step are dropped by readers
        earlier = any(ctx.run_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(ctx.run_dir), flush_secs=30,
                                    purge_step=ctx.start_step + 1 if earlier else None)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def log_summary(self, step: int, values: Mapping[str, float]) -> None:
        self.log_scalars(step, {f"summary/{k}": v for k, v in values.items()})

    def log_figures(self, step: int, paths: list[Path]) -> None:
        from matplotlib.image import imread

        for path in paths:
            image = imread(path)  # [H, W, 3 or 4] floats in 0..1 (PNG)
            self.writer.add_image(f"figures/{path.stem}", image, step, dataformats="HWC")

    def log_file(self, path: Path) -> None:
        """Files are not TensorBoard's business (the record is next to the events anyway)."""

    def close(self, status: str) -> None:
        self.writer.close()


MLFLOW_STATUS = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _mlflow_key(key: str) -> str:
    """A metric / param name MLflow accepts (letters, digits, ``_-. :/``)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


class MLflowLogger:
    """One MLflow run per job through ``MlflowClient`` (no global active run: sweeps run jobs in one process)."""

    name = "mlflow"
    MAX_VALUE = 6000  # MLflow's limit on a param value (characters)

    def __init__(self, cfg: MLflowConfig, ctx: JobContext, config: Mapping[str, Any]):
        from mlflow.tracking import MlflowClient

        self.log_every = max(1, cfg.log_every)
        self.uri = cfg.tracking_uri or default_tracking_uri(ctx.root_dir)
        experiment_id = ensure_experiment(self.uri, experiment_name(cfg, ctx.experiment, ctx.root_dir))
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending: list[Any] = []
        self.last_step: dict[str, int] = {}  # per metric: the last step the run holds (resume skips up to it)
        commit = git_commit()
        tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "overrides": " ".join(ctx.overrides),
                "run_dir": str(ctx.run_dir.resolve()), "sweep_dir": str(ctx.root_dir.resolve())}
        tags = {k: v[: self.MAX_VALUE] for k, v in tags.items()}
        self.run_id = self._previous_run(ctx, experiment_id) if ctx.resume else None
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=ctx.run_dir.name, tags=tags).info.run_id
            atomic_write_json(ctx.run_dir / RUN_ID_FILE,
                              {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id})
            existing: Mapping[str, str] = {}
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            data = self.client.get_run(self.run_id).data
            existing = data.params  # a param cannot change value (train.resume does): the first value stays
            for key in data.metrics:
                self.last_step[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        from mlflow.entities import Param

        params = [Param(_mlflow_key(k), str(v)[: self.MAX_VALUE]) for k, v in flatten(dict(config)).items()]
        params = [p for p in params if p.key not in existing]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _previous_run(self, ctx: JobContext, experiment_id: str) -> Optional[str]:
        """The run id an earlier attempt of this job left in its run directory, if it is in this store."""
        path = ctx.run_dir / RUN_ID_FILE
        if not path.exists():
            return None
        try:
            saved = read_json(path)
            if saved.get("tracking_uri") != self.uri or saved.get("experiment_id") != experiment_id:
                return None
            return self.client.get_run(saved["run_id"]).info.run_id
        except Exception:  # unreadable file or a run deleted from the store: start a new run
            return None

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            key = _mlflow_key(key)
            if step > self.last_step.get(key, -1):
                self.pending.append(Metric(key, value, now, step))
                self.last_step[key] = step
        if len(self.pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])

    def log_summary(self, step: int, values: Mapping[str, float]) -> None:
        self.log_scalars(step, values)
        self.flush()

    def log_figures(self, step: int, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


class Tracker:
    """The selected loggers behind one interface; one that fails is switched off and its error kept."""

    def __init__(self, loggers: Optional[list[Any]] = None, run_dir: Optional[Path] = None):
        self.loggers = list(loggers or [])
        self.run_dir = run_dir
        self.errors: list[str] = []  # one line per failure, written to results.json as logging_errors
        self.last_step = 0

    def fail(self, name: str, what: str, e: BaseException) -> None:
        """Record a logger failure (and say so); the run goes on without that logger."""
        message = f"{name}: {what}: {_one_line(e)}"
        self.errors.append(message)
        print(f"warning: logging failed, {message}; training goes on without {name}", file=sys.stderr)
        self.loggers = [lg for lg in self.loggers if lg.name != name]

    def _each(self, what: str, fn: Callable[[Any], None]) -> None:
        for logger in list(self.loggers):
            try:
                fn(logger)
            except Exception as e:
                self.fail(logger.name, what, e)

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """train() callback after each optimizer step (``step`` = steps done): train/* every log_every steps."""
        self.last_step = step
        values = {f"train/{k}": v for k, v in scalars(metrics).items()}
        self._each("train metrics", lambda lg: lg.log_scalars(step, values) if step % lg.log_every == 0 else None)

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """train() callback after each eval: eval/<metric>, then flush."""
        self.last_step = step
        values = {f"eval/{k}": v for k, v in scalars(metrics).items() if k not in ("step", "tokens")}

        def log(lg: Any) -> None:
            lg.log_scalars(step, values)
            lg.flush()

        self._each("eval metrics", log)

    def finish(self, record: dict[str, Any], results_path: str | os.PathLike,
               write: Callable[[Path, dict[str, Any]], Any] = atomic_write_json) -> dict[str, Any]:
        """Log the record's metrics and figures, write results.json with ``write`` (with any ``logging_errors``), log it, close."""
        results_path = Path(results_path)
        if self.loggers and record.get("status") == "ok":
            metrics = record.get("metrics", {})
            step = int(metrics.get("steps") or self.last_step)
            summary = scalars(metrics)
            figures = sorted(results_path.parent.glob("*.png"))
            self._each("final metrics", lambda lg: lg.log_summary(step, summary))
            self._each("figures", lambda lg: lg.log_figures(step, figures))
        if self.errors:
            record["logging_errors"] = list(self.errors)
        write(results_path, record)
        before = len(self.errors)
        self._each(results_path.name, lambda lg: lg.log_file(results_path))
        self.close(record.get("status", "ok"))
        if len(self.errors) > before:  # the copy in the store (if any) predates these
            record["logging_errors"] = list(self.errors)
            write(results_path, record)
        return record

    def close(self, status: str = "ok") -> None:
        """Flush and close every logger (MLflow run status from the record's: ok, failed, interrupted)."""
        self._each("close", lambda lg: lg.close(status))
        self.loggers = []


def job_context(cfg: Any, run_dir: Path, multirun: bool) -> JobContext:
    """The job's directories and overrides, from Hydra when it runs the job."""
    from hydra.core.hydra_config import HydraConfig

    root, overrides = run_dir, []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        if multirun:
            root = Path(hc.sweep.dir)
    resume = bool(cfg.train.resume)
    return JobContext(run_dir=run_dir, root_dir=root, experiment=str(cfg.get("experiment", "none")),
                      overrides=overrides, start_step=start_step(run_dir, resume), resume=resume)


def start_tracking(cfg: Any, config: Mapping[str, Any], run_dir: str | os.PathLike, multirun: bool) -> Tracker:
    """The loggers ``cfg.logger`` selects, started for this job (rank 0 only; others get an empty Tracker).

    Raises ConfigError naming the extra when a logger's package is absent; a logger that cannot start
    (store unreachable) is left out and its error kept for the record.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    names = selected(cfg.get("logger"))
    for name in names:
        require(name)
    tracker = Tracker(run_dir=run_dir)
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return tracker
    lcfg = OmegaConf.to_object(cfg.logger)
    ctx = job_context(cfg, run_dir, multirun)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            if name == "tensorboard":
                tracker.loggers.append(TensorBoardLogger(lcfg.tensorboard, ctx))
            else:
                tracker.loggers.append(MLflowLogger(lcfg.mlflow, ctx, config))
        except Exception as e:
            tracker.fail(name, "start", e)
    return tracker
