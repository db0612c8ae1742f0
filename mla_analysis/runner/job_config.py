"""A composed job config: checked before anything runs (``check_config``) and as it is recorded (``record_config``).

Used by ``mla_analysis.run`` for a single job and by ``mla_analysis.runner.launcher`` for every job of a sweep
before the first one starts; nothing here builds a model or reads a file.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, ModelConfig
from ..data import DataConfig
from ..probes import check_probes
from ..analysis.search import resolve_reference
from ..training.trainer import TrainConfig


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
        model_cfg, data_cfg, tcfg = job_objects(cfg)
        search = OmegaConf.to_object(cfg.search) if cfg.get("search") is not None else None
        convert = OmegaConf.to_object(cfg.convert) if cfg.get("convert") is not None else None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    if search is not None:
        resolve_reference(search)
    if convert is not None:
        from ..conversion.job import validate_convert

        validate_convert(convert, model_cfg, data_cfg)
    if tcfg.init_from is not None:
        from .schema import validate_train

        validate_train(tcfg)  # the model group is replaced by the loaded model's config: checked when loaded
        return
    validate_run(model_cfg, data_cfg, tcfg, cfg.device)
    if cfg.get("claims") is None and cfg.get("convert") is None:
        check_probes(OmegaConf.to_container(cfg.probe, resolve=True), model_cfg)


def record_config(cfg: DictConfig) -> dict[str, Any]:
    """The config for a record: resolved when it resolves (a failed row shows its actual values)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)
