"""The real_conversion study's tables and figures, generated from the run records (``<sweep>/*/results.json``).

Run: python experiments/real_conversion/tables.py [--root DIR]
    writes, from the sweep dirs of the study dir (default: this file's folder; missing dirs or jobs -> "not run"):
    ``results.md`` + ``figures/kl_vs_bytes.{png,pdf}`` (``run/``), ``ablations.md`` (``ablate/`` against the main
    recipe at 120 in ``run/``, rule 8's spread from ``calib/``), ``calibration.md`` (``run/`` + ``calib/``),
    ``healing.md`` + ``figures/healing.{png,pdf}`` + ``figures/healing_curves.{png,pdf}`` (``heal/`` + ``run/``),
    ``full.md`` + ``figures/copying_vs_distance.{png,pdf}`` (``full/``).
Run: python experiments/real_conversion/tables.py [--out NAME] RUN_DIR ...
    the generic tables of the given dirs only: ``NAME.md`` (default ``results``) and ``figures/NAME.{png,pdf}``
    (``kl_vs_bytes`` for ``results``).
Rules (README): intervals are Student-t 95% over evaluation windows (n stated); "vs" comparisons are paired over the
same windows (``kl_windows.json`` of each run) with a t-interval of the per-window difference of mean NLL (or KL).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from mla_analysis.analysis.figures import figure as new_figure
from mla_analysis.analysis.figures import save_figure
from mla_analysis.training.results import atomic_write_text

HERE = Path(__file__).resolve().parent
ORIGINAL_BYTES = 384 * 2  # SmolLM2: 2 x 3 KV heads x 64 elements per token per layer, bf16
ANY = object()  # a spec value that matches every record value

# The study's main recipe (conf/experiment/real_conversion.yaml) at 120, and its RoPE dims per budget (README)
MAIN_ROPE = {192: 64, 120: 32, 72: 32, 48: 16}
MAIN = {"convert.direction": "mla", "convert.cache_budget": 120, "convert.kv_budget": None,
        "convert.kv_lora_rank": None, "convert.rope_dims": 32, "convert.rope_key": "rorope",
        "convert.rope_heads": "shared", "convert.strategy": "high", "convert.bkv": False, "convert.whiten": True,
        "convert.factorization": "joint", "convert.kv_norm": False, "convert.allocation": "uniform",
        "convert.target": "mla", "convert.calib_examples": 8, "convert.calib_offset": 0, "convert.heal_steps": 0}
# keys older records lack, with the value they ran at
MISSING = {"convert.calib_offset": 0, "convert.heal_steps": 0, "train.trainable": "all"}
HEAL_STEPS = 32  # the healing chunk's budget: 32 x 1,024 tokens of the training plays
CALIB_OFFSET = 8  # rule 8's second calibration set: the next 8 x 1,024 tokens of the calibration plays
DISTANCES = (256, 512, 1024, 2048, 4096)  # conf/probe/copying.yaml


def load(run_dirs: list[Path]) -> list[dict]:
    """One dict per finished run: its flat record, directory, history and per-window sums when present."""
    rows = []
    for root in run_dirs:
        for f in sorted(root.glob("*/results.json")):
            rec = json.loads(f.read_text())
            if rec.get("status") != "ok":
                continue
            flat = rec["flat"]
            win = f.parent / "kl_windows.json"
            rows.append({"flat": flat, "dir": f.parent, "env": rec.get("env", {}), "history": rec.get("history", []),
                         "windows": json.loads(win.read_text()) if win.exists() else None})
    return rows


def healed(flat: dict) -> str:
    """', healed S x T tokens (trainable)' for a healed run, else ''."""
    if not flat.get("convert.heal_steps"):
        return ""
    return (f", healed {flat['convert.heal_steps']} x {flat['train.batch_size'] * flat['data.seq_len']} tokens "
            f"({flat.get('train.trainable', 'all')})")


def label(flat: dict) -> tuple[str, str]:
    """(family, variant label) of a run from its config."""
    if flat.get("convert.direction") == "gqa":
        heads, bits = flat.get("convert.kv_heads"), flat.get("convert.kv_quant_bits")
        if heads is None and bits == 16:
            if not flat.get("convert.heal_steps"):
                return "original", "original GQA (bf16)"
            return "baseline", "original GQA (bf16)" + healed(flat)  # the domain-adaptation control
        parts = [f"{3} -> {heads} KV heads (mean-pooled)" if heads is not None else "GQA"]
        if bits != 16:
            parts.append(f"int{bits} g{flat.get('convert.kv_quant_group')}")
        return "baseline", ", ".join(parts) + healed(flat)
    bits = [f"rope {flat.get('convert.rope_dims')} x {flat.get('convert.rope_heads')} ({flat.get('convert.rope_key')}"
            + (f", {flat.get('convert.strategy')}" if flat.get("convert.rope_key") != "rorope" else "") + ")"]
    for key, off, text in (("convert.kv_norm", False, "latent norm"), ("convert.bkv", False, "BKV"),
                           ("convert.whiten", True, "plain SVD"), ("convert.factorization", "joint", "split")):
        if flat.get(key) != off:
            bits.append(text)
    if flat.get("convert.calib_offset"):
        bits.append(f"calibration offset {flat['convert.calib_offset']}")
    budget = flat.get("convert.cache_budget")
    if budget is None and flat.get("convert.kv_budget") is not None:
        budget = f"kv_budget {flat['convert.kv_budget']} ({flat.get('convert.allocation')})"
    return "mla", f"MLA {budget}: " + ", ".join(bits) + healed(flat)


def bytes_per_layer(flat: dict) -> float:
    """Stored cache bytes per token per layer (codes, scales and zeros included)."""
    return flat["metrics.kv_bytes_per_token"] / flat["model.n_layers"]


def ci(flat: dict, key: str, digits: int = 3) -> str:
    """'mean [low, high]' of ``metrics.probe.<key>``, or '—' when the record lacks it."""
    m, lo, hi = (flat.get(f"metrics.probe.{key}.{s}") for s in ("mean", "ci_low", "ci_high"))
    return "—" if m is None else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ratio(flat: dict) -> str:
    """Perplexity ratio to the original, exp(delta NLL) with its interval, or '—'."""
    if flat.get("metrics.probe.kl.delta_nll.mean") is None:
        return "—"
    r = [math.exp(flat[f"metrics.probe.kl.delta_nll.{s}"]) for s in ("mean", "ci_low", "ci_high")]
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def window_values(row: dict, metric: str = "nll") -> np.ndarray | None:
    """Per-window mean of ``metric`` (nll, kl, nll_ref) per token, or None without kl_windows.json."""
    w = row["windows"]
    return None if w is None else np.asarray(w[metric]) / np.asarray(w["tokens"])


def paired_stats(a: dict | None, b: dict | None, metric: str = "nll") -> tuple[float, float, float, int] | None:
    """(mean, low, high, n) of the per-window difference a - b with its paired 95% t-interval, or None."""
    if a is None or b is None:
        return None
    x, y = window_values(a, metric), window_values(b, metric)
    if x is None or y is None or len(x) != len(y) or len(x) < 2:
        return None
    d = x - y
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def paired(a: dict | None, b: dict | None, metric: str = "nll") -> str:
    """Mean per-window difference a - b with its paired 95% t-interval (n windows), or '—'."""
    s = paired_stats(a, b, metric)
    return "—" if s is None else f"{s[0]:+.3f} [{s[1]:+.3f}, {s[2]:+.3f}] (n={s[3]})"


def provenance(runs: list[dict]) -> str:
    """Rule 11: the commits (with -dirty) of the records a table reads."""
    commits = sorted({r["env"].get("git_commit", "?") for r in runs})
    return f"Provenance: records from commit(s) {', '.join(commits) or 'none (no records)'}."


def annotate(runs: list[dict]) -> list[dict]:
    """Adds family, label and bytes to each run (in place); returns the runs."""
    for r in runs:
        r["family"], r["label"] = label(r["flat"])
        r["bytes"] = bytes_per_layer(r["flat"])
    return runs


# ---- the generic tables of a set of runs (results.md) ---------------------------------------------------------
def results_lines(runs: list[dict]) -> list[str]:
    """The variant table, NLL change by token class and equal-byte paired comparisons of ``runs`` (sorted in place)."""
    runs.sort(key=lambda r: (-r["bytes"], r["family"] != "original", r["label"]))
    n = runs[0]["flat"].get("metrics.probe.kl.windows")
    nll_ref = runs[0]["flat"]["metrics.probe.kl.nll_ref.mean"]
    when = "healing as labelled" if any(r["flat"].get("convert.heal_steps") for r in runs) else "one-shot (no healing)"
    lines = ["# real_conversion: results (generated by tables.py from the run records; do not edit)", "",
             f"SmolLM2-135M (dequantised Q4_1 GGUF), {when}. Metrics on {n} windows x "
             f"{runs[0]['flat'].get('metrics.probe.kl.seq_len')} tokens of the evaluation plays; mean [95% t-interval "
             f"over windows, n={n}]. Original perplexity on these windows: {math.exp(nll_ref):.2f}.", "",
             "| variant | cache bytes / token / layer | of original | perplexity | ratio to original | KL (nats/token) "
             "| top-1 agreement | latent rank |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["flat"]
        lines.append(f"| {r['label']} | {r['bytes']:.0f} | {r['bytes'] / ORIGINAL_BYTES:.1%} | "
                     f"{math.exp(f['metrics.probe.kl.nll.mean']):.2f} | {ratio(f)} | "
                     f"{ci(f, 'kl.kl')} | {ci(f, 'kl.top1_agree')} | {f.get('model.kv_lora_rank') if f.get('model.attention') == 'mla' else '—'} |")
    lines += ["", "## Fine detail: NLL change (nats) by token class", "",
              "Bins of the training plays' token counts (freq0 = rarest fifth of the held-out tokens' types by count); "
              "names = characters' names from each play's list of persons (spoken lines); numerals; unseen = types "
              "absent from the training plays. Mean [95% t over windows].", "",
              "| variant | freq0 (rare) | freq2 | freq4 (frequent) | names | numerals | unseen |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["family"] == "original":
            continue
        f = r["flat"]
        cells = [ci(f, f"token_bins.{b}.delta_nll", 2) for b in ("freq0", "freq2", "freq4", "names", "numerals", "unseen")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    mla = [r for r in runs if r["family"] == "mla"]
    base = [r for r in runs if r["family"] == "baseline"]
    lines += ["", "## Equal bytes, paired (rule 6)", "",
              "Per-window NLL difference, MLA minus the baseline nearest in bytes (negative = MLA better), paired 95% "
              "t-interval over the same windows; '—' where a run has no per-window file.", "",
              "| MLA variant | bytes | baseline | bytes | NLL difference |", "|---|---|---|---|---|"]
    for m in mla:
        if not base:
            break
        b = min(base, key=lambda r: abs(r["bytes"] - m["bytes"]))
        lines.append(f"| {m['label']} | {m['bytes']:.0f} | {b['label']} | {b['bytes']:.0f} | {paired(m, b)} |")
    return lines + ["", provenance(runs)]


def write_lines(path: Path, lines: list[str]) -> None:
    """Atomically write a generated table file."""
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---- selecting records by config --------------------------------------------------------------------------------
def value(flat: dict, key: str):
    """A config value of a record (keys older records lack: the value they ran at)."""
    return flat.get(key, MISSING.get(key))


def matches(flat: dict, spec: dict) -> bool:
    """Whether a record has every value of ``spec`` (ANY matches anything)."""
    return all(v is ANY or value(flat, k) == v for k, v in spec.items())


def find(runs: list[dict], spec: dict) -> dict | None:
    """The first run matching ``spec``, or None."""
    return next((r for r in runs if matches(r["flat"], spec)), None)


def main_recipe(budget: int, **over) -> dict:
    """The spec of the main recipe at ``budget`` (its RoPE dims), one-shot, calibration set A, with ``over``."""
    spec = {**MAIN, "convert.cache_budget": budget, "convert.rope_dims": MAIN_ROPE.get(budget, MAIN["convert.rope_dims"])}
    return {**spec, **{f"convert.{k}" if "." not in k else k: v for k, v in over.items()}}


def gqa(kv_heads=None, bits: int = 16, group=ANY, heal_steps: int = 0, trainable=ANY) -> dict:
    """The spec of a run on the original's GQA layout (original, KV quantisation, merged heads)."""
    return {"convert.direction": "gqa", "convert.kv_heads": kv_heads, "convert.kv_quant_bits": bits,
            "convert.kv_quant_group": group, "convert.heal_steps": heal_steps, "train.trainable": trainable}


def diff_label(flat: dict, base: dict = MAIN) -> str:
    """The config keys where a record differs from ``base``, as Hydra overrides."""
    parts = [f"{k}={json.dumps(value(flat, k))}" for k, v in base.items() if v is not ANY and value(flat, k) != v]
    return " ".join(p.replace("convert.", "") for p in parts) or "(the main recipe)"


def select(specs: list[tuple[str, dict]], runs: list[dict], extras: list[dict] = ()) -> list[tuple[str, dict | None]]:
    """(name, run or None) per spec, then (diff label, run) for each of ``extras`` that no spec matched."""
    out = [(name, find(runs, spec)) for name, spec in specs]
    taken = {id(r) for _, r in out if r is not None}
    return out + [(diff_label(r["flat"]), r) for r in extras if id(r) not in taken]


def not_run(name: str, columns: int) -> str:
    """A table row of ``columns`` cells for a variant without a record."""
    return f"| {name} | not run |" + " — |" * (columns - 2)


def table_rows(rows: list[tuple[str, dict | None]], columns: int, row) -> list[str]:
    """One table row per (name, run): ``row(name, run)`` where the run exists, a 'not run' row where it does not."""
    return [not_run(name, columns) if r is None else row(name, r) for name, r in rows]


def rank_of(f: dict) -> str:
    """The latent rank(s) of an MLA record: one number when uniform, else min..max."""
    ranks = f.get("metrics.convert.kv_lora_ranks") or [f.get("model.kv_lora_rank")]
    return str(ranks[0]) if len(set(ranks)) == 1 else f"{min(ranks)}..{max(ranks)}"


def kl_mean(r: dict | None) -> float | None:
    """The mean per-token KL of a run's record, or None."""
    return None if r is None else r["flat"].get("metrics.probe.kl.kl.mean")


# ---- rule 8: calibration sensitivity ----------------------------------------------------------------------------
def calibration_sets(runs: list[dict], budget: int) -> list[dict]:
    """The main recipe's runs at ``budget`` over calibration sets, by calibration offset."""
    spec = main_recipe(budget, calib_offset=ANY)
    return sorted((r for r in runs if matches(r["flat"], spec)), key=lambda r: value(r["flat"], "convert.calib_offset"))


def calib_spread(runs: list[dict], budget: int) -> float | None:
    """Rule 8's spread: max - min KL of the main recipe at ``budget`` over calibration sets (None with fewer than 2)."""
    kls = [k for k in map(kl_mean, calibration_sets(runs, budget)) if k is not None]
    return max(kls) - min(kls) if len(kls) >= 2 else None


def calibration_lines(runs: list[dict]) -> list[str]:
    """calibration.md: the main recipe at 192 and 120 with both calibration sets, and the spread of the KL."""
    lines = ["# real_conversion: calibration sensitivity (rule 8; generated by tables.py, do not edit)", "",
             f"The main recipe converted with calibration set A (`convert.calib_offset=0`: the first 8 x 1,024 tokens of "
             f"the calibration plays) and set B (`convert.calib_offset={CALIB_OFFSET}`: the next 8 x 1,024). Mean [95% t "
             "over windows]; 'vs set A' paired over the same windows (B minus A).", "",
             "| budget | calibration offset | calibration text | ppl ratio | KL (nats/token) | NLL vs set A | KL vs set A |",
             "|---|---|---|---|---|---|---|"]
    spreads, used = [], []
    for b in (192, 120):
        sets = {value(r["flat"], "convert.calib_offset"): r for r in calibration_sets(runs, b)}
        ref = sets.get(0)
        for off in sorted({0, CALIB_OFFSET} | set(sets)):
            r = sets.get(off)
            if r is None:
                lines.append(f"| {b} | {off} | not run | — | — | — | — |")
                continue
            used.append(r)
            f = r["flat"]
            text = f"{f.get('metrics.convert.calib.text', '—')} ({f.get('metrics.convert.calib.tokens', '?')} tokens)"
            cmp = ("—", "—") if off == 0 else (paired(r, ref), paired(r, ref, "kl"))
            lines.append(f"| {b} | {off} | {text} | {ratio(f)} | {ci(f, 'kl.kl')} | {cmp[0]} | {cmp[1]} |")
        s = calib_spread(runs, b)
        spreads.append(f"| {b} | {'not run (needs both calibration sets)' if s is None else f'{s:.3f}'} |")
    lines += ["", "## Spread (rule 8: ablation effects below it are 'within calibration noise')", "",
              "| budget | spread of KL over calibration sets (max - min, nats/token) |", "|---|---|", *spreads]
    return lines + ["", provenance(used)]


# ---- ablations at 120 -------------------------------------------------------------------------------------------
STRATEGIES = ("2norm", "uniform", "high", "low")
ALLOCATIONS = ("energy", "fisher", "whitened")
ABLATIONS = [
    ("rope_key=lstsq", main_recipe(120, rope_key="lstsq")),
    ("rope_dims=16 (rank 104)", main_recipe(120, rope_dims=16)),
    ("rope_dims=64 (rank 56)", main_recipe(120, rope_dims=64)),
    ("bkv=true", main_recipe(120, bkv=True)),
    ("whiten=false", main_recipe(120, whiten=False)),
    ("factorization=split", main_recipe(120, factorization="split")),
    ("kv_norm=true", main_recipe(120, kv_norm=True)),
    # MHA2MLA's layout: RoPE dims per KV head (3 x 8 + rank 96); RoRoPE builds one shared key, so lstsq / mean keys
    *[(f"rope_heads=per_kv_head rope_dims=8 strategy={s}",
       main_recipe(120, rope_heads="per_kv_head", rope_dims=8, strategy=s, rope_key=ANY)) for s in STRATEGIES],
    # CARE-style allocation of the same total cache (2,640 = 30 x 88 latent elements); needs a non-RoRoPE key
    *[(f"kv_budget=2640 allocation={a}",
       main_recipe(120, cache_budget=None, kv_budget=2640, allocation=a, rope_key=ANY, strategy=ANY)) for a in ALLOCATIONS],
]
# the orderings MHA2MLA reports (quality, so lower NLL): (better, relation, worse)
ORDERINGS = [(f"rope_heads=per_kv_head rope_dims=8 strategy={a}", rel, f"rope_heads=per_kv_head rope_dims=8 strategy={b}")
             for a, rel, b in (("2norm", ">=", "uniform"), ("uniform", ">", "high"), ("high", ">", "low"))]


def ordering_verdict(s: tuple[float, float, float, int] | None, rel: str) -> str:
    """Whether 'A rel B' holds from the paired NLL difference A - B (negative = A better)."""
    if s is None:
        return "not run"
    _, lo, hi, n = s
    if lo > 0:
        return "reversed (B better)"
    if hi < 0:
        return "holds (A better)"
    return "holds (not distinguishable)" if rel == ">=" else f"not distinguishable at n={n} windows"


def noise_verdict(r: dict, main: dict | None, spread: float | None) -> str:
    """Rule 8: whether an ablation's |KL effect| is below the calibration spread at 120."""
    a, m = kl_mean(r), kl_mean(main)
    if a is None or m is None:
        return "—"
    if spread is None:
        return f"|ΔKL| {abs(a - m):.3f}; calibration spread not run"
    within = abs(a - m) < spread
    cmp = "<" if within else ">="
    return f"{'within' if within else 'beyond'} calibration noise (|KL - KL_main| {abs(a - m):.3f} {cmp} {spread:.3f})"


def ablation_lines(runs: list[dict], ablate: list[dict]) -> list[str]:
    """ablations.md: one row per one-factor ablation at 120 vs the main recipe, rule 8's noise, MHA2MLA's orderings."""
    main = find(runs, main_recipe(120))
    spread = calib_spread(runs, 120)
    rows = select(ABLATIONS, ablate, extras=ablate)
    n = (main or {}).get("flat", {}).get("metrics.probe.kl.windows")
    head = ["# real_conversion: one-factor ablations at budget 120 (generated by tables.py from the run records; do not edit)",
            "", "Around the main recipe at 120 (RoRoPE shared key, 32 RoPE dims, rank 88, whitened joint SVD, no BKV, "
            "no latent norm, uniform rank). Perplexity ratio to the original and KL(original || variant): mean [95% t over "
            f"windows, n={n}]; ΔKL and NLL vs main: paired per-window differences ablation minus main (positive = the "
            "ablation is worse). 'vs calibration noise' (rule 8): |KL - KL_main| of the records' token-weighted means (the paired ΔKL column averages windows) against the spread of the main recipe's KL over "
            "two disjoint calibration sets at 120 " + ("(not run)" if spread is None else f"({spread:.3f} nats/token)") + ".",
            "", "| ablation | variant | latent rank | ppl ratio | KL (nats/token) | ΔKL vs main | NLL vs main "
            "| vs calibration noise |",
            "|---|---|---|---|---|---|---|---|"]
    lines = head + ([not_run("main recipe", 8)] if main is None else
                    [f"| main recipe | {main['label']} | {rank_of(main['flat'])} | {ratio(main['flat'])} | "
                     f"{ci(main['flat'], 'kl.kl')} | — | — | — |"])
    lines += table_rows(rows, 8, lambda name, r: (
        f"| {name} | {r['label']} | {rank_of(r['flat'])} | {ratio(r['flat'])} | {ci(r['flat'], 'kl.kl')} | "
        f"{paired(r, main, 'kl')} | {paired(r, main)} | {noise_verdict(r, main, spread)} |"))
    found = dict(rows)
    lines += ["", "## MHA2MLA's orderings (paired NLL difference A - B over the same windows; negative = A better)", "",
              "MHA2MLA: 2-norm >= uniform > high > low (per-KV-head RoPE dims), and joint > split factorisation; "
              "measured there after 2.25B healing tokens on benchmark accuracy, here one-shot on held-out NLL.", "",
              "| A | relation | B | NLL A - B | verdict |", "|---|---|---|---|---|"]
    pairs = ORDERINGS + [("main recipe (joint)", ">", "factorization=split")]
    found["main recipe (joint)"] = main
    for a, rel, b in pairs:
        s = paired_stats(found.get(a), found.get(b))
        lines.append(f"| {a} | {rel} | {b} | {paired(found.get(a), found.get(b))} | {ordering_verdict(s, rel)} |")
    lines += ["", "## Rank allocation vs uniform rank (same key, same total cache)", "",
              "Each allocation against the uniform-rank run with the same RoPE key and layout at 120 (RoRoPE needs the "
              "uniform rank, so allocations use a least-squares or mean key); paired NLL difference allocation minus "
              "uniform.", "", "| allocation | uniform reference | NLL vs uniform |", "|---|---|---|"]
    for a in ALLOCATIONS:
        r = found.get(f"kv_budget=2640 allocation={a}")
        if r is None:
            lines.append(f"| {a} | not run | — |")
            continue
        same = {k: value(r["flat"], k) for k in MAIN}
        uniform = {"convert.cache_budget": 120, "convert.kv_budget": None, "convert.allocation": "uniform"}
        ref = find(runs + ablate, {**same, **uniform})
        lines.append(f"| {a} | {'not run' if ref is None else ref['label']} | {paired(r, ref)} |")
    return lines + ["", provenance([r for r in [main, *(r for _, r in rows)] if r is not None]
                                   + calibration_sets(runs, 120))]


# ---- healing and its controls -----------------------------------------------------------------------------------
HEALED = [(f"MLA {b}, {t}", main_recipe(b, heal_steps=HEAL_STEPS, **{"train.trainable": t}))
          for b in (120, 48) for t in ("all", "attention")]
CONTROLS = [("control: original healed", gqa(heal_steps=HEAL_STEPS)),
            ("control: 3 -> 1 KV heads healed", gqa(kv_heads=1, heal_steps=HEAL_STEPS))]


def one_shot(spec: dict) -> dict:
    """The one-shot counterpart of a healed spec."""
    return {**spec, "convert.heal_steps": 0, "train.trainable": ANY}


def val_curve(r: dict) -> tuple[list[int], list[float]]:
    """(healing tokens, val loss) of a healed run: the converted model before healing at 0, then each eval."""
    f = r["flat"]
    start = f.get("metrics.convert.before.val_loss", f.get("metrics.convert.source.val_loss"))
    pts = [(0, start)] if start is not None else []
    pts += [(h["tokens"], h["val_loss"]) for h in r["history"] if "val_loss" in h and "tokens" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def healing_lines(runs: list[dict], heal: list[dict]) -> list[str]:
    """The controls section of healing.md: each healed variant against the original and the healed original."""
    rows = select(HEALED + CONTROLS, heal, extras=heal)
    ho = dict(rows).get("control: original healed")
    steps = sorted({h["step"] for _, r in rows if r is not None for h in r["history"] if "step" in h})
    lines = ["", "## Healing against its controls (the domain-adaptation control)", "",
             f"Every variant healed on the same {HEAL_STEPS} x 1,024 tokens of the training plays. 'healed original' = the "
             "original GQA model fine-tuned the same way: what healing repairs beyond adapting to the text is the "
             "variant's NLL minus the healed original's, paired over the same windows (positive = the variant is still "
             "worse). Ratio to the healed original = exp of that paired difference. Mean [95% t over windows]; val loss "
             "= the run's own eval set (data.eval_examples windows) after each eval.", "",
             "| variant | trainable parameters | one-shot ppl ratio | ppl ratio to original | ppl ratio to healed original "
             "| KL to original | NLL vs healed original | val loss at steps " + " / ".join(map(str, steps)) + " |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict) -> str:
        f = r["flat"]
        spec = dict(HEALED + CONTROLS).get(name)
        base = find(runs, one_shot(spec)) if spec is not None else None
        s = paired_stats(r, ho) if r is not ho else None
        to_ho = "—" if s is None else f"{math.exp(s[0]):.3f} [{math.exp(s[1]):.3f}, {math.exp(s[2]):.3f}]"
        by_step = {h.get("step"): h.get("val_loss") for h in r["history"]}
        curve = " / ".join("—" if by_step.get(t) is None else f"{by_step[t]:.3f}" for t in steps)
        params = f.get("metrics.params_trainable")
        return (f"| {r['label']} | {'—' if params is None else f'{params / 1e6:.1f}M'} | "
                f"{'—' if base is None else ratio(base['flat'])} | {ratio(f)} | {to_ho} | {ci(f, 'kl.kl')} | "
                f"{'—' if r is ho else paired(r, ho)} | {curve} |")

    lines += table_rows(rows, 8, row)
    return lines + ["", "Curves: figures/healing_curves.png (val loss vs healing tokens, controls dashed).", "",
                    provenance([r for _, r in rows if r is not None])]


def curves_figure(heal: list[dict], out: Path) -> None:
    """Val loss vs healing tokens per healed run, controls dashed, the original's val loss dotted."""
    if not any(val_curve(r)[0] for r in heal):
        return
    fig, axes = new_figure(1, 1, 7, 4.5)
    ax = axes[0, 0]
    source = None
    for r in sorted(heal, key=lambda r: r["label"]):
        xs, ys = val_curve(r)
        if not xs:
            continue
        ax.plot(xs, ys, "--" if r["flat"].get("convert.direction") == "gqa" else "-", marker="o", label=r["label"])
        source = r["flat"].get("metrics.convert.source.val_loss", source)
    if source is not None:
        ax.axhline(source, color="k", linestyle=":", label="original (no healing)")
    ax.set_xlabel("healing tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("SmolLM2-135M healing: val loss vs tokens")
    ax.legend(fontsize=6)
    save_all(fig, out, "healing_curves")


# ---- the full metric set (copying, next_line) -------------------------------------------------------------------
FULL = [*[(f"MLA {b}", main_recipe(b)) for b in (192, 120, 72, 48)],
        ("original", gqa()), ("int8 g64", gqa(bits=8, group=64)), ("int4 g32", gqa(bits=4, group=32)),
        ("3 -> 1 KV heads", gqa(kv_heads=1))]


def distances(rows: list[tuple[str, dict | None]]) -> list[int]:
    """The copying distances of the records (the probe's default when none ran)."""
    ds = {d for _, r in rows if r is not None for d in r["flat"].get("metrics.probe.copying.distances") or []}
    return sorted(ds) or list(DISTANCES)


def first_value(runs: list[dict], key: str) -> str:
    """The first record value of ``key`` among ``runs`` (a probe's settings), or '—' when none has it."""
    return str(next((r["flat"][key] for r in runs if r["flat"].get(key) is not None), "—"))


def full_lines(full: list[dict]) -> list[str]:
    """full.md: copying NLL / top-1 by distance and the next-line task's acc / acc_norm per variant."""
    rows = select(FULL, full, extras=full)
    ds = distances(rows)
    found = [r for _, r in rows if r is not None]
    ex, method, plen = (first_value(found, f"metrics.probe.copying.{k}")
                        for k in ("examples", "interval.method", "passage_len"))
    lines = ["# real_conversion: the full metric set (generated by tables.py from the run records; do not edit)", "",
             f"## Copying: the second occurrence of a {plen}-token held-out passage after d tokens of other held-out text",
             "", f"Mean over {ex} examples [95% {method} interval over examples]; 'first' = the same tokens in the first "
             "occurrence (no copy possible). A distance missing from a record: '—' (skipped: beyond model.max_seq_len)."]
    cols = ["first", *[f"d{d}" for d in ds]]
    for metric, title in (("nll", "NLL (nats/token)"), ("top1", "top-1 accuracy")):
        lines += ["", f"### {title}", "", "| variant | bytes | first | " + " | ".join(f"d={d}" for d in ds) + " |",
                  "|---|---|" + "---|" * len(cols)]
        digits = 3 if metric == "top1" else 2
        lines += table_rows(rows, len(cols) + 2, lambda _, r: f"| {r['label']} | {r['bytes']:.0f} | " + " | ".join(
            ci(r["flat"], f"copying.{c}.{metric}", digits) for c in cols) + " |")
    lines += ["", "## Next line (local lm-eval task: the true next line vs 3 lines from elsewhere in the play)", "",
              "Accuracy [95% Wilson interval over examples]; chance 0.25.", "",
              "| variant | bytes | acc | acc_norm | examples |", "|---|---|---|---|---|"]
    lines += table_rows(rows, 5, lambda _, r: (
        f"| {r['label']} | {r['bytes']:.0f} | {ci(r['flat'], 'next_line.acc')} | {ci(r['flat'], 'next_line.acc_norm')} | "
        f"{r['flat'].get('metrics.probe.next_line.examples', '—')} |"))
    return lines + ["", provenance(found)]


def copying_figure(full: list[dict], out: Path) -> None:
    """Copying top-1 accuracy on the second occurrence vs distance, one line per variant (95% intervals)."""
    if not any(f.get("metrics.probe.copying.distances") for f in (r["flat"] for r in full)):
        return
    fig, axes = new_figure(1, 1, 7, 4.5)
    ax = axes[0, 0]
    for r in sorted(full, key=lambda r: -r["bytes"]):
        f = r["flat"]
        ds = [d for d in f.get("metrics.probe.copying.distances") or []
              if f.get(f"metrics.probe.copying.d{d}.top1.mean") is not None]
        if not ds:
            continue
        m = np.array([f[f"metrics.probe.copying.d{d}.top1.mean"] for d in ds])
        lo = m - np.array([f[f"metrics.probe.copying.d{d}.top1.ci_low"] for d in ds])
        hi = np.array([f[f"metrics.probe.copying.d{d}.top1.ci_high"] for d in ds]) - m
        ax.errorbar(ds, m, yerr=[lo, hi], marker="o" if r["family"] == "mla" else "s", capsize=3,
                    linestyle="-" if r["family"] == "mla" else "--", label=f"{r['label']} ({r['bytes']:.0f} B)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance between the occurrences (tokens)")
    ax.set_ylabel("top-1 accuracy, second occurrence")
    ax.set_title("SmolLM2-135M: copying a held-out passage vs distance")
    ax.legend(fontsize=6)
    save_all(fig, out, "copying_vs_distance")


# ---- the Pareto figure ------------------------------------------------------------------------------------------
def save_all(fig, out: Path, name: str) -> None:
    """``name``.png and .pdf under ``out``, atomically."""
    for ext in ("png", "pdf"):
        save_figure(fig, out / f"{name}.{ext}", dpi=150)


def figure(runs: list[dict], name: str, out: Path = HERE / "figures") -> None:
    """Cache bytes per token per layer vs KL and vs perplexity ratio: MLA lines (per healing), baselines, the original."""
    fig, axes = new_figure(1, 2, 11, 4.2)
    panels = (("metrics.probe.kl.kl", lambda v: v, "KL(original || variant), nats/token"),
              ("metrics.probe.kl.delta_nll", math.exp, "perplexity ratio to the original"))
    for ax, (key, tf, ylabel) in zip(axes[0], panels):
        groups: dict[tuple, list[dict]] = {}
        for r in runs:
            if r["flat"].get(f"{key}.mean") is None:
                continue
            h = healed(r["flat"])
            groups.setdefault((r["family"], h if r["family"] == "mla" else r["label"]), []).append(r)
        for (fam, what), pts in sorted(groups.items(), key=lambda g: (g[0][0] != "mla", g[0][1])):
            pts.sort(key=lambda r: r["bytes"])
            ys = np.array([tf(r["flat"][f"{key}.mean"]) for r in pts])
            lo = ys - np.array([tf(r["flat"][f"{key}.ci_low"]) for r in pts])
            hi = np.array([tf(r["flat"][f"{key}.ci_high"]) for r in pts]) - ys
            fmt = {"mla": "o-", "baseline": "s", "original": "*"}[fam]
            name_ = ("MLA" + (what or " one-shot")) if fam == "mla" else what
            ax.errorbar([r["bytes"] for r in pts], ys, yerr=[lo, hi], fmt=fmt, label=name_, capsize=3, markersize=6)
            for r, y in zip(pts, ys):  # which budget each MLA point is
                if fam == "mla":
                    ax.annotate(str(r["flat"].get("convert.cache_budget") or ""), (r["bytes"], y), fontsize=6,
                                textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("cache bytes per token per layer")
        ax.set_ylabel(ylabel)
        if key.endswith(".kl"):
            ax.set_yscale("symlog", linthresh=0.01)
        else:
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("SmolLM2-135M: quality vs cache bytes (mean, 95% t over windows)")
    save_all(fig, out, name)


# ---- the study ---------------------------------------------------------------------------------------------------
def generic(run_dirs: list[Path], name: str, out: Path, figures: bool = True) -> list[str]:
    """``name``.md and its figure from the given run dirs (the tables of results.md)."""
    runs = annotate(load(run_dirs))
    if not runs:
        sys.exit(f"no finished runs in {', '.join(map(str, run_dirs))}")
    lines = results_lines(runs)
    write_lines(out / f"{name}.md", lines)
    if figures:
        figure(runs, "kl_vs_bytes" if name == "results" else name, out / "figures")
    return lines


def study(root: Path, figures: bool = True) -> None:
    """Every table (and, with ``figures``, figure) of the study from the sweep dirs under ``root`` (missing: 'not run')."""
    runs, ablate, calib, heal, full = (annotate(load([root / d])) for d in ("run", "ablate", "calib", "heal", "full"))
    figs = root / "figures"
    if runs:
        generic([root / "run"], "results", root, figures)
    write_lines(root / "ablations.md", ablation_lines(runs + calib, ablate))
    write_lines(root / "calibration.md", calibration_lines(runs + calib))
    heal_head = results_lines(list(heal)) if heal else ["# real_conversion: healing (generated by tables.py; do not edit)"]
    write_lines(root / "healing.md", heal_head + healing_lines(runs, heal))
    write_lines(root / "full.md", full_lines(full))
    if figures:
        if heal:
            figure(heal, "healing", figs)
        curves_figure(heal, figs)
        copying_figure(full, figs)


def main(argv: list[str]) -> None:
    """CLI: the whole study (no dirs, ``--root``) or the generic tables of the given dirs (``--out NAME``)."""
    opts = {}
    for flag in ("--out", "--root"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                sys.exit(f"{flag}: needs a value")
            opts[flag], argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if argv:
        print("\n".join(generic([Path(a) for a in argv], opts.get("--out", "results"), HERE)))
    else:
        study(Path(opts.get("--root", HERE)))


if __name__ == "__main__":
    main(sys.argv[1:])
