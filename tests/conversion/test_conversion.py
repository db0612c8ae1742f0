"""MHA/GQA/MQA -> MLA conversion: exactness at full rank, partial RoPE, rank monotonicity, whitening."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
from mla_analysis.interop.hf_io import load_model
from mla_analysis.config import RopeScaling, tiny
from mla_analysis.conversion.mla import factorize, mha_to_mla, pair_dims, pair_norm_scores, select_rope_pairs
from mla_analysis.models.transformer import Transformer
from tests.helpers import source_model

D = 32  # tiny preset d_model; head_dim 8 -> 4 frequency pairs
YARN = RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.5)


_source = source_model


def _ids(seed: int = 1, shape=(2, 48)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_non_attention_shared(src: Transformer, new: Transformer) -> None:
    new_sd = new.state_dict()
    for k, v in src.state_dict().items():
        if ".attn." not in k:
            assert torch.equal(new_sd[k], v), k


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(rope_interleave=True), dict(attention="gqa", n_kv_heads=2), dict(attention="mqa")],
    ids=["mha", "mha-interleave", "gqa", "mqa"],
)
@pytest.mark.parametrize(
    "kwargs",
    [dict(kv_lora_rank=D), dict(kv_lora_rank=D, calib=True), dict(kv_lora_rank=2 * D, factorization="split")],
    ids=["joint", "joint-whitened", "split"],
)
def test_full_rank_all_rope_reproduces_source_logits(overrides, kwargs):
    src = _source(**overrides)
    kwargs = dict(kwargs)
    if kwargs.pop("calib", False):
        kwargs["calib"] = _ids(seed=7, shape=(4, 64))
    new = mha_to_mla(src, **kwargs).eval()
    assert new.cfg.attention == "mla_coupled_rope"
    _assert_non_attention_shared(src, new)
    ids = _ids()
    with torch.no_grad():
        ref, got = src(ids), new(ids)
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)


def test_full_rank_bound_from_attention_norm_eps():
    """With a small residual stream the attention RMSNorm's eps makes ||u|| vary per token.

    ||u||^2 = D ms(h) / (ms(h) + eps): the per-token K/V scale error is about eps / (2 ms(h)); with
    embed std 0.02 (ms ~ 4e-4) that is ~1e-3, and with eps = 0 the conversion is exact again.
    """
    ids = _ids()
    errs = {}
    for eps in (1e-6, 0.0):
        src = _source(embed_std=0.02, rms_norm_eps=eps)
        with torch.no_grad():
            errs[eps] = _rel(mha_to_mla(src, D)(ids), src(ids))
    assert 1e-4 < errs[1e-6] < 3e-3
    assert errs[0.0] < 2e-6  # fp32 round-off


@pytest.mark.parametrize("rope_key", ["lstsq", "mean"])
def test_decoupled_mla_from_mqa_is_exact(rope_key):
    """Target 'mla' (one shared RoPE key): exact when the kv heads' keys are one key, as in MQA."""
    src = _source(attention="mqa")
    new = mha_to_mla(src, D, target="mla", rope_key=rope_key).eval()
    assert new.cfg.attention == "mla" and new.cfg.qk_rope_head_dim == 8 and new.cfg.qk_nope_head_dim == 0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(new(ids), src(ids), atol=3e-5, rtol=1e-5)
    # an MHA source cannot share one rope key across heads: a real, reported approximation
    mha = _source()
    conv = mha_to_mla(mha, D, target="mla")
    assert max(conv.conversion_info["layers"][0]["rope_key_rel_err"]) > 0.3
    with torch.no_grad():
        assert _rel(conv(ids), mha(ids)) > 1e-2


@pytest.mark.parametrize("interleave", [False, True])
def test_decoupled_mla_exact_when_kv_heads_differ_by_a_complex_factor(interleave):
    """GQA whose kv head 1 has, per pair, kv head 0's key times a complex number: one shared key fits.

    Checks that the per-head complex factor is folded (conjugated) into the query pair correctly.
    """
    src = _source(attention="gqa", n_kv_heads=2, rope_interleave=interleave)
    a, b = pair_dims(8, interleave)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in src.layers:
            wk = block.attn.wk.weight.view(2, 8, D)  # (H_kv, d_h, D)
            for i in range(4):
                cr, ci = torch.randn(2, generator=g).tolist()
                k_a, k_b = wk[0, a[i]].clone(), wk[0, b[i]].clone()
                wk[1, a[i]] = cr * k_a - ci * k_b  # (cr + i ci)(k_a + i k_b)
                wk[1, b[i]] = ci * k_a + cr * k_b
    new = mha_to_mla(src, D, target="mla").eval()
    assert max(new.conversion_info["layers"][0]["rope_key_rel_err"]) < 1e-6
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(new(ids), src(ids), atol=3e-5, rtol=1e-5)


def _partial_rope_reference(src: Transformer, keep: list[int]) -> Transformer:
    """The source with RoPE removed from the dropped pairs (frequency 0; YaRN's cos/sin factor kept)."""
    ref = copy.deepcopy(src)
    drop = [i for i in range(ref.rope.inv_freq.numel()) if i not in keep]
    ref.rope.inv_freq[drop] = 0.0
    return ref


@pytest.mark.parametrize(
    "overrides,target",
    [
        (dict(), "mla_coupled_rope"),
        (dict(rope_interleave=True, rope_scaling=YARN), "mla_coupled_rope"),
        (dict(attention="mqa"), "mla"),
        (dict(attention="mqa", rope_interleave=True, rope_scaling=YARN), "mla"),
    ],
    ids=["mha-coupled", "mha-coupled-interleave-yarn", "mqa-mla", "mqa-mla-interleave-yarn"],
)
@pytest.mark.parametrize("strategy,keep", [("high", [0]), ("low", [3]), ("uniform", [0, 2])])
def test_partial_rope_at_full_rank_equals_source_without_rope_on_dropped_pairs(overrides, target, strategy, keep):
    src = _source(**overrides)
    new = mha_to_mla(src, D, rope_dims=2 * len(keep), strategy=strategy, target=target).eval()
    assert new.conversion_info["rope_pairs"] == keep
    torch.testing.assert_close(new.rope.inv_freq, src.rope.inv_freq[keep])
    ids = _ids()
    with torch.no_grad():
        ref, got = _partial_rope_reference(src, keep)(ids), new(ids)
        torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)
        assert _rel(got, src(ids)) > 1e-3  # dropping RoPE really changed the model


def test_joint_error_non_increasing_in_rank():
    src = _source(attention="gqa", n_kv_heads=2)
    g = torch.Generator().manual_seed(3)
    x = src.layers[0].attn_norm(torch.randn(4, 64, D, generator=g))  # random attention inputs
    ids = torch.randint(0, 128, (4, 64), generator=g)
    at = src.layers[0].attn
    with torch.no_grad():
        kv_ref = torch.cat(
            (at.wk(x).view(4, 64, 2, 8).repeat_interleave(2, 2), at.wv(x).view(4, 64, 2, 8).repeat_interleave(2, 2)),
            dim=-1,
        )  # (B, T, H, d_h + d_h): per query head [k | v]
        logits_ref = src(ids)
        kv_errs, logit_errs = [], []
        for r in range(4, D + 1, 4):
            new = mha_to_mla(src, r, factorization="joint")
            a = new.layers[0].attn
            kv = a.wkv_b(a.kv_norm(a.wkv_a(x))).view(4, 64, 4, 16)  # through the real kv_norm
            kv_errs.append(_rel(kv, kv_ref))
            logit_errs.append(_rel(new(ids), logits_ref))
    assert all(b < a for a, b in zip(kv_errs, kv_errs[1:])), kv_errs
    assert all(b <= a for a, b in zip(logit_errs, logit_errs[1:])), logit_errs
    assert kv_errs[0] > 0.5 and kv_errs[-1] < 1e-5


def test_select_rope_pairs_fixed_strategies():
    assert select_rope_pairs("high", 8, 3).tolist() == [0, 1, 2]
    assert select_rope_pairs("low", 8, 3).tolist() == [5, 6, 7]
    assert select_rope_pairs("uniform", 8, 4).tolist() == [0, 2, 4, 6]
    assert select_rope_pairs("uniform", 8, 3).tolist() == [0, 2, 5]
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 3.0, 0.0, 9.0, 1.0])
    assert select_rope_pairs("norm", 8, 3, scores).tolist() == [1, 3, 6]  # tie 3 vs 4 -> higher freq
    with pytest.raises(ValueError):
        select_rope_pairs("random", 8, 3)


@pytest.mark.parametrize("interleave", [False, True])
def test_pair_norm_scores_hand_made(interleave):
    """Pair i reads input dim i with weight c_i in q and k: score_i = H * 2 c_i^2 var_i."""
    H, d_h, Din = 2, 8, 4
    a, b = pair_dims(d_h, interleave)
    w = torch.zeros(H, d_h, Din, dtype=torch.float64)
    c = torch.tensor([3.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    for i in range(4):
        w[:, a[i], i] = c[i]
        w[:, b[i], i] = c[i]
    w = w.reshape(H * d_h, Din)
    # by weights alone (isotropic inputs) pair 0 dominates ...
    iso = pair_norm_scores(w, w, H, interleave)
    torch.testing.assert_close(iso, H * 2 * c**2)
    assert select_rope_pairs("norm", 4, 2, iso).tolist() == [0, 1]
    # ... but calibration says input dim 0 barely varies and dim 3 varies a lot
    var = torch.tensor([0.01, 4.0, 1.0, 64.0], dtype=torch.float64)
    scores = pair_norm_scores(w, w, H, interleave, torch.diag(var))
    torch.testing.assert_close(scores, H * 2 * c**2 * var)  # [0.36, 16, 4, 64]
    assert select_rope_pairs("norm", 4, 2, scores).tolist() == [1, 3]


def test_norm_strategy_in_conversion_uses_the_dominant_pair():
    src = _source()
    _, b = pair_dims(8, False)
    with torch.no_grad():
        for block in src.layers:
            for w in (block.attn.wq.weight, block.attn.wk.weight):
                w.view(4, 8, D)[:, [2, int(b[2])]] *= 10.0  # pair 2 of every head dominates q.k
    new = mha_to_mla(src, D, rope_dims=2, strategy="norm", calib=_ids(seed=5, shape=(4, 32)))
    info = new.conversion_info
    assert info["rope_pairs"] == [2] and info["rope_freq_in_config"]
    assert new.cfg.rope_inv_freq == src.rope.inv_freq[[2]].tolist()  # not expressible by rope_theta
    assert int(torch.tensor(info["pair_scores"]).argmax()) == 2
    torch.testing.assert_close(new.rope.inv_freq, src.rope.inv_freq[[2]])


def test_norm_strategy_weighs_pairs_by_calibration_activations():
    """Pair 0 has by far the largest q/k weights, but reads input dims that never vary."""
    src = _source(ffn="none")
    a, b = pair_dims(8, False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        src.embed.weight[:, :4] *= 1e-3  # residual dims 0..3 nearly constant (zero) ...
        for block in src.layers:
            block.attn.wo.weight[:4] = 0.0  # ... in every layer's input
            for w in (block.attn.wq.weight, block.attn.wk.weight):
                v = w.view(4, 8, D)  # (H, d_h, D)
                v[:, :, :4] = 0.0
                v[:, [int(a[0]), int(b[0])]] = 0.0
                v[:, [int(a[0]), int(b[0])], :4] = 10.0 * torch.randn(4, 2, 4, generator=g)
    by_weights = mha_to_mla(src, D, rope_dims=2, strategy="norm")
    by_calib = mha_to_mla(src, D, rope_dims=2, strategy="norm", calib=_ids(seed=5, shape=(4, 32)))
    assert by_weights.conversion_info["rope_pairs"] == [0]
    assert by_calib.conversion_info["rope_pairs"] != [0]


def test_high_strategy_frequencies_live_in_config():
    src = _source()
    new = mha_to_mla(src, D, rope_dims=4, strategy="high")
    assert new.conversion_info["rope_freq_in_config"]
    rebuilt = Transformer(new.cfg)  # a config + state-dict reload keeps the kept frequencies
    torch.testing.assert_close(rebuilt.rope.inv_freq, src.rope.inv_freq[:2])


@pytest.mark.parametrize(
    "overrides,strategy",
    [(dict(), "low"), (dict(attention="mqa", rope_interleave=True, rope_scaling=YARN), "high")],
    ids=["mha-low", "mqa-yarn-high"],
)
def test_converted_frequencies_survive_a_checkpoint_round_trip(tmp_path, overrides, strategy):
    """Kept pairs that rope_theta cannot express go to cfg.rope_inv_freq and reload with the model."""
    src = _source(**overrides)
    new = mha_to_mla(src, D, rope_dims=4, strategy=strategy).eval()
    keep = new.conversion_info["rope_pairs"]
    assert new.cfg.rope_inv_freq == src.rope.inv_freq[keep].tolist()
    save_model_config(tmp_path, new.cfg)
    save_checkpoint(tmp_path, new, None, step=0, state={})
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.rope.inv_freq, src.rope.inv_freq[keep])
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), new(ids), atol=0, rtol=0)
        # without the field the config's theta-derived frequencies come back, and the logits differ
        plain = Transformer(dataclasses.replace(new.cfg, rope_inv_freq=None)).eval()
        plain.load_state_dict(new.state_dict())
        assert _rel(plain(ids), new(ids)) > 1e-3


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(pos_emb="learned"), "pos_emb"),
        (dict(attn_qkv_bias=True), "attn_qkv_bias"),
        (dict(bias=True), "bias"),
        (dict(norm="layernorm"), "norm"),
    ],
)
def test_rejects_sources_without_rope_or_with_biases(overrides, key):
    with pytest.raises(ValueError, match=f"source {key}="):
        mha_to_mla(_source(**overrides), D)


def test_whitened_svd_beats_plain_svd_on_anisotropic_activations():
    # factorize alone: activation-weighted error, whitened optimal (Eckart-Young in the C metric)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 16, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    cov = basis @ torch.diag(torch.logspace(-3, 1, 16, dtype=torch.float64)) @ basis.T

    def weighted_err(b, a):
        e = w - b @ a  # (m, D)
        return float(torch.einsum("md,de,me->", e, cov, e))

    plain, white = weighted_err(*factorize(w, 6)), weighted_err(*factorize(w, 6, cov, whiten=True))
    assert white < 0.8 * plain, (white, plain)
    evals, evecs = torch.linalg.eigh(cov)
    s = torch.linalg.svdvals(w @ (evecs * evals.sqrt()) @ evecs.T)  # singular values of W C^{1/2}
    assert white == pytest.approx(float(s[6:].pow(2).sum()), rel=1e-6)  # the Eckart-Young optimum

    # in the conversion: calibration activations with anisotropic covariance (scaled embedding dims)
    src = _source()
    with torch.no_grad():
        src.embed.weight.mul_(torch.logspace(-1.5, 1.0, D))
    calib = _ids(seed=9, shape=(8, 64))
    xs = []
    hook = src.layers[0].attn.register_forward_pre_hook(lambda m, args: xs.append(args[0].reshape(-1, D)))
    with torch.no_grad():
        src(calib)
    hook.remove()
    x = torch.cat(xs)  # (N, D) attention inputs of layer 0
    at = src.layers[0].attn
    with torch.no_grad():
        kv_ref = torch.cat((at.wk(x).view(-1, 4, 8), at.wv(x).view(-1, 4, 8)), dim=-1)  # (N, H, [k | v])
    errs = {}
    for whiten in (False, True):
        new = mha_to_mla(src, 12, calib=calib, whiten=whiten)
        a = new.layers[0].attn
        with torch.no_grad():
            kv_lin = a.wkv_b(a.wkv_a(x)).view(-1, 4, 16)  # linear reconstruction B A x (kv_norm.weight = rho)
        errs[whiten] = float((kv_lin - kv_ref).pow(2).sum())
        assert new.conversion_info["whiten"] is whiten
    assert errs[True] < 0.8 * errs[False], errs


@pytest.mark.parametrize("overrides", [dict(attention="gqa", n_kv_heads=2), dict(attention="mqa")], ids=["gqa", "mqa"])
def test_gqa_latent_is_the_eckart_young_optimum_of_the_repeated_kv_rows(overrides):
    """The latent is fitted on the kv heads' rows and repeated per query head: still the C-weighted optimum of the
    per-query-head K/V matrix (H (d_h + d_h), D) that the MLA layer reproduces (brute force: hooked inputs, svdvals)."""
    src = _source(**overrides)
    calib = _ids(seed=9, shape=(8, 64))
    xs = []
    hook = src.layers[1].attn.register_forward_pre_hook(lambda m, args: xs.append(args[0].reshape(-1, D).double()))
    with torch.no_grad():
        src(calib)
    hook.remove()
    x = torch.cat(xs)  # (N, D): layer 1's attention inputs
    cov = x.T @ x / x.shape[0]
    H, H_kv, d_h = src.cfg.n_heads, src.cfg.kv_heads, src.cfg.attn_head_dim
    at = src.layers[1].attn
    rep = lambda w: w.detach().double().view(H_kv, d_h, D).repeat_interleave(H // H_kv, dim=0)  # noqa: E731
    w = torch.cat((rep(at.wk.weight), rep(at.wv.weight)), dim=1).reshape(-1, D)  # (H * 2 d_h, D), wkv_b's layout
    rank = 10
    new = mha_to_mla(src, rank, calib=calib, kv_norm=False)  # all RoPE kept: coupled, K rows in source order
    a = new.layers[1].attn
    m = (a.wkv_b.weight @ a.wkv_a.weight).detach().double()  # (H * 2 d_h, D): the linear K/V map of every query head
    e = w - m
    err = float(torch.einsum("md,de,me->", e, cov, e))
    evals, evecs = torch.linalg.eigh(cov)
    s = torch.linalg.svdvals(w @ (evecs * evals.clamp_min(0).sqrt()) @ evecs.T)  # singular values of W C^{1/2}
    assert err == pytest.approx(float(s[rank:].pow(2).sum()), rel=1e-4)  # the optimum at this rank
    assert float(s[rank:].pow(2).sum()) > 1e-3 * float(s.pow(2).sum())  # below the K/V rank: not trivially 0


def test_rejects_bad_arguments():
    src = _source()
    with pytest.raises(ValueError):
        mha_to_mla(src, D, rope_dims=3)
    with pytest.raises(ValueError):
        mha_to_mla(src, 7, factorization="split")
    with pytest.raises(ValueError):
        mha_to_mla(mha_to_mla(src, D), D)  # already MLA


def _wide_gqa_source(**overrides) -> Transformer:
    # K/V maps of rank 2 x 2 kv heads x 8 = 32 < d_model 64: a latent of rank 32 can hold them exactly
    return _source(d_model=64, n_heads=4, head_dim=8, attention="gqa", n_kv_heads=2, **overrides)


@pytest.mark.parametrize("calib", [False, True], ids=["plain", "whitened"])
def test_no_latent_norm_makes_conversion_exact_at_the_kv_rank(calib):
    src = _wide_gqa_source()
    ids = _ids()
    ref = src(ids)
    kw = dict(calib=_ids(seed=2, shape=(4, 48))) if calib else {}
    exact = mha_to_mla(src, 32, kv_norm=False, **kw)
    assert exact.cfg.kv_norm is False and exact.conversion_info["kv_norm"] is False
    assert isinstance(exact.layers[0].attn.kv_norm, torch.nn.Identity)
    assert _rel(exact(ids), ref) < 1e-5
    # DeepSeek's normed latent below d_model rescales each token's K and V: the same rank is not exact
    normed = mha_to_mla(src, 32, **kw)
    assert _rel(normed(ids), ref) > 1e-3


def test_no_latent_norm_decodes_and_round_trips(tmp_path):
    from mla_analysis.models.accounting import count_params

    src = _wide_gqa_source()
    new = mha_to_mla(src, 32, rope_dims=4, kv_norm=False)
    ids = _ids(shape=(1, 20))
    full = new(ids)
    save_model_config(tmp_path, new.cfg)
    save_checkpoint(tmp_path, new, None, step=0, state={})
    back = load_model(tmp_path)
    assert back.cfg.kv_norm is False
    assert torch.allclose(back(ids), full, atol=1e-6)
    # the closed-form parameter count drops the latent norm's d_c weights per layer, as the module does
    assert count_params(new.cfg) == sum(p.numel() for p in new.parameters())
    normed = mha_to_mla(src, 32, rope_dims=4)
    assert count_params(normed.cfg) - count_params(new.cfg) == 32 * new.cfg.n_layers


def test_no_latent_norm_is_not_exported_as_deepseek():
    from mla_analysis.config import ConfigError
    from mla_analysis.interop.state_dict import to_hf_config

    src = _wide_gqa_source(rope_interleave=True)  # DeepSeek's RoPE layout
    with pytest.raises(ConfigError, match="kv_norm"):
        to_hf_config(mha_to_mla(src, 32, rope_dims=4, kv_norm=False).cfg)
    assert to_hf_config(mha_to_mla(src, 32, rope_dims=4).cfg).kv_lora_rank == 32  # the normed variant exports
