"""Low-rank K/V energy vs routing: the energy a rank-r truncation drops per token, split into high / low
groups, against the routing of the next MoE layer (MI and entropy with permutation tests).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...config import ConfigError
from ...models.attention import Attention
from ...models.mla import MLA
from .. import ProbeError
from .._common import moe_blocks, unwrap
from .statistics import calibrated_mi, entropy, membership


def kv_content(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Content keys and values [B, T, W] of one attention layer, all heads side by side, before RoPE.

    MLA (and coupled RoPE): wkv_b(c_kv) = per head [W^UK_h c_kv; W^UV_h c_kv], the K/V the latent encodes
    (the decoupled k_rope is cached beside the latent, uncompressed, and is left out). MHA family:
    [W^K x; W^V x] of every K/V head.
    """
    if isinstance(attn, MLA):  # MLACoupledRoPE is a subclass: its wkv_a has no rope rows
        c_kv = attn.kv_norm(attn.wkv_a(x)[..., : attn.kv_lora_rank])  # (B, T, d_c)
        return attn.wkv_b(c_kv)  # (B, T, H*(d_k_up + d_v))
    if isinstance(attn, Attention):
        return torch.cat((attn.wk(x), attn.wv(x)), -1)  # (B, T, 2*H_kv*d_h)
    raise ConfigError(f"probe.experts: attention module {type(attn).__name__} is not supported by energy_rank")


def kv_rank_bound(attn: torch.nn.Module) -> int:
    """Largest possible rank of the layer's kv_content rows (MLA: min(d_c, width))."""
    if isinstance(attn, MLA):
        return min(attn.kv_lora_rank, attn.wkv_b.out_features)
    return attn.wk.out_features + attn.wv.out_features


def dropped_energy(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Per row of z [N, W]: ||z - U U^T z||^2 / ||z||^2 for the orthonormal basis U [W, r]; 0 for a zero row."""
    z = z.double()
    kept = (z @ basis.double()).pow(2).sum(-1)  # (N,)
    total = z.pow(2).sum(-1)  # (N,)
    frac = torch.where(total > 0, 1.0 - kept / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return frac.clamp(0.0, 1.0)


@torch.no_grad()
def energy_routing_data(
    model: torch.nn.Module, inputs: list[torch.Tensor], rank: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Per-token dropped K/V energy at rank r per attention layer, and routing of every MoE layer.

    Two passes over ``inputs`` (a list of [n, L] id tensors): the first streams each layer's kv_content
    into a Gram to find the dominant rank-r right singular subspace (uncentred: the truncation of the
    cache as stored), the second measures each token's energy outside it and records the routing.
    """
    from ..spectra import GramAccumulator

    core = unwrap(model)
    moe = moe_blocks(core)
    following = {l: next((i for i, _ in moe if i >= l), None) for l in range(len(core.layers))}
    layers = [l for l, m in following.items() if m is not None]
    for l in layers:
        bound = kv_rank_bound(core.layers[l].attn)
        if rank >= bound:
            raise ConfigError(
                f"probe.experts.energy_rank={rank} is invalid for layer {l} (allowed: 1..{bound - 1}, below the K/V rank bound {bound})"
            )
    grams: dict[int, GramAccumulator] = {}
    bases: dict[int, torch.Tensor] = {}
    energy: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def hook(l: int):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            z = kv_content(module, x)
            z = z.reshape(-1, z.shape[-1])  # (B*T, W)
            if not torch.isfinite(z).all():
                raise ProbeError(f"experts: layer {l} keys/values have non-finite values (NaN/inf)")
            if l in bases:
                energy[l].append(dropped_energy(z, bases[l]).cpu())
            else:
                grams.setdefault(l, GramAccumulator(z.shape[-1], z.device)).update(z)

        return fn

    handles = [core.layers[l].attn.register_forward_hook(hook(l), with_kwargs=True) for l in layers]
    saved = [m.record_routing for _, m in moe]
    was_training = core.training
    core.eval()
    idx: dict[int, list[torch.Tensor]] = {i: [] for i, _ in moe}
    ent: dict[int, list[torch.Tensor]] = {i: [] for i, _ in moe}
    try:
        for x in inputs:  # pass 1: subspaces
            for s in range(0, x.shape[0], batch_size):
                core(x[s : s + batch_size].to(device))
        for l in layers:
            bases[l] = torch.from_numpy(np.ascontiguousarray(grams[l].subspace(rank))).to(grams[l].gram.device)
        for _, m in moe:
            m.record_routing = True
        for x in inputs:  # pass 2: per-token energy and routing
            for s in range(0, x.shape[0], batch_size):
                core(x[s : s + batch_size].to(device))
                for i, m in moe:
                    k = m.n_activated_experts
                    idx[i].append(m.last_indices.reshape(-1, k).cpu())
                    ent[i].append(entropy(m.last_scores.reshape(-1, m.n_routed_experts).cpu()))
    finally:
        for h in handles:
            h.remove()
        for (_, m), v in zip(moe, saved):
            m.record_routing = v
            m.last_indices = m.last_weights = m.last_scores = None
        core.train(was_training)
    return {
        "layers": layers,
        "following": {l: following[l] for l in layers},
        "energy": {l: torch.cat(energy[l]).numpy() for l in layers},
        "indices": {i: torch.cat(v) for i, v in idx.items()},
        "entropy": {i: torch.cat(v).numpy() for i, v in ent.items()},
    }


def group_expert_mi(labels: np.ndarray, member: np.ndarray, axis: int = -1) -> np.ndarray:
    """Plug-in MI (nats) between a 0/1 token label and the chosen expert (one sample per token and chosen
    expert, as ``expert_label_mi``); vectorised over the other axes of ``labels``; member [N, E] counts."""
    lab = np.moveaxis(np.asarray(labels, dtype=np.float64), axis, -1)  # (..., N)
    high = lab @ member  # (..., E): choices made by label-1 tokens
    total = member.sum(0)  # (E,)
    table = np.stack(np.broadcast_arrays(high, total - high), axis=-2) / total.sum()  # (..., 2, E)
    px = table.sum(-1, keepdims=True)
    py = table.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(table > 0, table * np.log(table / (px * py)), 0.0)
    return np.maximum(terms.sum(axis=(-2, -1)), 0.0)


def _batch_for(n: int, n_resamples: int) -> int:
    return max(1, min(n_resamples, 2_000_000 // max(1, n)))  # ~16 MB of float64 resamples at a time


def energy_routing_stats(
    energy: np.ndarray, indices: torch.Tensor, token_entropy: np.ndarray, n_experts: int,
    quantile: float = 0.75, n_resamples: int = 999, seed: int = 0,
) -> dict[str, float]:
    """MI between "high dropped energy" (>= the quantile) and expert choice, entropy difference, p-values.

    ``mi``/``p_value``: plug-in MI and a one-sided permutation test (scipy.stats.permutation_test,
    pairings: token labels shuffled against the routing). ``entropy_diff`` = mean routing entropy of the
    high group minus the rest, with a two-sided permutation p-value. ``spearman_entropy``: Spearman
    correlation of dropped energy and routing entropy over tokens (omitted when either is constant).
    ValueError when every token falls in one group (e.g. constant energy).
    """
    from scipy.stats import permutation_test, spearmanr

    energy = np.asarray(energy, dtype=np.float64)
    token_entropy = np.asarray(token_entropy, dtype=np.float64)
    threshold = float(np.quantile(energy, quantile))
    high = energy >= threshold
    if high.all() or not high.any():
        raise ValueError(f"energy_routing_stats: all {energy.size} tokens fall in one group (threshold {threshold:g})")
    member = membership(indices, n_experts).numpy()  # (N, E)
    labels = high.astype(np.float64)
    mi = float(group_expert_mi(labels, member))
    n = energy.size
    perm = permutation_test(
        (labels,), lambda lab, axis: group_expert_mi(lab, member, axis), permutation_type="pairings",
        vectorized=True, n_resamples=n_resamples, alternative="greater", batch=_batch_for(n, n_resamples),
        rng=np.random.default_rng(seed),
    )
    e_hi, e_lo = token_entropy[high], token_entropy[~high]
    ent_test = permutation_test(
        (e_hi, e_lo), lambda a, b, axis: a.mean(axis) - b.mean(axis), permutation_type="independent",
        vectorized=True, n_resamples=n_resamples, alternative="two-sided", batch=_batch_for(n, n_resamples),
        rng=np.random.default_rng(seed + 1),
    )
    p_high = float(labels.mean())
    out = {
        "mi": mi,
        "mi_max": float(-(p_high * math.log(p_high) + (1 - p_high) * math.log(1 - p_high))),
        "p_value": float(perm.pvalue),
        "entropy_high": float(e_hi.mean()),
        "entropy_low": float(e_lo.mean()),
        "entropy_diff": float(e_hi.mean() - e_lo.mean()),
        "entropy_p_value": float(ent_test.pvalue),
        "energy_mean": float(energy.mean()),
        "energy_threshold": threshold,
        "high_fraction": p_high,
    }
    if np.ptp(energy) > 0 and np.ptp(token_entropy) > 0:
        out["spearman_entropy"] = float(spearmanr(energy, token_entropy).statistic)
    return out


def energy_bins_mi(energy: np.ndarray, indices: torch.Tensor, n_experts: int, n_bins: int, strata: np.ndarray,
                   n_resamples: int, seed: int) -> dict[str, float]:
    """Chance-corrected MI between a token's dropped-energy quantile bin (``n_bins`` equal-count bins) and its
    experts: ``calibrated_mi`` with the bin labels shuffled inside each window (``strata``); "ami" is the effect size."""
    energy = np.asarray(energy, dtype=np.float64)
    edges = np.quantile(energy, np.arange(1, n_bins) / n_bins)
    bins = np.searchsorted(edges, energy, side="right")  # (N,) 0 = least energy dropped
    return calibrated_mi(indices, bins, n_experts, n_resamples, seed, strata=strata)


def window_ids(inputs: list[torch.Tensor]) -> np.ndarray:
    """Window (row) id of every token of ``inputs`` (a list of [n, L] id tensors), flattened in their order."""
    out, base = [], 0
    for x in inputs:
        out.append(np.repeat(np.arange(base, base + x.shape[0]), x.shape[1]))
        base += x.shape[0]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def energy_section(model: torch.nn.Module, sets: dict, p: dict, device: torch.device,
                   strata: np.ndarray | None = None) -> tuple[dict, dict]:
    """Metrics ``energy_routing.layer<l>.*`` and their experts.json record (``strata``: window id per token)."""
    n_experts = moe_blocks(model)[0][1].n_routed_experts
    data = energy_routing_data(model, list(sets.values()), p["energy_rank"], p["batch_size"], device)
    strata = window_ids(list(sets.values())) if strata is None else strata
    metrics: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for l in data["layers"]:
        moe_l = data["following"][l]
        try:
            st = energy_routing_stats(
                data["energy"][l], data["indices"][moe_l], data["entropy"][moe_l], n_experts,
                p["energy_quantile"], p["permutation_resamples"], p["seed"],
            )
        except ValueError as e:
            skipped[str(l)] = str(e)
            continue
        bins = energy_bins_mi(data["energy"][l], data["indices"][moe_l], n_experts, p["energy_bins"], strata,
                              p["mi_resamples"], p["seed"] + l)
        st.update({f"bins.{k}": bins[k] for k in ("mi", "null_mean", "excess", "ami", "p_value")})
        st["moe_layer"] = moe_l
        layers[str(l)] = st
        metrics.update({f"energy_routing.layer{l}.{k}": v for k, v in st.items()})
    record = {
        "rank": p["energy_rank"],
        "quantile": p["energy_quantile"],
        "n_resamples": p["permutation_resamples"],
        "definition": "per token: fraction of the squared norm of its content K/V (kv_content) outside the "
        "dominant rank-r right singular subspace of all eval tokens' K/V of that layer (uncentred); high group = "
        "tokens at or above the quantile; routing = the first MoE layer at or after the attention layer; bins.*: "
        "calibrated_mi of the energy_bins equal-count quantile bins vs the chosen experts, bins shuffled inside each "
        "window (ami = effect size, p_value one-sided)",
        "bins": p["energy_bins"],
        "layers": layers,
        "skipped": skipped,
    }
    return metrics, record
