"""``probe=head_ablation``: does a head's key spectrum predict what the model loses without that head?

For every attention layer l and head h (``layers``: null = all):

- Ablation: the head's output is zeroed before the output projection (a forward pre-hook on the
  layer's ``wo`` zeroes input columns [h*d_v, (h+1)*d_v); no model file is touched), and the eval sets
  (first ``max_examples`` sequences each) are re-scored with ``train.evaluate``. Effects, ablated minus
  unablated: ``delta_loss`` (next-token loss on "lm"), ``delta_error`` (retrieval error 1 - exact_match,
  mean over the task sets, e.g. mqar), ``delta_token_error`` (1 - token accuracy, mean over tasks; finer
  than exact match when a small model rarely solves whole examples). Without task sets only
  ``delta_loss`` exists.
- Spectrum: the keys the head attends with, on the "lm" eval set (at most ``max_tokens`` tokens),
  stacked over tokens (float64 Gram, ``spectra.GramAccumulator``; rows mean-centred only when
  ``center``). MHA / GQA / MQA: the key after RoPE of the head's K/V head (query heads of one GQA group
  share it, so they get identical spectra). MLA: k_h = [W^UK_h c_kv ; k_rope] (the head's content key
  up-projected from the latent, concatenated with the decoupled RoPE key shared by all heads) --
  exactly the key the head's query meets. MLA with coupled RoPE: the up-projected key after RoPE.
  ``ner`` = Roy-Vetterli effective rank / key width (Roy & Vetterli 2007; normalised as
  KV-CoRE normalises it, by a width d, here the head's key width); ``energy_dropped`` = 1 - (energy of the
  top ``rank`` singular values) / total, what a rank-r truncation of these keys drops.
- Correlation over heads: ``spearman.<metric>.<effect>.rho`` / ``.p_value`` (scipy.stats.spearmanr) and a
  paired bootstrap confidence interval ``.ci_low`` / ``.ci_high`` (scipy.stats.bootstrap, BCa,
  ``bootstrap_resamples``, ``confidence_level``); omitted when fewer than 3 heads or a constant column.
  When BCa is undefined (a degenerate bootstrap distribution, e.g. rho = 1 in every resample) the
  percentile interval of the resamples with a defined rho is used, and the method is recorded.

Flat metrics: ``base.loss``, ``base.error``, ``base.token_error``, ``n_heads``, per head
``L<l>.h<h>.{ner, energy_dropped, delta_loss, delta_error, delta_token_error}`` and the correlations.
head_ablation.json holds every head record (what ``correlate_runs`` pools across the runs of a sweep);
``head_ablation_scatter.png`` draws each metric against each effect.

``correlate_runs(run_dirs)`` (and ``python -m mla_analysis.probes.head_ablation RUN_DIR ...``) pools the
head records of several runs and returns Spearman's rho with a bootstrap CI. Heads of one model are not
independent samples; the CI treats them as such.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..training.forward_hooks import run_hooked
from ..models.attention import Attention
from ..models.mla import MLA, MLACoupledRoPE
from ..training.results import atomic_write_json, read_json
from . import ProbeError, register
from ._common import figure, model_config, options, save_figure, unwrap
from .spectra import GramAccumulator, effective_rank, energy_at_rank


METRICS = ("ner", "energy_dropped")
EFFECTS = ("delta_error", "delta_token_error", "delta_loss")
RESULT_FILE = "head_ablation.json"


def _parse(params: dict, n_layers: int) -> dict:
    p = options("head_ablation", params)  # checked in mla_analysis.config.probes; the layer range here
    layers = p["layers"]
    if layers is None:
        p["layers"] = list(range(n_layers))
    else:
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        ok = isinstance(layers, (list, tuple)) and layers and all(
            isinstance(l, int) and not isinstance(l, bool) and 0 <= l < n_layers for l in layers
        )
        if not ok:
            raise ConfigError(
                f"probe.head_ablation.layers={p['layers']!r} is invalid (allowed: null | a non-empty list of layer indices 0..{n_layers - 1})"
            )
        p["layers"] = sorted(set(layers))
    return p


# ---- ablation ---------------------------------------------------------------------------------------


def head_width(attn: torch.nn.Module) -> int:
    """Width of one head's output slice at the input of ``wo`` (d_h, or d_v for MLA)."""
    if isinstance(attn, MLA):
        return attn.v_head_dim
    if isinstance(attn, Attention):
        return attn.head_dim
    raise ConfigError(f"probe.head_ablation: attention module {type(attn).__name__} is not supported")


@contextlib.contextmanager
def ablated_heads(model: torch.nn.Module, heads: dict[int, Sequence[int]]):
    """Within the block the listed heads ({layer: [head, ...]}) output zero before ``wo`` (forward pre-hook)."""
    core = unwrap(model)
    handles = []
    try:
        for layer, hs in heads.items():
            attn = core.layers[layer].attn
            d = head_width(attn)

            def fn(module, args, hs=tuple(hs), d=d):
                o = args[0].clone()  # (B, T, H*d), head-major
                for h in hs:
                    o[..., h * d : (h + 1) * d] = 0
                return (o,)

            handles.append(attn.wo.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _summary(res: dict, tasks: list[str]) -> dict[str, float]:
    """loss ("lm"), error = mean over tasks of 1 - exact_match, token_error = mean of 1 - token_acc."""
    out = {"loss": res["val_loss"]}
    em = [1.0 - res[f"{t}.exact_match"] for t in tasks if math.isfinite(res[f"{t}.exact_match"])]
    ta = [1.0 - res[f"{t}.token_acc"] for t in tasks if math.isfinite(res[f"{t}.token_acc"])]
    if em:
        out["error"] = float(np.mean(em))
        out["token_error"] = float(np.mean(ta))
    for t in tasks:
        out[f"{t}.error"] = 1.0 - res[f"{t}.exact_match"]
    return out


def ablation_effects(
    model: torch.nn.Module, eval_sets: dict, layers: list[int], batch_size: int, device: torch.device
) -> tuple[dict, dict[tuple[int, int], dict]]:
    """Unablated scores and, per (layer, head), the change of each score when that head is ablated."""
    from ..training.trainer import evaluate

    core = unwrap(model)
    tasks = [n for n in eval_sets if n != "lm"]
    base = _summary(evaluate(core, eval_sets, device, batch_size), tasks)
    effects: dict[tuple[int, int], dict] = {}
    for l in layers:
        for h in range(core.layers[l].attn.n_heads):
            with ablated_heads(core, {l: [h]}):
                got = _summary(evaluate(core, eval_sets, device, batch_size), tasks)
            effects[(l, h)] = {f"delta_{k}": got[k] - base[k] for k in base}
    return base, effects


# ---- key spectra ------------------------------------------------------------------------------------


def head_keys(attn: torch.nn.Module, x: torch.Tensor, rope, cos, sin) -> torch.Tensor:
    """Keys (B, T, H, d_k) each query head attends with, recomputed from the attention input x."""
    B, T, _ = x.shape
    if isinstance(attn, Attention):
        k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)  # (B, T, H_kv, d_h)
        if rope is not None:
            k = rope.rotate(k, cos, sin)
        return k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)  # (B, T, H, d_h): head h -> K/V head h // group
    if isinstance(attn, MLACoupledRoPE):
        c_kv = attn.kv_norm(attn.wkv_a(x))  # (B, T, d_c)
        w_uk, _ = attn.w_uk_uv()  # (H, d_qk, d_c)
        k = torch.einsum("btc,hdc->bthd", c_kv, w_uk)  # (B, T, H, d_qk)
        k_nope, k_r = k.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        return torch.cat((k_nope, rope.rotate(k_r, cos, sin)), -1)  # (B, T, H, d_qk)
    if isinstance(attn, MLA):
        c_kv, k_r = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        c_kv = attn.kv_norm(c_kv)  # (B, T, d_c)
        k_rope = rope.rotate(k_r.unsqueeze(2), cos, sin)  # (B, T, 1, d_rope)
        w_uk, _ = attn.w_uk_uv()  # (H, d_nope, d_c)
        k_nope = torch.einsum("btc,hdc->bthd", c_kv, w_uk)  # (B, T, H, d_nope): W^UK_h c_kv
        return torch.cat((k_nope, k_rope.expand(B, T, attn.n_heads, attn.qk_rope_head_dim)), -1)  # (B, T, H, d_qk)
    raise ConfigError(f"probe.head_ablation: attention module {type(attn).__name__} is not supported")


@torch.no_grad()
def key_grams(
    model: torch.nn.Module, inputs: torch.Tensor, layers: list[int], batch_size: int, device: torch.device
) -> dict[int, list[GramAccumulator]]:
    """Per layer, one float64 Gram of the stacked keys per query head, streamed over ``inputs`` [N, L]."""
    core = unwrap(model)
    grams: dict[int, list[GramAccumulator]] = {}

    def hook(l: int):
        def fn(module, args, kwargs, output):
            names = ("x", "rope", "cos", "sin")
            x, rope, cos, sin = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
            k = head_keys(module, x, rope, cos, sin)  # (B, T, H, d_k)
            if not torch.isfinite(k).all():
                raise ProbeError(f"head_ablation: layer {l} keys have non-finite values (NaN/inf)")
            accs = grams.setdefault(l, [GramAccumulator(k.shape[-1], k.device) for _ in range(k.shape[2])])
            for h, acc in enumerate(accs):
                acc.update(k[:, :, h])

        return fn

    handles = [core.layers[l].attn.register_forward_hook(hook(l), with_kwargs=True) for l in layers]
    run_hooked(core, handles, inputs, batch_size, device)
    return grams


def spectrum_metrics(sv: Any, dim: int, rank: int) -> dict[str, float]:
    """erank, ner = erank / dim, and energy_dropped = 1 - energy of the top ``rank`` singular values."""
    er = effective_rank(sv)
    return {"erank": er, "ner": er / dim, "energy_dropped": 1.0 - energy_at_rank(sv, rank)}


# ---- correlation ------------------------------------------------------------------------------------


def _spearman_vec(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rho along ``axis`` (Pearson of average ranks); NaN where a column is constant."""
    from scipy.stats import rankdata

    rx = rankdata(x, axis=axis)
    ry = rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=axis) / den, np.nan)


def spearman_ci(
    x: Sequence[float], y: Sequence[float], n_resamples: int = 999, confidence_level: float = 0.95, seed: int = 0
) -> Optional[dict[str, Any]]:
    """Spearman rho, its p-value and a paired bootstrap CI; None with < 3 pairs or a constant column."""
    from scipy.stats import bootstrap, spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman_ci: x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    test = spearmanr(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate / NaN resamples are handled below
        res = bootstrap(
            (x, y), _spearman_vec, paired=True, vectorized=True, n_resamples=n_resamples,
            confidence_level=confidence_level, method="BCa", rng=np.random.default_rng(seed),
        )
    lo, hi, method = float(res.confidence_interval.low), float(res.confidence_interval.high), "BCa"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        dist = np.asarray(res.bootstrap_distribution)
        dist = dist[np.isfinite(dist)]
        alpha = (1 - confidence_level) / 2
        lo, hi = (float(v) for v in np.percentile(dist, [100 * alpha, 100 * (1 - alpha)]))
        method = f"percentile ({n_resamples - dist.size} undefined resamples dropped)"
    return {
        "rho": float(test.statistic),
        "p_value": float(test.pvalue),
        "ci_low": lo,
        "ci_high": hi,
        "n": int(x.size),
        "ci_method": method,
        "confidence_level": confidence_level,
    }


def correlations(
    records: list[dict], n_resamples: int, confidence_level: float, seed: int
) -> dict[str, dict[str, Any]]:
    """``spearman_ci`` of every (metric, effect) pair over the head records that have both values."""
    out = {}
    for metric in METRICS:
        for effect in EFFECTS:
            pairs = [(r[metric], r[effect]) for r in records if r.get(metric) is not None and r.get(effect) is not None]
            if not pairs:
                continue
            res = spearman_ci([a for a, _ in pairs], [b for _, b in pairs], n_resamples, confidence_level, seed)
            if res is not None:
                out[f"{metric}.{effect}"] = res
    return out


def correlate_runs(
    run_dirs: Iterable[str | Path], metric: str = "ner", effect: str = "delta_error",
    n_resamples: int = 999, confidence_level: float = 0.95, seed: int = 0, figure_path: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Pool the head records of each run's head_ablation.json; Spearman rho of metric vs effect with a bootstrap CI.

    Returns {rho, p_value, ci_low, ci_high, n, ci_method, confidence_level, runs}; rho and the CI are
    None when fewer than 3 heads or a constant column. ValueError names a missing/unreadable file or a bad key.
    """
    if metric not in METRICS:
        raise ValueError(f"correlate_runs: metric={metric!r} (allowed: {', '.join(METRICS)})")
    if effect not in EFFECTS:
        raise ValueError(f"correlate_runs: effect={effect!r} (allowed: {', '.join(EFFECTS)})")
    xs, ys, runs = [], [], []
    for d in run_dirs:
        path = Path(d) / RESULT_FILE
        try:
            rec = read_json(path)
            heads = rec["heads"]
        except Exception as e:  # missing, truncated or foreign file
            raise ValueError(f"{path}: not a head_ablation result ({type(e).__name__}: {e})") from None
        got = [(h[metric], h[effect]) for h in heads if h.get(metric) is not None and h.get(effect) is not None]
        xs += [a for a, _ in got]
        ys += [b for _, b in got]
        runs.append({"run_dir": str(d), "n_heads": len(got)})
    res = spearman_ci(xs, ys, n_resamples, confidence_level, seed) or {
        "rho": None, "p_value": None, "ci_low": None, "ci_high": None, "n": len(xs),
        "ci_method": None, "confidence_level": confidence_level,
    }
    res["runs"] = runs
    if figure_path is not None:
        fig, axes = figure(1, 1, 4.5, 3.6)
        start = 0
        for r in runs:
            n = r["n_heads"]
            axes[0, 0].scatter(xs[start : start + n], ys[start : start + n], s=14, label=Path(r["run_dir"]).name)
            start += n
        _label(axes[0, 0], metric, effect, res)
        if len(runs) <= 10:
            axes[0, 0].legend(fontsize=6)
        save_figure(fig, Path(figure_path))
    return res


# ---- the probe --------------------------------------------------------------------------------------


@register("head_ablation")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Per head: key spectrum (ner, energy dropped at rank r) vs ablation effect; Spearman rho with CI."""
    from ..data import build_eval_sets

    cfg = model_config(model)
    core = unwrap(model)
    p = _parse(params, len(core.layers))
    sets = build_eval_sets(data_cfg)
    eval_sets = {name: (x[: p["max_examples"]], y[: p["max_examples"]]) for name, (x, y) in sets.items()}
    lm = sets["lm"][0]  # (N, L)
    T = min(lm.shape[1], p["max_tokens"])
    lm = lm[: min(lm.shape[0], max(1, p["max_tokens"] // T)), :T]

    grams = key_grams(core, lm, p["layers"], p["batch_size"], device)
    base, effects = ablation_effects(core, eval_sets, p["layers"], p["batch_size"], device)
    records = []
    for l in p["layers"]:
        attn = core.layers[l].attn
        group = attn.n_heads // attn.n_kv_heads if isinstance(attn, Attention) else 1
        for h, acc in enumerate(grams[l]):
            rec = {"layer": l, "head": h, "kv_head": h // group, "dim": acc.dim}
            rec.update(spectrum_metrics(acc.spectrum(p["center"]), acc.dim, p["rank"]))
            rec.update(effects[(l, h)])
            records.append(rec)

    metrics: dict[str, Any] = {"n_heads": len(records), "rank": p["rank"], "center": p["center"]}
    metrics.update({f"base.{k}": v for k, v in base.items() if "." not in k})
    for r in records:
        for k in (*METRICS, *EFFECTS):
            if k in r:
                metrics[f"L{r['layer']}.h{r['head']}.{k}"] = r[k]
    corr = correlations(records, p["bootstrap_resamples"], p["confidence_level"], p["seed"])
    for name, c in corr.items():
        for k in ("rho", "p_value", "ci_low", "ci_high"):
            metrics[f"spearman.{name}.{k}"] = c[k]
    for key, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ProbeError(f"head_ablation: {key} is not finite")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures = [_plot_scatter(records, corr, run_dir)] if p["figures"] else []
    atomic_write_json(run_dir / RESULT_FILE, {
        "attention": cfg.attention,
        "rank": p["rank"],
        "center": p["center"],
        "n_spectrum_tokens": int(lm.numel()),
        "eval_examples": {name: int(x.shape[0]) for name, (x, _) in eval_sets.items()},
        "base": base,
        "heads": records,
        "correlations": corr,
        "notes": {
            "keys": "MHA family: key after RoPE of the head's K/V head; MLA: [W^UK_h c_kv ; k_rope]; "
            "coupled RoPE: up-projected key after RoPE",
            "ner": "Roy-Vetterli effective rank / key width",
            "energy_dropped": "1 - sum_{i<=rank} sigma_i^2 / sum sigma_i^2",
            "ablation": "head output zeroed at the input of wo; effects are ablated minus unablated",
            "error": "mean over task sets of 1 - exact_match (token_error: 1 - token_acc)",
        },
        "figures": figures,
    })
    return metrics


def _label(ax, metric: str, effect: str, c: Optional[dict]) -> None:
    ax.set_xlabel({"ner": "normalised effective rank of keys", "energy_dropped": "key energy dropped at rank r"}[metric])
    ax.set_ylabel(effect.replace("_", " ") + " (ablated - base)")
    if c and c.get("rho") is not None:
        ax.set_title(f"ρ = {c['rho']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] (n={c['n']})", fontsize=8)
    ax.grid(True, alpha=0.3)


def _plot_scatter(records: list[dict], corr: dict, run_dir: Path) -> str:
    effects = [e for e in EFFECTS if any(e in r for r in records)]
    fig, axes = figure(len(METRICS), len(effects), 4.0 * len(effects), 3.4 * len(METRICS))
    layers = sorted({r["layer"] for r in records})
    for i, metric in enumerate(METRICS):
        for j, effect in enumerate(effects):
            ax = axes[i, j]
            for l in layers:
                pts = [(r[metric], r[effect]) for r in records if r["layer"] == l and effect in r]
                ax.scatter([a for a, _ in pts], [b for _, b in pts], s=14, label=f"layer {l}")
            _label(ax, metric, effect, corr.get(f"{metric}.{effect}"))
            if len(layers) <= 12 and i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle("Per-head key spectrum vs ablation effect")
    return save_figure(fig, run_dir / "head_ablation_scatter.png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: pool head_ablation.json of several runs, print rho with its bootstrap CI."""
    ap = argparse.ArgumentParser(prog="python -m mla_analysis.probes.head_ablation", description=main.__doc__)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--metric", default="ner", choices=METRICS)
    ap.add_argument("--effect", default="delta_error", choices=EFFECTS)
    ap.add_argument("--resamples", type=int, default=999)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--figure", default=None, help="write the pooled scatter plot (PNG) here")
    a = ap.parse_args(argv)
    try:
        res = correlate_runs(a.run_dirs, a.metric, a.effect, a.resamples, a.confidence, figure_path=a.figure)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if res["rho"] is None:
        print(f"{a.metric} vs {a.effect}: undefined (n={res['n']}: fewer than 3 heads or a constant column)")
    else:
        print(
            f"{a.metric} vs {a.effect}: rho = {res['rho']:.3f}, {100 * a.confidence:g}% CI "
            f"[{res['ci_low']:.3f}, {res['ci_high']:.3f}] ({res['ci_method']}), p = {res['p_value']:.3g}, n = {res['n']} heads"
        )


if __name__ == "__main__":
    main()
