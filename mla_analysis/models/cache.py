"""KV cache for incremental decoding.

What each variant caches per layer and token is the point of MLA:
- MHA / GQA / MQA: ``k`` and ``v`` for each K/V head, (B, S, H_kv, d_h) each.
- MLA: only the normalised latent ``c_kv`` (B, S, d_c) and the shared decoupled RoPE key
  ``k_rope`` (B, S, d_h^R).
- MLA with coupled RoPE (ablation): only ``c_kv``.
Buffers are allocated once for ``max_len`` tokens; ``seq_len`` counts the tokens written so far.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig


def cache_shapes(cfg: ModelConfig, batch_size: int, max_len: int, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors layer ``layer`` caches."""
    if cfg.attention == "mla":
        return {
            "c_kv": (batch_size, max_len, cfg.layer_kv_lora_rank(layer)),
            "k_rope": (batch_size, max_len, cfg.qk_rope_head_dim),
        }
    if cfg.attention == "mla_coupled_rope":
        return {"c_kv": (batch_size, max_len, cfg.layer_kv_lora_rank(layer))}
    shape = (batch_size, max_len, cfg.kv_heads, cfg.attn_head_dim)
    return {"k": shape, "v": shape}


class KVCache:
    """Preallocated per-layer cache buffers plus the number of tokens already written."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ):
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = dtype
        self.seq_len = 0
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in cache_shapes(cfg, batch_size, max_len, i).items()}
            for i in range(cfg.n_layers)
        ]

    def write(self, layer: int, start: int, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new tokens at [start, start+T) and return views of everything cached up to there."""
        end = start + next(iter(tensors.values())).shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        buf = self.layers[layer]
        for name, t in tensors.items():
            buf[name][:, start:end] = t.to(self.dtype)
        return {name: b[:, :end] for name, b in buf.items()}

    def nbytes(self) -> int:
        """Bytes held by all cache buffers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def bytes_per_token(self) -> float:
        """Bytes of cache per token of context (per sequence), from the allocated tensors."""
        return self.nbytes() / (self.batch_size * self.max_len)

    def reset(self) -> None:
        self.seq_len = 0
