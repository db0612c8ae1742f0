"""KV cache for incremental decoding.

What each variant caches per layer and token is the point of MLA:
- MHA / GQA / MQA: ``k`` and ``v`` for each K/V head, (B, S, H_kv, d_h) each; with
  ``cfg.kv_quant_bits`` 8 or 4 instead their uint8 codes ``k_codes`` / ``v_codes`` (B, S, H_kv, d_h*bits/8)
  and fp16 ``*_scale`` / ``*_zero`` (B, S, H_kv, d_h/kv_quant_group) (models/kv_quant.py; the cache
  dtype does not apply to them).
- MLA: only the normalised latent ``c_kv`` (B, S, d_c) and the shared decoupled RoPE key
  ``k_rope`` (B, S, d_h^R), stored side by side in one (B, S, d_c + d_h^R) buffer per layer.
- MLA with coupled RoPE (ablation): only ``c_kv``.
Buffers are allocated once for ``max_len`` tokens; ``seq_len`` counts the tokens written so far.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig
from .kv_quant import SCALE_DTYPE, code_width


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
    if cfg.kv_quant_bits != 16:
        codes = shape[:-1] + (code_width(cfg.attn_head_dim, cfg.kv_quant_bits),)
        groups = shape[:-1] + (cfg.attn_head_dim // cfg.kv_quant_group,)
        return {f"{t}_{part}": codes if part == "codes" else groups for t in "kv" for part in ("codes", "scale", "zero")}
    return {"k": shape, "v": shape}


def buffer_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache tensor is stored in: uint8 codes, fp16 scales / zeros, else the cache dtype."""
    if name.endswith("_codes"):
        return torch.uint8
    if name.endswith(("_scale", "_zero")):
        return SCALE_DTYPE
    return dtype


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
        self.layers: list[dict[str, torch.Tensor]] = []
        # MLA: one buffer per layer holds [c_kv | k_rope] side by side (the named tensors are views of it),
        # so absorbed decoding reads the whole cache as one (B, S, d_c + d_rope) key matrix
        self.joint: list[Optional[torch.Tensor]] = []
        for i in range(cfg.n_layers):
            shapes = cache_shapes(cfg, batch_size, max_len, i)
            if cfg.attention == "mla":
                joint = torch.zeros(batch_size, max_len, sum(sh[-1] for sh in shapes.values()), dtype=dtype, device=device)
                views, offset = {}, 0
                for name, shape in shapes.items():  # narrow, not split: written in place, also under autograd
                    views[name] = joint.narrow(-1, offset, shape[-1])  # (B, max_len, d)
                    offset += shape[-1]
                self.layers.append(views)
                self.joint.append(joint)
            else:
                self.layers.append({name: torch.zeros(shape, dtype=buffer_dtype(name, dtype), device=device)
                                    for name, shape in shapes.items()})
                self.joint.append(None)

    def write(self, layer: int, start: int, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new tokens at [start, start+T) and return views of everything cached up to there."""
        end = start + next(iter(tensors.values())).shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        buf = self.layers[layer]
        for name, t in tensors.items():
            buf[name][:, start:end] = t.to(buf[name].dtype)
        return {name: b[:, :end] for name, b in buf.items()}

    def joint_view(self, layer: int, end: int) -> torch.Tensor:
        """MLA: the cached [c_kv | k_rope] of positions [0, end) as one (B, end, d_c + d_rope) view."""
        joint = self.joint[layer]
        if joint is None:
            raise ValueError(f"layer {layer} of a {self.cfg.attention!r} cache has no joint [c_kv | k_rope] buffer")
        return joint[:, :end]

    def nbytes(self) -> int:
        """Bytes held by all cache buffers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def bytes_per_token(self) -> float:
        """Bytes of cache per token of context (per sequence), from the allocated tensors."""
        return self.nbytes() / (self.batch_size * self.max_len)

    def reset(self) -> None:
        self.seq_len = 0
