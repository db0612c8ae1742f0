"""Hydra structured-config schemas, registered in the ConfigStore.

``conf/config.yaml`` starts its defaults list with ``run_schema``, so every YAML file in ``conf/``
is merged onto these dataclasses: unknown keys and wrong types fail at start-up. Semantic checks
(impossible combinations) live in ``config.validate_model_config`` and ``validate_run``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .claims import ClaimsConfig
from .config import ConfigError, ModelConfig, validate_model_config
from .data import DataConfig, validate_data_config
from .loggers import LoggerConfig
from .search import SearchConfig
from .train import TrainConfig


@dataclass
class ConvertConfig:
    """``convert`` node (+experiment=convert_mha / convert_moe): convert a trained model, heal it; see convert_job."""

    direction: str = "mla"  # mla (mha_to_mla) | moe (dense_to_moe)
    source: Optional[str] = None  # run dir / HF dir to convert; null = train the model group (cached)
    cache_dir: str = "outputs/convert_cache"  # content-hashed, file-locked source / scratch trainings
    kv_lora_rank: Optional[int] = None  # latent rank of every layer ...
    kv_budget: Optional[int] = None  # ... or the total over layers, split by `allocation`
    allocation: str = "uniform"  # uniform | energy | fisher | whitened (rank_allocation.py)
    rope_dims: Optional[int] = None  # rotary dims kept per head (null = all: mla_coupled_rope)
    strategy: str = "high"  # which frequency pairs keep RoPE: high | low | uniform | norm
    target: str = "auto"  # auto | mla | mla_coupled_rope
    factorization: str = "joint"  # joint | split
    whiten: bool = True  # activation-whitened SVD (calibration covariance)
    calib_examples: int = 64  # calibration sequences (training batch 0 of this size)
    heal_steps: int = 200
    heal_lr: Optional[float] = None  # null = train.lr
    scratch: bool = True  # also train the converted architecture from scratch (equal tokens), cached
    moe_method: str = "kmeans"  # direction=moe: kmeans (MoEfication) | upcycle
    n_routed_experts: int = 8
    n_activated_experts: int = 2
    n_shared_experts: int = 0
    upcycle_noise: float = 0.01


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


def check_finite(obj: Any, prefix: str) -> None:
    """Raise ConfigError naming the first NaN/inf number anywhere in a config (dataclass, dict or list)."""
    if dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ConfigError(f"{prefix}={obj} is invalid (allowed: a finite number)")
        return
    for name, value in items:
        check_finite(value, f"{prefix}.{name}" if prefix else str(name))


def _range_error(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"train.{key}={value!r} is invalid (allowed: {allowed})")


def validate_train(train: TrainConfig) -> None:
    """Raise ConfigError naming the first training option out of its range (run before any compute)."""
    check_finite(train, "train")
    if train.steps < 0 or (train.steps == 0 and train.init_from is None):
        raise ConfigError(
            f"train.steps={train.steps} is invalid (allowed: an integer > 0, or 0 with train.init_from to evaluate only)"
        )
    positive = ("batch_size", "eval_batch_size", "grad_accum", "keep_checkpoints", "lr")
    non_negative = ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip")
    unit = {"min_lr_ratio": "0..1", "solve_threshold": "0..1"}
    for key in positive:
        if getattr(train, key) <= 0:
            raise _range_error(key, getattr(train, key), "a number > 0" if key == "lr" else "an integer > 0")
    for key in non_negative:
        if getattr(train, key) < 0:
            raise _range_error(key, getattr(train, key), "a number >= 0")
    for key, allowed in unit.items():
        if not 0 <= getattr(train, key) <= 1:
            raise _range_error(key, getattr(train, key), allowed)
    for key in ("beta1", "beta2"):  # torch's AdamW takes [0, 1)
        if not 0 <= getattr(train, key) < 1:
            raise _range_error(key, getattr(train, key), "0 <= beta < 1")
    if train.threads is not None and train.threads < 1:
        raise _range_error("threads", train.threads, "null (torch's default) or an integer >= 1")
    if train.tokens is not None and train.tokens <= 0:
        raise _range_error("tokens", train.tokens, "null or an integer > 0")


def kv_cache_warning(model: ModelConfig) -> Optional[str]:
    """A one-line warning when an MLA latent caches more per token than its K and V would (it compresses nothing)."""
    from .accounting import kv_elements_per_token_layer

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
