"""Routing statistics on index tensors (OLMoE, arXiv:2409.02060; MaxVio: arXiv:2408.15664): load, balance,
routing entropy, domain / vocabulary specialisation, mutual information, router saturation.

Pure functions of the chosen experts S_t ([N, k] indices) and affinities; ``probe.py`` defines each metric.
"""

from __future__ import annotations

import numpy as np
import torch

from ...models.moe import routing_load


def _flat(indices: torch.Tensor) -> torch.Tensor:
    """Indices [..., k] -> [N, k] (long, cpu)."""
    return indices.reshape(-1, indices.shape[-1]).long().cpu()


def load_fraction(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Fraction of all assignments per expert [E] (sums to 1) from indices [..., k]."""
    load = routing_load(indices.long().cpu(), n_experts).double()
    return load / load.sum()


def load_cv(load: torch.Tensor) -> float:
    """Coefficient of variation std/mean (population std) of a load vector [E]."""
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of the distributions along ``dim`` (normalised first); 0 log 0 = 0."""
    p = p.double()
    p = p / p.sum(dim=dim, keepdim=True)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=dim)


def token_entropy_sum(scores: torch.Tensor) -> float:
    """Sum over tokens of the entropy of the normalised affinities s_t / sum_j s_{j,t}; scores [..., E]."""
    return float(entropy(scores.reshape(-1, scores.shape[-1])).sum())


def membership(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """M [N, E] float64: M[t, i] = 1 iff expert i is in S_t (indices [..., k], no repeats per token)."""
    idx = _flat(indices)
    m = torch.zeros(idx.shape[0], n_experts, dtype=torch.float64)
    m.scatter_(1, idx, 1.0)
    return m


def domain_counts(indices: torch.Tensor, domain: torch.Tensor, n_domains: int, n_experts: int) -> torch.Tensor:
    """C [E, D]: C[i, d] = #tokens of domain d whose S_t contains i; domain [...] matches indices[..., 0]."""
    m = membership(indices, n_experts)  # [N, E]
    onehot = torch.zeros(m.shape[0], n_domains, dtype=torch.float64)
    onehot[torch.arange(m.shape[0]), domain.reshape(-1).long().cpu()] = 1.0
    return m.T @ onehot


def domain_specialisation(indices: torch.Tensor, domain: torch.Tensor, n_domains: int, n_experts: int) -> torch.Tensor:
    """DomSpec [E, D] = N(i, D) / N_D (0 for an empty domain)."""
    c = domain_counts(indices, domain, n_domains, n_experts)
    n_d = torch.bincount(domain.reshape(-1).long().cpu(), minlength=n_domains).double()
    return c / torch.where(n_d > 0, n_d, torch.ones_like(n_d))


def top_domain_share(indices: torch.Tensor, domain: torch.Tensor, n_domains: int, n_experts: int) -> float:
    """Mean over experts with assignments of (assignments from its top domain) / (its assignments)."""
    c = domain_counts(indices, domain, n_domains, n_experts)
    tot = c.sum(1)
    used = tot > 0
    return float((c.max(1).values[used] / tot[used]).mean()) if used.any() else 0.0


def mutual_information(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plug-in MI (nats) between paired discrete samples x, y (same numel) from their contingency table."""
    x = x.reshape(-1).long().cpu().numpy()
    y = y.reshape(-1).long().cpu().numpy()
    if x.size != y.size:
        raise ValueError(f"mutual_information: {x.size} vs {y.size} samples")
    if x.size == 0:
        return 0.0
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(table, (xi, yi), 1.0)
    p = table / table.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max(0.0, (p[nz] * np.log(p[nz] / (px @ py)[nz])).sum()))


def expert_label_mi(indices: torch.Tensor, labels: torch.Tensor) -> float:
    """MI between the chosen expert and a per-token label; each of the k assignments is a sample."""
    idx = _flat(indices)  # [N, k]
    lab = labels.reshape(-1, 1).long().cpu().expand_as(idx)
    return mutual_information(idx, lab)


def vocab_specialisation(indices: torch.Tensor, tokens: torch.Tensor, n_experts: int) -> float:
    """Mean over token ids x of max_i N(x, i) / N_x (OLMoE section 1.4, x = input token)."""
    m = membership(indices, n_experts)  # [N, E]
    ids, inv = torch.unique(tokens.reshape(-1).cpu(), return_inverse=True)
    per_id = torch.zeros(len(ids), n_experts, dtype=torch.float64).index_add_(0, inv, m)  # N(x, i)
    n_x = torch.bincount(inv, minlength=len(ids)).double()
    return float((per_id.max(1).values / n_x).mean())


def rank_by_score(indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Selected experts [..., k] sorted by their affinity (descending), scores [..., E]."""
    s = scores.gather(-1, indices.long())
    order = s.argsort(dim=-1, descending=True, stable=True)
    return indices.long().gather(-1, order)


def saturation(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Sat^(k) = mean_t |S_t^(k)(a) ∩ S_t^(k)(b)| / k from ranked indices a, b [..., K >= k]."""
    a, b = _flat(a)[:, :k], _flat(b)[:, :k]
    if a.shape != b.shape:
        raise ValueError(f"saturation: routings of different shape {tuple(a.shape)} vs {tuple(b.shape)}")
    inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()  # [N]
    return float((inter / k).mean())


# ---- chance-corrected mutual information (expert vs a token label) ------------------------------------------
# Samples are (token, chosen expert) pairs, as ``expert_label_mi``: a token with label l and experts S_t adds
# one count to (l, i) for every i in S_t. Tokens with a negative label are left out.


def assignment_table(indices: torch.Tensor, labels: np.ndarray, n_labels: int, n_experts: int) -> np.ndarray:
    """Counts [L, E]: table[l, i] = #tokens of label l whose S_t contains i (labels [N] >= 0, indices [N, k])."""
    idx = _flat(indices).numpy()  # (N, k)
    code = np.asarray(labels, dtype=np.int64)[:, None] * n_experts + idx  # (N, k)
    return np.bincount(code.reshape(-1), minlength=n_labels * n_experts).reshape(n_labels, n_experts).astype(np.float64)


def _entropy_np(p: np.ndarray) -> float:
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def table_mi(table: np.ndarray) -> float:
    """Plug-in MI (nats) of a count table [L, E] (the estimate sklearn.metrics.mutual_info_score computes)."""
    p = table / table.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max(0.0, (p[nz] * np.log(p[nz] / (px @ py)[nz])).sum()))


def permuted_labels(labels: np.ndarray, rng: np.random.Generator, strata: np.ndarray | None = None,
                    units: np.ndarray | None = None) -> np.ndarray:
    """One draw of the null: ``labels`` [N] shuffled over tokens, within each stratum when ``strata`` [N] is given;
    with ``units`` [N] the label of each unit (constant inside it) is shuffled over units instead."""
    labels = np.asarray(labels)
    if units is not None:
        uniq, first, inv = np.unique(units, return_index=True, return_inverse=True)
        per_unit = labels[first]  # (U,)
        return per_unit[rng.permutation(len(uniq))][inv]
    if strata is None:
        return labels[rng.permutation(len(labels))]
    base = np.argsort(strata, kind="stable")  # positions grouped by stratum
    order = np.lexsort((rng.random(len(labels)), strata))  # the same groups, shuffled inside each
    out = np.empty_like(labels)
    out[base] = labels[order]
    return out


def calibrated_mi(indices: torch.Tensor, labels: np.ndarray, n_experts: int, n_resamples: int = 199, seed: int = 0,
                  strata: np.ndarray | None = None, units: np.ndarray | None = None) -> dict[str, float]:
    """Expert-label MI, permutation-calibrated: the null, its p-value and the adjusted (chance-corrected) MI.

    ``mi``: plug-in MI (nats); ``null_mean`` / ``null_q95``: mean and 95th percentile of the MI over
    ``n_resamples`` label permutations (``permuted_labels``: over tokens, within ``strata``, or over ``units``);
    ``p_value`` = (1 + #{null >= mi}) / (1 + n_resamples) (one-sided); ``excess`` = mi - null_mean;
    ``ami`` = excess / (min(H_label, H_expert) - null_mean): adjusted MI with the "min" normaliser (Vinh,
    Epps & Bailey 2010) and the permutation mean in place of their analytic expectation; 0 = chance, 1 = the
    label fixes the expert (or the expert the label) as far as the marginals allow. The normaliser carries the
    number of experts: H_expert <= log E, so a top-1 MoE of 8 experts and a 62-expert fine-grained one are on
    one scale. ``h_label`` / ``h_expert``: marginal entropies of the samples (nats).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = labels >= 0
    idx = _flat(indices)[torch.from_numpy(keep)]
    lab = labels[keep]
    strata = None if strata is None else np.asarray(strata).reshape(-1)[keep]
    units = None if units is None else np.asarray(units).reshape(-1)[keep]
    n_labels = int(lab.max()) + 1 if lab.size else 1
    table = assignment_table(idx, lab, n_labels, n_experts)
    mi = table_mi(table) if lab.size else 0.0
    rng = np.random.Generator(np.random.PCG64(seed))
    null = np.array([table_mi(assignment_table(idx, permuted_labels(lab, rng, strata, units), n_labels, n_experts))
                     for _ in range(n_resamples)]) if lab.size else np.zeros(n_resamples)
    h_label, h_expert = _entropy_np(table.sum(1)), _entropy_np(table.sum(0))
    null_mean = float(null.mean())
    denom = min(h_label, h_expert) - null_mean
    return {
        "mi": mi, "null_mean": null_mean, "null_q95": float(np.quantile(null, 0.95)),
        "p_value": float((1 + (null >= mi - 1e-12).sum()) / (1 + n_resamples)), "excess": mi - null_mean,
        "ami": (mi - null_mean) / denom if denom > 1e-12 else 0.0, "h_label": h_label, "h_expert": h_expert,
        "n_tokens": int(lab.size), "n_labels": int((table.sum(1) > 0).sum()), "n_resamples": int(n_resamples),
    }
