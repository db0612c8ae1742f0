"""Per-token group-wise asymmetric KV-cache quantisation (int8 / int4), the equal-byte baseline to MLA.

Each token's K (after RoPE, as transformers' quantized caches store it) and V of each K/V head are cut
into groups of ``group`` consecutive channels along head_dim; a group x gets

    zero = min(x), scale = (max(x) - min(x)) / (2^bits - 1)      (both stored in fp16)
    code = clamp(round((x - zero) / scale), 0, 2^bits - 1)        (uint8; int4: two codes per byte)
    x_hat = code * scale + zero

i.e. min-max affine quantisation, the rule of optimum-quanto's ``MaxOptimizer`` (float shift = -min) and
of KIVI's per-token V; here K is per-token too (KIVI quantises K per channel, which needs a residual of
full-precision tokens). Codes are computed from the fp16-rounded scale and zero, so the dequantised value
depends only on what the cache stores: a full forward that quantise-dequantises (``fake_quant``) and a
cached decode that dequantises what it stored give the same K and V.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16


def code_width(head_dim: int, bits: int) -> int:
    """Bytes of codes per token per head: head_dim (int8) or head_dim / 2 (int4, packed two per byte)."""
    return head_dim * bits // 8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15 [..., d] -> [..., d/2] bytes: channel 2i in the low nibble, 2i+1 in the high."""
    pairs = codes.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)  # (..., d/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [..., d/2] bytes -> [..., d] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)  # (..., d/2, 2) -> (..., d)


def quantize(x: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """x [..., d] -> codes [..., d*bits/8] uint8, scale and zero [..., d/group] fp16 (min-max per group)."""
    xg = x.float().unflatten(-1, (-1, group))  # (..., d/g, g)
    lo, hi = xg.amin(-1), xg.amax(-1)  # (..., d/g)
    scale = ((hi - lo) / (2**bits - 1)).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    # codes from the stored (fp16) scale and zero; a constant group (scale 0) gets code 0 = its value
    s = scale.float().unsqueeze(-1)  # (..., d/g, 1)
    q = torch.where(s > 0, (xg - zero.float().unsqueeze(-1)) / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = q.round().clamp(0, 2**bits - 1).to(torch.uint8).flatten(-2)  # (..., d)
    if bits == 4:
        codes = pack_int4(codes)  # (..., d/2)
    return {"codes": codes, "scale": scale, "zero": zero}


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., d*bits/8], scale / zero [..., d/g] -> x_hat [..., d] in ``dtype`` (code * scale + zero)."""
    if bits == 4:
        codes = unpack_int4(codes)  # (..., d)
    cg = codes.unflatten(-1, (scale.shape[-1], -1)).to(dtype)  # (..., d/g, g)
    return (cg * scale.to(dtype).unsqueeze(-1) + zero.to(dtype).unsqueeze(-1)).flatten(-2)  # (..., d)


def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """quantize then dequantize, in x's dtype: what a quantised cache hands back for x."""
    q = quantize(x, bits, group)
    x_hat = dequantize(q["codes"], q["scale"], q["zero"], bits, x.dtype)
    if x.requires_grad:  # straight-through gradient for training (rounding has none); no-grad stays exact
        return x + (x_hat - x).detach()
    return x_hat


__all__ = ["SCALE_DTYPE", "code_width", "dequantize", "fake_quant", "pack_int4", "quantize", "unpack_int4"]
