"""Benchmark sizes per device and the model configs each figure uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, validate_model_config

# ----------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """Everything --quick shrinks."""

    train_cfg: ModelConfig
    train_batch: int
    train_seq: int
    train_warmup: int
    train_iters: int
    decode_kw: dict[str, Any]  # shared shape of the decode models (figures 2 and 3)
    absorb_context: int
    absorb_iters: int
    contexts: list[int]
    batches: list[int]
    decode_iters: int
    decode_min_time_s: float
    copy_bytes: int
    copy_reps: int


def train_config(quick: bool = False, gpu: bool = False) -> ModelConfig:
    """The MLA + DeepSeekMoE model of figure 1 (DeepSeek-V3 style: sigmoid router, normalised top-k);
    ``gpu``: a larger one (64 fine-grained experts, top-6), so that a GPU step is not bound by kernel launches."""
    if quick:
        sizes = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32, n_routed_experts=4, moe_d_ff=16, d_ff=64)
    elif gpu:
        sizes = dict(vocab_size=8192, d_model=1024, n_layers=4, n_heads=16, kv_lora_rank=256, qk_nope_head_dim=64,
                     qk_rope_head_dim=32, v_head_dim=64, max_seq_len=1024, n_routed_experts=64, n_activated_experts=6,
                     moe_d_ff=256, d_ff=2048)
    else:
        sizes = dict(vocab_size=1024, d_model=256, n_layers=4, n_heads=8, kv_lora_rank=64, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256, n_routed_experts=16, moe_d_ff=128, d_ff=512)
    sizes.setdefault("n_activated_experts", 2)
    cfg = ModelConfig(
        name="bench-train", attention="mla", rope_interleave=True, ffn="moe", n_shared_experts=1,
        score_func="sigmoid", norm_topk_prob=True, **sizes,
    )
    return validate_model_config(cfg)


def decode_shape(quick: bool = False, gpu: bool = False) -> dict[str, Any]:
    """DeepSeek-V2's per-layer attention shape, 16 heads instead of 128 on CPU, 128 on a GPU (quick: tiny)."""
    if quick:
        return dict(vocab_size=128, d_model=64, n_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                    v_head_dim=16, head_dim=16, gqa_kv_heads=2, d_ff=64)
    heads = 128 if gpu else 16
    return dict(vocab_size=512, d_model=1024, n_heads=heads, kv_lora_rank=512, qk_rope_head_dim=64,
                qk_nope_head_dim=128, v_head_dim=128, head_dim=128, gqa_kv_heads=heads // 4, d_ff=256)


def decode_config(variant: str, shape: dict[str, Any], max_len: int, mla_decode: str = "absorb") -> ModelConfig:
    """One-layer decode model: ``mla`` (naive or absorbed), ``mha`` or ``gqa`` with the given shape."""
    common = dict(name=variant, vocab_size=shape["vocab_size"], d_model=shape["d_model"], n_layers=1,
                  n_heads=shape["n_heads"], max_seq_len=max_len, ffn="dense", d_ff=shape["d_ff"])
    if variant == "mla":
        cfg = ModelConfig(attention="mla", rope_interleave=True, kv_lora_rank=shape["kv_lora_rank"],
                          qk_rope_head_dim=shape["qk_rope_head_dim"], qk_nope_head_dim=shape["qk_nope_head_dim"],
                          v_head_dim=shape["v_head_dim"], mla_decode=mla_decode, **common)
    elif variant in ("mha", "gqa"):
        cfg = ModelConfig(attention=variant, head_dim=shape["head_dim"],
                          n_kv_heads=shape["gqa_kv_heads"] if variant == "gqa" else None, **common)
    else:
        raise ValueError(f"variant={variant!r} (allowed: mla | mha | gqa)")
    return validate_model_config(cfg)


def make_sizes(quick: bool, device: torch.device = torch.device("cpu")) -> Sizes:
    """The sizes of every figure: tiny with ``quick``, else the CPU's or (larger) a GPU's."""
    if quick:
        return Sizes(train_cfg=train_config(True), train_batch=2, train_seq=16, train_warmup=1, train_iters=2,
                     decode_kw=decode_shape(True), absorb_context=128, absorb_iters=2, contexts=[64, 128],
                     batches=[1, 2], decode_iters=2, decode_min_time_s=0.0, copy_bytes=8 << 20, copy_reps=3)
    if device.type == "cuda":
        return Sizes(train_cfg=train_config(gpu=True), train_batch=8, train_seq=1024, train_warmup=3, train_iters=20,
                     decode_kw=decode_shape(gpu=True), absorb_context=8192, absorb_iters=20,
                     contexts=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 8], decode_iters=20,
                     decode_min_time_s=0.5, copy_bytes=1 << 30, copy_reps=20)
    return Sizes(train_cfg=train_config(False), train_batch=8, train_seq=256, train_warmup=3, train_iters=15,
                 decode_kw=decode_shape(False), absorb_context=8192, absorb_iters=5,
                 contexts=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 8], decode_iters=3,
                 decode_min_time_s=1.0, copy_bytes=256 << 20, copy_reps=7)
