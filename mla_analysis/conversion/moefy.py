"""Dense -> DeepSeekMoE: split each dense SwiGLU FFN into experts (MoEfication) or upcycle it.

``dense_to_moe(model, n_routed_experts, n_activated_experts, n_shared_experts, method, calib)`` returns
a new ``Transformer`` with ``ffn="moe"`` that shares every non-FFN weight with the source.

``method="kmeans"`` (MoEfication, Zhang et al. 2022, adapted to SwiGLU and DeepSeekMoE's shared experts).
The d_ff hidden neurons n of a layer, h_n(x) = silu(w1_n . x) * (w3_n . x), are partitioned into
S = n_shared_experts shared and E = n_routed_experts routed experts of I = d_ff / (E + S) neurons each
(``moe_d_ff = I``); expert e gets rows w1[idx_e], w3[idx_e] and columns w2[:, idx_e], so the sum of all
experts is the dense FFN exactly.

1. Activity. Over the calibration tokens t (FFN inputs x_t = ffn_norm output), neuron n is *active* on t
   when |h_n(x_t)| is among the top fraction rho = (k + S) / (E + S) of that token's |h| (k =
   n_activated_experts): rho is the share of neurons the MoE computes per token. SwiGLU has no
   exact zeros, so this replaces MoEfication's ReLU pattern h > 0.
2. Shared experts: the S * I neurons active on the most tokens (ties: lower index).
3. Routed experts: balanced k-means of the remaining neurons' binary activity patterns a_n in {0,1}^N
   (co-activated neurons cluster together). sklearn ``KMeans`` gives the initial centroids; then, until the
   assignment stops changing (at most 20 rounds), an exact *balanced* assignment (every cluster exactly
   I neurons: ``scipy.optimize.linear_sum_assignment`` of neurons to E * I slots, slot cost = squared
   distance to its cluster's centroid) alternates with recomputing the centroids. Both run on the patterns'
   Gram embedding (``gram_embedding``: n <= d_ff coordinates with the same pairwise distances, instead of one
   coordinate per calibration token): the same k-means up to float round-off, 3-8x faster at 16k tokens.
   On SmolLM2 at 16 x 1,024 calibration tokens the partition is identical to the direct one in layer 15 (all
   three layouts); in layers 0 and 29 exact distance ties between the integer patterns break otherwise and
   k-means ends in another local optimum (layer 0: ARI 0.17, SSE +0.5%, inside the spread of k-means' own
   seeds, whose partitions agree to ARI 0.2 there; layer 29: ARI 0.88, SSE +0.03%).
4. Router (``Gate.weight`` row e), from the k-means centroids: the mean input direction that activates
   cluster e. With c_{e,t} = the cluster's centroid coordinate (the share of its neurons active on token
   t), w_e = sum_t c_{e,t} x_t / sum_t c_{e,t} - mean_t x_t; all rows are then scaled by one factor so the
   logits w_e . x_t have unit standard deviation over the calibration tokens. (MoEfication proper trains
   an MLP router to predict each expert's activation sum; this closed form is our departure.)
   Gating: softmax scores, ``norm_topk_prob=True``. ``gate_weights="unit"`` (the default): every selected
   expert is summed with weight 1 (MoEfication's unweighted sum; the router gets the score-weighted
   gradient, see ``models.moe.Gate``), so with n_activated_experts = n_routed_experts the MoE IS the dense
   FFN (fp32 round-off; tests/conversion/test_moefy.py) whatever the router. ``gate_weights="score"``: DeepSeek's
   weighted sum with ``route_scale = k`` (the k weights sum to k, each 1 only when the scores are equal).
5. Balancing for healing: ``aux_alpha`` (DeepSeek-V2's expert-level loss, per sequence) and
   ``bias_update_speed`` (DeepSeek-V3's auxiliary-loss-free bias, updated after every optimizer step by the
   trainer); both 0 = none.

Layouts (``experiment real_experts``): with S shared + E routed experts of width I = d_ff / (E + S) and k
routed experts per token, the active FFN width is (k + S) * I; ``active_experts(fraction, E, S)`` is the k of
an active fraction (k + S) / (E + S). SmolLM2-135M (d_ff 1536): fine-grained 2 shared + 62 routed of width 24,
top-6 -> active 192 = 1/8; coarse 8 x 192 top-1 and 16 x 96 top-2 -> the same 192.

``method="upcycle"`` (sparse upcycling, Komatsuzaki et al. 2023): every routed expert is a copy of the
whole FFN (``moe_d_ff = d_ff``) plus Gaussian noise of std ``noise`` times the weight's std; no shared
experts (n_shared_experts must be 0); router N(0, init_std) (seeded); softmax, norm_topk_prob=True,
route_scale 1, so the selected weights sum to 1 and with noise 0 the MoE equals the dense FFN.
Departure: no fine-grained (d_ff-slice) upcycling.

Layers below ``first_k_dense_replace`` keep their dense FFN (copied).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np
import torch

from ..training.forward_hooks import run_hooked
from ..models.mlp import SwiGLU
from ..models.moe import MoE
from ..models.transformer import Transformer

METHODS = ("kmeans", "upcycle")


@torch.no_grad()
def ffn_inputs(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[Optional[torch.Tensor]]:
    """Per layer, the dense FFN's inputs X (N, D) float32 on CPU over the calibration tokens (None: no dense FFN)."""
    store: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        if isinstance(block.ffn, SwiGLU):
            hooks.append(block.ffn.register_forward_pre_hook(
                lambda m, args, i=i: store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())))
    run_hooked(model, hooks, calib, batch_size, return_hidden=True)  # FFN inputs only: the LM head is not needed
    return [torch.cat(v) if v else None for v in store]  # (N, D) each


def hidden_activations(ffn: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU hidden activations silu(w1 x) * (w3 x) (N, d_ff) float32 of inputs x (N, D)."""
    w1, w3 = ffn.w1.weight.float().cpu(), ffn.w3.weight.float().cpu()  # (F, D)
    return torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)  # (N, F)


def ffn_activations(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Per dense layer, (FFN inputs X (N, D), hidden activations (N, d_ff)), float32 on CPU (all layers held at once)."""
    xs = ffn_inputs(model, calib, batch_size)
    return [None if x is None else (x, hidden_activations(block.ffn, x)) for x, block in zip(xs, model.layers)]


def active_experts(fraction: float, n_routed: int, n_shared: int) -> int:
    """k routed experts per token for an active fraction (k + S) / (E + S) of the FFN width (ValueError off the grid)."""
    total = n_routed + n_shared
    k = round(fraction * total) - n_shared
    if not 1 <= k <= n_routed or abs((k + n_shared) / total - fraction) > 1e-9:
        raise ValueError(
            f"active_fraction={fraction} is invalid for {n_shared} shared + {n_routed} routed experts "
            f"(allowed: (k + {n_shared}) / {total} for k in 1..{n_routed})"
        )
    return k


def active_pattern(h: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, d_ff) bool: neuron active on a token when its |h| is in the token's top `fraction` of neurons."""
    n_top = max(1, int(round(fraction * h.shape[1])))
    top = h.abs().topk(n_top, dim=1).indices  # (N, n_top)
    return torch.zeros_like(h, dtype=torch.bool).scatter_(1, top, True)


def gram_embedding(features: np.ndarray) -> np.ndarray:
    """Rows Y (n, r), r = rank <= min(n, F), with Y Y^T = X X^T for features X (n, F): the same pairwise distances.

    Pivoted Cholesky of the Gram matrix (LAPACK dpstrf; it tolerates the rank deficiency of duplicate or silent
    neurons). Binary features (activity patterns) are multiplied in float32, exact for counts below 2^24.
    """
    from scipy.linalg import lapack

    n = features.shape[0]
    binary = features.dtype == bool or np.array_equal(features, features.astype(bool))
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32 if binary else np.float64))
    gram = (x @ x.T).double().numpy()  # (n, n)
    factor, piv, rank, info = lapack.dpstrf(gram, lower=1)
    if info < 0:
        raise RuntimeError(f"dpstrf failed (info={info})")
    out = np.zeros((n, max(int(rank), 1)))  # a rank-0 Gram (every pattern zero) keeps one zero coordinate
    out[piv - 1, : int(rank)] = np.tril(factor)[:, : int(rank)]  # undo the pivoting: (P L)(P L)^T = G
    return out


def balanced_kmeans(features: np.ndarray, n_clusters: int, seed: int = 0, max_rounds: int = 20) -> np.ndarray:
    """Labels (n,) with exactly n / n_clusters points per cluster: KMeans init, then balanced assignment rounds.

    k-means (Lloyd and k-means++) only sees distances between points and means of points, so it runs on the
    Gram embedding (``gram_embedding``: at most n coordinates instead of one per calibration token, the same
    distances up to float64 round-off), with sklearn's tolerance rescaled to the new number of coordinates
    (sklearn scales ``tol`` by the mean per-coordinate variance; the total variance is unchanged). The result
    is MoEfication's balanced k-means of the patterns themselves; only exact ties may break differently.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} points cannot form {n_clusters} equal clusters")
    size = n // n_clusters
    feats = gram_embedding(features)  # (n, r)
    with warnings.catch_warnings():
        # identical patterns (e.g. every neuron active when all experts are) leave fewer distinct
        # clusters; the balanced assignment below still splits their ties into equal sizes
        warnings.simplefilter("ignore", ConvergenceWarning)
        tol = 1e-4 * feats.shape[1] / features.shape[1]  # sklearn's default 1e-4 on the original coordinates
        centers = KMeans(n_clusters, n_init=4, random_state=seed, tol=tol).fit(feats).cluster_centers_  # (k, r)
    labels = None
    sq = (feats ** 2).sum(1)[:, None]  # (n, 1)
    for _ in range(max_rounds):
        # |a - c|^2 = |a|^2 - 2 a.c + |c|^2 without the (n, k, r) broadcast
        dist = np.maximum(sq - 2.0 * feats @ centers.T + (centers ** 2).sum(1)[None, :], 0.0)  # (n, k)
        _, slots = linear_sum_assignment(np.repeat(dist, size, axis=1))  # (n,) slot of each point
        new = slots // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([feats[labels == c].mean(0) for c in range(n_clusters)])
    return labels


def _moe_config(cfg, method: str, n_routed: int, n_activated: int, n_shared: int, first_k: int,
                gate_weights: str = "score", aux_alpha: float = 0.0, bias_update_speed: float = 0.0):
    expert = cfg.d_ff // (n_routed + n_shared) if method == "kmeans" else cfg.d_ff
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}->moe{n_routed}x{n_activated}",
        ffn="moe",
        n_routed_experts=n_routed,
        n_activated_experts=n_activated,
        n_shared_experts=n_shared,
        moe_d_ff=expert,
        first_k_dense_replace=first_k,
        score_func="softmax",
        norm_topk_prob=True,
        route_scale=float(n_activated) if method == "kmeans" else 1.0,
        n_group=1,
        topk_group=1,
        n_devices=1,
        gate_weights=gate_weights,
        aux_alpha=aux_alpha,
        bias_update_speed=bias_update_speed,
    )


@torch.no_grad()
def dense_to_moe(
    model: Transformer,
    n_routed_experts: int,
    n_activated_experts: int,
    n_shared_experts: int = 0,
    method: str = "kmeans",
    calib: Optional[torch.Tensor] = None,
    first_k_dense_replace: int = 0,
    noise: float = 0.0,
    seed: int = 0,
    gate_weights: Optional[str] = None,
    aux_alpha: float = 0.0,
    bias_update_speed: float = 0.0,
) -> Transformer:
    """A DeepSeekMoE copy of a dense-SwiGLU Transformer by MoEfication (kmeans) or upcycling; see the module doc.

    calib: token ids (B, T) for kmeans (activation patterns, router). noise: upcycling's relative weight noise.
    gate_weights: None = "unit" for kmeans, "score" for upcycle (upcycle needs it: its copies' weights sum to 1).
    aux_alpha / bias_update_speed: the balancing the converted model heals with (model config fields).
    The result carries ``moefy_info`` (per layer: shared neuron ids, routed expert neuron ids).
    """
    src = model.cfg
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid (allowed: {' | '.join(METHODS)})")
    if src.ffn != "dense" or src.mlp != "swiglu" or src.bias:
        raise ValueError(f"source ffn={src.ffn!r} mlp={src.mlp!r} bias={src.bias} (need a bias-free dense swiglu FFN)")
    if not 1 <= n_activated_experts <= n_routed_experts:
        raise ValueError(f"n_activated_experts={n_activated_experts} is invalid (allowed: 1..{n_routed_experts})")
    if method == "kmeans":
        if src.d_ff % (n_routed_experts + n_shared_experts):
            raise ValueError(
                f"d_ff={src.d_ff} is not divisible by n_routed_experts + n_shared_experts="
                f"{n_routed_experts + n_shared_experts} (kmeans splits the neurons into equal experts)"
            )
        if calib is None:
            raise ValueError("method='kmeans' needs calib (calibration token ids)")
    elif n_shared_experts:
        raise ValueError(f"n_shared_experts={n_shared_experts} is invalid for method='upcycle' (allowed: 0)")
    if gate_weights is None:
        gate_weights = "unit" if method == "kmeans" else "score"
    if gate_weights not in ("unit", "score") or (method == "upcycle" and gate_weights != "score"):
        allowed = "score" if method == "upcycle" else "unit | score"
        raise ValueError(f"gate_weights={gate_weights!r} is invalid for method={method!r} (allowed: {allowed})")
    if not 0 <= first_k_dense_replace < src.n_layers:
        raise ValueError(f"first_k_dense_replace={first_k_dense_replace} is invalid (allowed: 0..{src.n_layers - 1})")

    cfg = _moe_config(src, method, n_routed_experts, n_activated_experts, n_shared_experts, first_k_dense_replace,
                      gate_weights, aux_alpha, bias_update_speed)
    torch.manual_seed(seed)  # the upcycled router's random init
    new = Transformer(cfg).to(dtype=model.embed.weight.dtype, device=model.embed.weight.device)
    moe_prefixes = tuple(f"layers.{i}.ffn." for i in range(first_k_dense_replace, src.n_layers))
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(moe_prefixes)}
    missing, unexpected = new.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith(moe_prefixes) for k in missing):
        raise RuntimeError(f"non-FFN weights do not line up: missing={missing}, unexpected={unexpected}")

    xs = ffn_inputs(model, calib) if method == "kmeans" else [None] * src.n_layers  # h per layer, below
    gen = torch.Generator().manual_seed(seed)
    info = []
    for i in range(first_k_dense_replace, src.n_layers):
        dense, moe = model.layers[i].ffn, new.layers[i].ffn
        assert isinstance(moe, MoE)
        w1, w3, w2 = dense.w1.weight, dense.w3.weight, dense.w2.weight  # (F, D), (F, D), (D, F)
        if method == "upcycle":
            for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
                copies = w.expand(n_routed_experts, *w.shape).clone()  # (E, ...)
                if noise > 0:
                    copies += noise * w.std() * torch.randn(copies.shape, generator=gen).to(w)
                getattr(moe, name).copy_(copies)
            info.append({})
            continue
        x = xs[i]
        xs[i] = None  # one layer's activations in memory at a time
        h = hidden_activations(dense, x)  # (N, F)
        size = cfg.moe_d_ff
        frac = (n_activated_experts + n_shared_experts) / (n_routed_experts + n_shared_experts)
        active = active_pattern(h, frac)  # (N, F)
        freq = active.float().mean(0)  # (F,)
        order = torch.argsort(-freq, stable=True)
        shared_idx = order[: n_shared_experts * size].sort().values
        routed_idx = order[n_shared_experts * size:].sort().values  # (E*I,)
        labels = balanced_kmeans(active[:, routed_idx].T.numpy(), n_routed_experts, seed=seed)  # bool (E*I, N)
        experts = [routed_idx[torch.from_numpy(np.flatnonzero(labels == e))] for e in range(n_routed_experts)]
        idx = torch.stack(experts)  # (E, I)
        moe.w1.copy_(w1[idx])  # (E, I, D)
        moe.w3.copy_(w3[idx])  # (E, I, D)
        moe.w2.copy_(w2[:, idx].permute(1, 0, 2))  # (D, E, I) -> (E, D, I)
        if n_shared_experts:
            moe.shared_experts.w1.weight.copy_(w1[shared_idx])
            moe.shared_experts.w3.weight.copy_(w3[shared_idx])
            moe.shared_experts.w2.weight.copy_(w2[:, shared_idx])
        # router: activity-weighted mean input per cluster, centred, logits scaled to unit std
        c = active[:, idx.reshape(-1)].float().view(-1, n_routed_experts, size).mean(-1)  # (N, E): centroids
        mu = (c.T @ x) / c.sum(0).clamp_min(1e-9)[:, None]  # (E, D)
        gate = mu - x.mean(0)  # (E, D)
        std = (x @ gate.T).std()
        moe.gate.weight.copy_(gate / std.clamp_min(1e-9))
        info.append({"shared": shared_idx.tolist(), "experts": idx.tolist()})
    new.moefy_info = {"method": method, "layers": info}
    return new


__all__ = ["METHODS", "active_experts", "active_pattern", "balanced_kmeans", "dense_to_moe", "ffn_activations", "ffn_inputs",
           "gram_embedding", "hidden_activations"]
