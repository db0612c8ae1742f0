"""Hydra structured-config schemas, registered in the ConfigStore.

``conf/config.yaml`` starts its defaults list with ``run_schema``, so every YAML file in ``conf/``
is merged onto these dataclasses: unknown keys and wrong types fail at start-up. Semantic checks
(impossible combinations) live in ``config.validate_model_config`` and ``validate_run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..config import (ClaimsConfig, ConfigError, ConvertConfig, LoggerConfig, ModelConfig, SearchConfig,  # noqa: F401
                     TrainConfig, check_finite, validate_model_config, validate_train)  # importable from here as before
from ..data import DataConfig, validate_data_config


@dataclass
class RunConfig:
    """One run: a model trained on a data mixture with a schedule, then probed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers (conf/logger/)
    experiment: str = "none"
    scale: str = "tiny"
    seed: int = 0
    device: str = "auto"
    skip_finished: bool = True  # a rerun of a sweep skips runs whose results.json is complete
    claims: Optional[ClaimsConfig] = None  # set by +experiment=claims: audit instead of training
    search: Optional[SearchConfig] = None  # set by +experiment=rank_search: the value a sweeper optimises
    convert: Optional[ConvertConfig] = None  # set by +experiment=convert_mha: convert + heal instead of train


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
        validate_data_config(data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_model_config(model, context_len=data.seq_len)
    if model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than data.vocab_size={data.vocab_size} "
            f"(allowed: >= {data.vocab_size})"
        )
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} is invalid (allowed: auto, cpu, cuda, cuda:N)")
    validate_train(train)
    if train.tokens is not None and train.tokens < train.batch_size * data.seq_len:
        raise ConfigError(
            f"train.tokens={train.tokens} is invalid (allowed: >= one batch = {train.batch_size * data.seq_len})"
        )


def _idiv(a: Any, b: Any) -> int:
    """``${idiv:a,b}``: integer division for sizes derived from others (expert width = d_ff / m)."""
    a, b = int(a), int(b)
    if b <= 0 or a % b:
        raise ConfigError(f"idiv: {a} is not divisible by {b} (allowed: a positive divisor)")
    return a // b


def register() -> None:
    """Register the schemas and resolvers (idempotent)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("idiv"):
        OmegaConf.register_new_resolver("idiv", _idiv)


register()
