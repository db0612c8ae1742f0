"""Closed-form accounting: KV-cache bytes per token, parameter counts and forward FLOPs per token.

Conventions: one multiply-add = 2 FLOPs; embeddings (token and learned position) are lookups
(0 FLOPs); norms (RMSNorm/LayerNorm), bias additions, activations, RoPE, softmax and the router's
top-k are ignored (O(d) per token, negligible against the matmuls).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import ModelConfig

_DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
    "fp8": 1, "float8": 1, "int8": 1, "int4": 0.5,
}


def dtype_bytes(dtype: Union[str, torch.dtype, float, int]) -> float:
    """Bytes per element for a torch dtype, a name like 'bf16', or a number of bits given as float."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, (int, float)):
        return float(dtype) / 8.0
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is unknown (allowed: {', '.join(_DTYPE_BYTES)} or bits as a number)")
    return _DTYPE_BYTES[key]


def kv_elements_per_token_layer(cfg: ModelConfig, layer: int = 0) -> int:
    """Cached elements per token in layer ``layer`` (DeepSeek-V2 Table 1 forms)."""
    if cfg.attention == "mla":
        return cfg.layer_kv_lora_rank(layer) + cfg.qk_rope_head_dim  # d_c + d_h^R
    if cfg.attention == "mla_coupled_rope":
        return cfg.layer_kv_lora_rank(layer)
    return 2 * cfg.kv_heads * cfg.attn_head_dim  # 2 n_g d_h (MHA: n_g = n_h, MQA: n_g = 1)


def kv_bytes_per_token_layer(cfg: ModelConfig, layer: int = 0, dtype: Union[str, torch.dtype, float] = "bf16") -> float:
    """Cache bytes per token in one layer: elements x dtype, or (kv_quant_bits 8 / 4) codes + fp16 scales + zeros."""
    if cfg.kv_quant_bits == 16 or cfg.is_mla:
        return kv_elements_per_token_layer(cfg, layer) * dtype_bytes(dtype)
    d_h, groups = cfg.attn_head_dim, cfg.attn_head_dim // cfg.kv_quant_group
    per_head = d_h * cfg.kv_quant_bits / 8 + groups * 2 * 2  # codes + one fp16 scale and one fp16 zero per group
    return 2 * cfg.kv_heads * per_head  # K and V of each K/V head; the cache dtype does not apply


def kv_bytes_per_token(cfg: ModelConfig, dtype: Union[str, torch.dtype, float] = "bf16") -> float:
    """Exact KV-cache bytes per token of context over all layers, for one sequence."""
    return sum(kv_bytes_per_token_layer(cfg, i, dtype) for i in range(cfg.n_layers))


def _attention_params(cfg: ModelConfig, layer: int = 0) -> int:
    D, H = cfg.d_model, cfg.n_heads
    if not cfg.is_mla:
        hd, hkv = cfg.attn_head_dim, cfg.kv_heads
        return D * H * hd + 2 * D * hkv * hd + H * hd * D
    qk = cfg.qk_head_dim
    if cfg.q_lora_rank is None:
        q = D * H * qk
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    r = cfg.layer_kv_lora_rank(layer)
    norm = r if cfg.kv_norm else 0  # the latent RMSNorm's weight
    if cfg.attention == "mla":
        kv = D * (r + cfg.qk_rope_head_dim) + norm + r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    else:  # coupled RoPE: no separate rope key, full key from the latent
        kv = D * r + norm + r * H * (qk + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * D


def _ffn_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    D = cfg.d_model
    if cfg.ffn == "none":
        return 0
    if not cfg.is_moe_layer(layer):
        return (2 if cfg.mlp == "gelu" else 3) * D * cfg.d_ff  # GELU MLP: no gate matrix
    n_routed = cfg.n_activated_experts if active else cfg.n_routed_experts
    return cfg.n_routed_experts * D + 3 * D * cfg.moe_d_ff * (n_routed + cfg.n_shared_experts)


def count_params(cfg: ModelConfig, active: bool = False, embeddings: bool = True) -> int:
    """Parameters of the model (``active``: only the top-k routed experts of each MoE layer count)."""
    D, V = cfg.d_model, cfg.vocab_size
    n = _norm_size(cfg)  # final norm
    norms_per_layer = _norm_size(cfg) * (1 if cfg.ffn == "none" else 2)
    for layer in range(cfg.n_layers):
        n += norms_per_layer + _attention_params(cfg, layer) + _ffn_params(cfg, layer, active)
    n += _bias_params(cfg)
    if embeddings:
        n += V * D + (0 if cfg.tie_embeddings else V * D)
        n += cfg.max_seq_len * D if cfg.pos_emb == "learned" else 0  # learned position table
    else:
        n += V * D  # the output head is a matmul even when embeddings are excluded
    return n


def _matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies with in a forward pass (active experts only, head included)."""
    norms = _norm_size(cfg) * ((1 if cfg.ffn == "none" else 2) * cfg.n_layers + 1)
    return count_params(cfg, active=True, embeddings=False) - norms - _norm_vectors(cfg) - _bias_params(cfg)


def _norm_size(cfg: ModelConfig) -> int:
    """Parameters of one block/final norm (LayerNorm adds a bias to the weight)."""
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def _bias_params(cfg: ModelConfig) -> int:
    """Bias elements of the attention and dense-FFN projections (additions, not matmuls)."""
    if cfg.is_mla:
        return 0
    H, H_kv, d_h, D = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.d_model
    per_layer = (H + 2 * H_kv) * d_h if (cfg.bias or cfg.attn_qkv_bias) else 0  # q, k, v
    if cfg.bias:
        per_layer += D  # output projection
        if cfg.ffn == "dense":
            per_layer += (1 if cfg.mlp == "gelu" else 2) * cfg.d_ff + D
    return per_layer * cfg.n_layers


def _norm_vectors(cfg: ModelConfig) -> int:
    """Latent RMSNorm weights inside the attention (not matmuls)."""
    if not cfg.is_mla:
        return 0
    kv = sum(cfg.layer_kv_lora_rank(i) for i in range(cfg.n_layers)) if cfg.kv_norm else 0
    return kv + (cfg.q_lora_rank or 0) * cfg.n_layers


def _attn_dims(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.is_mla:
        return cfg.qk_head_dim, cfg.v_head_dim
    return cfg.attn_head_dim, cfg.attn_head_dim


def flops_per_token(cfg: ModelConfig, context_len: int) -> float:
    """Forward FLOPs for one token attending to ``context_len`` tokens (training / prefill form)."""
    d_qk, d_v = _attn_dims(cfg)
    attn = 2 * cfg.n_heads * (d_qk + d_v) * context_len * cfg.n_layers
    return 2.0 * _matmul_params_per_token(cfg) + attn


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token averaged over a causal sequence of length seq_len (mean context (T+1)/2)."""
    return flops_per_token(cfg, context_len=(seq_len + 1) / 2)


def decode_flops_per_token(cfg: ModelConfig, context_len: int, path: Optional[str] = None) -> float:
    """FLOPs to decode one token with ``context_len`` cached tokens, for the given MLA path.

    naive: the cached latent is up-projected to per-head K/V at every step (2 d_c H (d_nope + d_v) S);
    absorb: W^UK / W^UV are applied to the query / output instead, and attention runs over the
    latent (2 H (d_c + d_rope) S for scores, 2 H d_c S for the weighted sum).
    """
    path = path or (cfg.mla_decode if cfg.attention == "mla" else "naive")
    H, L, S = cfg.n_heads, cfg.n_layers, context_len
    base = 2.0 * _matmul_params_per_token(cfg)
    if not cfg.is_mla:
        d_qk, d_v = _attn_dims(cfg)
        return base + 2 * H * (d_qk + d_v) * S * L
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    k_up = nope if cfg.attention == "mla" else nope + rope
    total = base
    for layer in range(L):
        r = cfg.layer_kv_lora_rank(layer)
        total -= 2 * r * H * (k_up + v)  # wkv_b on the new token, already in ``base``
        if path == "naive" or cfg.attention == "mla_coupled_rope":
            up = 2 * r * H * (k_up + v) * S  # re-project every cached token
            total += up + 2 * H * (nope + rope + v) * S
        else:
            absorb = 2 * H * nope * r + 2 * H * r * v  # q_nope W^UK and o_lat W^UV for the new token
            total += absorb + 2 * H * (r + rope) * S + 2 * H * r * S
    return total
