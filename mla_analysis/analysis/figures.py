"""Publication figures for a sweep, built from the runs' records (results.json) and probe files.

``python -m mla_analysis.figures DIR... [--out OUT] [--metric KEY] [--task NAME]`` writes, when the
runs carry the data for them (PNG and PDF each):

- ``pareto``: quality (``--metric``, default ``val_loss``) against KV-cache bytes per token, mean and
  95% Student-t interval of the mean over seeds (n in the legend) per configuration, with the Pareto frontier (less cache, better quality).
- ``rank_accuracy``: per task, exact match against MLA ``kv_lora_rank`` with a CI band; the MHA / GQA /
  MQA runs of the sweep as horizontal references.
- ``retrieval_heatmaps``: the retrieval probe's length x depth (MQAR: length x pairs) grid of one
  task, per configuration side by side, averaged over seeds.
- ``spectra``: normalised singular values sigma_i / sigma_1 of the cached tensor per layer (spectra probe).
- ``experts``: expert load per layer and the last layer's co-activation matrix (experts probe).

Groups are report.aggregate's (every varying config key except the seed); only runs with status ok count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..config import MLA_VARIANTS
from ..probes.plotting import figure, save_figure  # noqa: F401  (the shared style; importable from here as before)
from ..training.results import read_json

FORMATS = ("png", "pdf")
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")
LABEL_SKIP = ("rope_interleave",)  # follows from the variant name


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.png and .pdf; returns the paths."""
    return [save_figure(fig, out_dir / f"{name}.{fmt}", dpi=150) for fmt in FORMATS]


def _label(agg: dict[str, Any], keys: list[str]) -> str:
    """Short legend label of a group: its varying config values."""
    parts = []
    for k in keys:
        v = agg.get(k)
        if v is None:
            continue
        short = k.split(".")[-1]
        if short in LABEL_SKIP:
            continue
        parts.append(str(v) if short in ("name", "attention") else f"{short}={v}")
    return " ".join(parts) or "all runs"


def _groups(rows: list[dict[str, Any]], ignore: Sequence[str] = ()
            ) -> tuple[list[str], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Aggregated groups plus the ok run rows of each group, keyed by label."""
    from .report import aggregate

    keys, aggs = aggregate(rows, ignore)
    short = [k for k in ("model.name", "model.kv_lora_rank", "model.n_kv_heads") if k in keys]
    labels = [_label(a, short) for a in aggs]
    if not short or len(set(labels)) < len(labels):  # the variant does not identify a group: all keys
        labels = [_label(a, keys) for a in aggs]
    members: dict[str, list[dict[str, Any]]] = {}
    for agg, label in zip(aggs, labels):
        agg["label"] = label
        members[label] = [r for r in rows if r.get("status") == "ok" and all(repr(r.get(k)) == repr(agg.get(k)) or
                          (k == "model.kv_lora_rank" and agg.get(k) is None) for k in keys)]
    return keys, aggs, members


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (losses, perplexities)."""
    return any(t in metric for t in LOWER_IS_BETTER)


def pareto_front(points: list[tuple[float, float]], minimise_y: bool) -> list[int]:
    """Indices of the points no other point beats in both x (smaller) and y; sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if minimise_y else -points[i][1]))
    front, best = [], None
    for i in order:
        y = points[i][1]
        if best is None or (y < best if minimise_y else y > best):
            front.append(i)
            best = y
    return front


def plot_pareto(aggs: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """Quality vs KV bytes/token with CI error bars and the Pareto frontier."""
    key = f"metrics.{metric}"
    pts = [a for a in aggs if a.get(key) is not None and a.get("metrics.kv_bytes_per_token")]
    if not pts:
        return []
    fig, ax = figure(1, 1, 6.4, 4.4)
    ax = ax[0, 0]
    xy = [(a["metrics.kv_bytes_per_token"], a[key]) for a in pts]
    for a, (x, y) in zip(pts, xy):
        ci = a.get(key + ".ci")
        yerr = None if ci is None else [[y - ci[0]], [ci[1] - y]]
        ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, label=f"{a['label']} (n={a['n_ok']})")
    minimise = lower_is_better(metric)
    front = pareto_front(xy, minimise)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto frontier")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache per token, bytes (bf16, all layers)")
    ax.set_ylabel(f"{metric} ({'lower' if minimise else 'higher'} is better)")
    ax.set_title(f"{metric} vs KV cache (mean, 95% t-interval over seeds, n in legend)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out_dir, "pareto")


def plot_rank_accuracy(aggs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Exact match vs kv_lora_rank per task with CI bands; non-MLA variants as reference lines."""
    mla = sorted((a for a in aggs if a.get("model.kv_lora_rank") is not None), key=lambda a: a["model.kv_lora_rank"])
    # tasks no configuration learns (mean exact match < 0.1 everywhere) are left out of the figure
    tasks = sorted({k[len("metrics."): -len(".exact_match")] for a in aggs for k in a
                    if k.endswith(".exact_match") and not k.startswith("metrics.probe.") and (a.get(k) or 0) >= 0.1})
    if not mla or not tasks:
        return []
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = figure(nrows, ncols, 5.2 * ncols, 4.0 * nrows)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    others = [a for a in aggs if a.get("model.kv_lora_rank") is None]
    for ax, task in zip(axes.flat, tasks):
        key = f"metrics.{task}.exact_match"
        variants = sorted({str(a.get("model.name") or a.get("model.attention")) for a in mla})
        all_ranks: set[int] = set()
        for i, variant in enumerate(variants):  # one curve per MLA variant (e.g. mla, mla_coupled_rope)
            series = [a for a in mla if str(a.get("model.name") or a.get("model.attention")) == variant
                      and a.get(key) is not None]
            ranks = [a["model.kv_lora_rank"] for a in series]
            mean = [a[key] for a in series]
            lo = [a.get(key + ".ci", (m, m))[0] for a, m in zip(series, mean)]
            hi = [a.get(key + ".ci", (m, m))[1] for a, m in zip(series, mean)]
            ns = sorted({a.get("n_ok") or 0 for a in series})
            ax.plot(ranks, mean, "o-", color=f"C{i}", label=f"{variant} (mean over seeds)")
            ax.fill_between(ranks, lo, hi, color=f"C{i}", alpha=0.2,
                            label=f"{variant} 95% t-interval, n={'/'.join(map(str, ns))}")
            all_ranks.update(ranks)
        for i, a in enumerate(o for o in others if o.get(key) is not None):
            ax.axhline(a[key], ls="--", lw=1, color=f"C{i + len(variants)}", label=a["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ranks), [str(r) for r in sorted(all_ranks)])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("kv_lora_rank (latent width d_c)")
        ax.set_ylabel(f"{task} exact match")
        ax.set_title(f"{task}: accuracy vs KV rank", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, out_dir, "rank_accuracy")


def _grid(cells: list[dict[str, Any]], task: str) -> Optional[tuple[list, list, np.ndarray, str]]:
    """(lengths, second axis values, mean exact-match matrix, axis name) of one task's cells."""
    cells = [c for c in cells if c["task"] == task]
    if not cells:
        return None
    axis = "pairs" if task == "mqar" else "depth"
    lengths = sorted({c["length"] for c in cells})
    second = sorted({c.get(axis) for c in cells}, key=lambda v: (v is None, v))
    acc: dict[tuple, list[float]] = {}
    for c in cells:
        acc.setdefault((c["length"], c.get(axis)), []).append(c["exact_match"])
    m = np.full((len(second), len(lengths)), np.nan)
    for (length, s), vals in acc.items():
        m[second.index(s), lengths.index(length)] = float(np.mean(vals))
    return lengths, second, m, axis


def plot_retrieval(members: dict[str, list[dict[str, Any]]], task: str, out_dir: Path) -> list[Path]:
    """The retrieval grid of ``task`` per configuration, side by side (seed mean)."""
    panels = []
    for label, runs in members.items():
        cells, train_len = [], None
        for r in runs:
            path = Path(r["run_dir"]) / "retrieval.json"
            if path.exists():
                rec = read_json(path)
                cells += rec["cells"]
                train_len = rec["train_len"]
        g = _grid(cells, task)
        if g is not None:
            panels.append((label, g, train_len, len(runs)))
    if not panels:
        return []
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = figure(nrows, ncols, 3.4 * ncols + 1.0, 3.0 * nrows + 0.4)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    im = None
    for ax, (label, (lengths, second, m, axis), train_len, n) in zip(axes.flat, panels):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(second)), [f"{s:.2f}" if isinstance(s, float) else str(s) for s in second])
        if train_len in lengths:  # contexts right of this line are longer than training
            ax.axvline(lengths.index(train_len) + 0.5, color="w", ls="--", lw=1)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key-value pairs" if axis == "pairs" else "needle depth")
        ax.set_title(f"{label} (n={n})", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"{task} exact match")
    fig.suptitle(f"{task}: exact match by context length (dashed: training length)", fontsize=10)
    return _save(fig, out_dir, f"retrieval_{task}")


def _spectrum(rec: dict[str, Any], tensor: str) -> list[np.ndarray]:
    """Per layer, the mean over heads of sigma / sigma_1 for ``tensor`` (activations)."""
    out = []
    for layer in rec["layers"]:
        entry = layer["activations"].get(tensor)
        if entry is None:
            return []
        svs = [np.asarray(s["sv"], dtype=float) for s in entry["spectra"]]
        svs = [s / s[0] for s in svs if len(s) and s[0] > 0]
        out.append(np.mean(np.stack(svs), axis=0) if svs else np.array([]))
    return out


def _first_record(runs: list[dict[str, Any]], name: str) -> Optional[dict[str, Any]]:
    """The probe file ``name`` of the first run that has it, or None."""
    for r in runs:
        path = Path(r["run_dir"]) / name
        if path.exists():
            return read_json(path)
    return None


def plot_spectra(members: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Normalised key spectra per layer (MLA: the cached latent c_kv), one panel per configuration."""
    panels = []
    for label, runs in members.items():
        rec = _first_record(runs, "spectra.json")  # the first seed's spectra represent the configuration
        if rec is not None:
            tensor = "c_kv" if rec["attention"] in MLA_VARIANTS else "k"
            spec = _spectrum(rec, tensor)
            if spec:
                panels.append((label, tensor, spec))
    if not panels:
        return []
    fig, axes = figure(1, len(panels), 3.6 * len(panels), 3.2)
    for ax, (label, tensor, spec) in zip(axes[0], panels):
        for i, s in enumerate(spec):
            ax.semilogy(np.arange(1, len(s) + 1), s, label=f"layer {i}")
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.set_title(f"{label}: {tensor}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Singular-value spectra of the cached keys (mean over heads, first seed)", fontsize=10)
    return _save(fig, out_dir, "spectra")


def plot_experts(members: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Expert load per layer (heat map) and the last MoE layer's co-activation, per configuration."""
    panels = [(label, rec) for label, runs in members.items()
              if (rec := _first_record(runs, "experts.json")) is not None]
    if not panels:
        return []
    fig, axes = figure(2, len(panels), 4.2 * len(panels), 6.4)
    for j, (label, rec) in enumerate(panels):
        load = np.array([lay["load_fraction"] for lay in rec["layers"]])
        im = axes[0, j].imshow(load, aspect="auto", cmap="magma", vmin=0)
        axes[0, j].set_xlabel("expert")
        axes[0, j].set_ylabel("MoE layer")
        axes[0, j].set_yticks(range(load.shape[0]), [str(lay["layer"]) for lay in rec["layers"]])
        axes[0, j].set_title(f"{label}: load (balanced = {1 / load.shape[1]:.3f})", fontsize=9)
        fig.colorbar(im, ax=axes[0, j], shrink=0.8, label="fraction of routed slots")
        co = np.array(rec["layers"][-1]["coact"], dtype=float)
        np.fill_diagonal(co, np.nan)  # 1 by definition
        im = axes[1, j].imshow(co, cmap="viridis", vmin=0, vmax=1)
        axes[1, j].set_xlabel("expert j")
        axes[1, j].set_ylabel("expert i")
        axes[1, j].set_title(f"last layer: CoAct(i->j) = N(i,j)/N(i)", fontsize=9)
        fig.colorbar(im, ax=axes[1, j], shrink=0.8)
    fig.suptitle("Expert load and co-activation (experts probe, first seed)", fontsize=10)
    return _save(fig, out_dir, "experts")


def make_figures(paths: Iterable[str | Path], out_dir: str | Path, metric: str = "val_loss",
                 task: Optional[str] = None, ignore: Sequence[str] = ()) -> list[Path]:
    """Every figure the runs under ``paths`` have data for; returns the written files."""
    from .report import load_rows

    rows = load_rows(paths)
    if not rows:
        raise FileNotFoundError(f"no run directories under {', '.join(map(str, paths))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, aggs, members = _groups(rows, ignore)
    written = plot_pareto(aggs, metric, out_dir) + plot_rank_accuracy(aggs, out_dir)
    tasks = [task] if task else ["mqar", "passkey", "niah"]
    for t in tasks:
        written += plot_retrieval(members, t, out_dir)
    written += plot_spectra(members, out_dir) + plot_experts(members, out_dir)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: figures for the run directories given."""
    ap = argparse.ArgumentParser(prog="python -m mla_analysis.figures", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="sweep or run directories (searched recursively for results.json)")
    ap.add_argument("--out", default=None, help="output directory (default: <first path>/figures)")
    ap.add_argument("--metric", default="val_loss", help="quality metric of the Pareto plot (a results.json metric key)")
    ap.add_argument("--task", default=None, help="retrieval task of the heat maps (default: mqar, passkey, niah)")
    ap.add_argument("--ignore", default="", help="comma-separated config key patterns not to group by (as report)")
    args = ap.parse_args(argv)
    for p in args.paths:
        if not Path(p).exists():
            print(f"error: {p}: no such directory", file=sys.stderr)
            return 2
    try:
        ignore = [c.strip() for c in args.ignore.split(",") if c.strip()]
        written = make_figures(args.paths, args.out or Path(args.paths[0]) / "figures", args.metric, args.task, ignore)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
