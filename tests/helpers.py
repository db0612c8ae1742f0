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


EXPERTS_SHAPE = {"fine": (62, 2), "coarse_top1": (8, 0), "coarse_top2": (16, 0)}  # real_experts layouts: (E, S)
EXPERTS_PLAYS = ("merchant_of_venice.modern", "twelfth_night.modern", "richard_iii.modern", "hamlet.modern",
                 "phoenix_and_the_turtle.modern")


def experts_record(layout: str, balance: str = "auxfree", frac: float = 0.125, heal: int = 200, ami=0.02, p=0.001,
                   energy_related: int = 0, delta: float = 0.1, before: float = 4.0, after: float = 3.7,
                   max_vio=0.5, plays=None) -> dict:
    """A real_experts record's flat dict (the probe's exact keys): 30 layers; ``ami`` (one value, 30 values, or
    {label: either}) per label, ``max_vio`` per layer, ``plays`` {play: eval loss} (default: every play at ``after``)."""
    import numpy as np

    from mla_analysis.analysis.real_experts import LABELS, PROBE as P

    e, s = EXPERTS_SHAPE[layout]
    f = {"convert.direction": "moe", "convert.n_routed_experts": e, "convert.n_shared_experts": s,
         "convert.active_fraction": frac, "convert.heal_steps": heal,
         "convert.moe_aux_alpha": 0.003 if balance == "aux" else 0.0,
         "convert.moe_bias_update_speed": 0.001 if balance == "auxfree" else 0.0,
         "model.n_routed_experts": e, "model.n_shared_experts": s, "model.moe_d_ff": 1536 // (e + s),
         "model.n_activated_experts": round(frac * (e + s)) - s, "model.score_func": "softmax", "train.steps": 200,
         "metrics.convert.source.val_loss": 3.5, "metrics.convert.before.val_loss": before, "metrics.val_loss": after,
         P + "max_vio_mean": float(np.mean(max_vio)), P + "redundancy.r1.loss_delta": delta}
    for play, loss in (plays or dict.fromkeys(EXPERTS_PLAYS, after)).items():
        f[f"metrics.eval.{play}.loss"] = loss
    p = np.broadcast_to(p, 30)
    for lab in LABELS:
        a = np.broadcast_to(ami[lab] if isinstance(ami, dict) else ami, 30)
        for l in range(30):
            f[f"{P}L{l}.spec.{lab}.ami"], f[f"{P}L{l}.spec.{lab}.p_value"] = float(a[l]), float(p[l])
        f[f"{P}spec.{lab}.ami_mean"] = float(np.mean(a))
    mv = np.broadcast_to(max_vio, 30)
    for l in range(30):
        f[f"{P}L{l}.max_vio"] = float(mv[l])
        f[f"{P}energy_routing.layer{l}.bins.ami"] = 0.05 if l < energy_related else 0.0
        f[f"{P}energy_routing.layer{l}.bins.p_value"] = 0.005 if l < energy_related else 0.5
        for i in range(e):
            f[f"{P}L{l}.load.e{i}"] = 1.0 / e
    return f
