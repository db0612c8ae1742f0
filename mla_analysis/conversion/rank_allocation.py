"""Per-layer MLA latent ranks at a fixed total KV budget, for ``mha_to_mla(..., kv_lora_ranks=...)``.

``allocate_ranks(model, budget, method, calib)`` returns ranks r_i (one per layer) with
sum_i r_i = budget and min_rank <= r_i <= max_rank_i, where max_rank_i = rank bound of layer i's
latent matrix W_i = min(rows, d_model) (more latent dims cannot lower its error). W_i is exactly the
matrix ``mha_to_mla`` factorises jointly (``latent_weights``): the stacked per-query-head latent key
rows (all of K for mla_coupled_rope, the NoPE dims for "mla") and V, acting on u = x / attn_norm.weight,
GQA/MQA K/V heads repeated to query heads. C_i = E[u u^T] over the calibration tokens.

Methods (s_ij = j-th singular value, descending):

* ``uniform``: budget // L per layer, the remainder one each to the first layers.
* ``energy``: equal kept energy share. With e_ij = s_ij^2 of W_i C_i^{1/2} (calib given) or of W_i,
  r_i(tau) = the least r with sum_{j<r} e_ij >= tau * sum_j e_ij. Bisection finds the largest tau with
  sum_i r_i(tau) <= budget; dims still left go one at a time to the layer with the lowest kept share
  (ties: lower layer), so the shares stay as equal as the integer budget allows.
* ``whitened``: greedy water-filling on the whitened energies e_ij = s_ij(W_i C_i^{1/2})^2: the budget
  goes to the largest e_ij of all layers. By Eckart-Young in the C metric the whitened reconstruction
  error of layer i at rank r is sum_{j>=r} e_ij (what ``factorize(..., whiten=True)`` attains), so this
  minimises the total sum_i E||(W_i - W_i^(r_i)) u||^2 exactly (each layer's e_ij is non-increasing,
  so the greedy choice is optimal). Needs calib.
* ``fisher``: FWSVD (Hsu et al. 2022) per layer, water-filled across layers. Estimator: over calibration
  micro-batches b (next-token loss L_b), the row Fisher of layer i's K/V projection in u-space is
  I_r = mean_b sum_d (dL_b / dW_u[r, d])^2 (W_u = W_x diag(g), so dL/dW_u = dL/dW_x diag(1/g)); a
  repeated GQA/MQA row gets its kv row's I_r / group. The loss increase of truncating W_i to rank r is
  estimated (diagonal-Fisher second order) as 0.5 * sum_r' I_r' ||dW_r'||^2 = 0.5 * sum_{j>=r} f_ij^2
  with f_ij = s_ij(diag(sqrt(I)) W_i) (truncation of the Fisher-weighted SVD); water-filling on f_ij^2
  minimises the summed estimate. Needs calib. Departure from FWSVD: only the rank allocation is
  Fisher-weighted; the factorisation itself stays mha_to_mla's (whitened) SVD.

The "mla" target's shared decoupled RoPE key is outside the latent and not part of the budget.

Measured (no repeats: one seed; CPU, fp32). Setup = +experiment=convert_mha's defaults: scale=tiny MHA
(D=64, 4 heads of 16, 2 layers, no FFN) trained 1500 steps x 64 sequences of 64 tokens on rank_sweep's
data (75% MQAR at L=64, P=4; 25% synthetic language); source val loss 1.760, MQAR exact match 0.984.
Converted with all RoPE kept (mla_coupled_rope), joint whitened SVD, 64 calibration sequences, at a
total KV budget of 16 or 32 latent dims (full rank: 64 per layer), healed 100 steps at lr 1e-3.
Reproduce: python -m mla_analysis.run +experiment=convert_mha convert.kv_budget=16,32
convert.heal_steps=100 convert.scratch=false

  budget  allocation  ranks     val loss          MQAR exact match   whitened K/V
                                before   healed   before   healed    rel. error
  16      uniform     [8, 8]    1.815    1.789    0.000    0.250     0.162
  16      energy      [4, 12]   1.878    1.792    0.000    0.375     0.165
  16      fisher      [1, 15]   2.244    1.778    0.000    0.000     0.210
  16      whitened    [5, 11]   1.828    1.789    0.000    0.484     0.162
  32      uniform     [16, 16]  1.786    1.771    0.016    0.926     0.100
  32      energy      [10, 22]  1.795    1.770    0.012    0.961     0.100
  32      fisher      [9, 23]   1.795    1.771    0.004    0.941     0.101
  32      whitened    [12, 20]  1.789    1.770    0.070    0.949     0.098

(whitened K/V rel. error: mean over layers of conversion_info's kv_weighted_rel_err.) Reading: before
healing no allocation keeps MQAR at these budgets (1/8 and 1/4 of full rank); minimising the
total whitened K/V error (whitened) is not minimising the loss (uniform's loss is lower before healing at
budget 16); fisher's [1, 15] starves layer 0 and never recovers MQAR in 100 steps. With one seed, gaps of
~0.01 in loss or a few points of exact match are within run-to-run noise.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..config.convert import ALLOCATIONS
from .mla import collect_attention_covariances, pair_dims, pair_norm_scores, safe_inv, select_rope_pairs, sym_sqrt
from ..models.transformer import Transformer

METHODS = ALLOCATIONS  # the convert.allocation choices (mla_analysis.config.convert.Allocation)

Calib = Union[torch.Tensor, tuple]


def _calib_ids(calib: Calib) -> torch.Tensor:
    return calib[0] if isinstance(calib, (tuple, list)) else calib


def _calib_pairs(calib: Calib) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): given as such, or next-token targets from token ids (B, T)."""
    if isinstance(calib, (tuple, list)):
        return calib[0], calib[1]
    return calib[:, :-1], calib[:, 1:]


def latent_rows(model: Transformer, rope_dims: Optional[int] = None, strategy: str = "high",
                covs: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Indices (within a head of d_h dims) of the key dims that go through the latent, as mha_to_mla picks them."""
    cfg = model.cfg
    d_h = cfg.attn_head_dim
    rope_dims = d_h if rope_dims is None else rope_dims
    if rope_dims == d_h:  # mla_coupled_rope: the whole key is up-projected from the latent
        return torch.arange(d_h)
    H, H_kv, D = cfg.n_heads, cfg.kv_heads, cfg.d_model
    scores = None
    if strategy == "norm":
        scores = 0
        for i, block in enumerate(model.layers):
            g = block.attn_norm.weight.detach().double().cpu()
            wq = block.attn.wq.weight.detach().double().cpu() * g  # (H*d_h, D)
            wk = block.attn.wk.weight.detach().double().cpu() * g  # (H_kv*d_h, D)
            wk_rep = wk.view(H_kv, d_h, D).repeat_interleave(H // H_kv, dim=0).reshape(H * d_h, D)
            scores = scores + pair_norm_scores(wq, wk_rep, H, cfg.rope_interleave, None if covs is None else covs[i])
    keep = set(select_rope_pairs(strategy, d_h // 2, rope_dims // 2, scores).tolist())
    a, b = pair_dims(d_h, cfg.rope_interleave)
    drop = [i for i in range(d_h // 2) if i not in keep]
    return torch.cat((a[drop], b[drop])).sort().values  # (d_nope,)


def latent_weights(model: Transformer, rope_dims: Optional[int] = None, strategy: str = "high",
                   covs: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """Per layer, the (H * (d_k + d_h), D) float64 matrix mha_to_mla factorises jointly (acting on u = x / g)."""
    cfg = model.cfg
    if cfg.is_mla:
        raise ValueError(f"source attention={cfg.attention!r} is already MLA (need mha | gqa | mqa)")
    d_h, H, H_kv, D = cfg.attn_head_dim, cfg.n_heads, cfg.kv_heads, cfg.d_model
    rows = latent_rows(model, rope_dims, strategy, covs)
    out = []
    for block in model.layers:
        g = block.attn_norm.weight.detach().double().cpu()
        wk = block.attn.wk.weight.detach().double().cpu() * g  # (H_kv*d_h, D)
        wv = block.attn.wv.weight.detach().double().cpu() * g
        wk = wk.view(H_kv, d_h, D).repeat_interleave(H // H_kv, dim=0)[:, rows]  # (H, d_k, D)
        wv = wv.view(H_kv, d_h, D).repeat_interleave(H // H_kv, dim=0)  # (H, d_h, D)
        out.append(torch.cat((wk, wv), dim=1).reshape(-1, D))  # (H*(d_k+d_h), D): wkv_b's row layout
    return out


def whitened_spectra(weights: Sequence[torch.Tensor], covs: Optional[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Singular values of W_i C_i^{1/2} per layer (of W_i when covs is None), descending."""
    out = []
    for i, w in enumerate(weights):
        if covs is not None:
            w = w @ sym_sqrt(covs[i])[0]  # (m, D): whitened
        out.append(torch.linalg.svdvals(w))
    return out


def fisher_rows(model: Transformer, calib: Calib, rows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, the FWSVD row Fisher I_r (H * (d_k + d_h),) of the latent matrix in u-space (module doc)."""
    cfg = model.cfg
    d_h, H, H_kv = cfg.attn_head_dim, cfg.n_heads, cfg.kv_heads
    group = H // H_kv
    inputs, targets = _calib_pairs(calib)
    params = [p for b in model.layers for p in (b.attn.wk.weight, b.attn.wv.weight)]
    acc = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]
    was_training = model.training
    model.eval()  # no dropout / routing side effects; gradients still flow
    n_batches = 0
    dev = model.embed.weight.device
    try:
        with torch.enable_grad():
            for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
                logits = model(x.to(dev))  # (b, T, V)
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), y.to(dev).reshape(-1), ignore_index=-100
                )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for k, (gr, block) in enumerate(zip(grads, [b for b in model.layers for _ in range(2)])):
                    if gr is None:
                        continue
                    g_inv = safe_inv(block.attn_norm.weight.detach().double().cpu())
                    acc[k] += (gr.detach().double().cpu() * g_inv).pow(2).sum(1)  # dL/dW_u = dL/dW_x / g
                n_batches += 1
    finally:
        model.train(was_training)
    out = []
    for i in range(cfg.n_layers):
        ik, iv = (acc[2 * i] / max(n_batches, 1)).view(H_kv, d_h), (acc[2 * i + 1] / max(n_batches, 1)).view(H_kv, d_h)
        ik = ik.repeat_interleave(group, dim=0)[:, rows] / group  # (H, d_k): a repeated row's share
        iv = iv.repeat_interleave(group, dim=0) / group  # (H, d_h)
        out.append(torch.cat((ik, iv), dim=1).reshape(-1))  # (H*(d_k+d_h),), same row order as latent_weights
    return out


def water_fill(gains: Sequence[torch.Tensor], budget: int, max_ranks: Sequence[int], min_rank: int = 1) -> list[int]:
    """Ranks maximising the summed kept gains: each layer's min_rank first, then the largest gains of all layers.

    gains[i] must be non-increasing (squared singular values), so the chosen dims are prefixes per layer.
    """
    ranks = [min_rank] * len(gains)
    left = budget - sum(ranks)
    cand_gain, cand_layer = [], []
    for i, (g, m) in enumerate(zip(gains, max_ranks)):
        g = torch.cat((g.double(), g.new_zeros(max(0, m - g.numel()), dtype=torch.float64)))[min_rank:m]
        cand_gain.append(g)
        cand_layer.append(torch.full((g.numel(),), i))
    gain, layer = torch.cat(cand_gain), torch.cat(cand_layer)
    order = torch.argsort(-gain, stable=True)[:left]  # ties: lower layer first
    for i in layer[order].tolist():
        ranks[i] += 1
    return ranks


def energy_ranks(energies: Sequence[torch.Tensor], budget: int, max_ranks: Sequence[int], min_rank: int = 1,
                 iters: int = 60) -> list[int]:
    """Ranks keeping the same share tau of every layer's energy (bisection on tau), summing to budget."""
    shares = []
    for e in energies:
        e = e.double()
        total = float(e.sum())
        cum = torch.cat((e.new_zeros(1), e.cumsum(0))) / total if total > 0 else torch.ones(e.numel() + 1, dtype=torch.float64)
        shares.append(cum)  # cum[r] = share kept at rank r

    def ranks_at(tau: float) -> list[int]:
        out = []
        for cum, m in zip(shares, max_ranks):
            r = int(torch.searchsorted(cum, torch.tensor([tau - 1e-12], dtype=torch.float64)).item())
            out.append(min(max(r, min_rank), m))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if sum(ranks_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    ranks = ranks_at(lo)
    while sum(ranks) < budget:  # integer remainder: to the layer with the lowest kept share
        share = [float(c[min(r, c.numel() - 1)]) if r < m else float("inf") for c, r, m in zip(shares, ranks, max_ranks)]
        ranks[min(range(len(ranks)), key=lambda i: (share[i], i))] += 1
    return ranks


def uniform_ranks(n_layers: int, budget: int, max_ranks: Sequence[int]) -> list[int]:
    """budget // L per layer, the remainder one each to the first layers (capped per layer, overflow passed on)."""
    ranks = [min(budget // n_layers + (i < budget % n_layers), m) for i, m in enumerate(max_ranks)]
    i = 0
    while sum(ranks) < budget:
        if ranks[i % n_layers] < max_ranks[i % n_layers]:
            ranks[i % n_layers] += 1
        i += 1
    return ranks


def allocate_ranks(
    model: Transformer,
    budget: int,
    method: str = "uniform",
    calib: Optional[Calib] = None,
    rope_dims: Optional[int] = None,
    strategy: str = "high",
    min_rank: int = 1,
    max_rank: Optional[int] = None,
    covs: Optional[list[torch.Tensor]] = None,
) -> list[int]:
    """Per-layer kv_lora_ranks summing to ``budget`` by uniform | energy | fisher | whitened (module doc).

    calib: token ids (B, T) (next-token targets for fisher) or an (inputs, targets) pair. rope_dims /
    strategy: as passed to mha_to_mla (they decide which key dims go through the latent). covs: the per-layer
    ``collect_attention_covariances`` of calib when the caller already has them (None = collected here).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid (allowed: {' | '.join(METHODS)})")
    if method in ("fisher", "whitened") and calib is None:
        raise ValueError(f"method={method!r} needs calib (calibration token ids)")
    L, D = model.cfg.n_layers, model.cfg.d_model
    if min_rank < 1:
        raise ValueError(f"min_rank={min_rank} is invalid (allowed: an integer >= 1)")
    if covs is not None and len(covs) != L:
        raise ValueError(f"covs must hold one covariance per layer ({L}), got {len(covs)}")
    if method == "uniform":
        covs = None  # the weights alone decide
    elif covs is None and calib is not None:
        covs = collect_attention_covariances(model, _calib_ids(calib))
    weights = latent_weights(model, rope_dims, strategy, covs)
    bound = min(weights[0].shape[0], D)
    max_ranks = [bound if max_rank is None else min(bound, max_rank)] * L
    if not L * min_rank <= budget <= sum(max_ranks):
        raise ValueError(f"budget={budget} is invalid (allowed: {L * min_rank}..{sum(max_ranks)} for {L} layers)")
    if method == "uniform":
        return uniform_ranks(L, budget, max_ranks)
    if method == "energy":
        return energy_ranks([s.pow(2) for s in whitened_spectra(weights, covs)], budget, max_ranks, min_rank)
    if method == "whitened":
        return water_fill([s.pow(2) for s in whitened_spectra(weights, covs)], budget, max_ranks, min_rank)
    rows = latent_rows(model, rope_dims, strategy, covs)
    fis = fisher_rows(model, calib, rows)
    gains = [torch.linalg.svdvals(f.sqrt()[:, None] * w).pow(2) for f, w in zip(fis, weights)]  # f_ij^2
    return water_fill(gains, budget, max_ranks, min_rank)


__all__ = [
    "METHODS",
    "allocate_ranks",
    "energy_ranks",
    "fisher_rows",
    "latent_rows",
    "latent_weights",
    "uniform_ranks",
    "water_fill",
    "whitened_spectra",
]
