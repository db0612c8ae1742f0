"""Equal-byte baselines to MLA on the original MHA/GQA model: fewer K/V heads by merging, and a quantised cache.

``merge_kv_heads(model, n_kv_heads)``: GQA up-training's conversion (Ainslie et al. 2023, "GQA", Sec. 2.1):
the K and V projections of each group of H_kv / n_kv consecutive K/V heads are mean-pooled into one head,
and the query heads that attended to any head of the group attend to the merged head (Llama layout:
query head h reads K/V head h // (H / H_kv), so consecutive K/V heads keep their query heads in order).
RoPE is the same linear map on every head, so pooling the pre-RoPE projection pools the rotated keys too.
The cache shrinks by H_kv / n_kv; the paper heals with ~5% of the pretraining compute (convert_job).

``quantize_kv_cache(model, bits, group)``: the same weights with ``model.kv_quant_bits`` / ``kv_quant_group``
set (models/kv_quant.py: per-token group-wise int8 / int4 codes plus fp16 scales and zeros).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError, ModelConfig
from ..models.transformer import Transformer


def merged_config(cfg: ModelConfig, n_kv_heads: int, key: str = "convert.kv_heads") -> ModelConfig:
    """The config with ``n_kv_heads`` K/V heads (mha when equal to n_heads, mqa when 1, else gqa); errors name ``key``."""
    if cfg.is_mla:
        raise ConfigError(f"model.attention={cfg.attention!r} cannot merge K/V heads (allowed: mha | gqa | mqa)")
    src = cfg.kv_heads
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or src % n_kv_heads:
        divisors = [d for d in range(1, src + 1) if src % d == 0]
        raise ConfigError(f"{key}={n_kv_heads!r} is invalid (allowed: a divisor of the source's {src} K/V heads: {divisors})")
    if n_kv_heads == cfg.n_heads:
        return dataclasses.replace(cfg, attention="mha", n_kv_heads=None)
    if n_kv_heads == 1:
        return dataclasses.replace(cfg, attention="mqa", n_kv_heads=None, name=f"{cfg.name}-kv1")
    return dataclasses.replace(cfg, attention="gqa", n_kv_heads=n_kv_heads, name=f"{cfg.name}-kv{n_kv_heads}")


def mean_pool_heads(w: torch.Tensor, n_src: int, n_dst: int) -> torch.Tensor:
    """Rows of ``n_src`` heads [n_src * d_h, ...] -> [n_dst * d_h, ...], each the mean of n_src / n_dst consecutive heads."""
    grouped = w.reshape(n_dst, n_src // n_dst, -1, *w.shape[1:])  # (n_dst, r, d_h, ...)
    return grouped.mean(1).reshape(-1, *w.shape[1:])  # (n_dst * d_h, ...)


@torch.no_grad()
def merge_kv_heads(model: Transformer, n_kv_heads: int, key: str = "convert.kv_heads") -> Transformer:
    """A copy of an MHA/GQA model whose K/V heads are mean-pooled into ``n_kv_heads`` (GQA up-training's init)."""
    cfg = merged_config(model.cfg, n_kv_heads, key)
    src = model.cfg.kv_heads
    state = model.state_dict()
    for i in range(cfg.n_layers):
        for proj in ("wk", "wv"):
            for kind in ("weight", "bias"):
                key = f"layers.{i}.attn.{proj}.{kind}"
                if key in state:
                    state[key] = mean_pool_heads(state[key], src, n_kv_heads)  # (n_kv * d_h, D) or (n_kv * d_h,)
    new = Transformer(cfg).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    new.load_state_dict(state)
    return new.eval()


@torch.no_grad()
def quantize_kv_cache(model: Transformer, bits: int, group: int) -> Transformer:
    """A copy of an MHA/GQA model (same weights) whose K/V are cached as ``bits``-bit codes per ``group`` channels."""
    cfg = dataclasses.replace(model.cfg, kv_quant_bits=bits, kv_quant_group=group)
    new = Transformer(cfg).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)  # validates cfg
    new.load_state_dict(model.state_dict())
    return new.eval()


__all__ = ["mean_pool_heads", "merge_kv_heads", "merged_config", "quantize_kv_cache"]
