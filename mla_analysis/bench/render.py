"""The BENCHMARKS.md renderer: summary and sweep tables, one section per device kind, merged atomically."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..config import ModelConfig
from ..training.results import atomic_write_text
from ..metrics.timing import median
from .decode_sweep import VARIANT_LABELS

DEFAULT_OUT = "BENCHMARKS.md"
SECTION_RE = re.compile(r"<!-- bench:(?P<key>[\w.-]+):begin -->\n(?P<body>.*?)<!-- bench:(?P=key):end -->\n?", re.S)
HEADER = (
    "# Benchmarks\n\n"
    "Written by `python -m mla_analysis.bench` (definitions: the docstring of `mla_analysis/bench/__init__.py`).\n"
    "One section per device kind; a run replaces only its own section. Targets are for 2 CPU cores\n"
    "(figure 1 has its own on a GPU: >= 2x).\n"
    "Tests never assert timings: these numbers are the only performance claims.\n"
    "Sections the bench does not write (e.g. `cpu-notes`, an analysis by hand) are kept as they are.\n\n"
)

TARGET_TRAIN_RATIO = {"cpu": 1.5, "cuda": 2.0}  # by device type
TARGET_ABSORB_RATIO = 5.0
TARGET_BW_FRACTION = 0.30
TARGET_SPECTRA_MEM_RATIO = 1.10

# ------------------------------------------------------------------------------------- report
def _fmt(x: Optional[float], unit: str = "", digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}{unit}"


def train_target(device: str) -> float:
    """Figure 1's target on a device ('cpu', 'cuda', 'cuda:1', ...)."""
    return TARGET_TRAIN_RATIO[device.split(":")[0]]


def _status(value: Optional[float], target: float, quick: bool) -> str:
    if value is None:
        return "not measured"
    if quick:
        return "quick run: not assessed"
    return "met" if value >= target else "MISSED"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(res: dict[str, Any], quick: bool) -> list[list[str]]:
    """The one table: every figure, measured or marked, with its target and status."""
    rows: list[list[str]] = []
    t = res.get("train")
    target = train_target(res["machine"]["device"])
    if t:
        rows.append([f"1. training throughput, fwd+bwd+AdamW, MLA+MoE ours vs HF DeepseekV3 (its defaults: "
                     f"{t['hf_implementations']['hf']})", _fmt(t["tok_s"]["ours"], " tok/s"),
                     _fmt(t["tok_s"]["hf"], " tok/s"), _fmt(t["ratio"], "x", 2), f">= {target}x",
                     _status(t["ratio"], target, quick)])
        for i, (name, ratio) in enumerate(t["ratios"].items()):
            letter = "bcdefgh"[i]
            if name.startswith("hf"):
                rows.append([f"1{letter}. same, vs HF DeepseekV3 with {t['hf_implementations'][name]} (for information)",
                             _fmt(t["tok_s"]["ours"], " tok/s"), _fmt(t["tok_s"][name], " tok/s"),
                             _fmt(ratio, "x", 2), "-", "info"])
            else:  # ours_loop_experts
                rows.append([f"1{letter}. ours with a per-expert loop instead of grouped GEMMs (`MoE.grouped_mm = False`) "
                             "vs HF's defaults (for information)", _fmt(t["tok_s"][name], " tok/s"),
                             _fmt(t["tok_s"]["hf"], " tok/s"), _fmt(ratio, "x", 2), "-", "info"])
    else:
        rows.append(["1. training throughput, ours vs HF DeepseekV3", "not run", "", "", f">= {target}x", "not run"])
    a = res.get("absorb")
    if a:
        rows.append([f"2. MLA decode tok/s at context {a['context']:,}, absorbed vs naive (batch 1)",
                     _fmt(a["tok_s"]["absorb"], " tok/s", 2), _fmt(a["tok_s"]["naive"], " tok/s", 2),
                     _fmt(a["ratio"], "x", 2), f">= {TARGET_ABSORB_RATIO:g}x",
                     _status(a["ratio"], TARGET_ABSORB_RATIO, quick)])
    else:
        rows.append(["2. MLA decode, absorbed vs naive", "not run", "", "", f">= {TARGET_ABSORB_RATIO:g}x", "not run"])
    sweep = res.get("sweep")
    if sweep is not None:
        ctx = max(r["context"] for r in sweep)
        for batch in sorted({r["batch"] for r in sweep}):
            cell = next(r for r in sweep if r["variant"] == "mla" and r["batch"] == batch and r["context"] == ctx)
            label = f"3. MLA absorbed decode KV-read bandwidth at context {ctx:,}, batch {batch}, fraction of copy bw"
            if "skipped" in cell:
                rows.append([label, f"skipped: {cell['skipped']}", _fmt(res["copy"]["median_bw"] / 1e9, " GB/s", 2),
                             "-", f">= {TARGET_BW_FRACTION:.0%}", "not measured"])
                continue
            rows.append([label, _fmt(cell["kv_read_bw"] / 1e9, " GB/s", 2),
                         _fmt(res["copy"]["median_bw"] / 1e9, " GB/s copy", 2),
                         f"{cell['bw_fraction']:.1%}", f">= {TARGET_BW_FRACTION:.0%}",
                         _status(cell["bw_fraction"], TARGET_BW_FRACTION, quick)])
        for batch in sorted({r["batch"] for r in sweep}):
            cell = next((r for r in sweep if r["variant"] == "mla_bf16" and r["batch"] == batch
                         and r["context"] == ctx and "tok_s" in r), None)
            if cell:
                rows.append([f"3b. same, MLA absorbed with a bf16 cache (`new_cache(dtype=torch.bfloat16)`), batch "
                             f"{batch} (for information)", _fmt(cell["kv_read_bw"] / 1e9, " GB/s", 2),
                             _fmt(res["copy"]["median_bw"] / 1e9, " GB/s copy", 2), f"{cell['bw_fraction']:.1%}",
                             "-", "info"])
        for batch in sorted({r["batch"] for r in sweep}):  # what the smaller cache buys, at the longest context
            cells = {r["variant"]: r for r in sweep if r["batch"] == batch and r["context"] == ctx and "tok_s" in r}
            if "mla" in cells and len(cells) > 1:
                others = [v for v in ("mha", "gqa") if v in cells]
                rows.append([f"3'. decode tok/s at context {ctx:,}, batch {batch}: MLA absorbed vs "
                             + " / ".join(o.upper() for o in others) + " (for information)",
                             _fmt(cells["mla"]["tok_s"], " tok/s", 2),
                             " / ".join(_fmt(cells[o]["tok_s"], " tok/s", 1) for o in others),
                             " / ".join(_fmt(cells["mla"]["tok_s"] / cells[o]["tok_s"], "x", 2) for o in others),
                             "-", "info"])
    else:
        rows.append(["3. MLA vs MHA vs GQA decode sweep", "not run", "", "", f">= {TARGET_BW_FRACTION:.0%}", "not run"])
    sp = res.get("spectra")
    if sp:
        small, large = sp["counts"]
        rows.append([f"4. streaming spectra, dim {sp['dim']}: Gram accumulation tokens/s; peak RSS at {large:,} vs "
                     f"{small:,} tokens", _fmt(sp["tok_s"], " tok/s", 0),
                     f"{sp['runs'][large]['peak_kb'] / 1024:,.0f} vs {sp['runs'][small]['peak_kb'] / 1024:,.0f} MiB",
                     _fmt(sp["mem_ratio"], "x", 3), f"<= {TARGET_SPECTRA_MEM_RATIO:.2f}x",
                     "met" if sp["mem_ratio"] <= TARGET_SPECTRA_MEM_RATIO else ("info" if quick else "MISSED")])
    else:
        rows.append(["4. streaming spectra", "not run", "", "", f"<= {TARGET_SPECTRA_MEM_RATIO:.2f}x", "not run"])
    w = res.get("sweep_wall")
    if w:
        st = ", ".join(f"{k} {v}" for k, v in sorted(w["statuses"].items()))
        rows.append([f"5. rank-sweep wall time (`{w['dir']}`, {w['runs']} runs: {st})",
                     _fmt(w["span_s"], " s elapsed", 0), _fmt(w["sum_wall_s"], " s summed", 0),
                     f"longest run {w['max_wall_s']:.0f} s", "-", "info"])
    else:
        rows.append(["5. rank-sweep wall time", "not given (--sweep-dir DIR)", "", "", "-", "n/a"])
    return rows


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    rows = []
    for r in sweep:
        head = [VARIANT_LABELS.get(r["variant"], r["variant"]), r["batch"], f"{r['context']:,}", f"{r['kv_bytes_per_token']:,.0f}",
                _fmt(r["kv_bytes_per_step"] / 1e6, "", 1)]
        if "skipped" in r:
            rows.append(head + ["-", "-", "-", f"skipped: {r['skipped']}", "-"])
            continue
        rows.append(head + [_fmt(r["step_s"] * 1e3, "", 2), _fmt(r["tok_s"], "", 1), _fmt(r["kv_read_bw"] / 1e9, "", 2),
                            f"{r['bw_fraction']:.1%}", _fmt(r["flops_per_s"] / 1e9, "", 1)])
    return _table(["attention", "batch", "context", "KV B/token", "KV MB/step", "ms/step", "tok/s", "KV-read GB/s",
                   "of copy bw", "GFLOP/s"], rows)


def _cfg_line(cfg: ModelConfig, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys)


def render(res: dict[str, Any], argv: Sequence[str]) -> str:
    """The markdown body of one device section."""
    info, quick = res["machine"], res["quick"]
    out = [f"## {info['device']}{' (quick)' if quick else ''}: {info['date']}", ""]
    cores = f"{info['cores']} cores ({info['usable_cores']} usable)"
    caches = "; ".join(x for x in (info.get("cpu_caches"), info.get("cpu_flags")) if x)
    caches = f" ({caches})" if caches else ""
    out.append(f"Machine: {info['cpu']}{caches}, {cores}" + (f", GPU {info['gpu']}" if "gpu" in info else "")
               + f"; torch {info['torch']} ({info['threads']} threads), transformers {info['transformers']}, "
                 f"Python {info['python']}; dtype {info['dtype']}; git {info['git_commit']}"
               + "".join(f"; {k}={v}" for k, v in (info.get("env") or {}).items()) + ".")
    out.append("")
    cmd = " ".join(["python -m mla_analysis.bench", *argv])
    out.append(f"Command: `{cmd}`; bench wall time {res['wall_s']:.0f} s.")
    la0, other = res.get("load_before"), res.get("other_cpu_cores")
    facts = []
    if la0 is not None:
        facts.append(f"load average (1 min) at start {la0[0]:.2f}")
    if other is not None:
        facts.append(f"other processes used {other:.2f} of {info['cores']} cores on average during the run")
    if facts:
        # the load average lags (it still counts what ran a minute ago), so prefer the measured share
        cores = info["usable_cores"] or 1
        busy = other > 0.05 * cores if other is not None else la0[0] > 0.5 * cores
        out += ["", "Background: " + "; ".join(facts) + "."
                + (" **The machine was busy with other work during this run; absolute numbers (and, less so, "
                   "the interleaved ratios) may be affected.**" if busy else " The machine was otherwise quiet.")]
    if res.get("note"):
        out += ["", f"Note: {res['note']}"]
    out += ["", "### Summary", "", _table(["figure", "measured", "baseline", "ratio", "target", "status"],
                                          summary_rows(res, quick)), ""]
    t = res.get("train")
    if t:
        cfg = t["config"]
        out.append(f"Figure 1 model: {_cfg_line(cfg, ['d_model', 'n_layers', 'n_heads', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'n_routed_experts', 'n_activated_experts', 'n_shared_experts', 'moe_d_ff', 'vocab_size', 'score_func'])}; "
                   f"batch {t['batch']} x seq {t['seq']} = {t['tokens_per_step']} tokens/step; "
                   f"{len(t['times']['ours'])} timed steps each (median), interleaved. "
                   "Max |logit diff| before timing: "
                   + ", ".join(f"{k} {v:.1e}" for k, v in t["max_logit_diff"].items()) + ".")
        out.append("")
    a = res.get("absorb")
    if a:
        cfg = a["config"]
        out.append(f"Figure 2 model: 1 layer, {_cfg_line(cfg, ['d_model', 'n_heads', 'kv_lora_rank', 'qk_rope_head_dim', 'qk_nope_head_dim', 'v_head_dim', 'd_ff', 'vocab_size'])}; "
                   f"cache filled with random latents; median ms/step absorbed {median(a['times']['absorb']) * 1e3:.1f}, "
                   f"naive {median(a['times']['naive']) * 1e3:.1f}; max |next-token logit diff| {a['max_logit_diff']:.1e}.")
        out.append("")
    if res.get("sweep") is not None:
        c = res["copy"]
        shape = res["decode_shape"]
        out += ["### 3. Decode sweep: MLA (absorbed) vs MHA vs GQA", "",
                f"One layer each, d_model {shape['d_model']}, {shape['n_heads']} query heads; MHA/GQA head_dim "
                f"{shape['head_dim']} (GQA: {shape['gqa_kv_heads']} K/V heads); MLA as figure 2. KV bytes from "
                f"`accounting.kv_bytes_per_token` in the cache dtype ({info['dtype']}; "
                f"bfloat16 for 'mla, bf16 cache': the same model and weights reading a bf16 cache). Copy bandwidth "
                f"(`copy_` of {c['bytes'] / 2**20:.0f} MiB, read+write bytes): median {c['median_bw'] / 1e9:.2f} GB/s, "
                f"best {c['best_bw'] / 1e9:.2f} GB/s."
                + (f" CPU caches: {info['cpu_caches']}; a cache smaller than the last level is partly read from "
                   "there, not from DRAM." if info.get("cpu_caches") and info["device"] == "cpu" else ""),
                "", sweep_table(res["sweep"]), ""]
    profiles = dict(res.get("profile") or {})
    for r in res.get("sweep") or []:
        if r.get("profile"):
            profiles[f"figure 3, MLA absorbed decode step at {r['context']:,}, batch {r['batch']}"] = r["profile"]
    if profiles:
        out += ["### Profile (torch.profiler, top ops by self time)", ""]
        for name, prof in profiles.items():
            out += [f"{name}:", "", _table(["op", "self ms per call", "share", "calls per call"],
                                           [[p["op"], f"{p['self_ms_per_call_of_fn']:.1f}", f"{p['share']:.0%}",
                                             f"{p['calls_per_fn']:.0f}"] for p in prof]), ""]
    return "\n".join(out).rstrip() + "\n"


def merge_section(existing: str, key: str, body: str) -> str:
    """BENCHMARKS.md text with the section ``key`` replaced (or added); other sections are kept."""
    sections = {m.group("key"): m.group("body") for m in SECTION_RE.finditer(existing)}
    sections[key] = body
    order = sorted(sections, key=lambda k: (k != "cpu", k))
    parts = [HEADER]
    for k in order:
        parts.append(f"<!-- bench:{k}:begin -->\n{sections[k].rstrip()}\n<!-- bench:{k}:end -->\n\n")
    return "".join(parts).rstrip() + "\n"


def write_report(path: str | os.PathLike, key: str, body: str) -> Path:
    p = Path(path)
    existing = p.read_text(encoding="utf-8") if p.exists() else ""
    return atomic_write_text(p, merge_section(existing, key, body))
