"""A composed job config: checked before anything runs (``check_config``) and as it is recorded (``record_config``).

Used by ``mla_analysis.run`` for a single job and by ``mla_analysis.runner.launcher`` for every job of a sweep
before the first one starts; nothing here builds a model or reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, Job, ModelConfig, check_job
from ..data import DataConfig
from ..probes import check_probes
from ..analysis.search import resolve_reference
from ..training.trainer import TrainConfig
from .errors import one_line

JOB_NODES = ("convert", "claims")  # the root nodes that only their job reads (config.run.check_job)


@dataclass
class JobResult:
    """How one job ended: its status, its metrics and the record it wrote (None when it wrote none)."""

    status: str  # ok | failed | interrupted | skipped (a finished run left as it is)
    metrics: dict[str, Any] = field(default_factory=dict)
    record: Optional[Path] = None
    exit_code: int = 0  # non-zero: the process stops with it (a failed single run, an interrupted job)


def check_job_nodes(cfg: DictConfig) -> Job:
    """The config's ``job``, after checking that its node is set and no other job's node is (ConfigError)."""
    check_job(cfg.job, {name: cfg.get(name) is not None for name in JOB_NODES})
    return Job(cfg.job)


def job_objects(cfg: DictConfig) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The model, data and train groups of a job config as their dataclasses."""
    model = OmegaConf.to_object(cfg.model)
    data = OmegaConf.to_object(cfg.data)
    tcfg = OmegaConf.to_object(cfg.train)
    return model, data, tcfg


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first invalid key of a composed job config (no model built, no file read)."""
    from .schema import validate_run

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # a ??? left unset
        job = check_job_nodes(cfg)
        model_cfg, data_cfg, tcfg = job_objects(cfg)
        search = OmegaConf.to_object(cfg.search) if cfg.get("search") is not None else None
        convert = OmegaConf.to_object(cfg.convert) if job is Job.convert else None
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(e)) from None
    if search is not None:
        resolve_reference(search)
    if convert is not None:
        from ..conversion.job import validate_convert

        source_cfg = model_cfg
        if convert.source is not None:  # an existing model is converted: its shape decides what is valid
            from ..interop.hf_io import model_config_of
            from ..training.checkpoint import CheckpointError

            try:
                source_cfg = model_config_of(convert.source)
            except CheckpointError as e:
                raise ConfigError(f"convert.source={convert.source!r}: {e}") from None
        validate_convert(convert, source_cfg)
        model_cfg = source_cfg
    if tcfg.init_from is not None:
        from .schema import validate_train

        validate_train(tcfg)  # the model group is replaced by the loaded model's config: checked when loaded
        return
    validate_run(model_cfg, data_cfg, tcfg, cfg.device)
    if job is Job.train:
        check_probes(OmegaConf.to_container(cfg.probe, resolve=True), model_cfg)


def record_config(cfg: DictConfig) -> dict[str, Any]:
    """The config for a record: resolved when it resolves (a failed row shows its actual values)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)
