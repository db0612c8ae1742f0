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


# Which rotary frequency pairs keep RoPE in the converted model: high | low | uniform | norm | 2norm (MHA2MLA's
# 2-norm, per layer and KV head from mean activation norms). Functional form: "2norm" is not an identifier,
# and OmegaConf looks members up by name.
Strategy = Choice("Strategy", [(v, v) for v in ("high", "low", "uniform", "norm", "2norm")])


class RopeHeads(Choice):
    """The converted model's decoupled RoPE keys."""

    shared = "shared"  # DeepSeek: one k_rope for all heads (exportable)
    per_kv_head = "per_kv_head"  # MHA2MLA: one k_rope per source KV head (model.qk_rope_heads = n_kv_heads)


class RopeKey(Choice):
    """How a shared key is built from several KV heads (conversion.mha_to_mla's rope_key)."""

    lstsq = "lstsq"  # complex rank-1 fit per kept pair
    mean = "mean"
    rorope = "rorope"  # TransMLA: principal mixture of the heads keeps RoPE, the rest goes NoPE through the latent


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


DIRECTIONS = Direction.values()
ALLOCATIONS = Allocation.values()
MOE_METHODS = MoeMethod.values()
STRATEGIES = Strategy.values()
TARGETS = Target.values()
FACTORIZATIONS = Factorization.values()
ROPE_HEADS = RopeHeads.values()
ROPE_KEYS = RopeKey.values()


@dataclass
class ConvertConfig:
    """``convert`` node (+experiment=convert_mha / convert_moe): convert a trained model, heal it; see convert_job."""

    direction: Direction = Direction.mla  # mla (mha_to_mla) | moe (dense_to_moe) | gqa (kv_merge: the baselines)
    source: Optional[str] = None  # run dir / HF dir to convert; null = train the model group (cached)
    cache_dir: str = "outputs/convert_cache"  # content-hashed, file-locked source / scratch trainings
    kv_lora_rank: Optional[int] = None  # latent rank of every layer ...
    kv_budget: Optional[int] = None  # ... or the total over layers, split by `allocation`
    # ... or cache elements per token per layer INCLUDING the RoPE keys (kv_lora_rank = cache_budget - rope part);
    # unlike kv_budget (latent ranks summed over layers, no RoPE) it is the bytes a token costs per layer
    cache_budget: Optional[int] = None
    allocation: Allocation = Allocation.uniform  # uniform | energy | fisher | whitened (rank_allocation.py)
    rope_dims: Optional[int] = None  # rotary dims kept per head (null = all: mla_coupled_rope)
    strategy: Strategy = Strategy.high  # which frequency pairs keep RoPE: high | low | uniform | norm | 2norm
    rope_heads: RopeHeads = RopeHeads.shared  # shared (DeepSeek) | per_kv_head (MHA2MLA)
    rope_key: RopeKey = RopeKey.lstsq  # shared key from several KV heads: lstsq | mean | rorope (TransMLA)
    bkv: bool = False  # TransMLA's BKV: balance mean||K|| against mean||V|| before the joint factorisation
    target: Target = Target.auto  # auto | mla | mla_coupled_rope
    factorization: Factorization = Factorization.joint  # joint | split
    whiten: bool = True  # activation-whitened SVD (calibration covariance)
    kv_norm: bool = True  # keep DeepSeek's latent RMSNorm; false = none (exact at the source's K/V rank, not exportable)
    # calibration sequences of data.seq_len tokens: data.source=shakespeare takes them from the calibration plays
    # (consecutive windows; too few tokens is a config error), other sources from training batch 0
    calib_examples: int = 64
    # windows of the calibration plays skipped before the calibration text (a disjoint calibration set: the
    # study's calibration-sensitivity rule); other sources: ignored unless 0
    calib_offset: int = 0
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
