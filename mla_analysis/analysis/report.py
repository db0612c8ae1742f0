"""Comparison tables from run records: ``python -m mla_analysis.report DIR... [--out DIR]``.

Rows are built from each run's results.json only (never from logs). Runs are grouped by every
config key that varies across the set except the seed (and a data seed tied to it); each group reports
the mean over seeds and, with two or more seeds, a Student-t 95% interval of the mean with its n
(``mean_interval``); boolean ``.solved`` flags become the share of seeds with a 95% Wilson interval
(``share_interval``); ``steps_to_solve`` counts the unsolved seeds as censored at the run's last step.
Every table states the method and n of its intervals. Failed runs and run directories without results
are listed with their status, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..config import MLA_VARIANTS, ModelConfig
from ..training.results import ResultsError, atomic_write_text, find_run_dirs, flatten, load_record

CI_METHOD = "95% t"  # the label of every interval of a mean (report.mean_interval)
SHARE_METHOD = "95% Wilson"  # the label of every interval of a share of seeds (report.share_interval)
# metrics that are shares of examples in [0, 1]: their t-intervals are clipped to that range
BOUNDED_SUFFIXES = (".exact_match", ".token_acc")
# fields aggregate adds beside a metric (its interval, method, n, range, censoring): not metrics themselves
SIBLING_SUFFIXES = (".ci", ".ci_method", ".n", ".k", ".range", ".censored", ".median", ".median_is_lower_bound")
IGNORED_KEYS = ("seed", "device", "skip_finished", "train.progress", "train.resume", "train.threads",
                "train.init_from")  # a probed checkpoint is identified by its model config, its seed ignored
# metric columns shown when present: (record key, column title)
HEADLINE = [
    ("metrics.kv_bytes_per_token", "KV B/token (bf16)"),
    ("kv_ratio_to_mha", "KV ratio to MHA"),
    ("metrics.params", "params"),
    ("metrics.flops_per_token", "FLOPs/token"),
    ("metrics.val_loss", "val loss"),
    ("metrics.val_ppl", "val ppl"),
    ("metrics.convert.before.val_loss", "val loss before healing"),
    ("metrics.convert.scratch.val_loss", "val loss from scratch"),
]
TAIL = [
    ("metrics.search.feasible", "within tolerance"),
    ("metrics.search.objective", "search objective"),
    ("metrics.tokens_per_s", "tokens/s"),
    ("metrics.tokens_seen", "tokens"),
]


def _mha_kv_bytes(flat: dict[str, Any]) -> Optional[float]:
    """KV bytes/token (bf16) of MHA with the run's width, heads and depth, from the accounting closed form."""
    from ..models.accounting import kv_bytes_per_token
    from ..config import MLA_VARIANTS, ModelConfig

    try:
        mha = ModelConfig(attention="mha", d_model=flat["model.d_model"], n_heads=flat["model.n_heads"],
                          n_layers=flat["model.n_layers"])
    except KeyError:
        return None
    return kv_bytes_per_token(mha, "bf16")


_MODEL_DEFAULTS = {f"model.{k}": v for k, v in flatten(ModelConfig().to_dict()).items()}


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One flat row per run directory found under ``paths`` (status 'missing' when it has no results)."""
    rows = []
    for run_dir in find_run_dirs(paths):
        try:
            rec = load_record(run_dir)
            row = dict(rec["flat"])
            row["status"] = rec["status"] if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error', '')}".strip()
        except ResultsError as e:
            row = _row_from_hydra(run_dir)
            row["status"] = "missing" if "file not found" in str(e) else f"corrupt: {e}"
        row["run_dir"] = str(run_dir)
        for key, default in _MODEL_DEFAULTS.items():  # records written before a field existed group with its default
            if key not in row and any(k.startswith("model.") for k in row):
                row[key] = default
        mha = _mha_kv_bytes(row)
        if mha and row.get("metrics.kv_bytes_per_token") is not None:
            row["kv_ratio_to_mha"] = row["metrics.kv_bytes_per_token"] / mha
        rows.append(row)
    return rows


def _row_from_hydra(run_dir: Path) -> dict[str, Any]:
    """Config of a run that left no results, read from Hydra's saved config."""
    from omegaconf import OmegaConf

    from ..training.results import flatten

    path = Path(run_dir) / ".hydra" / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception:
        return {}
    try:  # resolved like the finished runs' records, so the run groups with its siblings
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:
        return flatten(OmegaConf.to_container(cfg, resolve=False))


def varying_keys(rows: list[dict[str, Any]], ignore: Sequence[str] = ()) -> list[str]:
    """Config keys whose values differ between runs (excluding seed, bookkeeping and ``ignore`` patterns)."""
    keys = set()
    for r in rows:
        keys.update(k for k in r if not k.startswith("metrics.") and k not in ("status", "run_dir", "kv_ratio_to_mha"))
    out = []
    for k in sorted(keys):
        if k in IGNORED_KEYS or k.startswith(("hydra", "logger.")) or any(fnmatch.fnmatchcase(k, pat) for pat in ignore):
            continue
        values = {repr(r.get(k)) for r in rows}
        if len(values) > 1 and not (k in SEED_LIKE_KEYS and all(r.get(k) == r.get("seed") for r in rows)):
            out.append(k)
    return out


# a data seed set to the run's seed (``data.seed: ${seed}`` in a study) is a second seed, not a factor
SEED_LIKE_KEYS = ("data.seed",)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """Student-t interval of the mean of ``values`` (n - 1 degrees of freedom); None when n < 2."""
    x = np.asarray([float(v) for v in values], dtype=float)
    n = len(x)
    if n < 2:
        return None
    from scipy.stats import t

    m = float(x.mean())
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return m - half, m + half


def share_interval(k: int, n: int, confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """Wilson score interval of a share k/n (scipy.stats.binomtest); None when n = 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def interval_label(n: int, method: str = CI_METHOD) -> str:
    """How an interval over n seeds is labelled in every table: '95% t, n=3' (n=2 says so: 1 df)."""
    if n < 2:
        return f"n={n}, no interval"
    return f"{method}, n={n}" + (" (1 df: very wide)" if n == 2 and method == CI_METHOD else "")


def censored_median(steps: Sequence[Optional[float]], censor_at: Optional[float]) -> tuple[Optional[float], bool]:
    """Median steps to solve with unsolved seeds (None) censored at ``censor_at``: (value, is a lower bound).

    All censored seeds sit above every solved one (the run stopped at ``censor_at``), so the sample median
    is exact while fewer than half of the seeds are censored, else only "> censor_at" is known.
    """
    n = len(steps)
    if n == 0:
        return None, False
    solved = sorted(float(s) for s in steps if s is not None)
    if 2 * len(solved) <= n:  # the middle of the sample is censored
        return censor_at, True
    big = float("inf")
    full = solved + [big] * (n - len(solved))
    mid = (full[(n - 1) // 2] + full[n // 2]) / 2
    return float(mid), False


def _label_keys(keys: list[str]) -> list[str]:
    """Put the variant and rank first among the grouping keys."""
    first = [k for k in ("model.name", "model.attention", "model.kv_lora_rank") if k in keys]
    return first + [k for k in keys if k not in first]


def aggregate(rows: list[dict[str, Any]], ignore: Sequence[str] = ()) -> tuple[list[str], list[dict[str, Any]]]:
    """Group rows by the varying config keys (minus ``ignore`` patterns); return (group keys, aggregated rows)."""
    keys = _label_keys(varying_keys(rows, ignore))
    if "model.attention" in keys and "model.name" in keys:
        keys.remove("model.attention")  # name already identifies the variant
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(repr(r.get(k)) for k in keys), []).append(r)
    metric_keys = sorted({k for r in rows for k in r if (k.startswith("metrics.") or k == "kv_ratio_to_mha")})
    out = []
    for members in groups.values():
        ok = [m for m in members if m.get("status") == "ok"]
        agg: dict[str, Any] = {k: members[0].get(k) for k in keys}
        if "model.kv_lora_rank" in agg and members[0].get("model.attention") not in MLA_VARIANTS:
            agg["model.kv_lora_rank"] = None  # not an MLA run: rank does not apply
        agg["n_ok"] = len(ok)
        agg["n_runs"] = len(members)
        agg["run_dirs"] = [m["run_dir"] for m in members if m.get("run_dir")]
        counts = Counter(m.get("status", "missing") for m in members)
        agg["status"] = "ok" if set(counts) == {"ok"} else "; ".join(f"{n} {st}" for st, n in sorted(counts.items()))
        for mk in metric_keys:
            vals = [m.get(mk) for m in ok]
            if mk.endswith(".solved"):
                flags = [bool(v) for v in vals if v is not None]
                agg[mk] = (sum(flags) / len(flags)) if flags else None
                if flags:
                    agg[mk + ".k"], agg[mk + ".n"] = sum(flags), len(flags)
                    agg[mk + ".ci"] = share_interval(sum(flags), len(flags))
                    agg[mk + ".ci_method"] = SHARE_METHOD
                continue
            nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(float(v))]
            agg[mk] = float(np.mean(nums)) if nums else None
            if nums:
                agg[mk + ".n"] = len(nums)
                agg[mk + ".range"] = (min(nums), max(nums))
            ci = mean_interval(nums) if len(set(nums)) > 1 else None  # equal on every seed: the value says it all
            if ci is not None and mk.endswith(BOUNDED_SUFFIXES):
                ci = (max(ci[0], 0.0), min(ci[1], 1.0))  # a share of examples: the interval clipped to [0, 1]
            if ci is not None:
                agg[mk + ".ci"] = ci
                agg[mk + ".ci_method"] = CI_METHOD
            if mk.endswith(".steps_to_solve"):  # unsolved seeds are censored at the last step, not dropped
                flags = [m.get(mk[: -len(".steps_to_solve")] + ".solved") for m in ok]
                steps = [m.get(mk) if f else None for m, f in zip(ok, flags) if f is not None]
                budget = max((m.get("train.steps") or 0 for m in ok), default=0) or None
                med, lower = censored_median(steps, budget)
                agg[mk + ".censored"] = sum(s is None for s in steps)
                agg[mk + ".median"], agg[mk + ".median_is_lower_bound"] = med, lower
        out.append(agg)
    out.sort(key=lambda a: tuple(_sort_key(a.get(k), k) for k in keys))
    return keys, out


VARIANT_ORDER = ("mha", "mha_partial_rope", "gqa", "mqa", "mla", "mla_coupled_rope")


def _sort_key(v: Any, key: str = "") -> tuple:
    if v is None:
        return (0, 0, "")
    if key in ("model.name", "model.attention") and str(v) in VARIANT_ORDER:
        return (1, VARIANT_ORDER.index(str(v)), str(v))
    if isinstance(v, (int, float)):
        return (1, v, "")
    return (2, 0, str(v))


def columns(keys: list[str], aggs: list[dict[str, Any]], extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(key, title) pairs: grouping keys, headline metrics, per-task accuracy, ``extra`` metric patterns, tail.

    ``extra``: fnmatch patterns over metric keys (without ``metrics.``), e.g. ``probe.retrieval.*.exact_match``;
    when any is given, the per-task accuracy columns are left out (a focused table).
    """
    cols = [(k, k.split(".", 1)[-1] if k.startswith("model.") else k) for k in keys]
    present = {k for a in aggs for k in a}
    cols += [(k, t) for k, t in HEADLINE if k in present]
    tasks = sorted({k[len("metrics."): -len(".exact_match")] for k in present
                    if k.endswith(".exact_match") and not k.startswith("metrics.probe.")})  # probes: own files
    if extra:
        tasks = []
        matched = sorted((k for k in present if k.startswith("metrics.") and not k.endswith(SIBLING_SUFFIXES)
                          and any(fnmatch.fnmatchcase(k[len("metrics."):], pat) for pat in extra)),
                         key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])  # len32 < len128
        cols += [(k, k[len("metrics."):].replace("probe.", "")) for k in matched]
    for t in tasks:
        cols.append((f"metrics.{t}.exact_match", f"{t} EM"))
        if f"metrics.{t}.solved" in present:
            cols.append((f"metrics.{t}.solved", f"{t} solved (seeds)"))
        if f"metrics.{t}.steps_to_solve" in present:
            cols.append((f"metrics.{t}.steps_to_solve", f"{t} steps to solve (solved seeds; median, unsolved censored)"))
    cols += [(k, t) for k, t in TAIL if k in present]
    cols += [("n_ok", "seeds ok"), ("status", "status")]
    if any(a.get("run_dirs") for a in aggs):
        cols.append(("run_dirs", "run dirs"))
    return cols


def _fmt(v: Any, ci: Optional[tuple[float, float]] = None) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return "; ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        if v == int(v):
            s = f"{int(v):,}"
        elif abs(v) >= 100:
            s = f"{v:,.0f}"
        else:
            s = f"{v:.4g}"
    elif isinstance(v, int):
        s = f"{v:,}"
    else:
        s = str(v)
    if ci is not None:
        s += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return s


def _cell(a: dict[str, Any], key: str) -> str:
    """Formatted cell: solved shares as 'k/n [Wilson]', other numbers as mean [t-interval]; n in 'seeds ok'."""
    if key.endswith(".solved") and a.get(key) is not None:
        n = a.get(key + ".n", a.get("n_ok") or 0)
        k = a.get(key + ".k", round(a[key] * n))
        ci = a.get(key + ".ci")
        return f"{k}/{n}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    cell = _fmt(a.get(key), a.get(key + ".ci"))
    if key.endswith(".steps_to_solve") and a.get(key + ".censored"):
        med = a.get(key + ".median")
        cell += f"; median {'> ' if a.get(key + '.median_is_lower_bound') else ''}{_fmt(med)}, {a[key + '.censored']} censored"
    return cell


def interval_note(aggs: list[dict[str, Any]]) -> str:
    """The line under every table naming its intervals' method and n."""
    ns = sorted({a.get("n_ok") or 0 for a in aggs})
    n = ", ".join(map(str, ns)) if ns else "0"
    return (f"Cells: mean over seeds [{CI_METHOD} interval of the mean, n = 'seeds ok' = {n}; n=2 has 1 df and is very "
            f"wide; exact match and token accuracy clipped to [0, 1]; no interval where every seed gave the same value]; solved: k/n seeds [{SHARE_METHOD} interval]; steps to solve: mean over solved seeds, the median "
            "counting unsolved seeds as censored at the last step.")


def to_markdown(keys: list[str], aggs: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """Markdown table (mean [95% t-interval] over seeds when there are several), with the interval note under it."""
    cols = columns(keys, aggs, extra)
    lines = ["| " + " | ".join(t for _, t in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for a in aggs:
        lines.append("| " + " | ".join(_cell(a, k).replace("|", "/") for k, _ in cols) + " |")
    return "\n".join(lines) + "\n\n" + interval_note(aggs) + "\n"


def to_csv(keys: list[str], aggs: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """CSV with raw numbers; CI bounds in <col>_ci_low/<col>_ci_high columns."""
    cols = columns(keys, aggs, extra)
    header = []
    for k, _ in cols:
        header.append(k)
        if any(k + ".ci" in a for a in aggs):
            header += [k + "_ci_low", k + "_ci_high", k + "_ci_method"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for a in aggs:
        row = []
        for k, _ in cols:
            value = a.get(k)
            row.append("" if value is None else "; ".join(map(str, value)) if isinstance(value, list) else value)
            if any(k + ".ci" in b for b in aggs):
                ci = a.get(k + ".ci")
                row += [ci[0], ci[1], a.get(k + ".ci_method", "")] if ci else ["", "", ""]
        w.writerow(row)
    return buf.getvalue()


def to_latex(keys: list[str], aggs: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """LaTeX (booktabs) table."""
    cols = columns(keys, aggs, extra)

    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule", " & ".join(esc(t) for _, t in cols) + r" \\", r"\midrule"]
    for a in aggs:
        lines.append(" & ".join(esc(_cell(a, k)) for k, _ in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + interval_note(aggs)]
    return "\n".join(lines) + "\n"


def write_tables(paths: Iterable[str | Path], out_dir: str | Path, formats=("md", "csv", "tex"),
                 extra: Sequence[str] = (), name: str = "comparison", ignore: Sequence[str] = ()) -> dict[str, Path]:
    """Build the comparison tables from run directories and write ``name``.{md,csv,tex} atomically."""
    paths = list(paths)
    rows = load_rows(paths)
    if not rows:
        raise ResultsError(f"no run directories under {', '.join(map(str, paths))}")
    corrupt = [r for r in rows if str(r.get("status", "")).startswith("corrupt")]
    if len(corrupt) == len(rows):
        raise ResultsError(f"no readable record under {', '.join(map(str, paths))}: all {len(rows)} are corrupt, "
                           f"e.g. {corrupt[0]['status'][len('corrupt: '):]}")
    keys, aggs = aggregate(rows, ignore)
    out_dir = Path(out_dir)
    for a in aggs:  # named relative to the tables, so they stay valid wherever the folder is moved
        a["run_dirs"] = [os.path.relpath(d, out_dir) for d in a.get("run_dirs", [])]
    writers = {"md": to_markdown, "csv": to_csv, "tex": to_latex}
    written = {}
    for fmt in formats:
        written[fmt] = atomic_write_text(out_dir / f"{name}.{fmt}", writers[fmt](keys, aggs, extra))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: rebuild comparison tables from any set of run directories."""
    p = argparse.ArgumentParser(prog="python -m mla_analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="run directories or folders containing them (e.g. a sweep dir)")
    p.add_argument("--out", default=None, help="where to write comparison.* (default: the first DIR)")
    p.add_argument("--formats", default="md,csv,tex", help="comma-separated subset of md,csv,tex")
    p.add_argument("--columns", default="", help="comma-separated metric key patterns to tabulate instead of the "
                   "task columns (fnmatch, without 'metrics.'), e.g. 'probe.retrieval.retrieval.*.exact_match'")
    p.add_argument("--name", default="comparison", help="file stem of the written tables")
    p.add_argument("--ignore", default="", help="comma-separated config key patterns not to group by (fnmatch), "
                   "e.g. 'model.kv_lora_ranks' when per-layer ranks follow from convert.allocation")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("md", "csv", "tex")]
    if bad:
        print(f"error: --formats={bad[0]!r} is invalid (allowed: md, csv, tex)", file=sys.stderr)
        return 2
    try:
        extra = [c.strip() for c in args.columns.split(",") if c.strip()]
        ignore = [c.strip() for c in args.ignore.split(",") if c.strip()]
        written = write_tables(args.dirs, args.out or args.dirs[0], formats, extra, args.name, ignore)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "md" in written:
        print(written["md"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
