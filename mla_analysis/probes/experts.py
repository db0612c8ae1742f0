"""``probe=experts``: routing statistics of every DeepSeekMoE layer on the eval sets.

Every eval set built by ``build_eval_sets`` ("lm" and each task) is a *domain*; its first
``max_examples`` sequences are fed through the model with ``record_routing`` on, and every position of
every sequence is a token. Definitions: ``analysis-definitions.md`` sections 1 (OLMoE) and 2.4 (MaxVio).
Notation: N tokens, E routed experts, k experts per token, S_t the set of experts chosen for token t
(the routing decision actually taken, i.e. after the aux-loss-free bias and the group limit).

Per MoE layer (keys ``L<block index>.<name>``):

- ``load.e<i>``: fraction of all k*N assignments that went to expert i (sums to 1).
- ``load_cv``: coefficient of variation of the per-expert load (population std / mean).
- ``max_vio``: (max_i Load_i - mean) / mean, mean = perfect balance k*N/E (section 2.4), over all domains.
- ``entropy_token``: mean over tokens of the entropy (nats) of the normalised affinities s_t / sum_j s_{j,t}
  (for softmax routers this is the router distribution itself); ``entropy_load``: entropy of the load
  fractions; both have the maximum ``entropy_max`` = log E.
- ``coact_mean_offdiag``: mean over i != j of CoAct(i->j) = N(i,j) / N(i), the paper definition (all
  unordered pairs of S_t counted in both directions; NOT the adjacent-pair variant of the OLMoE code); the
  mean runs over experts with N(i) > 0. ``coact_uniform`` = (k-1)/(E-1), its value under uniform routing.
- ``domspec.<D>.max``: max over experts of DomSpec(i, D) = N(i, D) / N_D (fraction of D's tokens whose
  S_t contains i); ``domspec_uniform`` = k/E is the reference line. The full [E, domains] matrix is in
  experts.json.
- ``mi_expert_domain``, ``mi_expert_token``: plug-in mutual information (nats) from the empirical
  contingency table (the estimate ``sklearn.metrics.mutual_info_score`` computes, no bias correction),
  between the chosen expert and the domain / the input token id; each of the k assignments of a token is
  one sample. The plug-in estimate is biased upwards when the table is sparse (token ids).
- ``top_domain_share``: per expert, the share of its assignments that come from its most frequent domain,
  averaged over experts with assignments (depends on the domain sizes; with equal-sized domains the
  uniform value is 1/#domains).
- ``vocab_spec``: OLMoE vocabulary specialisation with x = the input token x_t (section 1.4): mean over
  token ids of max_i N(x, i) / N_x; no minimum-count filter.
- with ``compare_to`` (a run directory): ``sat_k1`` and ``sat_k<top_k>``, router saturation
  Sat^(k) = mean_t |S_t^(k)(compare_to) ∩ S_t^(k)(this model)| / k on the same tokens (section 1.1); the
  top-1 expert is the selected expert with the highest unbiased affinity.

Across layers: ``max_vio_mean`` (the mean over MoE layers that section 2.4 reports). Routing agreement
between consecutive layers is not reported: their experts are different modules.

experts.json holds the full matrices (load counts, co-activation N(i,j) and CoAct, domain
specialisation); PNGs: ``experts_load.png`` (load bar chart per layer), ``experts_coact.png``
(co-activation heat maps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..models.moe import MoE, max_vio, routing_load
from . import ProbeError, register
from ._common import check_params, figure, positive_int, save_figure, unwrap

DEFAULTS: dict[str, Any] = {
    "max_examples": 256,  # sequences of each eval set (domain) fed through the model
    "batch_size": 32,
    "compare_to": None,  # run directory of another checkpoint for router saturation; null = skip
    "figures": True,
}


def _parse(params: dict) -> dict:
    p = check_params("experts", params, DEFAULTS)
    positive_int("experts", "max_examples", p["max_examples"])
    positive_int("experts", "batch_size", p["batch_size"])
    if p["compare_to"] is not None and not isinstance(p["compare_to"], (str, Path)):
        raise ConfigError(f"probe.experts.compare_to={p['compare_to']!r} is invalid (allowed: a run directory | null)")
    if not isinstance(p["figures"], bool):
        raise ConfigError(f"probe.experts.figures={p['figures']!r} is invalid (allowed: true | false)")
    return p


# ---- pure statistics on index tensors ---------------------------------------------------------------


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


def coactivation_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """N [E, E]: N[i, j] = #tokens with both i, j in S_t (all pairs, symmetric); N[i, i] = N(i)."""
    m = membership(indices, n_experts)
    return m.T @ m


def coactivation(counts: torch.Tensor) -> torch.Tensor:
    """CoAct [E, E]: CoAct[i, j] = N(i, j) / N(i) (row i = expert i; 0 where N(i) = 0). Diagonal is 1."""
    n_i = counts.diagonal().clone()
    safe = torch.where(n_i > 0, n_i, torch.ones_like(n_i))
    return torch.where(n_i[:, None] > 0, counts / safe[:, None], torch.zeros_like(counts))


def mean_offdiag(coact: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean of CoAct(i->j) over i != j, rows restricted to experts with N(i) > 0."""
    e = coact.shape[0]
    rows = counts.diagonal() > 0
    off = ~torch.eye(e, dtype=torch.bool)
    vals = coact[rows][off[rows]]
    return float(vals.mean()) if vals.numel() else 0.0


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


# ---- collection -------------------------------------------------------------------------------------


def _moe_blocks(model: torch.nn.Module) -> list[tuple[int, MoE]]:
    core = unwrap(model)
    return [(i, b.ffn) for i, b in enumerate(getattr(core, "layers", [])) if isinstance(b.ffn, MoE)]


def _collect(model: torch.nn.Module, sets: dict, p: dict, device: torch.device) -> dict[str, Any]:
    """Ranked routing indices [N, k] (one row per token) and the per-token entropy sum per MoE layer, for all domains."""
    core = unwrap(model)
    blocks = _moe_blocks(core)
    was_training = core.training
    saved = [m.record_routing for _, m in blocks]
    idx: list[list[torch.Tensor]] = [[] for _ in blocks]
    ent = [0.0 for _ in blocks]
    core.eval()
    try:
        for _, m in blocks:
            m.record_routing = True
        with torch.inference_mode():
            for name, x in sets.items():
                for start in range(0, x.shape[0], p["batch_size"]):
                    core(x[start : start + p["batch_size"]].to(device))
                    for j, (li, m) in enumerate(blocks):
                        scores = m.last_scores.float()
                        if not torch.isfinite(scores).all():
                            raise ProbeError(f"experts: non-finite router affinities in layer {li} on eval set {name!r}")
                        ent[j] += token_entropy_sum(scores)
                        idx[j].append(rank_by_score(m.last_indices, scores).reshape(-1, m.n_activated_experts).cpu())
    finally:
        for (_, m), r in zip(blocks, saved):
            m.record_routing = r
            m.last_indices = m.last_weights = m.last_scores = None
        core.train(was_training)
    return {"layers": [i for i, _ in blocks], "indices": [torch.cat(v) for v in idx], "entropy_sum": ent}


# ---- probe ------------------------------------------------------------------------------------------


@register("experts")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Load, balance, entropy, co-activation, domain/vocabulary specialisation and saturation per MoE layer."""
    from ..data import build_eval_sets

    p = _parse(params)
    blocks = _moe_blocks(model)
    if not blocks:
        raise ConfigError("probe.experts: model has no MoE layers")
    n_experts = blocks[0][1].n_routed_experts
    top_k = blocks[0][1].n_activated_experts
    sets = {name: xy[0][: p["max_examples"]] for name, xy in build_eval_sets(data_cfg).items()}
    domains = list(sets)
    # one row per token (sets may differ in length), in the order _collect feeds them
    domain = torch.cat([torch.full((x.numel(),), d, dtype=torch.long) for d, x in enumerate(sets.values())])  # [N]
    tokens = torch.cat([x.reshape(-1).cpu() for x in sets.values()])  # [N]
    n_tokens = int(domain.numel())

    got = _collect(model, sets, p, device)
    other = None
    if p["compare_to"] is not None:
        from ..checkpoint import load_model

        cmp_model = load_model(p["compare_to"], device)
        cmp_blocks = _moe_blocks(cmp_model)
        if [i for i, _ in cmp_blocks] != got["layers"] or any(m.n_routed_experts != n_experts for _, m in cmp_blocks):
            raise ConfigError(
                f"probe.experts.compare_to={str(p['compare_to'])!r}: its MoE layers / expert counts differ from the model's"
            )
        other = _collect(cmp_model, sets, p, device)

    metrics: dict[str, Any] = {
        "n_tokens": n_tokens,
        "n_moe_layers": len(blocks),
        "n_experts": n_experts,
        "top_k": top_k,
        "n_domains": len(domains),
        "entropy_max": math.log(n_experts),
        "domspec_uniform": top_k / n_experts,
        "coact_uniform": (top_k - 1) / (n_experts - 1) if n_experts > 1 else 0.0,
    }
    layers_json = []
    for j, li in enumerate(got["layers"]):
        ind = got["indices"][j]  # [N, k] ranked by affinity
        counts = routing_load(ind, n_experts)  # [E]
        frac = counts.double() / counts.sum()
        co_n = coactivation_counts(ind, n_experts)
        co = coactivation(co_n)
        dom = domain_specialisation(ind, domain, len(domains), n_experts)  # [E, D]
        pre = f"L{li}."
        for e in range(n_experts):
            metrics[f"{pre}load.e{e}"] = float(frac[e])
        metrics[pre + "load_cv"] = load_cv(counts)
        metrics[pre + "max_vio"] = max_vio(counts)
        metrics[pre + "entropy_token"] = got["entropy_sum"][j] / n_tokens
        metrics[pre + "entropy_load"] = float(entropy(frac))
        metrics[pre + "coact_mean_offdiag"] = mean_offdiag(co, co_n)
        for d, name in enumerate(domains):
            metrics[f"{pre}domspec.{name}.max"] = float(dom[:, d].max())
        metrics[pre + "mi_expert_domain"] = expert_label_mi(ind, domain)
        metrics[pre + "mi_expert_token"] = expert_label_mi(ind, tokens)
        metrics[pre + "top_domain_share"] = top_domain_share(ind, domain, len(domains), n_experts)
        metrics[pre + "vocab_spec"] = vocab_specialisation(ind, tokens, n_experts)
        sat = {}
        if other is not None:
            for k in sorted({1, top_k}):
                sat[f"k{k}"] = saturation(other["indices"][j], ind, k)
                metrics[f"{pre}sat_k{k}"] = sat[f"k{k}"]
        layers_json.append({
            "layer": li,
            "load_counts": counts.tolist(),
            "load_fraction": frac.tolist(),
            "coact_counts": co_n.tolist(),
            "coact": co.tolist(),
            "domspec": {name: dom[:, d].tolist() for d, name in enumerate(domains)},
            "saturation": sat,
        })
    metrics["max_vio_mean"] = float(np.mean([metrics[f"L{li}.max_vio"] for li in got["layers"]]))
    for key, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ProbeError(f"experts: {key} is not finite")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if p["figures"]:
        figures = [_plot_load(layers_json, run_dir, top_k), _plot_coact(layers_json, run_dir)]
    record = {
        "n_experts": n_experts,
        "top_k": top_k,
        "domains": domains,
        "tokens_per_domain": {name: int(x.numel()) for name, x in sets.items()},
        "compare_to": None if p["compare_to"] is None else str(p["compare_to"]),
        "notes": {
            "coact": "CoAct[i][j] = N(i,j)/N(i), all pairs of the chosen set counted both ways (paper definition)",
            "domspec": "N(i,D)/N_D, reference k/E",
            "mi": "plug-in MI (nats) from the contingency table; one sample per (token, chosen expert)",
            "saturation": "Sat^(k) = mean |S^(k)(compare_to) ∩ S^(k)(model)|/k; top-1 = highest unbiased affinity",
        },
        "layers": layers_json,
        "figures": figures,
    }
    (run_dir / "experts.json").write_text(json.dumps(record))
    return metrics


# ---- figures ----------------------------------------------------------------------------------------


def _plot_load(layers_json: list[dict], run_dir: Path, top_k: int) -> str:
    n = len(layers_json)
    fig, axes = figure(n, 1, 7, 2.2 * n)
    for ax, lay in zip(axes[:, 0], layers_json):
        frac = lay["load_fraction"]
        ax.bar(range(len(frac)), frac)
        ax.axhline(1.0 / len(frac), color="k", ls="--", lw=0.8, label="balanced 1/E")
        ax.set_title(f"layer {lay['layer']}: load per expert (top-{top_k})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=7)
    return save_figure(fig, run_dir / "experts_load.png")


def _plot_coact(layers_json: list[dict], run_dir: Path) -> str:
    n = len(layers_json)
    fig, axes = figure(1, n, 4 * n, 3.6)
    for ax, lay in zip(axes[0], layers_json):
        co = np.array(lay["coact"])
        np.fill_diagonal(co, np.nan)  # the diagonal is 1 by definition
        im = ax.imshow(co, vmin=0.0, vmax=max(1e-9, float(np.nanmax(co)) if np.isfinite(co).any() else 1.0), cmap="viridis")
        ax.set_title(f"layer {lay['layer']}: CoAct(i->j)", fontsize=9)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, run_dir / "experts_coact.png")
