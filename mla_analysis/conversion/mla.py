"""Convert a trained MHA / GQA / MQA ``Transformer`` into MLA by SVD of its key/value projections.

``mha_to_mla(model, kv_lora_rank, ...)`` returns a new MLA ``Transformer`` that shares every
non-attention weight (embeddings, norms, FFN/MoE, head) with the source exactly, following the
conversion literature (MHA2MLA, Ji et al. 2025; TransMLA; X-EcoMLA):

1. Partial RoPE. The source rotates all ``d_h / 2`` frequency pairs of every head; MLA rotates only
   ``rope_dims`` dims. ``strategy`` picks which pairs keep RoPE (``select_rope_pairs``):
   ``"high"`` the highest-frequency pairs (0, 1, ...), ``"low"`` the lowest, ``"uniform"`` pairs
   ``floor(j * n_pairs / n_keep)``, ``"norm"`` the pairs with the largest query-key norm
   contribution ``sum_h rms||q_{h,i}|| * rms||k_{h,i}||`` (calibration activations, all layers).
   The other pairs lose their rotation (NoPE) and go into the latent with V.
2. Low-rank latent. The stacked per-head key rows that go through the latent (K_nope for "mla",
   the whole K for "mla_coupled_rope") and V (GQA/MQA: K/V heads repeated to query heads first) are
   factorised by truncated SVD (``factorization="joint"``: one latent, as MLA caches) or per K and V
   at ``kv_lora_rank / 2`` each (``"split"``: block-diagonal wkv_b). With calibration data the SVD is
   activation-aware: SVD of ``W C^{1/2}`` then un-whitened, which minimises E||W u - W_hat u||^2 over
   the calibration activations (Eckart-Young in the C metric).
3. Targets. ``"mla_coupled_rope"`` (the default when every pair keeps RoPE): per-head keys are
   up-projected from the latent and rotated afterwards, so no cross-head sharing is needed (but no
   absorbed decoding). ``"mla"`` (decoupled RoPE, the default otherwise): the rotated part of the key
   is ONE key shared by all heads. Per frequency pair the head keys are complex numbers
   k_h = a_h + i b_h and RoPE multiplies by e^{i theta}, which commutes with any complex scale; so we
   fit the rank-1 model k_h ~= alpha_h * kappa (complex SVD of the stacked pair weights, whitened when
   calibrated; or ``rope_key="mean"``: alpha_h = 1, kappa = mean_h k_h) and fold conj(alpha_h) into
   head h's query pair. Exact when the kv heads' pair keys are complex-proportional (always for MQA).

The RMSNorm on c_kv (``kv_norm``) rescales K_nope and V of each token by 1 / rms(c_t): not linear.
We make the latent an *isometry* of the RMS-normalised residual u = x / g (x = attn_norm output,
g = attn_norm.weight): c = Q^T u with orthonormal columns Q spanning the SVD subspace (completed,
when kv_lora_rank exceeds rank(W), by complement directions of largest calibration energy: "ballast"
the up-projection ignores but which keeps ||c|| close to ||u||). kv_norm.weight is set to
rho = sqrt(E[ms(c)] + kv_norm.eps), so RMSNorm(c) = c * rho / sqrt(ms(c) + eps) ~= c. When Q spans
all of u-space (kv_lora_rank >= d_model joint, >= 2 d_model split), ||c|| = ||u|| for every token
and RMSNorm(c) = c, up to the attention RMSNorm's own eps: ||u||^2 = D ms(h) / (ms(h) + eps) varies
per token, a relative K/V scale error of about eps / (2 ms(h)): ~5e-7 for an O(1) residual stream,
but 1.7e-3 relative logit error measured with a 0.02-std residual stream (0 with eps = 0). Below
full rank ms(c_t) varies per token and that error adds to the SVD's (the SVD does not control it).

Exactness (fp32, tests in tests/conversion/test_conversion.py):
- exact (relative logit error ~1e-6, fp32 round-off): rope_dims = head_dim, target
  mla_coupled_rope, kv_lora_rank >= d_model (joint) or >= 2 d_model (split), MHA, GQA or MQA
  source, with or without calibration. For MHA this already halves the cache (2D -> D per token).
- exact likewise: target "mla", rope_dims = head_dim, from MQA, or from GQA whose kv heads' pair
  keys differ by complex factors.
- exact w.r.t. the partial-RoPE source (the source with the dropped pairs un-rotated) at full rank,
  for mla_coupled_rope and for "mla" from MQA, YaRN included: dropping RoPE is the only change.
- approximations: dropping RoPE on pairs (the literature fine-tunes afterwards); the shared
  decoupled key for MHA/GQA sources; kv_lora_rank < d_model.
Measured (no fine-tuning) on a tiny MHA (D=64, H=4, d_h=16, 2 layers) trained 2500 steps on
MQAR/copy/synthetic LM, eval loss 1.775; loss after conversion, all RoPE kept (coupled):
  kv_lora_rank        64     48     32     16     8
  joint, plain SVD    1.775  1.788  1.987  3.349  4.326
  joint, whitened     1.775  1.775  1.781  1.831  3.091
  split, whitened     1.785  1.797  1.850  2.409  4.282
Partial RoPE at kv_lora_rank 64 (whitened), coupled / "mla" (shared key): rope_dims 8 of 16: high
1.774 / 1.800, low 5.09 / 4.01, uniform 2.94 / 2.95 ("norm" chose high's pairs); rope_dims 4: high
2.58 / 2.51, low, uniform and norm all >= 4.1.

4. Real-model pieces (issue #18). ``strategy="2norm"``: MHA2MLA's 2_norm.py, per layer and per KV head, pair i
   = dims pair_dims(d_h)[i] (rotate-half or interleaved), score = mean||k_pair|| x sum over the group's query
   heads of mean||q_pair|| (pre-RoPE, calibration tokens); different pairs per layer / head go to the layers'
   ``rope_inv_freq`` buffers (``model.rope_layer_freqs``). ``rope_heads="per_kv_head"``: one RoPE key per source
   KV head (``model.qk_rope_heads``), copied exactly; query head h uses key h // group. ``rope_key="rorope"``
   (TransMLA): per kept pair the top eigenvector u of the heads' pair-energy matrix C (whitened) mixes the KV
   heads into the one shared key (a real orthogonal mixing applied to both components commutes with the
   rotation; u^T C u >= any single head's energy), query head h scales its pair by u[kv head]; every head's
   remainder k_j - u_j k' keeps its key un-rotated in the latent (qk_nope_head_dim = head_dim). Exact when the
   heads' pair keys are real multiples of one key. ``bkv=True`` (TransMLA's BKV): K rows divided by
   mean||K_lat u|| / mean||V u|| before the joint factorisation and multiplied back in W^UK (exact at full rank).
   ``to_interleaved_rope`` permutes the rope rows of a converted halves-layout model into DeepSeek's layout
   (exact), which with the latent norm, one shared key, one rank and default frequencies exports as DeepseekV3
   (``hf.exportable_to_deepseek``).

Departures from the literature:
- Except for "2norm", the kept pairs are one set for every layer and head. The "norm" score uses the RMS
  of the pair norms (from the activation covariance) instead of their mean and sums it over heads and layers.
- MHA2MLA factorises one latent per KV head; here one joint latent over all heads (at least as good at equal
  size). RoRoPE without FreqFold.
- The target frequencies are the source's frequencies of the kept pairs. "uniform" (with n_pairs
  divisible by n_keep) and "high" (no rope_scaling; via rope_theta' = theta^(d_rope / d_h)) are
  expressible by rope_theta; otherwise (e.g. "low", "norm", YaRN sources) they are stored in the
  config's ``rope_inv_freq``, so a checkpoint round trip (config + state dict) keeps them
  (``conversion_info["rope_freq_in_config"]`` is always True). Such configs cannot be exported to a
  Hugging Face config, which has no field for explicit frequencies.
- YaRN scales cos/sin by an attention factor m, so rotated dims contribute m^2 q.k; pairs turned into
  NoPE get m^2 folded into their query rows to keep the score.
- No fine-tuning step; queries stay full rank (q_lora_rank=None); v_head_dim = head_dim.

Cost: one calibration forward collects every layer's statistics (running float64 sums of u^T u per batch, hidden
states only: the LM head is skipped); per layer one eigendecomposition of C (``sym_sqrt``, shared by the shared-key
fit and the factorisation) and one SVD of the H_kv kv heads' rows (query heads repeat them: same subspace, the
up-projection is repeated afterwards). SmolLM2-135M (30 layers), 8 x 1,024 calibration tokens, 1 thread on a shared
2-core machine: 29 s CPU for the study's recipe (was 40 s), ~80% of it the forward; peak memory above the source is the
converted model plus one batch's activations, flat in the calibration tokens (bench.real's recipe: 0.82 GiB at 8 x 1,024
and at 64k tokens in windows of 512; before, 1.7 / 1.04 GiB with each batch's 49k-vocabulary logits).

Model-file note: the kept frequencies persist through ``ModelConfig.rope_inv_freq``, honoured by
``RotaryEmbedding.from_config``.

Sources must use RoPE, RMSNorm and no biases (``pos_emb="rope"``, ``norm="rmsnorm"``, ``bias`` and
``attn_qkv_bias`` False): learned positions have no rotation to keep, K/V biases have no place in the
latent, and LayerNorm's centring breaks the u = x / g isometry below; such sources raise ValueError.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..config import ModelConfig
from ..config.convert import FACTORIZATIONS, ROPE_HEADS, ROPE_KEYS, STRATEGIES, TARGETS  # noqa: F401  (re-exported)
from ..training.forward_hooks import run_hooked
from ..models.rope import RotaryEmbedding, softmax_scale
from ..models.transformer import Transformer

ROPE_STRATEGIES = STRATEGIES  # the convert.strategy choices (mla_analysis.config.convert.Strategy)


# ---------------------------------------------------------------------------------------------
# RoPE pair bookkeeping
# ---------------------------------------------------------------------------------------------
def pair_dims(head_dim: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a_i, b_i) of the two dims rotated together by frequency pair i, i = 0..head_dim/2-1."""
    n = head_dim // 2
    i = torch.arange(n)
    if interleave:
        return 2 * i, 2 * i + 1
    return i, i + n


def _layout(a: torch.Tensor, b: torch.Tensor, interleave: bool) -> torch.Tensor:
    # order the selected pairs' dims as apply_rope expects them in a head of width 2 * len(a)
    if interleave:
        return torch.stack((a, b), dim=-1).flatten()  # (2r,): a0 b0 a1 b1 ...
    return torch.cat((a, b))  # (2r,): a0 a1 ... b0 b1 ...


def select_rope_pairs(
    strategy: str, n_pairs: int, n_keep: int, scores: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Indices (ascending, pair 0 = highest frequency) of the n_keep pairs that keep RoPE."""
    if not 0 < n_keep <= n_pairs:
        raise ValueError(f"n_keep={n_keep} must be in 1..n_pairs={n_pairs}")
    if strategy == "high":
        return torch.arange(n_keep)
    if strategy == "low":
        return torch.arange(n_pairs - n_keep, n_pairs)
    if strategy == "uniform":
        return torch.arange(n_keep) * n_pairs // n_keep
    if strategy == "norm":
        if scores is None or scores.shape != (n_pairs,):
            raise ValueError(f"strategy='norm' needs scores of shape ({n_pairs},)")
        # stable sort: ties go to the higher-frequency pair
        return torch.argsort(-scores.double(), stable=True)[:n_keep].sort().values
    raise ValueError(f"strategy={strategy!r} is invalid (allowed: {' | '.join(ROPE_STRATEGIES)})")


def pair_norm_scores(
    wq: torch.Tensor, wk: torch.Tensor, n_heads: int, interleave: bool, cov: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per pair: sum over heads of rms||q_{h,i}|| * rms||k_{h,i}|| for inputs with covariance cov (None = I).

    wq (H*d_h, D), wk (H*d_h, D) with K already repeated to query heads.
    """
    D = wq.shape[1]
    cov = torch.eye(D, dtype=wq.dtype) if cov is None else cov.to(wq.dtype)
    d_h = wq.shape[0] // n_heads
    a, b = pair_dims(d_h, interleave)

    def rms_pair(w: torch.Tensor) -> torch.Tensor:
        w = w.view(n_heads, d_h, D)  # (H, d_h, D)
        energy = torch.einsum("hdi,ij,hdj->hd", w, cov, w).clamp_min(0)  # (H, d_h): E[(w x)^2] per dim
        return (energy[:, a] + energy[:, b]).sqrt()  # (H, n_pairs): rms norm of each 2-d pair

    return (rms_pair(wq) * rms_pair(wk)).sum(0)  # (n_pairs,)


# ---------------------------------------------------------------------------------------------
# Factorisation
# ---------------------------------------------------------------------------------------------
def sym_sqrt(cov: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^{1/2}, C^{-1/2}) of a symmetric PSD matrix, with a relative ridge."""
    # ridge keeps C^{-1/2} finite when calibration does not span every direction
    D = cov.shape[0]
    cov = cov + ridge * (cov.trace() / D).clamp_min(1e-30) * torch.eye(D, dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(evals.max() * 1e-12)
    half = (evecs * evals.sqrt()) @ evecs.T
    inv_half = (evecs * evals.rsqrt()) @ evecs.T
    return half, inv_half


def factorize(
    w: torch.Tensor, rank: int, cov: Optional[torch.Tensor] = None, whiten: bool = False,
    roots: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factorisation w (m, D) ~= b (m, rank) @ a (rank, D) with orthonormal rows of a.

    whiten=True: the subspace minimises E||(w - b a) x||^2 for E[x x^T] = cov (SVD of w C^{1/2});
    otherwise plain SVD. a's rows beyond rank(w) are ballast (complement directions of largest
    energy under cov, then zeros beyond D) so that ||a x|| tracks ||x||; b is the least-squares
    decoder for the chosen subspace (plain: b = w a^T). roots: ``sym_sqrt(cov)`` when the caller already has it
    (mha_to_mla computes it once per layer; the eigendecomposition is the costly step).
    """
    w = w.double()
    m, D = w.shape
    cov_d = None if cov is None else cov.double()
    if whiten and cov_d is None:
        raise ValueError("whiten=True needs a covariance")
    k = min(rank, m, D)
    if k > 0 and m > 0:
        if whiten:
            half, inv_half = sym_sqrt(cov_d) if roots is None else (roots[0].double(), roots[1].double())
            _, s, vh = torch.linalg.svd(w @ half, full_matrices=False)
            dirs = inv_half @ vh[:k].T  # (D, k): un-whitened row space of the rank-k approximation
        else:
            _, s, vh = torch.linalg.svd(w, full_matrices=False)
            dirs = vh[:k].T  # (D, k)
        n_nz = int((s[:k] > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 0
        basis = torch.linalg.qr(dirs[:, :n_nz]).Q if n_nz else w.new_zeros(D, 0)  # (D, n_nz)
    else:
        basis = w.new_zeros(D, 0)
    n_ballast = min(rank, D) - basis.shape[1]
    if n_ballast > 0:
        proj = torch.eye(D, dtype=w.dtype) - basis @ basis.T  # onto the complement
        energy = proj @ (torch.eye(D, dtype=w.dtype) if cov_d is None else cov_d) @ proj
        evals, evecs = torch.linalg.eigh((energy + energy.T) / 2)
        basis = torch.cat((basis, evecs[:, evals.argsort(descending=True)[:n_ballast]]), dim=1)
    if rank > D:
        basis = torch.cat((basis, w.new_zeros(D, rank - D)), dim=1)  # (D, rank): latent wider than x
    a = basis.T  # (rank, D)
    if whiten:
        # least-squares decoder in the C metric: b = w C a^T (a C a^T)^+
        b = w @ cov_d @ a.T @ torch.linalg.pinv(a @ cov_d @ a.T, hermitian=True)
    else:
        b = w @ a.T
    return b, a


def _rank1_shared_key(
    m: torch.Tensor, cov: Optional[torch.Tensor], mode: str,
    roots: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex rank-1 fit m (H_kv, D) ~= alpha (H_kv,) outer beta (D,): per-head scale, shared key."""
    if mode == "mean":
        return torch.ones(m.shape[0], dtype=m.dtype), m.mean(0)
    if cov is None:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        beta = vh[0]  # (D,)
    else:
        half, inv_half = sym_sqrt(cov) if roots is None else roots  # roots: sym_sqrt(cov), once per layer
        u, s, vh = torch.linalg.svd(m @ half.to(m.dtype), full_matrices=False)
        beta = vh[0] @ inv_half.to(m.dtype)  # (D,)
    # scale so that mean |alpha_h|^2 = 1: the shared key has the heads' typical magnitude
    n = m.shape[0]
    return u[:, 0] * n**0.5, beta * s[0] / n**0.5


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
def safe_inv(g: torch.Tensor) -> torch.Tensor:
    """Elementwise 1/g, 0 where g is 0 (an RMSNorm gain folded out of a projection)."""
    return torch.where(g.abs() > 1e-12, 1.0 / g, torch.zeros_like(g))


@torch.no_grad()
def collect_attention_covariances(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, E[u u^T] (D, D, float64) of the RMS-normalised attention input u = x / attn_norm.weight."""
    return [st["cov"] for st in collect_calibration_stats(model, calib, batch_size=batch_size)]


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def _target_config(cfg: ModelConfig, target: str, kv_lora_rank: int, rope_dims: int, kv_norm: bool,
                   rope_heads: int = 1, nope_dims: Optional[int] = None) -> ModelConfig:
    d_h = cfg.attn_head_dim
    return dataclasses.replace(
        cfg,
        rope_inv_freq=None,  # set by mha_to_mla when rope_theta cannot express the kept pairs
        name=f"{cfg.name}->{target}{kv_lora_rank}",
        attention=target,
        n_kv_heads=None,
        head_dim=None,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=None,
        qk_nope_head_dim=d_h - rope_dims if nope_dims is None else nope_dims,
        qk_rope_head_dim=rope_dims,
        v_head_dim=d_h,
        kv_norm=kv_norm,
        qk_rope_heads=rope_heads,
    )


def two_norm_scores(q_pair_norm: torch.Tensor, k_pair_norm: torch.Tensor) -> torch.Tensor:
    """MHA2MLA's 2-norm score (H_kv, n_pairs): mean||k_{j,i}|| times the sum over group j's query heads of mean||q_{h,i}||.

    q_pair_norm (H, n_pairs) and k_pair_norm (H_kv, n_pairs) are means over calibration tokens of the pre-RoPE
    pair norms (``collect_calibration_stats``); query head h belongs to kv head h // (H / H_kv) (SDPA's grouping).
    """
    H, n_pairs = q_pair_norm.shape
    H_kv = k_pair_norm.shape[0]
    return q_pair_norm.view(H_kv, H // H_kv, n_pairs).sum(1) * k_pair_norm  # (H_kv, n_pairs)


def rorope_mixing(wa: torch.Tensor, wb: torch.Tensor, cov: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TransMLA's RoRoPE for one frequency pair: the principal direction u (H_kv,) across the kv heads, and C.

    wa, wb (H_kv, D): the pair's two key rows per kv head. C[j, m] = E[a_j a_m + b_j b_m] = wa_j C_u wa_m^T +
    wb_j C_u wb_m^T (C_u = cov, identity without calibration); one real orthogonal mixing of the heads, applied to
    both components of the pair, commutes with the rotation, and u (unit, top eigenvector of C) puts the most
    positional energy u^T C u >= max_j C[j, j] into one mixed head. Returns (u, C).
    """
    cov = torch.eye(wa.shape[1], dtype=wa.dtype) if cov is None else cov.to(wa.dtype)
    c = wa @ cov @ wa.T + wb @ cov @ wb.T  # (H_kv, H_kv)
    return _principal_mixing(c), c


def _principal_mixing(c: torch.Tensor) -> torch.Tensor:
    # top eigenvector of the (H_kv, H_kv) pair-energy matrix, sign fixed so the result is deterministic
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    u = evecs[:, -1]
    return u if float(u.sum()) >= 0 else -u


# ---------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_calibration_stats(model: Transformer, calib: torch.Tensor, pair_norms: bool = False, sample_tokens: int = 0,
                              batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``cov`` E[u u^T] (D, D, float64) of u = x / attn_norm.weight; with ``pair_norms`` the mean pre-RoPE
    pair norms ``q_pair_norm`` (H, n_pairs) and ``k_pair_norm`` (H_kv, n_pairs) over all calibration tokens (MHA2MLA's
    2_norm.py); with ``sample_tokens`` the first that many rows of u as ``u`` (N, D) float32 (BKV's mean norms).
    """
    cfg = model.cfg
    D, H, H_kv, d_h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    a, b = pair_dims(d_h, cfg.rope_interleave)
    stats: list[dict] = [dict(cov=torch.zeros(D, D, dtype=torch.float64), n=0, q=0.0, k=0.0, u=[], kept=0)
                         for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        g_inv = safe_inv(block.attn_norm.weight.detach().double().cpu())

        def hook(mod, args, st=stats[i], g_inv=g_inv):
            x = args[0].detach()
            u = x.double().cpu().reshape(-1, D) * g_inv  # (N, D)
            st["cov"] += u.T @ u
            st["n"] += u.shape[0]
            if pair_norms:
                q = mod.wq(x).double().cpu().reshape(-1, H, d_h)  # (N, H, d_h), before RoPE
                k = mod.wk(x).double().cpu().reshape(-1, H_kv, d_h)  # (N, H_kv, d_h)
                st["q"] = st["q"] + torch.hypot(q[..., a], q[..., b]).sum(0)  # (H, n_pairs): sum of ||q_pair||
                st["k"] = st["k"] + torch.hypot(k[..., a], k[..., b]).sum(0)  # (H_kv, n_pairs)
            if st["kept"] < sample_tokens:
                take = u[: sample_tokens - st["kept"]].float()
                st["u"].append(take)
                st["kept"] += take.shape[0]

        hooks.append(block.attn.register_forward_pre_hook(hook))
    calib = calib.reshape(-1, calib.shape[-1]) if calib.dim() > 1 else calib[None]
    # one forward for every layer's statistics, running sums per batch (memory flat in the number of batches);
    # the hooks read attention inputs only, so the LM head (49k-vocab logits for SmolLM2) is skipped
    run_hooked(model, hooks, calib, batch_size, return_hidden=True)
    out = []
    for st in stats:
        n = max(st["n"], 1)
        layer = dict(cov=st["cov"] / n)
        if pair_norms:
            layer.update(q_pair_norm=st["q"] / n, k_pair_norm=st["k"] / n)
        if sample_tokens:
            layer["u"] = torch.cat(st["u"]) if st["u"] else torch.zeros(0, D)
        out.append(layer)
    return out


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def latent_key_dim(head_dim: int, rope_dims: int, target: str, rope_key: str = "lstsq") -> int:
    """Key dims per head that go through the latent: all for mla_coupled_rope and RoRoPE, else the NoPE dims."""
    if target == "mla_coupled_rope" or rope_key == "rorope":
        return head_dim
    return head_dim - rope_dims


def full_latent_rank(cfg: ModelConfig, rope_dims: Optional[int] = None, target: str = "auto",
                     rope_key: str = "lstsq") -> int:
    """The largest useful latent rank of a source: min(d_model, rows of its K/V latent map) (GQA: kv heads' rows)."""
    d_h = cfg.attn_head_dim
    rope_dims = d_h if rope_dims is None else rope_dims
    if target == "auto":
        target = "mla_coupled_rope" if rope_dims == d_h else "mla"
    return min(cfg.d_model, cfg.kv_heads * (latent_key_dim(d_h, rope_dims, target, rope_key) + d_h))


@torch.no_grad()
def mha_to_mla(
    model: Transformer,
    kv_lora_rank: int,
    rope_dims: Optional[int] = None,
    strategy: str = "high",
    calib: Optional[torch.Tensor] = None,
    factorization: str = "joint",
    target: str = "auto",
    whiten: Optional[bool] = None,
    rope_key: str = "lstsq",
    kv_lora_ranks: Optional[list[int]] = None,
    kv_norm: bool = True,
    rope_heads: str = "shared",
    bkv: bool = False,
    bkv_tokens: int = 4096,
    calib_stats: Optional[list[dict[str, torch.Tensor]]] = None,
) -> Transformer:
    """Convert an MHA/GQA/MQA Transformer into MLA at kv_lora_rank by (whitened) SVD; see the module doc.

    rope_dims: rotary dims kept per head (even; None = head_dim, all). strategy: high | low | uniform |
    norm | 2norm (norm without calib scores isotropic inputs, i.e. the weights alone; 2norm = MHA2MLA's
    per-layer, per-KV-head choice from mean activation norms, needs calib). calib: token ids (B, T)
    whose attention inputs give the covariance for whitening, "norm" / "2norm" and kv_norm's scale. target:
    "auto" picks mla_coupled_rope when all dims keep RoPE (exact at full rank), else "mla". whiten:
    None = whiten when calib is given. rope_heads: "shared" (DeepSeek: one k_rope for all heads) or
    "per_kv_head" (MHA2MLA: one k_rope per source KV head, copied exactly; target "mla"). rope_key, for the
    shared key from several kv heads: "lstsq" (complex rank-1 fit), "mean", or "rorope" (TransMLA: per pair the
    principal mixture of the kv heads keeps RoPE, the rest of every head's key goes, un-rotated, through the
    latent; qk_nope_head_dim = head_dim). bkv: TransMLA's BKV, K rows scaled by mean||K_lat|| / mean||V|| over the
    first ``bkv_tokens`` calibration tokens before the joint factorisation, undone in wkv_b (needs calib).
    The result carries ``conversion_info`` (kept pairs, frequencies,
    per-layer reconstruction errors); kept frequencies that rope_theta cannot express (e.g. "low",
    "norm") go to the config's ``rope_inv_freq``; pairs that differ per layer or head (2norm) go to the
    layers' ``rope_inv_freq`` buffers (``model.rope_layer_freqs``). Sources with learned positions, LayerNorm or
    biases raise ValueError.
    kv_lora_ranks: per-layer latent ranks (written to cfg.kv_lora_ranks; see rank_allocation.py);
    kv_lora_rank then only names the config's nominal rank.
    kv_norm: keep DeepSeek's latent RMSNorm (its scale set to the calibrated latent RMS, see the module doc);
    False = no latent norm, so the conversion is exact once each layer's rank reaches the rank of its K/V maps.
    calib_stats: ``collect_calibration_stats`` of ``calib`` when the caller already has them (``convert_model``
    shares them with the rank allocation, so one calibration forward serves both); None = collected here.
    """
    src = model.cfg
    if src.is_mla:
        raise ValueError(f"source attention={src.attention!r} is already MLA (need mha | gqa | mqa)")
    for key, supported in (("pos_emb", "rope"), ("norm", "rmsnorm"), ("bias", False), ("attn_qkv_bias", False)):
        if getattr(src, key) != supported:
            raise ValueError(f"source {key}={getattr(src, key)!r} is unsupported by mha_to_mla (allowed: {supported!r})")
    d_h, H, H_kv, D, L = src.attn_head_dim, src.n_heads, src.kv_heads, src.d_model, src.n_layers
    n_pairs = d_h // 2
    rope_dims = d_h if rope_dims is None else rope_dims
    if rope_dims <= 0 or rope_dims % 2 or rope_dims > d_h:
        raise ValueError(f"rope_dims={rope_dims} must be even and in 2..head_dim={d_h}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization={factorization!r} is invalid (allowed: {' | '.join(FACTORIZATIONS)})")
    if kv_lora_ranks is not None and (len(kv_lora_ranks) != src.n_layers or min(kv_lora_ranks) <= 0):
        raise ValueError(f"kv_lora_ranks={kv_lora_ranks} must be {src.n_layers} integers > 0 (one per layer)")
    if factorization == "split" and any(r % 2 for r in kv_lora_ranks or []):
        raise ValueError(f"factorization='split' needs even kv_lora_ranks (got {kv_lora_ranks})")
    if factorization == "split" and kv_lora_rank % 2:
        raise ValueError(f"factorization='split' needs an even kv_lora_rank (got {kv_lora_rank})")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is invalid (allowed: {' | '.join(TARGETS)})")
    if strategy not in ROPE_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid (allowed: {' | '.join(ROPE_STRATEGIES)})")
    if rope_key not in ROPE_KEYS:
        raise ValueError(f"rope_key={rope_key!r} is invalid (allowed: {' | '.join(ROPE_KEYS)})")
    if rope_heads not in ROPE_HEADS:
        raise ValueError(f"rope_heads={rope_heads!r} is invalid (allowed: {' | '.join(ROPE_HEADS)})")
    if target == "auto":
        target = "mla_coupled_rope" if rope_dims == d_h and rope_heads == "shared" and rope_key != "rorope" else "mla"
    whiten = calib is not None if whiten is None else whiten
    if whiten and calib is None:
        raise ValueError("whiten=True needs calib")
    for flag, on in (("strategy='2norm'", strategy == "2norm"), ("bkv=True", bkv)):
        if on and calib is None:
            raise ValueError(f"{flag} needs calib (calibration activations)")
    if target == "mla_coupled_rope" and (rope_heads != "shared" or rope_key == "rorope"):
        raise ValueError(f"rope_heads={rope_heads!r} / rope_key={rope_key!r} need target 'mla' (decoupled RoPE keys)")
    if rope_key == "rorope" and rope_heads != "shared":
        raise ValueError("rope_key='rorope' builds one shared key (allowed: rope_heads='shared')")
    n_rope = H_kv if rope_heads == "per_kv_head" else 1
    layer_pairs = strategy == "2norm"  # per layer (and per rope head) pair choice

    if calib_stats is not None:
        need = ["cov"] + (["q_pair_norm", "k_pair_norm"] if layer_pairs else []) + (["u"] if bkv else [])
        if calib is None or len(calib_stats) != L or any(k not in st for st in calib_stats for k in need):
            raise ValueError(f"calib_stats must be collect_calibration_stats of calib: {L} layers with {need}")
    stats = calib_stats
    if stats is None and calib is not None:
        stats = collect_calibration_stats(model, calib, pair_norms=layer_pairs, sample_tokens=bkv_tokens if bkv else 0)
    covs = [st["cov"] for st in stats] if stats is not None else [None] * L
    group = H // H_kv
    a_idx, b_idx = pair_dims(d_h, src.rope_interleave)

    # per layer weights acting on u = x / g (g = attn_norm.weight), in float64, per source K/V head: query head h
    # reads kv head h // group (SDPA's GQA grouping), so the latent is factorised over the H_kv heads' rows and its
    # up-projection repeated per query head afterwards (same subspace as the repeated rows: their Gram is group x)
    layers = []
    for block in model.layers:
        g = block.attn_norm.weight.detach().double().cpu()
        at = block.attn
        wq = at.wq.weight.detach().double().cpu() * g  # (H*d_h, D)
        wk = at.wk.weight.detach().double().cpu() * g  # (H_kv*d_h, D)
        wv = at.wv.weight.detach().double().cpu() * g
        layers.append(dict(g=g, wq=wq.view(H, d_h, D), wk=wk.view(H_kv, d_h, D), wv=wv.view(H_kv, d_h, D),
                           wo=at.wo.weight))

    # kept pairs: keeps[l] (n_rope, r) per layer, rope key j of layer l keeps pairs keeps[l][j] (ascending)
    scores = None
    if strategy == "norm":
        scores = sum(
            pair_norm_scores(l["wq"].reshape(H * d_h, D), l["wk"].repeat_interleave(group, dim=0).reshape(H * d_h, D),
                             H, src.rope_interleave, c)
            for l, c in zip(layers, covs)
        )
    if layer_pairs:
        scores = []
        keeps = []
        for st in stats:
            s = two_norm_scores(st["q_pair_norm"], st["k_pair_norm"])  # (H_kv, n_pairs)
            s = s if n_rope == H_kv else s.sum(0, keepdim=True)  # (n_rope, n_pairs): a shared key sums its heads
            scores.append(s.tolist())
            keeps.append(torch.stack([select_rope_pairs("norm", n_pairs, rope_dims // 2, row) for row in s]))
    else:
        keep = select_rope_pairs(strategy, n_pairs, rope_dims // 2, scores)  # (r,)
        keeps = [keep.expand(n_rope, -1)] * L
    one_set = all(torch.equal(k, keeps[0][0].expand_as(k)) for k in keeps)
    keep = keeps[0][0]  # the pairs when one set serves every layer and head

    # target config; express the kept frequencies through rope_theta where possible
    nope_dims = d_h if rope_key == "rorope" else d_h - rope_dims
    new_cfg = _target_config(src, target, kv_lora_rank, rope_dims, kv_norm, n_rope, nope_dims)
    if kv_lora_ranks is not None:
        new_cfg = dataclasses.replace(new_cfg, kv_lora_ranks=[int(r) for r in kv_lora_ranks])
    # the frequencies the source actually uses (its buffer), not a recomputation from its config
    src_inv_freq, attn_factor = model.rope.inv_freq.detach().float().cpu(), model.rope.attention_factor
    want_inv_freq = src_inv_freq[keep]
    if not one_set:
        new_cfg = dataclasses.replace(new_cfg, rope_layer_freqs=True)  # each layer's buffer holds its pairs' freqs
    elif src.rope_scaling is None and torch.equal(keep, torch.arange(len(keep))) and rope_dims != d_h:
        new_cfg = dataclasses.replace(new_cfg, rope_theta=src.rope_theta ** (rope_dims / d_h))
    if one_set and not torch.allclose(RotaryEmbedding.from_config(new_cfg).inv_freq, want_inv_freq, rtol=1e-6, atol=0):
        # not expressible by rope_theta / rope_scaling: store them, so a config + state-dict reload keeps them
        new_cfg = dataclasses.replace(new_cfg, rope_inv_freq=want_inv_freq.tolist())
    freq_in_config = True
    new = Transformer(new_cfg).to(dtype=model.embed.weight.dtype, device=model.embed.weight.device)

    # every non-attention weight is reused as is
    attn_keys = {k for k in new.state_dict() if ".attn." in k}
    shared = {k: v for k, v in model.state_dict().items() if ".attn." not in k}
    missing, unexpected = new.load_state_dict(shared, strict=False)
    if set(missing) != attn_keys or unexpected:
        raise RuntimeError(f"non-attention weights do not line up: missing={missing}, unexpected={unexpected}")

    q_scale = softmax_scale(src) / softmax_scale(new_cfg)  # score = scale * q.k on both sides
    nope_q_scale = q_scale * attn_factor**2  # YaRN's cos/sin factor no longer reaches NoPE dims
    t_a, t_b = pair_dims(rope_dims, src.rope_interleave)  # target rows of each kept pair
    rope_of_head = torch.arange(H) // (H // n_rope)  # query head h -> its rope key (= its kv head when per_kv_head)
    info_layers = []
    for li, (layer, blk, cov) in enumerate(zip(layers, new.layers, covs)):
        kv_lora_rank = blk.attn.kv_lora_rank  # this layer's rank (cfg.kv_lora_ranks when given)
        g_inv = safe_inv(layer["g"])
        wq, wk, wv = layer["wq"], layer["wk"], layer["wv"]  # (H, d_h, D), (H_kv, d_h, D) x 2
        rope_src = [_layout(a_idx[k], b_idx[k], src.rope_interleave) for k in keeps[li]]  # (d_rope,) per rope key
        nope_src = [torch.cat((a_idx[d], b_idx[d])).sort().values  # (d_nope,) per rope key
                    for d in (torch.tensor(sorted(set(range(n_pairs)) - set(k.tolist())), dtype=torch.long)
                              for k in keeps[li])]
        # C^{1/2}, C^{-1/2}: one eigendecomposition per layer, shared by the shared-key fit and the factorisation
        roots = sym_sqrt(cov) if whiten else None
        heads = torch.arange(H)[:, None]  # (H, 1): gathers query head h's rows of its rope key's dims in one index
        q_rope = wq[heads, torch.stack(rope_src)[rope_of_head]] * q_scale  # (H, d_rope, D)
        linfo: dict = {}
        if rope_key == "rorope":
            q_nope = wq * nope_q_scale  # (H, d_h, D): every dim keeps its un-rotated part
        else:
            q_nope = wq[heads, torch.stack(nope_src)[rope_of_head]] * nope_q_scale  # (H, d_nope, D)
        if target == "mla" and n_rope > 1:
            # one rope key per kv head: its kept rows as they are (exact), NoPE rows through the latent
            k_rope = torch.cat([wk[j, rope_src[j]] for j in range(n_rope)])  # (n_rope * d_rope, D)
            k_lat = torch.stack([wk[j, nope_src[j]] for j in range(H_kv)])  # (H_kv, d_nope, D): rope key j = kv head j
        elif target == "mla" and rope_key == "rorope":
            # per kept pair: the principal mixture of the kv heads keeps RoPE; every head's remainder goes NoPE
            k_rope = torch.zeros(rope_dims, D, dtype=torch.float64)
            wk_res = wk.clone()  # (H_kv, d_h, D)
            captured, best_head = [], []
            # every pair's energy matrix C[j, m] = wa_j C_u wa_m^T + wb_j C_u wb_m^T from one Gram of all key rows
            cov_u = cov if whiten else torch.eye(D, dtype=torch.float64)
            gram = (wk @ cov_u).reshape(H_kv * d_h, D) @ wk.reshape(H_kv * d_h, D).T  # (H_kv*d_h, H_kv*d_h)
            gram = gram.view(H_kv, d_h, H_kv, d_h)
            for j, i in enumerate(keeps[li][0].tolist()):
                ia, ib = int(a_idx[i]), int(b_idx[i])
                c = gram[:, ia, :, ia] + gram[:, ib, :, ib]  # (H_kv, H_kv), as rorope_mixing computes it
                u = _principal_mixing(c)
                ka, kb = u @ wk[:, a_idx[i]], u @ wk[:, b_idx[i]]  # (D,) each: the mixed head's pair rows
                k_rope[t_a[j]], k_rope[t_b[j]] = ka, kb
                wk_res[:, a_idx[i]] -= u[:, None] * ka
                wk_res[:, b_idx[i]] -= u[:, None] * kb
                uh = u.repeat_interleave(group)[:, None]  # (H, 1): query head h scales its pair by u[kv head]
                q_rope[:, t_a[j]] *= uh
                q_rope[:, t_b[j]] *= uh
                tr = float(c.trace().clamp_min(1e-30))
                captured.append(float(u @ c @ u) / tr)
                best_head.append(float(c.diagonal().max()) / tr)
            linfo["rorope_energy"] = captured  # share of the pair's key energy on the rotated key
            linfo["rorope_best_head_energy"] = best_head  # the best single source head's share
            k_lat = wk_res  # (H_kv, d_h, D)
        elif target == "mla":
            # shared decoupled key: per kept pair, complex rank-1 fit over the kv heads
            k_rope = torch.zeros(rope_dims, D, dtype=torch.float64)
            rel_err = []
            roots_c = None if roots is None else tuple(r.to(torch.complex128) for r in roots)  # cast once per layer
            for j, i in enumerate(keeps[li][0].tolist()):
                mc = torch.complex(wk[:, a_idx[i]], wk[:, b_idx[i]])  # (H_kv, D): k_h = a_h + i b_h
                alpha, beta = _rank1_shared_key(mc, cov if whiten else None, rope_key, roots_c)
                fit = alpha[:, None] * beta[None]  # (H_kv, D)
                rel_err.append(float((mc - fit).abs().norm() / mc.abs().norm().clamp_min(1e-30)))
                k_rope[t_a[j]], k_rope[t_b[j]] = beta.real, beta.imag
                # q_h <- conj(alpha_h) q_h on this pair, so Re(conj(R q') R kappa) = Re(conj(R q) R alpha kappa)
                al = alpha.repeat_interleave(group)  # (H,)
                ar, ai = al.real[:, None], al.imag[:, None]
                qa, qb = q_rope[:, t_a[j]].clone(), q_rope[:, t_b[j]].clone()  # (H, D) each
                q_rope[:, t_a[j]] = ar * qa + ai * qb
                q_rope[:, t_b[j]] = ar * qb - ai * qa
            linfo["rope_key_rel_err"] = rel_err
            k_lat = wk[:, nope_src[0]]  # (H_kv, d_nope, D): only NoPE keys go through the latent
        else:
            k_lat = torch.cat((wk[:, nope_src[0]], wk[:, rope_src[0]]), dim=1)  # (H_kv, d_h, D), rope last
        d_k = k_lat.shape[1]
        kv = torch.cat((k_lat, wv), dim=1)  # (H_kv, d_k + d_h, D): wkv_b's per-head row layout, per kv head
        k_bal = 1.0
        if bkv:
            # BKV: balance mean ||K_lat u|| against mean ||V u|| so the joint SVD does not favour the larger one
            u_s = stats[li]["u"].double()  # (N, D)
            k_norm = torch.einsum("nd,hkd->nhk", u_s, k_lat).norm(dim=-1).mean()  # over kv heads = over query heads
            v_norm = torch.einsum("nd,hkd->nhk", u_s, wv).norm(dim=-1).mean()
            k_bal = float(k_norm / v_norm.clamp_min(1e-30)) if float(k_norm) > 0 else 1.0
            linfo["bkv_scale"] = k_bal
        kv_fit = torch.cat((k_lat / k_bal, wv), dim=1)  # (H_kv, d_k + d_h, D)
        if factorization == "joint":
            b, a = factorize(kv_fit.reshape(-1, D), kv_lora_rank, cov, whiten, roots)  # (H_kv*(d_k+d_h), r), (r, D)
        else:
            half = kv_lora_rank // 2
            b_k, a_k = factorize(kv_fit[:, :d_k].reshape(-1, D), half, cov, whiten, roots)  # (H_kv*d_k, r/2), (r/2, D)
            b_v, a_v = factorize(wv.reshape(-1, D), half, cov, whiten, roots)  # (H_kv*d_h, r/2), (r/2, D)
            a = torch.cat((a_k, a_v))  # (r, D)
            b = torch.cat(
                (
                    torch.cat((b_k.view(H_kv, d_k, half), torch.zeros(H_kv, d_k, half, dtype=b_k.dtype)), dim=2),
                    torch.cat((torch.zeros(H_kv, d_h, half, dtype=b_v.dtype), b_v.view(H_kv, d_h, half)), dim=2),
                ),
                dim=1,
            ).reshape(-1, kv_lora_rank)  # (H_kv*(d_k+d_h), r): block-diagonal per head
        b = b.view(H_kv, d_k + d_h, kv_lora_rank)  # (H_kv, d_k + d_h, r)
        b = torch.cat((b[:, :d_k] * k_bal, b[:, d_k:]), dim=1)  # BKV undone in W^UK
        cov_eff = torch.eye(D, dtype=torch.float64) if cov is None else cov
        ms_c = float(((a @ cov_eff) * a).sum() / kv_lora_rank)  # E[ms(c)]
        # kv_norm divides by sqrt(ms(c) + eps): include its eps so a constant ms(c) cancels exactly
        rho = (ms_c + blk.attn.kv_norm.eps) ** 0.5 if kv_norm else ms_c**0.5
        kv_flat = kv.reshape(-1, D)  # (m, D), m = H_kv (d_k + d_h): the ratios below equal those over query heads
        err = kv_flat - b.reshape(-1, kv_lora_rank) @ a  # (m, D): linear reconstruction error, kv_norm aside
        linfo["kv_rel_err"] = float(err.norm() / kv_flat.norm().clamp_min(1e-30))
        if cov is not None:
            w_err = ((err @ cov) * err).sum()  # E||err u||^2 over calibration
            w_ref = ((kv_flat @ cov) * kv_flat).sum()
            linfo["kv_weighted_rel_err"] = float((w_err / w_ref.clamp_min(1e-30)).sqrt())
        b = b.repeat_interleave(group, dim=0).reshape(-1, kv_lora_rank)  # (H*(d_k+d_h), r): head h <- kv head h // group
        linfo["latent_rms"] = rho
        info_layers.append(linfo)

        attn = blk.attn
        dt = attn.wo.weight.dtype
        wq_new = torch.cat((q_nope, q_rope), dim=1).reshape(-1, D) * g_inv  # (H * d_qk, D), back to x-space
        attn.wq.weight.copy_(wq_new.to(dt))
        lat = a * g_inv  # (r, D): c = Q^T (x / g)
        wkv_a = lat if target == "mla_coupled_rope" else torch.cat((lat, k_rope * g_inv))  # (r [+ n d_rope], D)
        attn.wkv_a.weight.copy_(wkv_a.to(dt))
        if kv_norm:
            attn.kv_norm.weight.fill_(rho)
        attn.wkv_b.weight.copy_(b.to(dt))
        attn.wo.weight.copy_(layer["wo"])  # v_head_dim = head_dim, same head-major layout
        if attn.rope_inv_freq is not None:
            attn.rope_inv_freq.copy_(src_inv_freq[keeps[li]].to(attn.rope_inv_freq.dtype))  # (n_rope, d_rope/2)

    new.conversion_info = dict(
        target=target,
        factorization=factorization,
        whiten=whiten,
        strategy=strategy,
        rope_heads=rope_heads,
        rope_key=rope_key,
        bkv=bkv,
        rope_pairs=keep.tolist() if one_set else [k.tolist() for k in keeps],
        rope_inv_freq=want_inv_freq.tolist() if one_set else [src_inv_freq[k].tolist() for k in keeps],
        rope_freq_in_config=freq_in_config,
        rope_layer_freqs=not one_set,
        pair_scores=None if scores is None else (scores.tolist() if isinstance(scores, torch.Tensor) else scores),
        layers=info_layers,
        kv_lora_ranks=[blk.attn.kv_lora_rank for blk in new.layers],
        kv_norm=kv_norm,
    )
    return new


@torch.no_grad()
def to_interleaved_rope(model: Transformer) -> Transformer:
    """The same MLA model with its rotated dims in the interleaved layout (DeepSeek's) instead of halves: exact.

    Only the decoupled rope rows are rotated (q_rope per head, k_rope), so permuting them from (a_0..a_r, b_0..b_r)
    to (a_0, b_0, a_1, b_1, ...) in both and flipping ``rope_interleave`` leaves every score unchanged; NoPE dims,
    latent and values are untouched. Makes a converted Llama-layout model exportable as DeepseekV3.
    """
    cfg = model.cfg
    if cfg.attention != "mla":
        raise ValueError(f"attention={cfg.attention!r} is invalid (allowed: mla; coupled RoPE rotates the latent's keys)")
    if cfg.rope_interleave:
        return model
    d_r, d_n, H = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.n_heads
    half = torch.arange(d_r // 2)
    perm = _layout(half, half + d_r // 2, True)  # (d_rope,): interleaved row t <- halves row perm[t]
    new = Transformer(dataclasses.replace(cfg, rope_interleave=True)).to(model.embed.weight)
    new.load_state_dict(model.state_dict())
    for blk in new.layers:
        at = blk.attn
        wq = at.wq.weight.view(H, d_n + d_r, -1)  # (H, d_qk, D)
        wq[:, d_n:] = wq[:, d_n:][:, perm].clone()
        r = at.kv_lora_rank
        k_r = at.wkv_a.weight[r:].view(at.qk_rope_heads, d_r, -1)  # (n_rope, d_rope, D)
        k_r.copy_(k_r[:, perm].clone())
    if hasattr(model, "conversion_info"):
        new.conversion_info = dict(model.conversion_info, rope_interleave=True)
    return new


__all__ = [
    "FACTORIZATIONS",
    "ROPE_HEADS",
    "ROPE_KEYS",
    "ROPE_STRATEGIES",
    "collect_attention_covariances",
    "collect_calibration_stats",
    "factorize",
    "full_latent_rank",
    "latent_key_dim",
    "mha_to_mla",
    "rorope_mixing",
    "to_interleaved_rope",
    "two_norm_scores",
    "pair_dims",
    "pair_norm_scores",
    "select_rope_pairs",
]
