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

Energy quantile bins (``energy_bins``, default 4): ``energy_routing.layer<l>.bins.{mi,null_mean,excess,ami,p_value}``
= ``calibrated_mi`` (below) between the token's equal-count bin of e_t and its chosen experts, the bins shuffled
inside each window (a stricter null than the token shuffle above: e_t and routing both drift with position and
context); ``bins.ami`` is the effect size.

Real domains (``real_domains: true``, data.source=shakespeare; ``domains.py``). The held-out plays
(data.shakespeare.eval_edition's texts of the evaluation split) are cut into non-overlapping windows of
``window`` tokens (null = data.seq_len) inside each document, at most ``max_windows_per_doc`` evenly spaced;
these windows, grouped by genre, replace the eval sets as the domains of every statistic above (so
``domspec.<genre>.max``, ``mi_expert_domain`` = genre; the redundancy test still scores the "lm" eval set).
Token labels: genre (the Folio's comedy / history / tragedy, plus poem), play, kind (line / stage / speaker,
data.shakespeare.char_kinds; "other" left out), token class of spoken-line tokens (name from the play's persons
list as probe=token_bins finds them, numeral, function word from ``domains.FUNCTION_WORDS``, other word; tokens of
other kinds left out). Per MoE layer and label ``L<l>.spec.<label>.``: ``mi`` (plug-in, nats, one sample per
token and chosen expert), ``null_mean`` (mean MI over ``mi_resamples`` permutations), ``excess`` = mi - null_mean,
``p_value`` (one-sided, (1 + #null >= mi) / (1 + resamples)), ``ami`` = excess / (min(H_label, H_expert) -
null_mean): the adjusted MI (Vinh et al. 2010, "min" normaliser) with a permutation expectation, 0 at chance,
comparable across expert counts. Nulls: genre and play (constant in a window) move with whole windows (windows
of one play share names and topic, so this null is optimistic for genre: with one held-out play per genre, genre
and play are confounded); kind and token class are shuffled inside each window. ``spec.<label>.ami_mean``: the
mean over MoE layers; ``real.n_windows``, ``real.window``. Figure ``experts_genre.png`` (DomSpec by genre).

experts.json holds the full matrices (load counts, co-activation N(i,j) and CoAct, domain
specialisation) and the redundancy / energy_routing records; PNGs: ``experts_load.png`` (load bar chart
per layer), ``experts_coact.png`` (co-activation heat maps), ``experts_redundancy.png`` (loss vs r).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import ConfigError, Ffn
from ...models.moe import max_vio, routing_load
from ...training.results import atomic_write_json
from .. import ProbeError, register
from .._common import figure, model_config, moe_blocks, options, save_figure, unwrap
from .coact import coactivation, coactivation_counts, mean_offdiag
from .energy import energy_section
from .masking import redundancy_section
from .domains import KIND_LABELS, TOKEN_CLASSES
from .statistics import (calibrated_mi, domain_specialisation, entropy, expert_label_mi, load_cv, load_fraction,
                         rank_by_score, saturation, token_entropy_sum, top_domain_share, vocab_specialisation)


def check_model(cfg: Any) -> None:
    """ConfigError before training when the model has no DeepSeekMoE layer to probe."""
    if cfg.ffn != Ffn.moe or cfg.first_k_dense_replace >= cfg.n_layers:
        raise ConfigError(
            f"probe.experts: model.ffn={cfg.ffn} with first_k_dense_replace={cfg.first_k_dense_replace} of "
            f"{cfg.n_layers} layers has no MoE layers (allowed: model.ffn=moe)"
        )


def _parse(params: dict) -> dict:
    return options("experts", params)  # checked in mla_analysis.config.probes


# ---- collection -------------------------------------------------------------------------------------


def _collect(model: torch.nn.Module, sets: dict, p: dict, device: torch.device) -> dict[str, Any]:
    """Ranked routing indices [N, k] (one row per token) and the per-token entropy sum per MoE layer, for all domains."""
    core = unwrap(model)
    blocks = moe_blocks(core)
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


# ---- real domains -------------------------------------------------------------------------------------

# label -> how its null is drawn: document-level labels move with whole windows, token-level ones are shuffled
# inside each window (keeping every window's label mix and any window-level routing drift)
REAL_LABELS = {"genre": "units", "play": "units", "kind": "strata", "token_class": "strata"}


def _real_sets(model: torch.nn.Module, data_cfg: Any, p: dict) -> dict[str, Any]:
    """Windows of the held-out plays grouped by genre (the domains), their stream positions and token labels."""
    from .._text import model_tokenizer, shakespeare_split
    from .domains import play_windows, stream_labels

    labelled = shakespeare_split(data_cfg, "experts")
    length = p["window"] or data_cfg.seq_len
    max_len = model_config(model).max_seq_len
    if length > max_len:
        raise ConfigError(f"probe.experts.window={length} is beyond the model's context (allowed: <= {max_len})")
    x, pos = play_windows(labelled, length, p["max_windows_per_doc"])  # (n, L)
    labels = stream_labels(labelled, model_tokenizer(data_cfg, "experts"))
    win_genre = labels["genre"][pos[:, 0]]  # (n,): a window lies inside one document
    sets, order = {}, []
    for g, name in enumerate(labels["genres"]):
        rows = np.flatnonzero(win_genre == g)
        if rows.size:
            sets[name] = x[torch.from_numpy(rows)]
            order.append(rows)
    rows = np.concatenate(order)
    pos = pos[rows].reshape(-1)  # (N,) stream position of every routed token, in _collect's order
    window = np.repeat(np.arange(len(rows)), length)  # (N,)
    return {"sets": sets, "labels": {k: labels[k][pos] for k in REAL_LABELS}, "window": window,
            "names": {"genre": labels["genres"], "play": labels["plays"], "kind": list(KIND_LABELS),
                      "token_class": list(TOKEN_CLASSES)},
            "found_names": labels["names"], "length": length, "n_windows": len(rows)}


def _real_section(got: dict, real: dict, n_experts: int, p: dict) -> tuple[dict, dict]:
    """Metrics ``L<l>.spec.<label>.*`` / ``spec.<label>.ami_mean`` and the experts.json record of the real domains."""
    metrics: dict[str, Any] = {"real.n_windows": real["n_windows"], "real.window": real["length"]}
    layers: dict[str, Any] = {}
    for j, li in enumerate(got["layers"]):
        per = {}
        for label, null in REAL_LABELS.items():
            kw = {"units": real["window"]} if null == "units" else {"strata": real["window"]}
            st = calibrated_mi(got["indices"][j], real["labels"][label], n_experts, p["mi_resamples"], p["seed"] + j, **kw)
            per[label] = st
            for key in ("ami", "mi", "null_mean", "excess", "p_value"):
                metrics[f"L{li}.spec.{label}.{key}"] = st[key]
        layers[str(li)] = per
    for label in REAL_LABELS:
        metrics[f"spec.{label}.ami_mean"] = float(np.mean([layers[str(li)][label]["ami"] for li in got["layers"]]))
        metrics[f"spec.{label}.n_tokens"] = layers[str(got["layers"][0])][label]["n_tokens"]
    record = {
        "window": real["length"], "n_windows": real["n_windows"], "labels": real["names"],
        "null": {k: ("label of each window shuffled over windows" if v == "units" else "labels shuffled inside each window")
                 for k, v in REAL_LABELS.items()},
        "definition": "calibrated_mi: plug-in MI of (token label, chosen expert) samples; null = mi_resamples label "
        "permutations; ami = (mi - null_mean) / (min(H_label, H_expert) - null_mean)",
        "tokens_per_label": {k: np.bincount(v[v >= 0], minlength=len(real["names"][k])).tolist()
                             for k, v in real["labels"].items()},
        "persons_names": real["found_names"],
        "layers": layers,
    }
    return metrics, record


# ---- probe ------------------------------------------------------------------------------------------


@register("experts")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Load, balance, entropy, co-activation, domain/vocabulary specialisation and saturation per MoE layer."""
    from ...data import build_eval_sets

    p = _parse(params)
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError("probe.experts: model has no MoE layers")
    n_experts = blocks[0][1].n_routed_experts
    top_k = blocks[0][1].n_activated_experts
    eval_xy = {name: (xy[0][: p["max_examples"]], xy[1][: p["max_examples"]]) for name, xy in build_eval_sets(data_cfg).items()}
    real = _real_sets(model, data_cfg, p) if p["real_domains"] else None
    sets = real["sets"] if real is not None else {name: xy[0] for name, xy in eval_xy.items()}
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
        from ...interop.hf_io import load_model

        cmp_model = load_model(p["compare_to"], device)
        cmp_blocks = moe_blocks(cmp_model)
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
    real_json = None
    if real is not None:
        r_metrics, real_json = _real_section(got, real, n_experts, p)
        metrics.update(r_metrics)
    red_json = None
    if p["redundancy_r"]:
        red_metrics, red_json = redundancy_section(model, eval_xy, p, device)
        metrics.update(red_metrics)
    energy_json = None
    if p["energy_rank"] is not None:
        e_metrics, energy_json = energy_section(model, sets, p, device, strata=real["window"] if real is not None else None)
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
        if real_json is not None:
            figures.append(_plot_genre(layers_json, run_dir, top_k / n_experts))
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
        "real_domains": real_json,
        "figures": figures,
    }
    atomic_write_json(run_dir / "experts.json", record, indent=None)  # 30 layers of E x E matrices: half the bytes unindented
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


def _plot_genre(layers_json: list[dict], run_dir: Path, uniform: float) -> str:
    """DomSpec(i, genre) heat map per layer (rows genres, columns experts), reference k/E."""
    n = len(layers_json)
    fig, axes = figure(n, 1, 8, 1.6 + 0.9 * n)
    for ax, lay in zip(axes[:, 0], layers_json):
        names = list(lay["domspec"])
        mat = np.array([lay["domspec"][g] for g in names])  # (genres, E)
        im = ax.imshow(mat, aspect="auto", cmap="magma", vmin=0.0, vmax=max(uniform * 2, float(mat.max())))
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"layer {lay['layer']}: DomSpec(expert, genre) (uniform k/E = {uniform:.3f})", fontsize=9)
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, run_dir / "experts_genre.png")


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
