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
   distance to its cluster's centroid) alternates with recomputing the centroids.
4. Router (``Gate.weight`` row e): the mean input direction that activates cluster e. With
   c_{e,t} = the cluster's centroid coordinate (the share of its neurons active on token t),
   w_e = sum_t c_{e,t} x_t / sum_t c_{e,t} - mean_t x_t; all rows are then scaled by one factor so the
   logits w_e . x_t have unit standard deviation over the calibration tokens.
   Gating: softmax scores, ``norm_topk_prob=True`` and ``route_scale = k``: the k selected weights sum to
   k, each 1 when the scores are equal, matching MoEfication's unweighted sum of experts.
   Exactness: with n_activated_experts = n_routed_experts and equal scores (gate weight 0), every weight
   is 1 and the MoE equals the dense FFN (fp32 round-off; tests/conversion/test_moefy.py).

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
def ffn_activations(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per dense layer, (FFN inputs X (N, D), hidden activations silu(w1 x) * w3 x (N, d_ff)), float32 on CPU."""
    store: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        if isinstance(block.ffn, SwiGLU):
            hooks.append(block.ffn.register_forward_pre_hook(lambda m, args, i=i: store[i].append(args[0].detach())))
    run_hooked(model, hooks, calib, batch_size)
    out = []
    for i, block in enumerate(model.layers):
        if not store[i]:
            out.append(None)
            continue
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in store[i]]).float().cpu()  # (N, D)
        ffn = block.ffn
        h = torch.nn.functional.silu(x @ ffn.w1.weight.float().cpu().T) * (x @ ffn.w3.weight.float().cpu().T)  # (N, d_ff)
        out.append((x, h))
    return out


def active_pattern(h: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, d_ff) bool: neuron active on a token when its |h| is in the token's top `fraction` of neurons."""
    n_top = max(1, int(round(fraction * h.shape[1])))
    top = h.abs().topk(n_top, dim=1).indices  # (N, n_top)
    return torch.zeros_like(h, dtype=torch.bool).scatter_(1, top, True)


def balanced_kmeans(features: np.ndarray, n_clusters: int, seed: int = 0, max_rounds: int = 20) -> np.ndarray:
    """Labels (n,) with exactly n / n_clusters points per cluster: KMeans init, then balanced assignment rounds."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} points cannot form {n_clusters} equal clusters")
    size = n // n_clusters
    feats = features.astype(np.float64)
    with warnings.catch_warnings():
        # identical patterns (e.g. every neuron active when all experts are) leave fewer distinct
        # clusters; the balanced assignment below still splits their ties into equal sizes
        warnings.simplefilter("ignore", ConvergenceWarning)
        centers = KMeans(n_clusters, n_init=4, random_state=seed).fit(feats).cluster_centers_  # (k, F)
    labels = None
    for _ in range(max_rounds):
        dist = ((feats[:, None, :] - centers[None]) ** 2).sum(-1)  # (n, k)
        _, slots = linear_sum_assignment(np.repeat(dist, size, axis=1))  # (n,) slot of each point
        new = slots // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([feats[labels == c].mean(0) for c in range(n_clusters)])
    return labels


def _moe_config(cfg, method: str, n_routed: int, n_activated: int, n_shared: int, first_k: int):
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
) -> Transformer:
    """A DeepSeekMoE copy of a dense-SwiGLU Transformer by MoEfication (kmeans) or upcycling; see the module doc.

    calib: token ids (B, T) for kmeans (activation patterns, router). noise: upcycling's relative weight noise.
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
    if not 0 <= first_k_dense_replace < src.n_layers:
        raise ValueError(f"first_k_dense_replace={first_k_dense_replace} is invalid (allowed: 0..{src.n_layers - 1})")

    cfg = _moe_config(src, method, n_routed_experts, n_activated_experts, n_shared_experts, first_k_dense_replace)
    torch.manual_seed(seed)  # the upcycled router's random init
    new = Transformer(cfg).to(dtype=model.embed.weight.dtype, device=model.embed.weight.device)
    moe_prefixes = tuple(f"layers.{i}.ffn." for i in range(first_k_dense_replace, src.n_layers))
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(moe_prefixes)}
    missing, unexpected = new.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith(moe_prefixes) for k in missing):
        raise RuntimeError(f"non-FFN weights do not line up: missing={missing}, unexpected={unexpected}")

    acts = ffn_activations(model, calib) if method == "kmeans" else [None] * src.n_layers
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
        x, h = acts[i]
        size = cfg.moe_d_ff
        frac = (n_activated_experts + n_shared_experts) / (n_routed_experts + n_shared_experts)
        active = active_pattern(h, frac)  # (N, F)
        freq = active.float().mean(0)  # (F,)
        order = torch.argsort(-freq, stable=True)
        shared_idx = order[: n_shared_experts * size].sort().values
        routed_idx = order[n_shared_experts * size:].sort().values  # (E*I,)
        labels = balanced_kmeans(active[:, routed_idx].T.float().numpy(), n_routed_experts, seed=seed)
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


__all__ = ["METHODS", "active_pattern", "balanced_kmeans", "dense_to_moe", "ffn_activations"]
