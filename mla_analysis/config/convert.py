"""The ``convert`` group (+experiment=convert_mha / convert_moe): what is converted, how, and the healing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .checks import Choice
from .model import GateWeights


class Direction(Choice):
    mla = "mla"  # mha_to_mla
    moe = "moe"  # dense_to_moe
    gqa = "gqa"  # kv_merge: fewer K/V heads by mean-pooling (convert.kv_heads), optionally a quantised cache


class Allocation(Choice):
    """How a KV budget is split over layers (``mla_analysis.conversion.rank_allocation``)."""

    uniform = "uniform"
    energy = "energy"
    fisher = "fisher"
    whitened = "whitened"


class Strategy(Choice):
    """Which rotary frequency pairs keep RoPE in the converted model."""

    high = "high"
    low = "low"
    uniform = "uniform"
    norm = "norm"


class Target(Choice):
    auto = "auto"
    mla = "mla"
    mla_coupled_rope = "mla_coupled_rope"


class Factorization(Choice):
    joint = "joint"
    split = "split"


class MoeMethod(Choice):
    kmeans = "kmeans"  # MoEfication
    upcycle = "upcycle"


class CalibSplit(Choice):
    """Where the calibration sequences come from."""

    train = "train"  # training batch 0 (any data source)
    calibration = "calibration"  # windows of the calibration plays (data.source=shakespeare)


DIRECTIONS = Direction.values()
CALIB_SPLITS = CalibSplit.values()
ALLOCATIONS = Allocation.values()
MOE_METHODS = MoeMethod.values()
STRATEGIES = Strategy.values()
TARGETS = Target.values()
FACTORIZATIONS = Factorization.values()


@dataclass
class ConvertConfig:
    """``convert`` node (+experiment=convert_mha / convert_moe): convert a trained model, heal it; see convert_job."""

    direction: Direction = Direction.mla  # mla (mha_to_mla) | moe (dense_to_moe) | gqa (kv_merge: the baselines)
    source: Optional[str] = None  # run dir / HF dir to convert; null = train the model group (cached)
    cache_dir: str = "outputs/convert_cache"  # content-hashed, file-locked source / scratch trainings
    kv_lora_rank: Optional[int] = None  # latent rank of every layer ...
    kv_budget: Optional[int] = None  # ... or the total over layers, split by `allocation`
    allocation: Allocation = Allocation.uniform  # uniform | energy | fisher | whitened (rank_allocation.py)
    rope_dims: Optional[int] = None  # rotary dims kept per head (null = all: mla_coupled_rope)
    strategy: Strategy = Strategy.high  # which frequency pairs keep RoPE: high | low | uniform | norm
    target: Target = Target.auto  # auto | mla | mla_coupled_rope
    factorization: Factorization = Factorization.joint  # joint | split
    whiten: bool = True  # activation-whitened SVD (calibration covariance)
    kv_norm: bool = True  # keep DeepSeek's latent RMSNorm; false = none (exact at the source's K/V rank, not exportable)
    calib_examples: int = 64  # calibration sequences (training batch 0 of this size, or calibration-play windows)
    calib_split: CalibSplit = CalibSplit.train  # train (batch 0) | calibration (data=shakespeare's calibration plays)
    heal_steps: int = 200
    heal_lr: Optional[float] = None  # null = train.lr
    scratch: bool = True  # also train the converted architecture from scratch (equal tokens), cached
    moe_method: MoeMethod = MoeMethod.kmeans  # direction=moe: kmeans (MoEfication) | upcycle
    n_routed_experts: int = 8
    n_activated_experts: int = 2
    n_shared_experts: int = 0
    # direction=moe: active fraction (k + shared) / (routed + shared) of the FFN width; sets n_activated_experts
    active_fraction: Optional[float] = None
    moe_gate_weights: Optional[GateWeights] = None  # null = unit for kmeans, score for upcycle (moefy.py)
    moe_aux_alpha: float = 0.0  # healing with DeepSeek-V2's expert balance loss (alpha_1)
    moe_bias_update_speed: float = 0.0  # healing with DeepSeek-V3's auxiliary-loss-free bias (gamma)
    upcycle_noise: float = 0.01
    # direction=gqa: K/V heads after mean-pooling (null = the source's: no merge) and the cache's
    # quantisation (model.kv_quant_bits / kv_quant_group of the converted model; 16 = off)
    kv_heads: Optional[int] = None
    kv_quant_bits: int = 16
    kv_quant_group: int = 64
