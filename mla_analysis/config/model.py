"""Model configuration (``mla_analysis.config.model``): one dataclass describes every attention/FFN variant the toolkit builds.

The attention variant is named by a string (``attention``) and mapped to a class in
``mla_analysis.models.transformer``, so old configs keep loading when classes move.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional

from .checks import Choice, ConfigError, coerce_choices, plain

KV_QUANT_BITS = (16, 8, 4)  # kv_quant_bits: 16 = off


class Attention(Choice):
    """``model.attention``: the attention variant (mapped to a class in ``mla_analysis.models``)."""

    mha = "mha"
    gqa = "gqa"
    mqa = "mqa"
    mla = "mla"  # DeepSeek-V2: latent c_kv plus a decoupled RoPE key
    mla_coupled_rope = "mla_coupled_rope"  # RoPE on the up-projected keys (no decoupled part)


class MlaDecode(Choice):
    """``model.mla_decode``: the cached-decode path of MLA."""

    naive = "naive"  # up-project the cached latent to K and V
    absorb = "absorb"  # fold W^UK into the query and W^UV into the output


class PosEmb(Choice):
    rope = "rope"
    learned = "learned"  # absolute position table (GPT-2)


class Ffn(Choice):
    dense = "dense"
    moe = "moe"  # DeepSeekMoE
    none = "none"  # attention-only


class Mlp(Choice):
    swiglu = "swiglu"
    gelu = "gelu"  # non-gated, tanh-approximate (GPT-2's gelu_new)


class ScoreFunc(Choice):
    """``model.score_func``: the router's affinity function."""

    softmax = "softmax"  # DeepSeek-V2
    sigmoid = "sigmoid"  # DeepSeek-V3


class GateWeights(Choice):
    """``model.gate_weights``: what multiplies a selected routed expert's output."""

    score = "score"  # the (normalised, scaled) affinity, as DeepSeek-V2/V3
    # 1 in the forward pass (MoEfication's unweighted sum: a MoEfied FFN with every expert active is the
    # dense FFN); the router still gets the score-weighted gradient (straight-through, moe.Gate.forward)
    unit = "unit"


class Norm(Choice):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"  # with bias (GPT-2)


class RopeType(Choice):
    yarn = "yarn"


ATTENTION_VARIANTS = Attention.values()
MLA_VARIANTS = (Attention.mla.value, Attention.mla_coupled_rope.value)
FFN_KINDS = Ffn.values()
POS_EMBS = PosEmb.values()
NORMS = Norm.values()
MLP_KINDS = Mlp.values()
SCORE_FUNCS = ScoreFunc.values()
GATE_WEIGHTS = GateWeights.values()
MLA_DECODE_PATHS = MlaDecode.values()


@dataclass
class RopeScaling:
    """YaRN rope scaling as DeepSeek-V2/V3 configure it (``rope_scaling`` in their config.json)."""

    type: RopeType = RopeType.yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        coerce_choices(self, "model.rope_scaling", strict=False)


@dataclass
class ModelConfig:
    """Decoder-only transformer with a selectable attention variant and dense or DeepSeekMoE FFN."""

    name: str = "mha"  # label used in tables
    attention: Attention = Attention.mha
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # MHA / GQA / MQA (one class; n_kv_heads selects the grouping; None = the variant's default)
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None  # None = d_model // n_heads
    # KV-cache quantisation (MHA family; models/kv_quant.py): 16 = off, 8 | 4 = per-token group-wise
    # asymmetric codes of K (after RoPE) and V plus an fp16 scale and zero per group of kv_quant_group channels
    kv_quant_bits: int = 16
    kv_quant_group: int = 64
    # MLA (DeepSeek-V2 notation: d_c = kv_lora_rank, d_h^R = qk_rope_head_dim)
    kv_lora_rank: int = 32
    # per-layer latent ranks (rank allocation at a fixed KV budget); None = kv_lora_rank in every layer
    kv_lora_ranks: Optional[List[int]] = None
    q_lora_rank: Optional[int] = None  # None = full-rank query projection
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    mla_decode: MlaDecode = MlaDecode.absorb  # cached-decode path: naive (up-project cache) or absorb
    # RMSNorm on the latent c_kv as DeepSeek-V2/V3 (kv_a_layernorm); False = identity, which makes an SVD
    # conversion exact at the source's K/V rank (a norm over d_c < d_model rescales every token's K and V)
    kv_norm: bool = True
    # decoupled RoPE keys per token (attention="mla"): 1 = DeepSeek's one shared k_rope; n (a divisor of n_heads) =
    # one k_rope per group of n_heads / n query heads (MHA2MLA keeps one per original KV head), cached n x d_h^R
    qk_rope_heads: int = 1
    # per-layer RoPE frequencies (attention="mla"): each layer holds a persistent buffer rope_inv_freq
    # (qk_rope_heads, qk_rope_head_dim / 2) in its state dict (conversions that keep different pairs per layer
    # and head, e.g. strategy 2norm); False = the model's one RotaryEmbedding for every layer, as before
    rope_layer_freqs: bool = False
    # positions
    rope_theta: float = 10000.0
    rope_interleave: bool = False  # True: pairs (x0,x1),(x2,x3)... as DeepSeek; False: halves, as Llama
    rope_scaling: Optional[RopeScaling] = None
    # explicit RoPE inverse frequencies (rope_dim/2 values, after any YaRN blend; YaRN's cos/sin factor
    # still applies); None = computed from rope_theta/rope_scaling. Set by mha_to_mla for kept pairs.
    rope_inv_freq: Optional[List[float]] = None
    pos_emb: PosEmb = PosEmb.rope  # rope | learned (absolute position table of max_seq_len rows, GPT-2; MHA family)
    max_seq_len: int = 256
    # FFN
    ffn: Ffn = Ffn.dense  # dense | moe | none (attention-only, as Zoology's MQAR models)
    d_ff: int = 256  # dense SwiGLU hidden size (also the first_k_dense_replace layers)
    mlp: Mlp = Mlp.swiglu  # dense FFN: swiglu | gelu (non-gated, tanh-approximate GELU as GPT-2's gelu_new)
    first_k_dense_replace: int = 0
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k routed experts per token
    moe_d_ff: int = 64  # hidden size of one fine-grained expert
    score_func: ScoreFunc = ScoreFunc.softmax  # softmax (V2) | sigmoid (V3)
    norm_topk_prob: bool = False  # V3: renormalise the selected scores
    route_scale: float = 1.0  # routed_scaling_factor
    gate_weights: GateWeights = GateWeights.score  # score (DeepSeek) | unit (forward weight 1, MoEfication)
    n_group: int = 1  # expert groups for group-limited routing (1 = unrestricted)
    topk_group: int = 1  # groups kept per token
    aux_alpha: float = 0.0  # expert-level balance loss weight (alpha_1)
    seq_aux: bool = True  # balance statistics per sequence (V2/V3) instead of per batch
    n_devices: int = 1  # expert groups (devices) for the device/communication balance losses
    device_alpha: float = 0.0  # alpha_2
    comm_alpha: float = 0.0  # alpha_3
    bias_update_speed: float = 0.0  # gamma of auxiliary-loss-free balancing (0 = off)
    capacity_factor: Optional[float] = None  # V2 token dropping in training (None = no drop, V3)
    # misc
    norm: Norm = Norm.rmsnorm  # block and final norms: rmsnorm | layernorm (with bias, GPT-2)
    rms_norm_eps: float = 1e-6  # eps of the block and final norms (RMSNorm or LayerNorm)
    bias: bool = False  # biases on every attention and dense-FFN projection (GPT-2; MHA family, no MoE)
    attn_qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2; MHA family)
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # plain strings (Python callers, records) become the members OmegaConf would have composed
        coerce_choices(self, "model", strict=False)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.attention in MLA_VARIANTS

    @property
    def kv_heads(self) -> int:
        """Number of K/V heads for the MHA family (MHA: n_heads, MQA: 1, GQA: n_kv_heads)."""
        if self.attention == Attention.mqa:
            return 1
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head (MLA: the decoupled part; MHA family: the whole head)."""
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    def layer_kv_lora_rank(self, layer_idx: int) -> int:
        """The MLA latent rank d_c of layer ``layer_idx``."""
        return self.kv_lora_rank if self.kv_lora_ranks is None else self.kv_lora_ranks[layer_idx]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.ffn == Ffn.moe and layer_idx >= self.first_k_dense_replace

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (e.g. a results.json 'config.model'), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})")
        d = dict(d)
        if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], RopeScaling):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        cfg = ModelConfig(**d)
        validate_model_config(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (choices as their strings), as records and model_config.json hold them."""
        return plain(dataclasses.asdict(self))


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"model.{key}={plain(value)!r} is invalid (allowed: {allowed})")


def validate_model_config(cfg: ModelConfig, context_len: Optional[int] = None) -> ModelConfig:
    """Raise ConfigError naming the first impossible value or combination; return cfg when valid."""
    coerce_choices(cfg, "model")  # a field assigned a plain string after construction
    if cfg.rope_scaling is not None:
        coerce_choices(cfg.rope_scaling, "model.rope_scaling")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"):
        if getattr(cfg, key) <= 0:
            raise _err(key, getattr(cfg, key), "an integer > 0")
    if cfg.head_dim is not None and cfg.head_dim <= 0:
        raise _err("head_dim", cfg.head_dim, "null or an integer > 0")
    if cfg.head_dim is None and not cfg.is_mla and cfg.d_model % cfg.n_heads:
        raise _err("n_heads", cfg.n_heads, f"a divisor of d_model={cfg.d_model}, or set head_dim")
    if cfg.attention == Attention.mha and cfg.n_kv_heads not in (None, cfg.n_heads):
        raise _err("n_kv_heads", cfg.n_kv_heads, f"null or {cfg.n_heads} for attention=mha (use gqa)")
    if cfg.attention == Attention.mqa and cfg.n_kv_heads not in (None, 1):
        raise _err("n_kv_heads", cfg.n_kv_heads, "null or 1 for attention=mqa")
    if cfg.attention == Attention.gqa:
        if cfg.n_kv_heads is None or cfg.n_kv_heads <= 0 or cfg.n_heads % cfg.n_kv_heads:
            divisors = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0]
            raise _err("n_kv_heads", cfg.n_kv_heads, f"a divisor of n_heads={cfg.n_heads}: {divisors}")
    if cfg.kv_quant_bits not in KV_QUANT_BITS:
        raise _err("kv_quant_bits", cfg.kv_quant_bits, " | ".join(map(str, KV_QUANT_BITS)) + " (16 = off)")
    if cfg.kv_quant_bits != 16:
        if cfg.is_mla:
            raise _err("kv_quant_bits", cfg.kv_quant_bits, f"16 for attention={cfg.attention!r} (quantised caches: mha | gqa | mqa)")
        d_h = cfg.attn_head_dim
        if cfg.kv_quant_group <= 0 or d_h % cfg.kv_quant_group or (cfg.kv_quant_bits == 4 and d_h % 2):
            divisors = [g for g in range(1, d_h + 1) if d_h % g == 0]
            raise _err("kv_quant_group", cfg.kv_quant_group, f"a divisor of head_dim={d_h}: {divisors} (int4: even head_dim)")
    if cfg.is_mla:
        for key, off in (("pos_emb", PosEmb.rope), ("bias", False), ("attn_qkv_bias", False)):
            if getattr(cfg, key) != off:
                raise _err(key, getattr(cfg, key), f"{plain(off)!r} for attention={plain(cfg.attention)!r} (only mha | gqa | mqa)")
    if cfg.ffn == Ffn.moe:
        for key, off in (("mlp", Mlp.swiglu), ("bias", False)):
            if getattr(cfg, key) != off:
                raise _err(key, getattr(cfg, key), f"{plain(off)!r} with ffn='moe' (experts are bias-free SwiGLU)")
    if cfg.pos_emb == PosEmb.learned:
        if cfg.rope_scaling is not None or cfg.rope_inv_freq is not None:
            key = "rope_scaling" if cfg.rope_scaling is not None else "rope_inv_freq"
            raise ConfigError(f"model.{key} is set with pos_emb='learned' (allowed: null; learned positions use no RoPE)")
    elif not cfg.is_mla and cfg.attn_head_dim % 2:
        raise _err("head_dim", cfg.attn_head_dim, "an even number (RoPE rotates pairs)")
    freqs = cfg.rope_inv_freq
    if freqs is not None and (
        len(freqs) != cfg.rope_dim // 2
        or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < float("inf") for f in freqs)
    ):
        raise _err("rope_inv_freq", freqs, f"null or a list of rope_dim/2={cfg.rope_dim // 2} finite numbers >= 0")
    if cfg.is_mla:
        if cfg.kv_lora_rank <= 0:
            raise _err("kv_lora_rank", cfg.kv_lora_rank, "an integer > 0")
        ranks = cfg.kv_lora_ranks
        if ranks is not None and (
            len(ranks) != cfg.n_layers or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks)
        ):
            raise _err("kv_lora_ranks", ranks, f"null or a list of n_layers={cfg.n_layers} integers > 0")
        if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
            raise _err("q_lora_rank", cfg.q_lora_rank, "null or an integer > 0")
        if cfg.qk_rope_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
            raise _err("qk_rope_head_dim", cfg.qk_rope_head_dim, "an even integer > 0")
        if cfg.qk_nope_head_dim < 0:
            raise _err("qk_nope_head_dim", cfg.qk_nope_head_dim, "an integer >= 0")
        if cfg.v_head_dim <= 0:
            raise _err("v_head_dim", cfg.v_head_dim, "an integer > 0")
        if isinstance(cfg.qk_rope_heads, bool) or not isinstance(cfg.qk_rope_heads, int) or cfg.qk_rope_heads <= 0 \
                or cfg.n_heads % cfg.qk_rope_heads:
            divisors = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0]
            raise _err("qk_rope_heads", cfg.qk_rope_heads, f"a divisor of n_heads={cfg.n_heads}: {divisors}")
    if cfg.attention != "mla":
        # only the decoupled layout has rope keys of its own (coupled RoPE rotates the up-projected keys)
        for key, off in (("qk_rope_heads", 1), ("rope_layer_freqs", False)):
            if getattr(cfg, key) != off:
                raise _err(key, getattr(cfg, key), f"{off!r} for attention={cfg.attention!r} (only mla)")
    if cfg.rope_theta <= 0:
        raise _err("rope_theta", cfg.rope_theta, "a number > 0")
    rs = cfg.rope_scaling
    if rs is not None:
        if rs.factor < 1.0:
            raise ConfigError(f"model.rope_scaling.factor={rs.factor!r} is invalid (allowed: >= 1)")
        if rs.original_max_position_embeddings <= 0:
            raise ConfigError(
                "model.rope_scaling.original_max_position_embeddings="
                f"{rs.original_max_position_embeddings!r} is invalid (allowed: an integer > 0)"
            )
    if context_len is not None and context_len > cfg.max_seq_len:
        raise ConfigError(
            f"model.max_seq_len={cfg.max_seq_len} is shorter than the context length {context_len} "
            "(allowed: max_seq_len >= context; for longer contexts raise max_seq_len with rope_scaling)"
        )
    if cfg.ffn == Ffn.moe:
        E = cfg.n_routed_experts
        if E <= 0:
            raise _err("n_routed_experts", E, "an integer > 0")
        if cfg.n_shared_experts < 0:
            raise _err("n_shared_experts", cfg.n_shared_experts, "an integer >= 0")
        if cfg.moe_d_ff <= 0:
            raise _err("moe_d_ff", cfg.moe_d_ff, "an integer > 0")
        if not 1 <= cfg.n_activated_experts <= E:
            raise _err("n_activated_experts", cfg.n_activated_experts, f"1..n_routed_experts={E}")
        if cfg.n_group <= 0 or E % cfg.n_group:
            divisors = [d for d in range(1, E + 1) if E % d == 0]
            raise _err("n_group", cfg.n_group, f"a divisor of n_routed_experts={E}: {divisors}")
        if not 1 <= cfg.topk_group <= cfg.n_group:
            raise _err("topk_group", cfg.topk_group, f"1..n_group={cfg.n_group}")
        if cfg.n_group > 1 and cfg.topk_group * (E // cfg.n_group) < cfg.n_activated_experts:
            raise _err(
                "topk_group",
                cfg.topk_group,
                f"enough groups to hold n_activated_experts={cfg.n_activated_experts} experts",
            )
        if cfg.n_group > 1 and cfg.score_func == ScoreFunc.sigmoid and E // cfg.n_group < 2:
            raise _err("n_group", cfg.n_group, "groups of >= 2 experts with score_func=sigmoid (top-2 group score)")
        if cfg.n_devices <= 0 or E % cfg.n_devices:
            divisors = [d for d in range(1, E + 1) if E % d == 0]
            raise _err("n_devices", cfg.n_devices, f"a divisor of n_routed_experts={E}: {divisors}")
        if cfg.first_k_dense_replace < 0:
            raise _err("first_k_dense_replace", cfg.first_k_dense_replace, "an integer >= 0")
        for key in ("aux_alpha", "device_alpha", "comm_alpha", "bias_update_speed"):
            if getattr(cfg, key) < 0:
                raise _err(key, getattr(cfg, key), "a number >= 0")
        if cfg.capacity_factor is not None and cfg.capacity_factor <= 0:
            raise _err("capacity_factor", cfg.capacity_factor, "null (no dropping) or a number > 0")
        if cfg.route_scale <= 0:
            raise _err("route_scale", cfg.route_scale, "a number > 0")
    return cfg


def tiny(**overrides: Any) -> ModelConfig:
    """The unit tests' preset (keyword overrides applied and validated); not ``scale=tiny``.

    d_model 32 is half of ``conf/scale/tiny.yaml``'s 64 (the CPU studies' scale), so that the tests stay fast.
    """
    base = dict(
        vocab_size=128,
        d_model=32,
        n_layers=2,
        n_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_seq_len=128,
        d_ff=64,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        moe_d_ff=16,
    )
    base.update(overrides)
    if isinstance(base.get("rope_scaling"), dict):
        base["rope_scaling"] = RopeScaling(**base["rope_scaling"])
    return validate_model_config(ModelConfig(**base))


__all__ = [
    "ATTENTION_VARIANTS",
    "Attention",
    "ConfigError",
    "Ffn",
    "GATE_WEIGHTS",
    "GateWeights",
    "MlaDecode",
    "Mlp",
    "Norm",
    "PosEmb",
    "RopeType",
    "ScoreFunc",
    "ModelConfig",
    "RopeScaling",
    "tiny",
    "validate_model_config",
]
