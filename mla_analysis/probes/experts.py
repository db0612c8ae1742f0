"""``probe=experts``: routing statistics of every DeepSeekMoE layer on the eval sets.

Every eval set built by ``build_eval_sets`` ("lm" and each task) is a *domain*; its first
``max_examples`` sequences are fed through the model with ``record_routing`` on, and every position of
every sequence is a token. Definitions: the OLMoE paper (Muennighoff et al. 2024, arXiv:2409.02060) for the
routing analyses, Wang et al. 2024 (arXiv:2408.15664, auxiliary-loss-free balancing) for MaxVio.
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

Expert redundancy (DeepSeekMoE section 4.5, Fig. 4; ``redundancy_r``, [] = skip). For each r, every
MoE layer at once masks each token's r highest-affinity routed experts (ranked by the unbiased
affinity s) and takes the top-k among the rest (``Gate.mask_top_r``); gate weights keep their unmasked
affinities s (renormalised over the new selection only when ``norm_topk_prob``). Loss = mean next-token
cross-entropy over scored positions of each eval set (``train.evaluate``); "lm" is the analogue of the
paper's Pile loss.

- ``redundancy.base.loss`` (and ``.base.<set>.loss``): unmasked; ``redundancy.r<r>.fraction`` = r/E, the
  paper's x-axis (its denominator is all routed experts); ``redundancy.r<r>.loss_delta`` on "lm",
  ``redundancy.r<r>.<set>.loss_delta`` and ``.<task>.exact_match_delta`` per eval set.
- ``dense_baseline`` (a run dir loadable by ``hf_io.load_model``; meant to be a dense model with the
  same active parameters, both counts reported as ``redundancy.active_params`` /
  ``redundancy.dense.active_params`` and NOT enforced): in every layer that is MoE in the probed model, its
  dense FFN's round(f * d_ff) hidden units (inputs of w2) with the largest mean |activation| over the eval
  tokens are zeroed for every token. f (``redundancy.dense.r<r>.neuron_fraction``) matches the share of
  active expert capacity removed: ``dense_fraction: active`` -> f = min(1, r / (k + n_shared)), the r
  masked experts' share of the k routed + n_shared shared experts a token runs (for r <= k: its first-
  choice capacity removed); ``routed`` -> f = min(1, r / E), the paper's denominator.
  ``redundancy.dense.r<r>.loss_delta`` etc. as above. Departures from the paper: it compares with a
  routed model (GShard x1.5, equal r=0 loss) that can re-route around the masked experts; a dense model
  cannot, so its units are removed, not replaced (the dense model loses compute, the MoE does not), the
  ranking is global (mean |activation|, chosen on the same eval tokens) rather than per token, and the
  r=0 losses are not matched.

Low-rank K/V energy vs routing (``energy_rank`` = r, null = skip). Per attention layer l and token t,
z_t = the content keys and values of all heads (``kv_content``: MLA -> per head [W^UK_h c_kv; W^UV_h c_kv],
the K/V the latent encodes, k_rope excluded since it is cached uncompressed; MHA family -> [W^K x; W^V x]
before RoPE). U_r = dominant rank-r right singular subspace of all eval tokens' z of that layer
(uncentred, the Frobenius-optimal rank-r truncation); dropped energy e_t = ||z_t - U_r U_r^T z_t||^2 /
||z_t||^2. "High" tokens: e_t >= the ``energy_quantile`` (0.75: top quartile) of the layer. Routing: the
first MoE layer at or after l (``energy_routing.layer<l>.moe_layer``). Keys ``energy_routing.layer<l>.``:
``mi`` (plug-in MI, nats, high/low vs chosen expert, one sample per token and chosen expert; ``mi_max`` =
entropy of the group label, its upper bound), ``p_value`` (one-sided permutation test of the MI,
``permutation_resamples`` shuffles of the token labels, scipy.stats.permutation_test), ``entropy_high`` /
``entropy_low`` / ``entropy_diff`` (mean routing entropy of the normalised affinities, high minus low)
with ``entropy_p_value`` (two-sided permutation test), ``spearman_entropy`` (Spearman e_t vs routing
entropy), ``energy_mean``, ``energy_threshold``, ``high_fraction``. Tokens are treated as exchangeable; tokens
of one sequence are not independent, so the p-values are optimistic for strongly autocorrelated data.

experts.json holds the full matrices (load counts, co-activation N(i,j) and CoAct, domain
specialisation) and the redundancy / energy_routing records; PNGs: ``experts_load.png`` (load bar chart
per layer), ``experts_coact.png`` (co-activation heat maps), ``experts_redundancy.png`` (loss vs r).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..models.attention import Attention
from ..models.mla import MLA
from ..models.moe import MoE, max_vio, routing_load
from ..training.results import atomic_write_json
from . import ProbeError, register
from ._common import check_params, figure, int_list, model_config, positive_int, save_figure, unwrap

DEFAULTS: dict[str, Any] = {
    "max_examples": 256,  # sequences of each eval set (domain) fed through the model
    "batch_size": 32,
    "compare_to": None,  # run directory of another checkpoint for router saturation; null = skip
    "figures": True,
    # DeepSeekMoE redundancy test: mask each token's r highest-affinity routed experts; [] / null = skip
    "redundancy_r": [1, 2, 4],
    "dense_baseline": None,  # run directory of a dense model with equal active parameters; null = skip
    "dense_fraction": "active",  # neuron share zeroed in the dense model: active = r/(k+shared), routed = r/E
    # low-rank K/V energy vs routing: rank of the truncation; null = skip
    "energy_rank": 4,
    "energy_quantile": 0.75,  # tokens with dropped energy >= this quantile form the "high" group
    "permutation_resamples": 999,
    "seed": 0,
}


def check_model(cfg: Any) -> None:
    """ConfigError before training when the model has no DeepSeekMoE layer to probe."""
    if cfg.ffn != "moe" or cfg.first_k_dense_replace >= cfg.n_layers:
        raise ConfigError(
            f"probe.experts: model.ffn={cfg.ffn} with first_k_dense_replace={cfg.first_k_dense_replace} of "
            f"{cfg.n_layers} layers has no MoE layers (allowed: model.ffn=moe)"
        )


def _parse(params: dict) -> dict:
    p = check_params("experts", params, DEFAULTS)
    positive_int("experts", "max_examples", p["max_examples"])
    positive_int("experts", "batch_size", p["batch_size"])
    if p["compare_to"] is not None and not isinstance(p["compare_to"], (str, Path)):
        raise ConfigError(f"probe.experts.compare_to={p['compare_to']!r} is invalid (allowed: a run directory | null)")
    if not isinstance(p["figures"], bool):
        raise ConfigError(f"probe.experts.figures={p['figures']!r} is invalid (allowed: true | false)")
    p["redundancy_r"] = [] if p["redundancy_r"] in (None, []) else int_list("experts", "redundancy_r", p["redundancy_r"])
    if p["dense_baseline"] is not None and not isinstance(p["dense_baseline"], (str, Path)):
        raise ConfigError(f"probe.experts.dense_baseline={p['dense_baseline']!r} is invalid (allowed: a run directory | null)")
    if p["dense_fraction"] not in ("active", "routed"):
        raise ConfigError(f"probe.experts.dense_fraction={p['dense_fraction']!r} is invalid (allowed: active | routed)")
    if p["energy_rank"] is not None:
        positive_int("experts", "energy_rank", p["energy_rank"])
    q = p["energy_quantile"]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
        raise ConfigError(f"probe.experts.energy_quantile={q!r} is invalid (allowed: a number in (0, 1))")
    positive_int("experts", "permutation_resamples", p["permutation_resamples"])
    if isinstance(p["seed"], bool) or not isinstance(p["seed"], int) or p["seed"] < 0:
        raise ConfigError(f"probe.experts.seed={p['seed']!r} is invalid (allowed: an integer >= 0)")
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


# ---- expert redundancy (DeepSeekMoE section 4.5, Fig. 4) --------------------------------------------


@contextlib.contextmanager
def masked_top_experts(model: torch.nn.Module, r: int):
    """Within the block every MoE layer skips each token's r highest-affinity routed experts (Gate.mask_top_r)."""
    blocks = _moe_blocks(model)
    saved = [m.gate.mask_top_r for _, m in blocks]
    try:
        for _, m in blocks:
            m.gate.mask_top_r = r
        yield
    finally:
        for (_, m), v in zip(blocks, saved):
            m.gate.mask_top_r = v


def eval_losses(model: torch.nn.Module, eval_sets: dict, batch_size: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per eval set: mean next-token cross-entropy over scored positions (and exact match for task sets)."""
    from ..training.trainer import evaluate

    res = evaluate(model, eval_sets, device, batch_size)
    out: dict[str, dict[str, float]] = {}
    for name in eval_sets:
        if name == "lm":
            out[name] = {"loss": res["val_loss"]}
        else:
            out[name] = {"loss": res[f"{name}.loss"], "exact_match": res[f"{name}.exact_match"]}
    return out


@torch.no_grad()
def _check_masked_routing(model: torch.nn.Module, x: torch.Tensor, r: int, device: torch.device) -> None:
    """ProbeError if a masked expert was still selected (group-limited routing left fewer than k experts)."""
    core = unwrap(model)
    blocks = _moe_blocks(core)
    saved = [m.record_routing for _, m in blocks]
    was_training = core.training
    core.eval()
    try:
        for _, m in blocks:
            m.record_routing = True
        core(x.to(device))
        for li, m in blocks:
            top_r = m.last_scores.topk(r, dim=-1)[1]  # (B, T, r)
            hit = (m.last_indices[..., :, None] == top_r[..., None, :]).any()
            if bool(hit):
                raise ProbeError(
                    f"experts: redundancy_r={r} leaves fewer than k={m.n_activated_experts} selectable experts in layer {li} "
                    "(group-limited routing); use a smaller r"
                )
    finally:
        for (_, m), v in zip(blocks, saved):
            m.record_routing = v
            m.last_indices = m.last_weights = m.last_scores = None
        core.train(was_training)


def redundancy(model: torch.nn.Module, eval_sets: dict, rs: list[int], batch_size: int, device: torch.device) -> dict:
    """Eval losses unmasked ("base") and with each token's top-r routed experts masked in every MoE layer."""
    out: dict[str, Any] = {"base": eval_losses(model, eval_sets, batch_size, device), "masked": {}}
    first = next(iter(eval_sets.values()))[0][:batch_size]
    for r in rs:
        with masked_top_experts(model, r):
            _check_masked_routing(model, first, r, device)
            out["masked"][r] = eval_losses(model, eval_sets, batch_size, device)
    return out


def dense_neuron_fraction(r: int, n_experts: int, top_k: int, n_shared: int, mode: str) -> float:
    """Share of a dense FFN's hidden units matched to masking r routed experts (module docstring, "redundancy")."""
    if mode == "active":
        return min(1.0, r / (top_k + n_shared))
    if mode == "routed":
        return min(1.0, r / n_experts)
    raise ValueError(f"dense_neuron_fraction: mode={mode!r} (allowed: active | routed)")


def _dense_ffns(model: torch.nn.Module, layers: list[int]) -> list[tuple[int, torch.nn.Module]]:
    """The dense FFN of each listed block (anything with a ``w2`` down projection that is not a MoE)."""
    core = unwrap(model)
    out = []
    for i in layers:
        ffn = core.layers[i].ffn
        if isinstance(ffn, MoE) or not isinstance(getattr(ffn, "w2", None), torch.nn.Linear):
            raise ValueError(f"layer {i} has no dense FFN with a w2 down projection")
        out.append((i, ffn))
    return out


@torch.no_grad()
def ffn_neuron_activity(
    model: torch.nn.Module, layers: list[int], eval_sets: dict, batch_size: int, device: torch.device
) -> dict[int, torch.Tensor]:
    """Mean |activation| [d_ff] (float64) of every hidden unit (the input of w2) per layer, over all eval tokens."""
    core = unwrap(model)
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    handles = []
    for li, ffn in _dense_ffns(core, layers):

        def fn(module, args, li=li):
            h = args[0].detach()
            h = h.reshape(-1, h.shape[-1]).double().abs()  # (B*T, d_ff)
            sums[li] = sums.get(li, 0) + h.sum(0).cpu()
            if li == layers[0]:
                count[0] += h.shape[0]

        handles.append(ffn.w2.register_forward_pre_hook(fn))
    was_training = core.training
    core.eval()
    try:
        for x, _ in eval_sets.values():
            for i in range(0, x.shape[0], batch_size):
                core(x[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        core.train(was_training)
    return {li: s / count[0] for li, s in sums.items()}


@contextlib.contextmanager
def zeroed_neurons(model: torch.nn.Module, neurons: dict[int, torch.Tensor]):
    """Within the block the listed hidden units (input columns of w2) of each layer's dense FFN output 0."""
    handles = []
    try:
        for li, ffn in _dense_ffns(model, list(neurons)):
            idx = neurons[li]

            def fn(module, args, idx=idx):
                return (args[0].index_fill(-1, idx.to(args[0].device), 0.0),)

            handles.append(ffn.w2.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def top_neurons(activity: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * d_ff) units with the largest mean |activation| (ties: lower index first)."""
    n = int(math.floor(fraction * activity.numel() + 0.5))
    return torch.argsort(activity, descending=True, stable=True)[:n]


def dense_redundancy(
    dense_model: torch.nn.Module, layers: list[int], eval_sets: dict, fractions: dict[int, float],
    batch_size: int, device: torch.device,
) -> dict:
    """Eval losses of the dense model unablated ("base") and with the top units of each layer zeroed per r."""
    activity = ffn_neuron_activity(dense_model, layers, eval_sets, batch_size, device)
    out: dict[str, Any] = {"base": eval_losses(dense_model, eval_sets, batch_size, device), "masked": {}, "n_zeroed": {}}
    for r, f in fractions.items():
        neurons = {li: top_neurons(a, f) for li, a in activity.items()}
        out["n_zeroed"][r] = {li: int(n.numel()) for li, n in neurons.items()}
        with zeroed_neurons(dense_model, neurons):
            out["masked"][r] = eval_losses(dense_model, eval_sets, batch_size, device)
    return out


# ---- low-rank K/V energy vs routing -----------------------------------------------------------------


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
    from .spectra import GramAccumulator

    core = unwrap(model)
    moe = _moe_blocks(core)
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


# ---- probe sections ---------------------------------------------------------------------------------


def _main_set(losses: dict) -> str:
    return "lm" if "lm" in losses else next(iter(losses))


def _redundancy_section(model: torch.nn.Module, eval_xy: dict, p: dict, device: torch.device) -> tuple[dict, dict]:
    """Metrics ``redundancy.*`` and the experts.json record of the redundancy test (and its dense baseline)."""
    from ..models.accounting import count_params

    cfg = model_config(model)
    blocks = _moe_blocks(model)
    n_experts, top_k = blocks[0][1].n_routed_experts, blocks[0][1].n_activated_experts
    rs = p["redundancy_r"]
    res = redundancy(model, eval_xy, rs, p["batch_size"], device)
    main = _main_set(res["base"])
    metrics: dict[str, Any] = {"redundancy.base.loss": res["base"][main]["loss"], "redundancy.active_params": count_params(cfg, active=True)}
    for name, v in res["base"].items():
        metrics[f"redundancy.base.{name}.loss"] = v["loss"]
    for r in rs:
        m = res["masked"][r]
        metrics[f"redundancy.r{r}.fraction"] = r / n_experts
        metrics[f"redundancy.r{r}.loss_delta"] = m[main]["loss"] - res["base"][main]["loss"]
        for name, v in m.items():
            metrics[f"redundancy.r{r}.{name}.loss_delta"] = v["loss"] - res["base"][name]["loss"]
            if "exact_match" in v:
                metrics[f"redundancy.r{r}.{name}.exact_match_delta"] = v["exact_match"] - res["base"][name]["exact_match"]
    record: dict[str, Any] = {
        "r": rs,
        "main_set": main,
        "definition": "each token's r highest-affinity routed experts masked in every MoE layer at once, top-k "
        "chosen among the rest (Gate.mask_top_r); gate weights keep the unmasked affinities (renormalised only "
        "when norm_topk_prob); fraction = r / E (paper's x-axis)",
        "moe": {"base": res["base"], "masked": {str(r): v for r, v in res["masked"].items()}},
        "dense": None,
    }
    if p["dense_baseline"] is None:
        return metrics, record

    from ..interop.hf_io import load_model

    path = str(p["dense_baseline"])
    dense = load_model(path, device)
    dcfg = model_config(dense)
    key = f"probe.experts.dense_baseline={path!r}"
    if _moe_blocks(dense):
        raise ConfigError(f"{key}: the model has MoE layers (allowed: a run with a dense FFN)")
    if dcfg.n_layers != cfg.n_layers or dcfg.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"{key}: n_layers/vocab_size {dcfg.n_layers}/{dcfg.vocab_size} differ from the MoE model's {cfg.n_layers}/{cfg.vocab_size}"
        )
    layers = [i for i, _ in blocks]
    try:
        _dense_ffns(dense, layers)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    fractions = {r: dense_neuron_fraction(r, n_experts, top_k, cfg.n_shared_experts, p["dense_fraction"]) for r in rs}
    dres = dense_redundancy(dense, layers, eval_xy, fractions, p["batch_size"], device)
    metrics["redundancy.dense.base.loss"] = dres["base"][main]["loss"]
    metrics["redundancy.dense.active_params"] = count_params(dcfg, active=True)
    for name, v in dres["base"].items():
        metrics[f"redundancy.dense.base.{name}.loss"] = v["loss"]
    for r in rs:
        m = dres["masked"][r]
        metrics[f"redundancy.dense.r{r}.neuron_fraction"] = fractions[r]
        metrics[f"redundancy.dense.r{r}.loss_delta"] = m[main]["loss"] - dres["base"][main]["loss"]
        for name, v in m.items():
            metrics[f"redundancy.dense.r{r}.{name}.loss_delta"] = v["loss"] - dres["base"][name]["loss"]
            if "exact_match" in v:
                metrics[f"redundancy.dense.r{r}.{name}.exact_match_delta"] = v["exact_match"] - dres["base"][name]["exact_match"]
    record["dense"] = {
        "run_dir": path,
        "layers": layers,
        "fraction_mode": p["dense_fraction"],
        "definition": "in the dense model's FFN of every layer that is MoE in the probed model, the "
        "round(f * d_ff) hidden units with the largest mean |activation| over the eval tokens are zeroed for "
        "every token; f = min(1, r/(k + n_shared)) (active) or min(1, r/E) (routed)",
        "fractions": {str(r): f for r, f in fractions.items()},
        "n_zeroed": {str(r): v for r, v in dres["n_zeroed"].items()},
        "active_params": {"moe": metrics["redundancy.active_params"], "dense": metrics["redundancy.dense.active_params"]},
        "base": dres["base"],
        "masked": {str(r): v for r, v in dres["masked"].items()},
    }
    return metrics, record


def _energy_section(model: torch.nn.Module, sets: dict, p: dict, device: torch.device) -> tuple[dict, dict]:
    """Metrics ``energy_routing.layer<l>.*`` and their experts.json record."""
    n_experts = _moe_blocks(model)[0][1].n_routed_experts
    data = energy_routing_data(model, list(sets.values()), p["energy_rank"], p["batch_size"], device)
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
        st["moe_layer"] = moe_l
        layers[str(l)] = st
        metrics.update({f"energy_routing.layer{l}.{k}": v for k, v in st.items()})
    record = {
        "rank": p["energy_rank"],
        "quantile": p["energy_quantile"],
        "n_resamples": p["permutation_resamples"],
        "definition": "per token: fraction of the squared norm of its content K/V (kv_content) outside the "
        "dominant rank-r right singular subspace of all eval tokens' K/V of that layer (uncentred); high group = "
        "tokens at or above the quantile; routing = the first MoE layer at or after the attention layer",
        "layers": layers,
        "skipped": skipped,
    }
    return metrics, record


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
    eval_xy = {name: (xy[0][: p["max_examples"]], xy[1][: p["max_examples"]]) for name, xy in build_eval_sets(data_cfg).items()}
    sets = {name: xy[0] for name, xy in eval_xy.items()}
    domains = list(sets)
    for r in p["redundancy_r"]:
        if r + top_k > n_experts:
            raise ConfigError(
                f"probe.experts.redundancy_r={p['redundancy_r']!r} is invalid (allowed: integers 1..{n_experts - top_k} = E - k)"
            )
    # one row per token (sets may differ in length), in the order _collect feeds them
    domain = torch.cat([torch.full((x.numel(),), d, dtype=torch.long) for d, x in enumerate(sets.values())])  # [N]
    tokens = torch.cat([x.reshape(-1).cpu() for x in sets.values()])  # [N]
    n_tokens = int(domain.numel())

    got = _collect(model, sets, p, device)
    other = None
    if p["compare_to"] is not None:
        from ..interop.hf_io import load_model

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
    red_json = None
    if p["redundancy_r"]:
        red_metrics, red_json = _redundancy_section(model, eval_xy, p, device)
        metrics.update(red_metrics)
    energy_json = None
    if p["energy_rank"] is not None:
        e_metrics, energy_json = _energy_section(model, sets, p, device)
        metrics.update(e_metrics)
    for key, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ProbeError(f"experts: {key} is not finite")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if p["figures"]:
        figures = [_plot_load(layers_json, run_dir, top_k), _plot_coact(layers_json, run_dir)]
        if red_json is not None:
            figures.append(_plot_redundancy(red_json, run_dir))
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
        "redundancy": red_json,
        "energy_routing": energy_json,
        "figures": figures,
    }
    atomic_write_json(run_dir / "experts.json", record)
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


def _plot_redundancy(red: dict, run_dir: Path) -> str:
    fig, axes = figure(1, 1, 5.5, 3.6)
    ax = axes[0, 0]
    main = red["main_set"]
    rs = [0] + list(red["r"])
    moe = [red["moe"]["base"][main]["loss"]] + [red["moe"]["masked"][str(r)][main]["loss"] for r in red["r"]]
    ax.plot(rs, moe, marker="o", label="MoE: top-r routed experts masked")
    if red["dense"] is not None:
        d = red["dense"]
        dense = [d["base"][main]["loss"]] + [d["masked"][str(r)][main]["loss"] for r in red["r"]]
        ax.plot(rs, dense, marker="s", label=f"dense: matched share of FFN units zeroed ({d['fraction_mode']})")
    ax.set_xlabel("r (routed experts masked per token)")
    ax.set_ylabel(f"{main} loss (nats/token)")
    ax.set_title("Expert redundancy (DeepSeekMoE Fig. 4 analogue)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, run_dir / "experts_redundancy.png")
