"""``probe=cost``: what the KV cache and cached decoding cost, measured on the run's model and
extrapolated to published models.

- KV bytes per token: ``accounting.kv_bytes_per_token`` (closed form) against the bytes the model's
  own cache tensors hold (``model.new_cache(...).bytes_per_token()``), per cache dtype.
- Published models (``mla_analysis/published_configs/*.json``): cache elements and bytes per token,
  GiB per sequence at a long context, parameters, decode FLOPs; and the DeepSeek-V2 "93.3% smaller
  KV cache than DeepSeek 67B" arithmetic, which holds only for a ~6-bit cache (82.2% at bf16).
- Decode: prefill time and per-step latency / tokens per second of cached greedy decoding over
  context lengths and batch sizes; for MLA both the naive (up-project the cache) and the absorbed
  path on the same weights, with ``accounting.decode_flops_per_token`` for each.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import torch

from ..metrics import timing
from ..models import accounting
from ..config import Attention, MlaDecode, ModelConfig
from ..models.mla import MLA, MLACoupledRoPE
from ..published_configs import load_all
from ..training.results import atomic_write_json
from . import ProbeError, register
from ._common import figure, model_config, options, save_figure, unwrap

QUICK = {"contexts": [32], "batch_sizes": [1], "decode_steps": 2, "warmup": False}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLAIM = {"mla": "deepseek_v2", "baseline": "deepseek_67b", "reduction": 0.933}
GIB = 1024**3


def _parse(params: dict) -> dict:
    p = options("cost", params)  # checked in mla_analysis.config.probes
    if p["quick"]:
        p.update(QUICK)  # the config file lists the full grid, so quick must override it
    return p


# ---- KV bytes ---------------------------------------------------------------------------------


def kv_bytes_check(model: torch.nn.Module, cfg: ModelConfig, dtypes: list[str]) -> dict[str, Any]:
    """Analytic vs allocated cache bytes per token for each cache dtype."""
    core = unwrap(model)
    out: dict[str, Any] = {}
    for name in dtypes:
        cache = core.new_cache(batch_size=2, max_len=16, dtype=TORCH_DTYPES[name])
        out[f"kv_bytes_per_token.{name}.analytic"] = float(accounting.kv_bytes_per_token(cfg, name))
        out[f"kv_bytes_per_token.{name}.measured"] = float(cache.bytes_per_token())
    out["kv_bytes_per_token.match"] = all(
        out[f"kv_bytes_per_token.{n}.analytic"] == out[f"kv_bytes_per_token.{n}.measured"] for n in dtypes
    )
    return out


# ---- published models -------------------------------------------------------------------------


def published_table(extrap_context: int) -> dict[str, dict[str, Any]]:
    """Per shipped config: cache size, parameters and decode FLOPs from the accounting module."""
    table = {}
    for name, c in load_all().items():
        table[name] = {
            "attention": c.attention,
            "n_layers": c.n_layers,
            "kv_elements_per_token": accounting.kv_elements_per_token_layer(c) * c.n_layers,
            "kv_bytes_per_token_bf16": float(accounting.kv_bytes_per_token(c, "bf16")),
            "kv_gib_per_seq_bf16": float(accounting.kv_bytes_per_token(c, "bf16")) * extrap_context / GIB,
            "params_b": accounting.count_params(c) / 1e9,
            "active_params_b": accounting.count_params(c, active=True) / 1e9,
            "decode_gflops_per_token": accounting.decode_flops_per_token(c, extrap_context) / 1e9,
        }
    return table


def claim_93_3(bits: float) -> dict[str, Any]:
    """DeepSeek-V2 vs DeepSeek 67B KV cache per token, at bf16 and at ``bits`` per element."""
    cfgs = load_all()
    v2, base = cfgs[CLAIM["mla"]], cfgs[CLAIM["baseline"]]
    base_bytes = accounting.kv_bytes_per_token(base, "bf16")
    v2_elems = accounting.kv_elements_per_token_layer(v2) * v2.n_layers
    v2_bf16 = accounting.kv_bytes_per_token(v2, "bf16")
    v2_low = accounting.kv_bytes_per_token(v2, float(bits))
    red_bf16 = 1.0 - v2_bf16 / base_bytes
    red_low = 1.0 - v2_low / base_bytes
    # bits per element at which the reduction is exactly the published 93.3%
    bits_needed = (1.0 - CLAIM["reduction"]) * base_bytes * 8 / v2_elems
    return {
        "claim_93_3.ds67b_kv_bytes_per_token_bf16": float(base_bytes),
        "claim_93_3.v2_kv_elements_per_token": int(v2_elems),
        "claim_93_3.v2_kv_bytes_per_token_bf16": float(v2_bf16),
        "claim_93_3.v2_kv_bytes_per_token_low_bit": float(v2_low),
        "claim_93_3.low_bits": float(bits),
        "claim_93_3.reduction_bf16": float(red_bf16),
        "claim_93_3.reduction_low_bit": float(red_low),
        "claim_93_3.bits_for_claim": float(bits_needed),
        "claim_93_3.holds_at_bf16": round(red_bf16, 3) >= CLAIM["reduction"],
        "claim_93_3.holds_at_low_bit": round(red_low, 3) >= CLAIM["reduction"],
        "claim_93_3.assumption": (
            f"DeepSeek 67B cache in 16-bit (2 x 8 kv heads x 128 x 95 layers x 2 B); DeepSeek-V2 latent "
            f"(512 + 64) x 60 elements quantised to {bits:g} bits each. At bf16 the reduction is "
            f"{100 * red_bf16:.1f}%, at {bits:g} bits {100 * red_low:.1f}%."
        ),
    }


# ---- decode timing ----------------------------------------------------------------------------


def _decode_paths(cfg: ModelConfig) -> list[str]:
    if cfg.attention == Attention.mla:
        return list(MlaDecode.values())
    return [MlaDecode.naive.value] if cfg.attention == Attention.mla_coupled_rope else ["cached"]


def _set_path(core: torch.nn.Module, path: str) -> None:
    for block in core.layers:
        if isinstance(block.attn, MLA) and not isinstance(block.attn, MLACoupledRoPE):
            block.attn.decode = path


def time_decode(core, S: int, B: int, steps: int, vocab: int, device: torch.device):
    """(prefill seconds, per-step seconds, first decode logits [B, V]) for one cache (``metrics.timing.time_decode``)."""
    prefill, lat, first = timing.time_decode(core, S, B, steps, vocab, device)
    if not torch.isfinite(first).all():
        raise ProbeError(f"cost: non-finite logits in cached decoding (context {S}, batch {B})")
    return prefill, lat, first


def decode_costs(model: torch.nn.Module, cfg: ModelConfig, p: dict, device: torch.device) -> dict[str, Any]:
    """Prefill / per-step decode timings and decode FLOPs per path, context and batch size."""
    core = unwrap(model)
    paths = _decode_paths(cfg)
    configured = str(cfg.mla_decode) if cfg.attention == Attention.mla else paths[0]
    rows, first_logits = [], {}
    was_training = core.training
    core.eval()
    try:
        with torch.inference_mode():
            if p["warmup"]:
                time_decode(core, min(p["contexts"]), 1, 2, cfg.vocab_size, device)
            for path in paths:
                _set_path(core, path)
                for S in p["contexts"]:
                    flops = accounting.decode_flops_per_token(cfg, S, None if path == "cached" else path)
                    for B in p["batch_sizes"]:
                        prefill, lat, logits = time_decode(core, S, B, p["decode_steps"], cfg.vocab_size, device)
                        step = statistics.median(lat)
                        first_logits.setdefault(path, logits)
                        rows.append({
                            "path": path, "context": S, "batch": B,
                            "prefill_ms": 1e3 * prefill, "step_ms": 1e3 * step, "step_ms_min": 1e3 * min(lat),
                            "tokens_per_s": B / step, "prefill_tokens_per_s": B * S / prefill,
                            "flops_per_token": float(flops), "achieved_gflops_per_s": flops * B / step / 1e9,
                        })
    finally:
        _set_path(core, cfg.mla_decode)
        core.train(was_training)
    out: dict[str, Any] = {"decode.path_configured": configured, "decode.steps": p["decode_steps"]}
    for r in rows:
        key = f"{r['path']}.S{r['context']}.B{r['batch']}"
        out[f"decode.{key}.step_ms"] = r["step_ms"]
        out[f"decode.{key}.tokens_per_s"] = r["tokens_per_s"]
        out[f"prefill.{key}.ms"] = r["prefill_ms"]
    for path in paths:
        for S in p["contexts"]:
            out[f"decode_flops_per_token.{path}.S{S}"] = next(r["flops_per_token"] for r in rows if r["path"] == path and r["context"] == S)
    if len(first_logits) == 2:
        # both paths decode the same prompt: their logits must agree up to rounding
        a, b = first_logits["naive"], first_logits["absorb"]
        out["decode.absorb_vs_naive_max_abs_diff"] = float((a - b).abs().max())
    return {"metrics": out, "rows": rows, "paths": paths}


# ---- the probe --------------------------------------------------------------------------------


@register("cost")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """KV bytes (analytic vs measured), published-model extrapolation, the 93.3% claim, decode timings."""
    p = _parse(params)
    cfg = model_config(model)
    metrics: dict[str, Any] = {}
    metrics.update(kv_bytes_check(model, cfg, p["dtypes"]))
    table = published_table(p["extrap_context"])
    for name, row in table.items():
        metrics[f"published.{name}.kv_elements_per_token"] = row["kv_elements_per_token"]
        metrics[f"published.{name}.kv_bytes_per_token_bf16"] = row["kv_bytes_per_token_bf16"]
        metrics[f"published.{name}.kv_gib_per_seq_bf16"] = row["kv_gib_per_seq_bf16"]
        metrics[f"published.{name}.params_b"] = row["params_b"]
        metrics[f"published.{name}.active_params_b"] = row["active_params_b"]
        metrics[f"published.{name}.decode_gflops_per_token"] = row["decode_gflops_per_token"]
    metrics["published.extrap_context"] = p["extrap_context"]
    claim = claim_93_3(p["claim_bits"])
    metrics.update(claim)
    dec = decode_costs(model, cfg, p, device)
    metrics.update(dec["metrics"])
    figures = [_plot(dec["rows"], table, claim, run_dir)] if p["figures"] else []
    record = {
        "model": cfg.to_dict(),
        "params": {k: v for k, v in p.items()},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # timings are wall clock
        "kv_bytes": {k: v for k, v in metrics.items() if k.startswith("kv_bytes")},
        "published": table,
        "claim_93_3": claim,
        "decode": dec["rows"],
        "figures": figures,
    }
    atomic_write_json(Path(run_dir) / "cost.json", record)
    return metrics


def _plot(rows: list[dict], table: dict, claim: dict, run_dir: Path) -> str:
    fig, axes = figure(1, 2, 12, 4.2)
    ax = axes[0, 0]
    for path in dict.fromkeys(r["path"] for r in rows):
        for B in dict.fromkeys(r["batch"] for r in rows):
            pts = sorted((r["context"], r["step_ms"]) for r in rows if r["path"] == path and r["batch"] == B)
            ax.plot([c for c, _ in pts], [m for _, m in pts], marker="o", label=f"{path}, batch {B}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached context length (tokens)")
    ax.set_ylabel("decode step latency (ms, median)")
    ax.set_title("Cached decoding on this model")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    names = sorted(table, key=lambda n: table[n]["kv_bytes_per_token_bf16"])
    kib = [table[n]["kv_bytes_per_token_bf16"] / 1024 for n in names]
    ax.barh(names, kib, color="tab:blue", label="bf16")
    low = claim["claim_93_3.v2_kv_bytes_per_token_low_bit"] / 1024
    ax.barh(["deepseek_v2 (%g-bit)" % claim["claim_93_3.low_bits"]], [low], color="tab:orange",
            label=f"{claim['claim_93_3.low_bits']:g}-bit elements")
    ax.set_xlabel("KV cache per token (KiB, all layers)")
    ax.set_title(
        f"Published models: V2 cache {100 * claim['claim_93_3.reduction_bf16']:.1f}% smaller than 67B's at bf16, "
        f"{100 * claim['claim_93_3.reduction_low_bit']:.1f}% at {claim['claim_93_3.low_bits']:g} bits",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(run_dir) / "cost.png")

