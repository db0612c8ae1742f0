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


def validate_run(model: ModelConfig, data: DataConfig, train: TrainConfig, device: str) -> None:
    """Raise ConfigError for impossible combinations across groups."""
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
    if train.steps < 0 or (train.steps == 0 and train.init_from is None):
        raise ConfigError(
            f"train.steps={train.steps} is invalid (allowed: an integer > 0, or 0 with train.init_from to evaluate only)"
        )
    for key in ("batch_size", "eval_batch_size"):
        if getattr(train, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(train, key)} is invalid (allowed: an integer > 0)")
    if train.tokens is not None and train.tokens < train.batch_size * data.seq_len:
        raise ConfigError(
            f"train.tokens={train.tokens} is invalid (allowed: >= one batch = {train.batch_size * data.seq_len})"
        )
    if train.lr <= 0:
        raise ConfigError(f"train.lr={train.lr} is invalid (allowed: a number > 0)")
    if not 0 <= train.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={train.min_lr_ratio} is invalid (allowed: 0..1)")
    if train.warmup_steps < 0 or train.eval_every < 0 or train.checkpoint_every < 0:
        raise ConfigError("train.warmup_steps/eval_every/checkpoint_every must be >= 0")


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
