"""Rotary position embedding (RoPE) with YaRN scaling as DeepSeek-V2/V3 configure it.

Two layouts of the rotated dimensions exist and checkpoints depend on which one was used:
- interleaved (``interleave=True``): pairs (x0, x1), (x2, x3), ... share one frequency. DeepSeek's own
  inference code and its checkpoints use this (complex multiplication on adjacent pairs).
- halves (``interleave=False``): x_i pairs with x_{i + d/2} (``rotate_half``), as Llama / GPT-NeoX.

YaRN follows ``transformers``' ``_compute_yarn_parameters``: frequencies are blended between
interpolation and extrapolation with a linear ramp over [beta_fast, beta_slow] rotations, and cos/sin
are multiplied by ``attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim)``; the
softmax scale gets ``mscale(factor, mscale_all_dim) ** 2`` (see ``softmax_scale``). DeepSeek's
reference code applies YaRN only once the sequence exceeds the original length; like transformers we
apply it whenever it is configured.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig, RopeScaling


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature factor 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """Softmax scale of the attention logits: 1/sqrt(qk head dim), times YaRN mscale^2 when scaled."""
    head_dim = cfg.qk_head_dim if cfg.is_mla else cfg.attn_head_dim
    scale = head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_frequencies(dim: int, theta: float, scaling: Optional[RopeScaling]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin attention factor (YaRN when scaling is set)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = theta**exponents
    inv_freq = 1.0 / pos_freqs
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(n_rot: float) -> float:
        orig = scaling.original_max_position_embeddings
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original (high-frequency) rotation
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions; ``rotate`` rotates a [B, T, H, d] tensor.

    ``inv_freq`` (dim/2 values) replaces the frequencies computed from theta/scaling, e.g. the kept
    pairs of an MHA -> MLA conversion; the YaRN attention factor of ``scaling`` still applies.
    """

    def __init__(
        self,
        dim: int,
        theta: float,
        scaling: Optional[RopeScaling],
        interleave: bool,
        inv_freq: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        computed, attention_factor = rope_frequencies(dim, theta, scaling)
        if inv_freq is not None:
            if len(inv_freq) != dim // 2:
                raise ValueError(f"inv_freq has {len(inv_freq)} values, RoPE over {dim} dims needs {dim // 2}")
            computed = torch.tensor(list(inv_freq), dtype=torch.float32)
        self.register_buffer("inv_freq", computed, persistent=False)
        self.attention_factor = attention_factor
        self.interleave = interleave
        self.dim = dim

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RotaryEmbedding":
        """The model's RoPE: frequencies from ``cfg.rope_inv_freq`` when set, else theta/scaling."""
        return cls(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave, cfg.rope_inv_freq)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, dim/2] for integer positions [T]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, d/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, H, d] by cos/sin [T, d/2] or [T, H, d/2] (computed in fp32, returned in x's dtype)."""
        return apply_rope(x, cos, sin, self.interleave)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [B, T, H, d] with cos/sin [T, d/2] (or per head [T, H, d/2]) in the given layout."""
    dtype = x.dtype
    xf = x.float()
    # per-head frequencies (MLA's per-layer rope_inv_freq) come as (T, H, d/2); one set for all heads as (T, d/2)
    cos = cos[None] if cos.dim() == 3 else cos[None, :, None, :]  # (1, T, H or 1, d/2)
    sin = sin[None] if sin.dim() == 3 else sin[None, :, None, :]
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, T, H, d/2) each
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, H, d/2, 2)
        return out.flatten(-2).to(dtype)  # (B, T, H, d), pairs stay adjacent
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]  # (B, T, H, d/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)  # (B, T, H, d)
