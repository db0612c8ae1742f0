"""Figure 3: decode sweep, MLA vs MHA vs GQA over contexts and batch sizes, KV-read bandwidth."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..models.accounting import decode_flops_per_token, kv_bytes_per_token
from ..metrics.timing import median, profile_top, time_interleaved
from .machine import PeakMemory, available_memory
from .sizes import Sizes
from .decode import decode_models, fill_cache_, make_decode_step

# ------------------------------------------------------------------------ figure 3: decode sweep
SWEEP_VARIANTS = ("mla", "mla_bf16", "mha", "gqa")
VARIANT_LABELS = {"mla_bf16": "mla, bf16 cache"}


def sweep_variant(name: str, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """(model variant, cache dtype) of a sweep variant: ``mla_bf16`` is the MLA model with a bfloat16 cache."""
    return ("mla", torch.bfloat16) if name == "mla_bf16" else (name, dtype)


def bench_decode_sweep(sizes: Sizes, device: torch.device, dtype: torch.dtype, copy_bw: float, seed: int,
                       max_step_s: float, variants: Sequence[str] = SWEEP_VARIANTS,
                       log: Callable[[str], None] = lambda s: None, profile: bool = False) -> list[dict[str, Any]]:
    """Figure 3: one row per (variant, batch, context); skipped cells say why. ``mla_bf16`` (the same MLA
    model reading a bfloat16 cache) is left out when ``dtype`` is already bfloat16. With ``profile`` the MLA
    step at the longest context gets a profiler hotspot table (``row["profile"]``)."""
    variants = [v for v in variants if not (v == "mla_bf16" and dtype == torch.bfloat16)]
    max_ctx = max(sizes.contexts)
    models = decode_models(sizes.decode_kw, max_ctx + 1, device, dtype,
                           sorted({sweep_variant(v, dtype)[0] for v in variants}), seed)
    rows: list[dict[str, Any]] = []
    for batch in sizes.batches:
        for v in variants:
            base, cache_dtype = sweep_variant(v, dtype)
            model = models[base]
            per_token = kv_bytes_per_token(model.cfg, cache_dtype)
            prev: Optional[dict[str, Any]] = None
            for S in sorted(sizes.contexts):
                row: dict[str, Any] = {"variant": v, "batch": batch, "context": S, "kv_bytes_per_token": per_token,
                                       "kv_bytes_per_step": per_token * S * batch,
                                       "flops_per_step": decode_flops_per_token(model.cfg, S + 1) * batch,
                                       "cache_dtype": str(cache_dtype).replace("torch.", "")}
                rows.append(row)
                reason = skip_reason(prev, S, batch, per_token, device, max_step_s, sizes.decode_iters)
                if reason:
                    row["skipped"] = reason
                    log(f"  {v:8s} B={batch} S={S}: skipped ({reason})")
                    continue
                with PeakMemory(device) as peak:
                    cache = model.new_cache(batch, S + 1, cache_dtype)
                    fill_cache_(cache, S, seed)
                    step = make_decode_step(model, cache, S, batch, device, seed)
                    times = time_interleaved({"step": step}, device, warmup=1, iters=sizes.decode_iters,
                                             min_time_s=sizes.decode_min_time_s, max_iters=20)["step"]
                if profile and v == "mla" and S == max_ctx:
                    row["profile"] = profile_top(step, device)
                del cache, step
                t = median(times)
                row.update(step_s=t, iters=len(times), tok_s=batch / t, kv_read_bw=row["kv_bytes_per_step"] / t,
                           flops_per_s=row["flops_per_step"] / t, peak_bytes=peak.bytes)
                row["bw_fraction"] = row["kv_read_bw"] / copy_bw
                prev = row
                log(f"  {v:8s} B={batch} S={S}: {t * 1e3:8.1f} ms/step, {row['tok_s']:8.1f} tok/s, "
                    f"{row['kv_read_bw'] / 1e9:6.2f} GB/s KV ({100 * row['bw_fraction']:.0f}% of copy)")
    return rows


def skip_reason(prev: Optional[dict[str, Any]], S: int, batch: int, per_token: float, device: torch.device,
                 max_step_s: float, iters: int) -> Optional[str]:
    """Why the next (longer) context should not run, extrapolating linearly from the previous one."""
    avail = available_memory(device)
    if prev is None:
        need = 2 * per_token * S * batch  # the cache plus one copy of it
        if avail is not None and need > 0.8 * avail:
            return f"cache needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
        return None
    if "skipped" in prev:
        return "longer context skipped before"
    scale = S / prev["context"]
    if prev.get("peak_bytes") and avail is not None and prev["peak_bytes"] * scale > 0.8 * avail:
        return f"would need ~{prev['peak_bytes'] * scale / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
    if prev["step_s"] * scale > max_step_s:
        return f"would take ~{prev['step_s'] * scale:.1f} s/step > --max-step-s {max_step_s:g}"
    return None
