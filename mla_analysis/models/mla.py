"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, as in DeepSeek-V3's inference/model.py).

Per token t with hidden h_t (names as in the paper / reference code):
    c_kv  = RMSNorm(W^DKV h_t)                        latent, d_c = kv_lora_rank      (wkv_a, kv_norm)
    k_rope = RoPE(W^KR h_t)                           one key shared by all heads, d_h^R  (wkv_a)
    [k_nope; v] per head = W^UK c_kv, W^UV c_kv       (wkv_b)
    q = W^Q h_t  or  W^UQ RMSNorm(W^DQ h_t)           (wq | wq_a, q_norm, wq_b), split q_nope / q_rope
Only c_kv and k_rope are cached: (d_c + d_h^R) elements per layer and token. ``kv_norm=False`` replaces the
latent RMSNorm by the identity (not DeepSeek's layout; makes SVD conversions exact at the source's K/V rank).
``qk_rope_heads = n > 1`` (MHA2MLA's layout for converted GQA models): n RoPE keys per token, query head h uses
key h // (n_heads / n); cached (d_c + n d_h^R). ``rope_layer_freqs``: the layer's own RoPE frequencies per rope
head, a persistent buffer ``rope_inv_freq`` (n, d_h^R / 2) (conversions keeping different pairs per layer / head).

Decoding paths with a cache:
- ``naive``: up-project the whole cached latent to per-head keys/values every step.
- ``absorb``: fold W^UK into the query (q_nope W^UK -> latent query) and W^UV into the output, so
  attention runs in the latent space: an MQA with one K/V "head" of width d_c + d_h^R (values d_c),
  computed with the heads folded into the query rows so the latent is read once, not once per head.
  The cache keeps [c_kv | k_rope] in one buffer, which is both key and value of one SDPA call. With n rope
  keys the buffer is [c_kv | k_rope_0 | ... | k_rope_{n-1}] and head h's rope query sits in slot h // (H / n)
  of a query row zero elsewhere, so it is still one MQA over the buffer.

``MLACoupledRoPE`` is the ablation without decoupled RoPE: RoPE is applied to the last
qk_rope_head_dim dims of each head's up-projected key, so W^UK cannot be absorbed (the rotation sits
between the latent and the key); only c_kv is cached and every step re-projects and re-rotates it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import attend, causal_mask
from .cache import KVCache
from .norm import RMSNorm
from .rope import RotaryEmbedding, softmax_scale


def head_groups(n_heads: int, batch: int, threads: int) -> int:
    """Smallest divisor G of ``n_heads`` with batch * G >= threads (G query-head groups per latent read)."""
    return next(g for g in range(1, n_heads + 1) if n_heads % g == 0 and (batch * g >= threads or g == n_heads))


def latent_decode_gemm(q: torch.Tensor, kv: torch.Tensor, d_c: int, scale: float) -> torch.Tensor:
    """softmax(q kv^T * scale) kv[..., :d_c] as two GEMMs: q (B, 1, H, d_c + d_rope), kv (B, 1, S, d_c + d_rope).

    For one decode step on CUDA: PyTorch's flash kernels take heads of at most 256 dims (MLA's are 576), so SDPA
    falls back to slower kernels, while cuBLAS splits the long S dimension across the GPU. The scores (B, 1, H, S)
    are small for a single query token. H100 timings before and after: BENCHMARKS.md, cuda notes.
    """
    scores = torch.matmul(q, kv.transpose(-1, -2)).float() * scale  # (B, 1, H, S)
    p = scores.softmax(dim=-1).to(kv.dtype)  # (B, 1, H, S)
    return torch.matmul(p, kv[..., :d_c])  # (B, 1, H, d_c)


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE and naive/absorbed cached decoding."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.layer_kv_lora_rank(layer_idx)
        self.q_lora_rank = cfg.q_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.decode = cfg.mla_decode
        self.scale = softmax_scale(cfg)
        self.qk_rope_heads = cfg.qk_rope_heads if cfg.attention == "mla" else 1
        self.rope_group = cfg.n_heads // self.qk_rope_heads  # query heads per rope key
        if cfg.rope_layer_freqs:
            # starts as the model's frequencies; a conversion overwrites it; saved with the state dict
            inv_freq = RotaryEmbedding.from_config(cfg).inv_freq  # (d_rope/2,)
            self.register_buffer("rope_inv_freq", inv_freq.repeat(self.qk_rope_heads, 1))  # (n_rope, d_rope/2)
        else:
            self.rope_inv_freq = None
        H, D = cfg.n_heads, cfg.d_model
        if self.q_lora_rank is None:
            self.wq = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self._kv_a_rope_dim(), bias=False)
        # cfg.kv_norm=False: no latent norm (exact conversions); probes call kv_norm either way
        self.kv_norm = RMSNorm(self.kv_lora_rank) if cfg.kv_norm else nn.Identity()
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self._k_up_dim() + self.v_head_dim), bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, D, bias=False)

    # the coupled-RoPE ablation changes only these two widths
    def _kv_a_rope_dim(self) -> int:
        return self.qk_rope_heads * self.qk_rope_head_dim

    def _k_up_dim(self) -> int:
        return self.qk_nope_head_dim

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head queries (B, T, H, qk_head_dim), before RoPE."""
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        return q.view(B, T, self.n_heads, self.qk_head_dim)  # (B, T, H, d_nope + d_rope)

    def rope_cos_sin(
        self, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, n_rope, d_rope/2) of this layer's rope keys: its own frequencies, or the model's (T, 1, d/2)."""
        if self.rope_inv_freq is None:
            return cos[:, None], sin[:, None]  # (T, 1, d_rope/2)
        pos = torch.arange(start, start + cos.shape[0], device=cos.device, dtype=torch.float32)
        freqs = pos[:, None, None] * self.rope_inv_freq.float()[None]  # (T, n_rope, d_rope/2)
        # YaRN's cos/sin factor applies to every rotated dim as in RotaryEmbedding.forward
        return freqs.cos() * rope.attention_factor, freqs.sin() * rope.attention_factor

    def rotate_q_k(
        self, rope: RotaryEmbedding, q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q_rope (B, T, H, d_rope) and the flat k_rope (B, T, n_rope * d_rope); k_rope returned flat."""
        B, T, _ = k_rope.shape
        cos_k, sin_k = self.rope_cos_sin(rope, cos, sin, start)  # (T, n_rope or 1, d_rope/2)
        k_rope = rope.rotate(k_rope.view(B, T, self.qk_rope_heads, self.qk_rope_head_dim), cos_k, sin_k)
        if cos_k.shape[1] > 1:  # query head h rotates with rope key h // group
            cos_k, sin_k = cos_k.repeat_interleave(self.rope_group, 1), sin_k.repeat_interleave(self.rope_group, 1)
        q_rope = rope.rotate(q_rope, cos_k, sin_k)  # (B, T, H, d_rope)
        return q_rope, k_rope.flatten(2)  # (B, T, H, d_rope), (B, T, n_rope * d_rope)

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Up-projection weights split per head: W^UK (H, d_k_up, d_c) and W^UV (H, d_v, d_c)."""
        w = self.wkv_b.weight.view(self.n_heads, self._k_up_dim() + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self._k_up_dim()], w[:, self._k_up_dim() :]  # (H, d_k_up, d_c), (H, d_v, d_c)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[KVCache] = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self._kv_a_rope_dim()], dim=-1)
        c_kv = self.kv_norm(c_kv)  # (B, T, d_c)
        q_rope, k_rope = self.rotate_q_k(rope, q_rope, k_rope, cos, sin, start)  # (B, T, H, d_rope), (B, T, n*d_rope)
        if cache is not None:
            kv = cache.write(self.layer_idx, start, c_kv=c_kv, k_rope=k_rope)
            if self.decode == "absorb":
                return self._absorbed(q_nope, q_rope, cache.joint_view(self.layer_idx, start + T), start)
            c_kv, k_rope = kv["c_kv"].to(x.dtype), kv["k_rope"].to(x.dtype)  # (B, S, d_c), (B, S, n * d_rope)
        return self._naive(q_nope, q_rope, c_kv, k_rope, start)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, start: int) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)  # (B, S, H, d_nope + d_v)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope.view(B, S, self.qk_rope_heads, 1, self.qk_rope_head_dim)  # (B, S, n_rope, 1, d_rope)
        k_rope = k_rope.expand(B, S, self.qk_rope_heads, self.rope_group, self.qk_rope_head_dim).reshape(B, S, H, -1)
        k = torch.cat((k_nope, k_rope), dim=-1)  # (B, S, H, d_qk): head h sees rope key h // group
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, d_qk)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, start)  # (B, H, T, d_v)
        return self.wo(o.transpose(1, 2).reshape(B, T, H * self.v_head_dim))  # (B, T, D)

    def _absorbed(self, q_nope, q_rope, latent, start: int) -> torch.Tensor:
        """Attention in the latent space over ``latent`` = the cached [c_kv | k_rope] (B, S, d_c + n_rope d_rope)."""
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        w_uk, w_uv = self.w_uk_uv()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, d_c): W^UK absorbed into q
        if self.qk_rope_heads > 1:
            # head h's rope query in slot h // group of n_rope slots, zeros elsewhere: q_rope . k_rope_{h // group}
            slot = F.one_hot(torch.arange(H, device=q_rope.device) // self.rope_group, self.qk_rope_heads)  # (H, n)
            q_rope = torch.einsum("bthd,hn->bthnd", q_rope, slot.to(q_rope.dtype)).flatten(3)  # (B, T, H, n*d_rope)
        # q_lat . c_kv + q_rope . k_rope = [q_lat | q_rope] . [c_kv | k_rope]: one MQA whose single K/V
        # "head" is the cache buffer. The heads are folded into query rows, so the cache is read once per
        # group of heads (one query row per head would stream the cache once per head).
        # On CPU, SDPA runs one task per (batch row, group): a small batch uses G > 1 groups to keep every thread
        # busy. On CUDA one group: the GPU parallelises within it, and G > 1 would make SDPA expand the cache.
        cuda = q_lat.is_cuda
        G = 1 if cuda else head_groups(H, B, torch.get_num_threads())
        q = torch.cat((q_lat, q_rope), dim=-1).view(B, T, G, H // G, -1)  # (B, T, G, H/G, d_c + n*d_rope)
        q = q.transpose(1, 2).reshape(B, G, T * H // G, -1)  # (B, G, T*H/G, d_c + n*d_rope), row t*H/G + h
        kv = latent.unsqueeze(1)  # (B, 1, S, d_c + n*d_rope), shared by the G groups
        # a cache in a lower precision (e.g. bf16) is read as is: attention runs in its dtype, not on an fp32 copy
        if cuda and T == 1:
            o = latent_decode_gemm(q.to(kv.dtype), kv, self.kv_lora_rank, self.scale)  # (B, 1, H, d_c)
        else:
            mask = causal_mask(T, S, start, q.device)
            if mask is not None:
                mask = mask.repeat_interleave(H // G, dim=0)  # (T*H/G, S): row t*H/G + h sees keys 0..start+t
            # The value is c_kv, the first d_c columns of the same buffer. The fused (flash) kernel needs equal
            # key and value widths, so there the whole buffer is the value and the d_rope extra output columns
            # are dropped: 2*H*d_rope*S extra FLOPs instead of a second pass over the cache (as ``attend`` pads v).
            v = kv if torch.backends.cuda.flash_sdp_enabled() else kv[..., : self.kv_lora_rank]
            o = F.scaled_dot_product_attention(q.to(kv.dtype), kv, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=G > 1)
        o_lat = o[..., : self.kv_lora_rank].to(q.dtype).view(B, G, T, H // G, self.kv_lora_rank)  # (B, G, T, H/G, d_c)
        o_lat = o_lat.transpose(1, 2).reshape(B, T, H, self.kv_lora_rank)  # (B, T, H, d_c)
        o = torch.einsum("bthc,hdc->bthd", o_lat, w_uv)  # (B, T, H, d_v): W^UV applied after attention
        return self.wo(o.reshape(B, T, H * self.v_head_dim))  # (B, T, D)


class MLACoupledRoPE(MLA):
    """MLA ablation without decoupled RoPE: RoPE on up-projected keys, so no absorption is possible."""

    def _kv_a_rope_dim(self) -> int:
        return 0

    def _k_up_dim(self) -> int:
        return self.qk_head_dim

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[KVCache] = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.query(x)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, rope.rotate(q_rope, cos, sin)), dim=-1)  # (B, T, H, d_qk)
        c_kv = self.kv_norm(self.wkv_a(x))  # (B, T, d_c)
        if cache is not None:
            c_kv = cache.write(self.layer_idx, start, c_kv=c_kv)["c_kv"].to(x.dtype)  # (B, S, d_c)
            # every cached position must be re-rotated: the rotation follows the up-projection
            cos, sin = rope(torch.arange(c_kv.shape[1], device=x.device))
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, H, self.qk_head_dim + self.v_head_dim)  # (B, S, H, d_qk + d_v)
        k, v = kv.split([self.qk_head_dim, self.v_head_dim], dim=-1)
        k_nope, k_rope = k.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        k = torch.cat((k_nope, rope.rotate(k_rope, cos, sin)), dim=-1)  # (B, S, H, d_qk)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, start)  # (B, H, T, d_v)
        return self.wo(o.transpose(1, 2).reshape(B, T, H * self.v_head_dim))  # (B, T, D)
