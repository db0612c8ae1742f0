"""The ``convert`` group (+experiment=convert_mha / convert_moe): what is converted, how, and the healing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DIRECTIONS = ("mla", "moe")
MOE_METHODS = ("kmeans", "upcycle")
STRATEGIES = ("high", "low", "uniform", "norm")
TARGETS = ("auto", "mla", "mla_coupled_rope")
FACTORIZATIONS = ("joint", "split")


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
