"""Multi-head attention with grouped K/V heads: MHA (n_kv_heads = n_heads), GQA, MQA (n_kv_heads = 1).

One class, one knob (``cfg.kv_heads``), as in litgpt. RoPE rotates the whole head (Llama style);
with learned absolute positions (``cfg.pos_emb == "learned"``, GPT-2) there is no rotation.
Biases: ``cfg.attn_qkv_bias`` on q/k/v (Qwen2), ``cfg.bias`` on q/k/v and the output (GPT-2).
``cfg.kv_quant_bits`` 8 / 4: K (after RoPE) and V are quantised per token, per head and per group of
``cfg.kv_quant_group`` channels (models/kv_quant.py); the cache stores the codes, and a forward without
a cache quantise-dequantises the same way, so perplexity and cached decoding see the same K and V.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .kv_quant import dequantize, fake_quant, quantize
from .rope import RotaryEmbedding, softmax_scale


def causal_mask(t_q: int, t_k: int, start: int, device: torch.device) -> Optional[torch.Tensor]:
    """Boolean mask [t_q, t_k] letting query start+i see keys 0..start+i; None when no mask is needed."""
    if t_q == 1:
        return None  # one new token sees the whole cache
    q_pos = torch.arange(start, start + t_q, device=device)
    k_pos = torch.arange(t_k, device=device)
    return k_pos[None, :] <= q_pos[:, None]  # (t_q, t_k)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int
) -> torch.Tensor:
    """SDPA over q (B, H, T, d), k (B, H_kv, S, d), v (B, H_kv, S, d_v), causal from position ``start``."""
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    d_v = v.shape[-1]
    if q.device.type == "cpu" and d_v < q.shape[-1] and torch.backends.cuda.flash_sdp_enabled():
        # the fused (flash) CPU kernel needs equal q/k and v widths; zero-padded values leave the output
        # unchanged (the flag also governs the CPU kernel; without it padding would only add work)
        v = F.pad(v, (0, q.shape[-1] - d_v))
        return attend(q, k, v, scale, start)[..., :d_v]
    if start == 0 and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_mask(t_q, t_k, start, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """MHA / GQA / MQA with RoPE (or none); caches K and V per K/V head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.attn_head_dim
        self.scale = softmax_scale(cfg)
        self.kv_quant_bits, self.kv_quant_group = cfg.kv_quant_bits, cfg.kv_quant_group
        qkv_bias = cfg.bias or cfg.attn_qkv_bias
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[RotaryEmbedding],
        cos: Optional[torch.Tensor],
        sin: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; rope None = no rotation (learned absolute positions)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, d_h)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        if rope is not None:
            q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        if self.kv_quant_bits != 16:
            k, v = self.quantized_kv(k, v, cache, start)  # (B, S, H_kv, d_h) each, dequantised
        elif cache is not None:
            kv = cache.write(self.layer_idx, start, k=k, v=v)
            k, v = kv["k"].to(q.dtype), kv["v"].to(q.dtype)  # (B, S, H_kv, d_h)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, start)  # (B, H, T, d_h)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def quantized_kv(
        self, k: torch.Tensor, v: torch.Tensor, cache: Optional[KVCache], start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, T, H_kv, d_h] -> the dequantised K, V the attention sees (the whole cache when given)."""
        bits, group = self.kv_quant_bits, self.kv_quant_group
        if cache is None:
            return fake_quant(k, bits, group), fake_quant(v, bits, group)
        new = {f"{name}_{part}": t for name, x in (("k", k), ("v", v)) for part, t in quantize(x, bits, group).items()}
        kv = cache.write(self.layer_idx, start, **new)  # (B, S, H_kv, *) codes / scales / zeros
        return tuple(dequantize(kv[f"{n}_codes"], kv[f"{n}_scale"], kv[f"{n}_zero"], bits, k.dtype) for n in "kv")
