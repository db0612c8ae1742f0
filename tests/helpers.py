"""Helpers shared by test modules (not tests): constants, the Hydra app as a user runs it, models to test on.

Test modules import these from here, never from each other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file
# a run of the Hydra app in seconds: 4 steps on CPU, eval every 2, small eval sets, no progress bars
FAST = ["train.steps=4", "train.eval_every=2", "data.eval_examples=8", "train.progress=false", "train.batch_size=4",
        "device=cpu"]

# the GPT-2 / Qwen2 knobs (learned positions, LayerNorm, GELU, biases) as tiny-model overrides, one param each
GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, rms_norm_eps=1e-5)
KNOB_VARIANTS = [
    pytest.param(dict(GPT2, tie_embeddings=True), id="gpt2"),
    pytest.param(dict(attention="gqa", n_kv_heads=2, attn_qkv_bias=True), id="qwen2-gqa"),
    pytest.param(dict(attention="mqa", pos_emb="learned"), id="mqa-learned-pos"),
    pytest.param(dict(mlp="gelu", norm="layernorm"), id="rope-layernorm-gelu"),
    pytest.param(dict(bias=True), id="swiglu-bias"),
    pytest.param(dict(GPT2, ffn="none"), id="gpt2-attention-only"),
]


def run_app(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m mla_analysis.run ARGS`` in ``cwd``, output captured."""
    return subprocess.run([sys.executable, "-m", "mla_analysis.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def mqar_data():
    """The probes' small data config with one MQAR eval task (2 pairs), for probes that read task examples."""
    from mla_analysis.data import DataConfig, MQARConfig

    return DataConfig(vocab_size=128, seq_len=32, eval_examples=8, eval_tasks=["mqar"], mqar=MQARConfig(num_kv_pairs=2))


def source_model(seed: int = 0, embed_std: float = 1.0, **overrides):
    """A tiny source model for conversions whose attention is far from uniform (init_std 0.2), norms not 1.

    embed_std 1 gives an O(1) residual stream as in trained models, so the attention RMSNorm's eps
    (the one documented source of inexactness at full rank) is negligible.
    """
    from mla_analysis.config import tiny
    from mla_analysis.models.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(tiny(init_std=0.2, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.embed.weight.normal_(0.0, embed_std)
    return model


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and float buffer random (transformers inits routers and biases to zero, norms to one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name or name.endswith("attn.bias"):
                continue
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
