"""``probe=spectra``: singular-value spectra of the keys and values each attention layer produces.

Forward hooks on every layer's attention module recompute, from the module's input x and weights,
the tensors below for the held-out "lm" eval set, and stream them into float64 Gram matrices (memory
independent of the number of tokens). Singular values are the square roots of the Gram eigenvalues.

Activations (per layer; "per head" = one spectrum per K/V head):
- MHA / GQA / MQA: ``k_pre`` (key before RoPE), ``k`` (after RoPE, as cached), ``v`` and ``kv`` =
  [k; v] per head; per layer, every K/V head side by side: ``k_pre_all``, ``k_all``, ``v_all`` (H_kv d_h wide),
  ``kv_pre_all`` = [k_pre_all; v_all] (the keys before RoPE: what a joint MLA latent of the layer compresses)
  and ``kv_all`` = [k_all; v_all] (the layer's whole cache entry).
- MLA: ``c_kv`` (the normalised latent), ``k_rope`` (shared decoupled key after RoPE, as cached),
  per head ``k_nope`` = W^UK c_kv, ``v`` = W^UV c_kv and ``kv`` = [k_nope; v] (rank <= d_c by
  construction); ``kv_all`` = [all k_nope, all v, k_rope] (rank <= d_c + d_h^R).
- MLA with coupled RoPE: ``c_kv``, per head ``k_pre`` (up-projected key), ``k`` (after RoPE), ``v``,
  ``kv``; ``kv_all``.
Weights: MLA ``w_dkv`` (the W^DKV rows of wkv_a), ``w_kr`` (its W^KR rows), per head ``w_uk``,
``w_uv``; MHA family per head ``wk``, ``wv``.

Measures: effective rank (Roy & Vetterli 2007, "The effective rank", EUSIPCO; l1-normalised singular
values), stable rank (Rudelson & Vershynin 2007), energy rank r_tau, energy captured by the top r. Rows are mean-centred only when
``center`` is true (recorded in the output). Across layers: principal angles between the dominant
r-dim right singular subspaces of consecutive layers' keys, as the mean cosine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..training.forward_hooks import run_hooked
from ..models.attention import Attention
from ..models.mla import MLA, MLACoupledRoPE
from ..training.results import atomic_write_json
from . import ProbeError, register
from ._common import figure, lm_inputs, model_config, options, save_figure, unwrap


# key tensors whose dominant subspaces are compared between consecutive layers
SUBSPACE_TENSORS = ("k_pre", "k", "c_kv", "k_rope", "k_nope")
# per-head tensors drawn in the r_0.99 heat map, in order of preference
HEATMAP_TENSORS = ("k", "k_nope", "v")
# kept out of the flat metrics (they stay in spectra.json)
JSON_ONLY = ("kv",)


# ---- streaming Gram ---------------------------------------------------------------------------


class GramAccumulator:
    """Streams rows X [n, dim] into X^T X and the column sum in float64; memory O(dim^2), not O(n)."""

    def __init__(self, dim: int, device: Optional[torch.device] = None):
        self.dim = dim
        self.n = 0
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.col_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._eig: dict[bool, tuple[np.ndarray, np.ndarray]] = {}

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., dim] (leading dims are flattened into rows)."""
        x = x.reshape(-1, self.dim).to(device=self.gram.device, dtype=torch.float64)  # (n, dim)
        self.gram.addmm_(x.T, x)
        self.col_sum += x.sum(0)
        self.n += x.shape[0]
        self._eig.clear()

    def gram_matrix(self, center: bool = False) -> torch.Tensor:
        """X^T X, or (X - mean)^T (X - mean) when ``center``."""
        if not center or self.n == 0:
            return self.gram
        mean = self.col_sum / self.n
        return self.gram - self.n * torch.outer(mean, mean)

    def eig(self, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending, clipped at 0) and eigenvectors [dim, dim] of the Gram."""
        if self.n == 0:
            raise ValueError("GramAccumulator: no rows were added")
        if center not in self._eig:
            g = self.gram_matrix(center)
            g = 0.5 * (g + g.T)  # exact symmetry for eigh
            evals, evecs = torch.linalg.eigh(g.cpu())
            evals = evals.flip(0).clamp_min(0.0).numpy()
            self._eig[center] = (evals, evecs.flip(1).numpy())
        return self._eig[center]

    def spectrum(self, center: bool = False) -> np.ndarray:
        """Singular values of the stacked rows (min(n, dim) of them, descending)."""
        evals, _ = self.eig(center)
        return np.sqrt(evals[: min(self.n, self.dim)])

    def block(self, idx: Sequence[int] | slice) -> "GramAccumulator":
        """The accumulator of the columns ``idx`` alone (the Gram's diagonal block): no second pass over the rows."""
        cols = torch.arange(self.dim)[idx]
        out = GramAccumulator(len(cols), self.gram.device)
        out.gram = self.gram[cols][:, cols].clone()
        out.col_sum = self.col_sum[cols].clone()
        out.n = self.n
        return out

    def subspace(self, r: int, center: bool = False) -> np.ndarray:
        """Orthonormal basis [dim, r] of the dominant r-dim right singular subspace."""
        return self.eig(center)[1][:, :r]


# ---- rank measures ----------------------------------------------------------------------------


def _sv(sv: Any) -> np.ndarray:
    s = np.asarray(sv.detach().cpu() if isinstance(sv, torch.Tensor) else sv, dtype=np.float64).ravel()
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("singular values must be finite and >= 0")
    return s


def effective_rank(sv: Any) -> float:
    """Roy & Vetterli effective rank exp(H(p)), p = sigma / sum(sigma); 0 for a zero matrix."""
    s = _sv(sv)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def stable_rank(sv: Any) -> float:
    """Stable rank sum(sigma^2) / sigma_1^2; 0 for a zero matrix."""
    s = _sv(sv)
    if s.size == 0 or s.max() <= 0:
        return 0.0
    return float((s**2).sum() / s.max() ** 2)


def energy_rank(sv: Any, tau: float) -> int:
    """Smallest r whose top-r squared singular values hold a fraction >= tau of the total; 0 for zero."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau={tau} must be in (0, 1]")
    s = np.sort(_sv(sv))[::-1]
    e = s**2
    total = e.sum()
    if total <= 0:
        return 0
    frac = np.cumsum(e) / total
    # the tolerance keeps tau = 1 (and exact ties such as 2 of 4 equal values at 0.5) from failing on rounding
    return int(np.argmax(frac >= tau - 1e-12) + 1)


def energy_at_rank(sv: Any, r: int) -> float:
    """Fraction of the squared-singular-value energy held by the top r; 0 for a zero matrix."""
    s = np.sort(_sv(sv))[::-1]
    e = s**2
    total = e.sum()
    if total <= 0 or r <= 0:
        return 0.0
    return float(min(e[:r].sum() / total, 1.0))


def numerical_rank(sv: Any, rtol: float) -> int:
    """Number of singular values above rtol * sigma_1."""
    s = _sv(sv)
    if s.size == 0 or s.max() <= 0:
        return 0
    return int((s > rtol * s.max()).sum())


def _tau_name(tau: float) -> str:
    return "r" + f"{100 * tau:g}".replace(".", "p")


def spectrum_stats(sv: Any, taus: Sequence[float], ranks: Sequence[int], rtol: float) -> dict[str, Any]:
    """All measures of one spectrum, plus the singular values themselves."""
    s = _sv(sv)
    out: dict[str, Any] = {
        "erank": effective_rank(s),
        "srank": stable_rank(s),
        "rank": numerical_rank(s, rtol),
    }
    out.update({_tau_name(t): energy_rank(s, t) for t in taus})
    out.update({f"energy_r{r}": energy_at_rank(s, r) for r in ranks})
    out["sv"] = [float(v) for v in s]
    return out


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the principal angles between the column spaces of a and b."""
    from scipy.linalg import subspace_angles

    return float(np.cos(subspace_angles(a, b)).mean())


def random_mean_cosine(dim: int, r: int, draws: int = 64, seed: int = 0) -> float:
    """Expected mean cosine between two random r-dim subspaces of R^dim (Monte Carlo, fixed seed)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([mean_cosine(rng.standard_normal((dim, r)), rng.standard_normal((dim, r))) for _ in range(draws)]))


# ---- activations ------------------------------------------------------------------------------


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs[name]


def _features(attn: torch.nn.Module, x: torch.Tensor, rope, cos, sin) -> tuple[dict, dict, list]:
    """Recompute what the layer caches: layer-level {name: (B, T, d)}, per-head {name: (B, T, H, d)},
    and the names to check for NaN/inf in computation order (upstream first, so a NaN is reported where it
    appears; a concatenation of checked tensors needs no check of its own)."""
    B, T, _ = x.shape
    if isinstance(attn, Attention):
        k_pre = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)  # (B, T, H_kv, d_h)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)  # (B, T, H_kv, d_h)
        k = rope.rotate(k_pre, cos, sin)
        heads = {"k_pre": k_pre, "k": k, "v": v, "kv": torch.cat((k, v), -1)}
        k_pre_all, k_all, v_all = k_pre.flatten(2), k.flatten(2), v.flatten(2)  # (B, T, H_kv d_h) each
        layer = {
            "k_pre_all": k_pre_all,
            "k_all": k_all,
            "v_all": v_all,
            "kv_pre_all": torch.cat((k_pre_all, v_all), -1),  # (B, T, 2 H_kv d_h): what a joint MLA latent compresses
            "kv_all": torch.cat((k_all, v_all), -1),  # (B, T, 2 H_kv d_h): the cache entry
        }
        return layer, heads, ["k_pre", "k", "v"]  # the rest are concatenations of these: no second NaN check
    if isinstance(attn, MLACoupledRoPE):
        c_kv = attn.kv_norm(attn.wkv_a(x))  # (B, T, d_c)
        w_uk, w_uv = attn.w_uk_uv()  # (H, d_qk, d_c), (H, d_v, d_c)
        k_pre = torch.einsum("btc,hdc->bthd", c_kv, w_uk)  # (B, T, H, d_qk)
        v = torch.einsum("btc,hdc->bthd", c_kv, w_uv)  # (B, T, H, d_v)
        k_nope, k_r = k_pre.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        k = torch.cat((k_nope, rope.rotate(k_r, cos, sin)), -1)  # (B, T, H, d_qk)
        heads = {"k_pre": k_pre, "k": k, "v": v, "kv": torch.cat((k, v), -1)}
        layer = {"c_kv": c_kv, "kv_all": torch.cat((k.flatten(2), v.flatten(2)), -1)}
        return layer, heads, ["c_kv", "k_pre", "k", "v", "kv", "kv_all"]
    if isinstance(attn, MLA):
        c_kv, k_r = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        c_kv = attn.kv_norm(c_kv)  # (B, T, d_c)
        k_rope = rope.rotate(k_r.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, d_rope)
        w_uk, w_uv = attn.w_uk_uv()  # (H, d_nope, d_c), (H, d_v, d_c)
        k_nope = torch.einsum("btc,hdc->bthd", c_kv, w_uk)  # (B, T, H, d_nope)
        v = torch.einsum("btc,hdc->bthd", c_kv, w_uv)  # (B, T, H, d_v)
        heads = {"k_nope": k_nope, "v": v, "kv": torch.cat((k_nope, v), -1)}
        layer = {"c_kv": c_kv, "k_rope": k_rope, "kv_all": torch.cat((k_nope.flatten(2), v.flatten(2), k_rope), -1)}
        return layer, heads, ["c_kv", "k_rope", "k_nope", "v", "kv", "kv_all"]
    raise ConfigError(f"probe.spectra: attention module {type(attn).__name__} is not supported")


def _weights(attn: torch.nn.Module) -> tuple[dict, dict]:
    """Weight matrices: (layer-level {name: [out, in]}, per-head {name: [H, out, in]})."""
    if isinstance(attn, Attention):
        H, d = attn.n_kv_heads, attn.head_dim
        wk = attn.wk.weight.view(H, d, -1)  # (H_kv, d_h, D)
        wv = attn.wv.weight.view(H, d, -1)  # (H_kv, d_h, D)
        return {}, {"wk": wk, "wv": wv}
    w_uk, w_uv = attn.w_uk_uv()
    w_a = attn.wkv_a.weight  # (d_c [+ d_rope], D)
    layer = {"w_dkv": w_a[: attn.kv_lora_rank]}
    if w_a.shape[0] > attn.kv_lora_rank:
        layer["w_kr"] = w_a[attn.kv_lora_rank :]
    return layer, {"w_uk": w_uk, "w_uv": w_uv}


class LayerStats:
    """Gram accumulators of one layer, created on the first batch (widths come from the tensors).

    ``layer[name]``: one GramAccumulator per layer-level tensor; ``heads[name]``: one per head; ``skipped``:
    layer-level tensors wider than ``max_joint_dim`` (not accumulated) and why. ``names``: only these tensors are
    accumulated (None = all; every tensor is still checked for NaN/inf)."""

    def __init__(self, idx: int, max_joint_dim: int, names: Optional[Sequence[str]] = None):
        self.idx = idx
        self.max_joint_dim = max_joint_dim
        self.names = None if names is None else set(names)
        self.layer: dict[str, GramAccumulator] = {}
        self.heads: dict[str, list[GramAccumulator]] = {}
        self.skipped: dict[str, str] = {}

    def add(self, layer: dict, heads: dict, order: list) -> None:
        """Check one batch's tensors named in ``order`` for NaN/inf and stream them into the accumulators."""
        for name in order:
            t = layer[name] if name in layer else heads[name]
            if not torch.isfinite(t).all():
                raise ProbeError(f"spectra: layer {self.idx} {name} has non-finite values (NaN/inf) on the 'lm' eval set")
        if self.names is not None:
            layer = {k: v for k, v in layer.items() if k in self.names}
            heads = {k: v for k, v in heads.items() if k in self.names}
        for name, t in layer.items():
            d = t.shape[-1]
            if d > self.max_joint_dim:
                self.skipped[name] = f"width {d} > max_joint_dim={self.max_joint_dim}"
                continue
            self.layer.setdefault(name, GramAccumulator(d, t.device)).update(t.reshape(-1, d))
        for name, t in heads.items():
            H, d = t.shape[-2:]
            accs = self.heads.setdefault(name, [GramAccumulator(d, t.device) for _ in range(H)])
            for h in range(H):
                accs[h].update(t[..., h, :].reshape(-1, d))  # (B*T, d) rows of head h


def _hook(stats: LayerStats):
    def fn(module, args, kwargs, output):
        x = _arg(args, kwargs, 0, "x")
        if not torch.isfinite(x).all():
            raise ProbeError(f"spectra: layer {stats.idx} attention input x has non-finite values (NaN/inf)")
        rope, cos, sin = (_arg(args, kwargs, i, n) for i, n in ((1, "rope"), (2, "cos"), (3, "sin")))
        stats.add(*_features(module, x, rope, cos, sin))

    return fn


def attach(model: torch.nn.Module, max_joint_dim: int, names: Optional[Sequence[str]] = None
           ) -> tuple[list[LayerStats], list]:
    """Forward hooks on every layer's attention streaming its K/V features (``names``: only these; None = all) into
    LayerStats; returns (stats, hook handles).

    Run the model with ``training.forward_hooks.run_hooked(model, handles, ...)`` (which removes the hooks), together
    with other hooks when one pass should serve several measurements."""
    core = unwrap(model)
    stats = [LayerStats(i, max_joint_dim, names) for i in range(len(core.layers))]
    handles = [
        block.attn.register_forward_hook(_hook(s), with_kwargs=True) for block, s in zip(core.layers, stats)
    ]
    return stats, handles



# ---- the probe --------------------------------------------------------------------------------


def _parse(params: dict) -> dict:
    return options("spectra", params)  # checked in mla_analysis.config.probes


def _check_weights(core: torch.nn.Module) -> None:
    for i, block in enumerate(core.layers):
        for name, w in block.attn.named_parameters():
            if not torch.isfinite(w).all():
                raise ProbeError(f"spectra: layer {i} weight attn.{name} has non-finite values (NaN/inf)")


def _summaries(entries: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Mean over heads of each measure (a layer-level tensor is a list of one)."""
    return {k: float(np.mean([e[k] for e in entries])) for k in keys}


@register("spectra")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Spectra of cached keys/values and K/V weights per layer and head; writes spectra.json and PNGs."""
    p = _parse(params)
    cfg = model_config(model)
    core = unwrap(model)
    _check_weights(core)
    inputs = lm_inputs(data_cfg)  # (N, L)
    T = min(inputs.shape[1], p["max_tokens"])
    n_seq = min(inputs.shape[0], max(1, p["max_tokens"] // T))
    inputs = inputs[:n_seq, :T]
    stats, handles = attach(model, p["max_joint_dim"])
    run_hooked(core, handles, inputs, p["batch_size"], device)

    taus, ranks, rtol, center = p["taus"], p["ranks"], float(p["rank_rtol"]), p["center"]
    measure_keys = ["erank", "srank", *(_tau_name(t) for t in taus), *(f"energy_r{r}" for r in ranks)]
    metrics: dict[str, Any] = {"n_tokens": int(inputs.numel()), "center": center}
    layers_json = []
    for s, block in zip(stats, core.layers):
        acts: dict[str, Any] = {}
        for name, acc in s.layer.items():
            acts[name] = {"per_head": False, "dim": acc.dim, "spectra": [spectrum_stats(acc.spectrum(center), taus, ranks, rtol)]}
        for name, accs in s.heads.items():
            acts[name] = {
                "per_head": True,
                "dim": accs[0].dim,
                "spectra": [spectrum_stats(a.spectrum(center), taus, ranks, rtol) for a in accs],
            }
        w_layer, w_heads = _weights(block.attn)
        weights: dict[str, Any] = {}
        with torch.no_grad():
            for name, w in w_layer.items():
                sv = torch.linalg.svdvals(w.detach().double().cpu())
                weights[name] = {"per_head": False, "shape": list(w.shape), "spectra": [spectrum_stats(sv, taus, ranks, rtol)]}
            for name, w in w_heads.items():
                svs = torch.linalg.svdvals(w.detach().double().cpu())  # (H, min(out, in))
                weights[name] = {
                    "per_head": True,
                    "shape": list(w.shape[1:]),
                    "spectra": [spectrum_stats(sv, taus, ranks, rtol) for sv in svs],
                }
        for name, a in acts.items():
            if name in JSON_ONLY:
                continue
            for k, v in _summaries(a["spectra"], measure_keys).items():
                metrics[f"L{s.idx}.{name}.{k}"] = v
        for name, w in weights.items():
            for k, v in _summaries(w["spectra"], ["erank", "srank", _tau_name(taus[-1])]).items():
                metrics[f"L{s.idx}.{name}.{k}"] = v
        layers_json.append({"layer": s.idx, "activations": acts, "weights": weights, "skipped": s.skipped})

    subspace = _subspace_angles(stats, p["subspace_rank"], center)
    for name, res in subspace.items():
        metrics[f"subspace.{name}.mean_cos"] = res["mean_cos"]
        metrics[f"subspace.{name}.random_mean_cos"] = res["random_mean_cos"]
        for pair, v in res["pairs"].items():
            metrics[f"subspace.{name}.{pair}.mean_cos"] = v
    for key, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ProbeError(f"spectra: {key} is not finite")

    figures = []
    if p["figures"]:
        figures.append(_plot_spectra(layers_json, run_dir, len(inputs.reshape(-1)), center))
        heat = _plot_heatmap(layers_json, run_dir, taus[-1])
        if heat:
            figures.append(heat)
    record = {
        "attention": cfg.attention,
        "center": center,
        "n_tokens": int(inputs.numel()),
        "n_sequences": int(n_seq),
        "seq_len": int(T),
        "taus": taus,
        "ranks": ranks,
        "rank_rtol": rtol,
        "notes": {
            "singular_values": "sqrt of the eigenvalues of the float64 Gram X^T X (clipped at 0)",
            "erank": "Roy & Vetterli: exp(entropy of sigma / sum(sigma))",
            "srank": "sum(sigma^2) / sigma_1^2",
            "r_tau": "smallest r with sum_{i<=r} sigma_i^2 >= tau * sum sigma^2",
            "rank": "number of sigma_i > rank_rtol * sigma_1",
            "subspace": "right singular subspaces, heads paired by index; key bases are only fixed up to the "
            "model's gauge freedom (see module docstring), compare against random_mean_cos",
        },
        "layers": layers_json,
        "subspace": subspace,
        "figures": figures,
    }
    atomic_write_json(Path(run_dir) / "spectra.json", record)
    return metrics


def _subspace_angles(stats: list[LayerStats], r_max: int, center: bool) -> dict[str, Any]:
    """Mean cosine of principal angles between consecutive layers' dominant key subspaces."""
    out: dict[str, Any] = {}
    for name in SUBSPACE_TENSORS:
        accs = [s.layer[name] if name in s.layer else s.heads.get(name) for s in stats]
        if len(accs) < 2 or any(a is None for a in accs):
            continue
        per_layer = [a if isinstance(a, list) else [a] for a in accs]
        dim = per_layer[0][0].dim
        r = min(r_max, dim // 2)  # r = dim would make every comparison trivially 1
        if r < 1:
            continue
        pairs = {}
        for l in range(len(per_layer) - 1):
            cos = [
                mean_cosine(a.subspace(r, center), b.subspace(r, center))
                for a, b in zip(per_layer[l], per_layer[l + 1])
            ]
            pairs[f"L{l}-L{l + 1}"] = float(np.mean(cos))
        out[name] = {
            "rank": r,
            "dim": dim,
            "pairs": pairs,
            "mean_cos": float(np.mean(list(pairs.values()))),
            "random_mean_cos": random_mean_cosine(dim, r),
        }
    return out


# ---- figures ----------------------------------------------------------------------------------


def _plot_spectra(layers: list[dict], run_dir: Path, n_tokens: int, center: bool) -> str:
    n = len(layers)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = figure(nrows, ncols, 4.2 * ncols, 3.4 * nrows)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        for name, a in layer["activations"].items():
            curves = []
            for e in a["spectra"]:
                s = np.asarray(e["sv"])
                curves.append(s / s[0] if s.size and s[0] > 0 else np.zeros_like(s))
            # heads of one tensor share a width; their mean normalised spectrum is drawn
            y = np.maximum(np.mean(curves, axis=0), 1e-12)  # floor: exact zeros cannot be drawn on a log axis
            label = f"{name} ({'mean of heads, ' if a['per_head'] else ''}d={a['dim']})"
            ax.plot(np.arange(1, y.size + 1), y, marker=".", ms=3, lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("σ_i / σ_1 (dimensionless)")
        ax.set_title(f"layer {layer['layer']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Normalised singular values of cached K/V ({n_tokens} tokens, {'mean-centred' if center else 'uncentred'})")
    return save_figure(fig, Path(run_dir) / "spectra_normalised.png")


def _plot_heatmap(layers: list[dict], run_dir: Path, tau: float) -> Optional[str]:
    names = [t for t in HEATMAP_TENSORS if t in layers[0]["activations"] and layers[0]["activations"][t]["per_head"]]
    if not names:
        return None
    key = _tau_name(tau)
    fig, axes = figure(1, len(names), 4.5 * len(names), 1.2 + 0.5 * len(layers) + 1.5)
    for ax, name in zip(axes.flat, names):
        grid = np.array([[e[key] for e in layer["activations"][name]["spectra"]] for layer in layers], dtype=float)
        dim = layers[0]["activations"][name]["dim"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=dim, origin="upper")
        if grid.size <= 400:
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7, color="w" if v < dim / 2 else "k")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_title(f"{name}: rank for {100 * tau:g}% energy (of d={dim})")
        fig.colorbar(im, ax=ax, label=f"r_{tau:g} (number of singular values)")
    return save_figure(fig, Path(run_dir) / f"spectra_{key}_heatmap.png")
