"""Hydra structured-config schemas, registered in the ConfigStore.

``conf/config.yaml`` starts its defaults list with ``run_schema``, and each ``conf/probe/<name>.yaml``
with ``<name>_schema``, so every YAML file in ``conf/`` is merged onto the dataclasses of
``mla_analysis.config``: unknown keys, wrong types and values outside a choice fail at start-up.
Semantic checks (ranges, impossible combinations) live beside the dataclasses
(``config.validate_model_config``, ``config.run.check_run``, ...); ``validate_run`` adds those that
need the data package's registries (task names, tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..config import (ClaimsConfig, ConfigError, ConvertConfig, LoggerConfig, ModelConfig, SearchConfig,  # noqa: F401
                     TrainConfig, check_finite, validate_model_config, validate_train)  # importable from here as before
from ..config.data import DataConfig
from ..config.probes import PROBE_CONFIGS
from ..config.run import Job, check_run
from ..data import validate_data_config


@dataclass
class RunConfig:
    """One run: a model trained on a data mixture with a schedule, then probed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # probe name -> its options: conf/probe/<name>.yaml starts from <name>_schema ({name: its dataclass},
    # registered below), so probe=... composes typed nodes and the record keeps only the probes selected
    probe: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers (conf/logger/)
    job: Job = Job.train  # what the run does; convert and claims need their node below (config.run.check_job)
    experiment: str = "none"
    scale: str = "tiny"
    seed: int = 0
    device: str = "auto"
    skip_finished: bool = True  # a rerun of a sweep skips runs whose results.json is complete
    claims: Optional[ClaimsConfig] = None  # job=claims: set by +experiment=claims
    search: Optional[SearchConfig] = None  # set by +experiment=rank_search: the value a sweeper optimises
    convert: Optional[ConvertConfig] = None  # job=convert: set by +experiment=convert_mha, convert_moe, ...


def kv_cache_warning(model: ModelConfig) -> Optional[str]:
    """A one-line warning when an MLA latent caches more per token than its K and V would (it compresses nothing)."""
    from ..models.accounting import kv_elements_per_token_layer

    if not model.is_mla:
        return None
    full = model.n_heads * (model.qk_head_dim + model.v_head_dim)  # K [heads, qk dim] + V [heads, v dim], per layer
    latent = max(kv_elements_per_token_layer(model, i) for i in range(model.n_layers))
    if latent <= full:
        return None
    return (f"warning: model.kv_lora_rank={model.kv_lora_rank} caches {latent} values per token and layer, more than "
            f"the {full} of caching K and V ({model.n_heads} heads): the latent compresses nothing")


def validate_run(model: ModelConfig, data: DataConfig, train: TrainConfig, device: str) -> None:
    """Raise ConfigError for impossible combinations across groups and out-of-range options."""
    check_finite(model, "model")
    check_finite(data, "data")
    try:
        validate_data_config(data)  # the data package's registries (task names, tokenizers) and check_data
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_run(model, data, train, device)


def _idiv(a: Any, b: Any) -> int:
    """``${idiv:a,b}``: integer division for sizes derived from others (expert width = d_ff / m)."""
    a, b = int(a), int(b)
    if b <= 0 or a % b:
        raise ConfigError(f"idiv: {a} is not divisible by {b} (allowed: a positive divisor)")
    return a // b


def register() -> None:
    """Register the schemas and resolvers (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, (cls, _) in PROBE_CONFIGS.items():  # conf/probe/<name>.yaml: defaults [<name>_schema, _self_]
        cs.store(group="probe", name=f"{name}_schema", node={name: cls})
    if not OmegaConf.has_resolver("idiv"):
        OmegaConf.register_new_resolver("idiv", _idiv)


register()
