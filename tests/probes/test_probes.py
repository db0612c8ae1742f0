"""Probes: streaming spectra and rank measures against direct SVDs, the spectra probe against the
model's own KV cache, the cost probe's byte accounting and the published 93.3% arithmetic, end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mla_analysis.config import ConfigError, ModelConfig, tiny
from mla_analysis.data import DataConfig, build_eval_sets
from mla_analysis.models.transformer import Transformer
from mla_analysis.probes import PROBES, ProbeError, run_probes
from mla_analysis.probes.spectra import (
    GramAccumulator,
    effective_rank,
    energy_at_rank,
    energy_rank,
    mean_cosine,
    stable_rank,
)
from mla_analysis.published_configs import PUBLISHED_DIR, load_all
from tests.helpers import CPU, PNG_MAGIC

DATA = DataConfig(vocab_size=128, seq_len=32, eval_examples=16, eval_tasks=[])


def _with_spectrum(s, rows: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T [rows, len(s)] with orthonormal U, V: a matrix whose singular values are s."""
    g = torch.Generator().manual_seed(seed)
    d = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, d, generator=g, dtype=torch.float64))  # (rows, d)
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # (d, d)
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


# ---- Gram accumulator -------------------------------------------------------------------------


def test_gram_spectrum_matches_svd_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = x + 3.0  # a non-zero mean, so centring matters
    one, chunked = GramAccumulator(12), GramAccumulator(12)
    one.update(x)
    for chunk in (x[:7], x[7:100], x[100:]):
        chunked.update(chunk)
    assert one.n == chunked.n == 300
    torch.testing.assert_close(chunked.gram, one.gram, rtol=1e-13, atol=1e-10)
    np.testing.assert_allclose(chunked.spectrum(), one.spectrum(), rtol=1e-12)
    np.testing.assert_allclose(one.spectrum(), torch.linalg.svdvals(x).numpy(), rtol=1e-9)
    np.testing.assert_allclose(one.spectrum(center=True), torch.linalg.svdvals(x - x.mean(0)).numpy(), rtol=1e-9)
    assert not np.allclose(one.spectrum(center=True), one.spectrum())
    # fewer rows than columns: min(n, d) singular values
    few = GramAccumulator(12)
    few.update(x[:5].float())  # float32 rows are promoted to float64
    np.testing.assert_allclose(few.spectrum(), torch.linalg.svdvals(x[:5].float().double()).numpy(), rtol=1e-8)
    # a block of columns is the accumulator of those columns alone
    cols = [1, 4, 5, 9]
    np.testing.assert_allclose(one.block(cols).spectrum(center=True), torch.linalg.svdvals(x[:, cols] - x[:, cols].mean(0)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(one.block(slice(0, 6)).spectrum(), torch.linalg.svdvals(x[:, :6]).numpy(), rtol=1e-9)
    # batched [B, T, d] input is flattened into rows
    b = GramAccumulator(12)
    b.update(x.view(3, 100, 12))
    torch.testing.assert_close(b.gram, one.gram)


def test_gram_subspace_is_dominant_singular_subspace():
    x = _with_spectrum([5.0, 4.0, 1.0, 0.5], rows=50)
    acc = GramAccumulator(4)
    acc.update(x)
    _, _, vh = torch.linalg.svd(x)
    assert mean_cosine(acc.subspace(2), vh[:2].T.numpy()) == pytest.approx(1.0, abs=1e-9)
    assert mean_cosine(acc.subspace(2), vh[2:].T.numpy()) == pytest.approx(0.0, abs=1e-7)


# ---- rank measures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s,erank,srank,r50,r90,e1",
    [
        ([1.0, 1.0, 1.0, 1.0], 4.0, 4.0, 2, 4, 0.25),
        ([3.0, 0.0, 0.0], 1.0, 1.0, 1, 1, 1.0),
        # p = (2/3, 1/3): exp(H) = (3/2)^(2/3) * 3^(1/3); srank = (4 + 1) / 4; energy of the top 1 = 4/5
        ([2.0, 1.0], 1.5 ** (2 / 3) * 3 ** (1 / 3), 1.25, 1, 2, 0.8),
    ],
)
def test_rank_measures_on_known_spectra(s, erank, srank, r50, r90, e1):
    x = _with_spectrum(s, rows=20)
    acc = GramAccumulator(len(s))
    acc.update(x)
    sv = acc.spectrum()
    np.testing.assert_allclose(sv, s, atol=1e-7)
    assert effective_rank(sv) == pytest.approx(erank, rel=1e-6)
    assert stable_rank(sv) == pytest.approx(srank, rel=1e-6)
    assert energy_rank(sv, 0.5) == r50
    assert energy_rank(sv, 0.9) == r90
    assert energy_rank(sv, 1.0) == sum(v > 0 for v in s)
    assert energy_at_rank(sv, 1) == pytest.approx(e1, rel=1e-6)
    assert energy_at_rank(sv, len(s)) == pytest.approx(1.0)


def test_rank_measures_edge_cases():
    assert effective_rank([0.0, 0.0]) == 0.0 and stable_rank([0.0]) == 0.0 and energy_rank([0.0], 0.9) == 0
    assert effective_rank([2.0, 1.0]) != pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))))  # not sigma^2
    with pytest.raises(ValueError):
        energy_rank([1.0], 0.0)
    with pytest.raises(ValueError):
        effective_rank([1.0, float("nan")])


# ---- spectra probe ----------------------------------------------------------------------------


def _cached(model: Transformer, inputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """What the model's own KV cache holds after a prefill of ``inputs``, per layer."""
    cache = model.new_cache(inputs.shape[0], inputs.shape[1])
    with torch.no_grad():
        model(inputs, cache=cache)
    return cache.layers


def _json_sv(js: dict, layer: int, name: str, head: int = 0) -> np.ndarray:
    return np.asarray(js["layers"][layer]["activations"][name]["spectra"][head]["sv"])


def test_spectra_probe_mla_matches_cache_and_latent_rank_bounds(tmp_path):
    torch.manual_seed(0)
    # d_c = 4 < d_nope = d_v = 8: per-head keys and values can have rank at most 4
    cfg = tiny(attention="mla", kv_lora_rank=4, qk_nope_head_dim=8, v_head_dim=8, qk_rope_head_dim=4)
    model = Transformer(cfg).eval()
    out = run_probes(model, {"spectra": {"max_tokens": 256, "batch_size": 3}}, DATA, tmp_path, CPU)
    js = json.loads((tmp_path / "spectra.json").read_text())
    assert js["n_tokens"] == 256 and out["probe.spectra.n_tokens"] == 256 and js["center"] is False
    inputs = build_eval_sets(DATA)["lm"][0][:8]  # the probe's 256 tokens: 8 sequences of 32
    cache = _cached(model, inputs)
    for layer in range(cfg.n_layers):
        c_kv = cache[layer]["c_kv"].reshape(-1, 4)  # (N, d_c)
        k_rope = cache[layer]["k_rope"].reshape(-1, 4)  # (N, d_rope)
        sv = _json_sv(js, layer, "c_kv")
        assert len(sv) <= cfg.kv_lora_rank
        np.testing.assert_allclose(sv, torch.linalg.svdvals(c_kv.double()).numpy(), rtol=1e-5)
        np.testing.assert_allclose(_json_sv(js, layer, "k_rope"), torch.linalg.svdvals(k_rope.double()).numpy(), rtol=1e-5)
        w_uk, w_uv = (w.detach() for w in model.layers[layer].attn.w_uk_uv())  # (H, d, d_c) each
        for h in range(cfg.n_heads):  # per-head keys/values are the cached latent up-projected
            for name, w in (("k_nope", w_uk), ("v", w_uv)):
                ref = torch.linalg.svdvals((c_kv @ w[h].T).double()).numpy()
                np.testing.assert_allclose(_json_sv(js, layer, name, h), ref, rtol=1e-4, atol=1e-6 * ref[0])
        for name in ("k_nope", "v", "kv"):
            for head in js["layers"][layer]["activations"][name]["spectra"]:
                s = np.asarray(head["sv"])
                assert len(s) >= 8 and head["rank"] == 4, (layer, name, head["rank"])
                assert s[3] / s[0] > 1e-3 and np.all(s[4:] / s[0] < 1e-5)  # exactly d_c non-zero values
        kv_all = js["layers"][layer]["activations"]["kv_all"]["spectra"][0]
        assert kv_all["rank"] <= cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # weight spectra: W^UK of head 0 vs a direct SVD
        w_uk = model.layers[layer].attn.w_uk_uv()[0][0].detach().double()  # (d_nope, d_c)
        np.testing.assert_allclose(
            js["layers"][layer]["weights"]["w_uk"]["spectra"][0]["sv"], torch.linalg.svdvals(w_uk).numpy(), rtol=1e-9
        )
        assert out[f"probe.spectra.L{layer}.k_nope.r99"] <= 4
        for key in ("erank", "srank", "r90", "r95", "r99", "energy_r4"):
            assert math.isfinite(out[f"probe.spectra.L{layer}.c_kv.{key}"])
    assert 0 < out["probe.spectra.subspace.k_rope.mean_cos"] <= 1 + 1e-9
    for name in ("spectra_normalised.png", "spectra_r99_heatmap.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_spectra_probe_mha_centred_matches_cache(tmp_path):
    torch.manual_seed(1)
    cfg = tiny(attention="gqa", n_kv_heads=2)
    model = Transformer(cfg).eval()
    out = run_probes(model, {"spectra": {"max_tokens": 128, "center": True, "figures": False}}, DATA, tmp_path, CPU)
    js = json.loads((tmp_path / "spectra.json").read_text())
    assert js["center"] is True and out["probe.spectra.center"] is True
    cache = _cached(model, build_eval_sets(DATA)["lm"][0][:4])
    H, d = cfg.kv_heads, cfg.attn_head_dim
    for layer in range(cfg.n_layers):
        for name in ("k", "v"):
            x = cache[layer][name].reshape(-1, H, d).double()  # (N, H_kv, d_h)
            for h in range(H):
                xc = x[:, h] - x[:, h].mean(0)
                np.testing.assert_allclose(_json_sv(js, layer, name, h), torch.linalg.svdvals(xc).numpy(), rtol=1e-5, atol=1e-7)
        assert js["layers"][layer]["activations"]["kv_all"]["dim"] == 2 * H * d
        for name in ("k_all", "v_all"):  # every KV head side by side, as cached
            x = cache[layer][name[0]].reshape(-1, H * d).double()
            xc = x - x.mean(0)
            np.testing.assert_allclose(_json_sv(js, layer, name), torch.linalg.svdvals(xc).numpy(), rtol=1e-5, atol=1e-7)
        assert set(js["layers"][layer]["weights"]) == {"wk", "wv"}
    assert not list(tmp_path.glob("*.png"))


def test_layer_concatenations_have_the_known_spectra_of_constructed_keys_and_values():
    # x = U diag(s) with orthonormal U; wk reads coordinates 0..15 of x, wv 16..31 scaled by 3. So every KV head
    # side by side has singular values s[:16] (K pre-RoPE) and 3 s[16:] (V), [K_pre; V] their union (disjoint
    # coordinates of orthonormal columns), and RoPE (a rotation per token) keeps K's Frobenius norm.
    from mla_analysis.probes.spectra import attach

    cfg = tiny(attention="gqa", n_kv_heads=2)  # head_dim 8: K and V are 2 x 8 = 16 wide, [K; V] 32 = d_model
    model = Transformer(cfg).eval()
    attn = model.layers[0].attn
    s = np.geomspace(10.0, 0.1, 32)
    u, _ = torch.linalg.qr(torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = (u * torch.from_numpy(s)).float()  # (48, 32): column j is s_j times an orthonormal column
    with torch.no_grad():
        eye = torch.eye(32)
        attn.wk.weight.copy_(eye[:16])
        attn.wv.weight.copy_(3.0 * eye[16:])
    stats, handles = attach(model, max_joint_dim=64, names=("k_pre_all", "k_all", "v_all", "kv_pre_all"))
    cos, sin = model.rope(torch.arange(48))
    with torch.no_grad():
        attn(x[None], model.rope, cos, sin)  # (1, 48, 32): one sequence of 48 tokens
    for h in handles:
        h.remove()
    layer = stats[0].layer
    np.testing.assert_allclose(layer["k_pre_all"].spectrum(), s[:16], rtol=1e-4)
    np.testing.assert_allclose(layer["v_all"].spectrum(), 3.0 * s[16:], rtol=1e-4)
    joint = np.sort(np.concatenate((s[:16], 3.0 * s[16:])))[::-1]
    np.testing.assert_allclose(layer["kv_pre_all"].spectrum(), joint, rtol=1e-4)
    assert (layer["k_all"].spectrum() ** 2).sum() == pytest.approx((s[:16] ** 2).sum(), rel=1e-4)
    assert not np.allclose(layer["k_all"].spectrum(), s[:16], rtol=1e-2)  # RoPE does change the spectrum
    # closed forms on these spectra: p_i = s_i / sum s, erank = exp(-sum p log p); r90 by the cumulative energy
    p = s[:16] / s[:16].sum()
    assert effective_rank(layer["k_pre_all"].spectrum()) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    e = np.cumsum(joint**2) / (joint**2).sum()
    assert energy_rank(layer["kv_pre_all"].spectrum(), 0.9) == int(np.argmax(e >= 0.9)) + 1
    assert 1 - energy_at_rank(layer["kv_pre_all"].spectrum(), 8) == pytest.approx(1 - e[7], rel=1e-3)
    assert stats[0].heads == {} and "kv_all" not in layer  # only the tensors asked for are accumulated
    assert stats[1].layer == {}  # layer 1 was never called


def test_spectra_probe_rejects_nan(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(attention="mla"))
    with torch.no_grad():
        model.layers[1].attn.wkv_b.weight[0, 0] = float("nan")
    with pytest.raises(ProbeError, match=r"layer 1 .*wkv_b"):
        run_probes(model, {"spectra": {"max_tokens": 64}}, DATA, tmp_path, CPU)
    model = Transformer(tiny(attention="mha"))
    with torch.no_grad():
        model.embed.weight[:] = float("nan")  # activations, not attention weights
    with pytest.raises(ProbeError, match=r"layer 0 .*non-finite"):
        run_probes(model, {"spectra": {"max_tokens": 64}}, DATA, tmp_path, CPU)
    model = Transformer(tiny(attention="mha"))
    with torch.no_grad():
        model.layers[0].attn.wk.weight.fill_(1e38)  # finite weights, but the keys overflow to inf
    with pytest.raises(ProbeError, match=r"layer 0 k_pre has non-finite"):
        run_probes(model, {"spectra": {"max_tokens": 64}}, DATA, tmp_path, CPU)
    assert not (tmp_path / "spectra.json").exists()


def test_probe_params_are_checked(tmp_path):
    model = Transformer(tiny())
    with pytest.raises(ConfigError, match="probe.spectra.max_tokenz"):
        run_probes(model, {"spectra": {"max_tokenz": 1}}, DATA, tmp_path, CPU)
    with pytest.raises(ConfigError, match="probe.cost.dtypes"):
        run_probes(model, {"cost": {"dtypes": ["fp7"]}}, DATA, tmp_path, CPU)
    assert {"spectra", "cost"} <= set(PROBES)


# ---- cost probe -------------------------------------------------------------------------------


def test_published_configs_load_and_match_published_sizes():
    files = sorted(PUBLISHED_DIR.glob("*.json"))
    assert {f.stem for f in files} == {"deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "deepseek_67b", "llama2_7b", "qwen25_7b"}
    for f in files:
        ModelConfig.from_dict(json.loads(f.read_text()))  # raises on unknown keys or invalid values
    from mla_analysis.models.accounting import count_params, kv_elements_per_token_layer

    cfgs = load_all()
    expected_total_b = {"deepseek_v2": 236, "deepseek_v2_lite": 15.7, "deepseek_v3": 671, "deepseek_67b": 67,
                        "llama2_7b": 6.74, "qwen25_7b": 7.6}
    for name, total in expected_total_b.items():
        assert count_params(cfgs[name]) / 1e9 == pytest.approx(total, rel=0.02), name
    assert count_params(cfgs["deepseek_v2"], active=True) / 1e9 == pytest.approx(21, rel=0.03)
    assert count_params(cfgs["deepseek_v3"], active=True) / 1e9 == pytest.approx(37, rel=0.03)
    assert kv_elements_per_token_layer(cfgs["deepseek_v2"]) * 60 == 34560


def test_cost_probe_bytes_claim_and_decode_paths(tmp_path, monkeypatch):
    from mla_analysis.models.mla import MLA

    torch.manual_seed(0)
    model = Transformer(tiny(attention="mla", mla_decode="naive"))
    calls = {"_naive": 0, "_absorbed": 0}
    for fn in calls:  # count which decode path each cached forward takes
        orig = getattr(MLA, fn)

        def counted(self, *a, _orig=orig, _fn=fn, **k):
            calls[_fn] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(MLA, fn, counted)
    m = run_probes(model, {"cost": {"quick": True}}, DATA, tmp_path, CPU)
    assert calls["_naive"] > 0 and calls["_absorbed"] > 0
    m = {k.removeprefix("probe.cost."): v for k, v in m.items()}
    assert m["kv_bytes_per_token.fp32.analytic"] == m["kv_bytes_per_token.fp32.measured"] == (16 + 4) * 2 * 4
    assert m["kv_bytes_per_token.bf16.analytic"] == m["kv_bytes_per_token.bf16.measured"] == (16 + 4) * 2 * 2
    assert m["kv_bytes_per_token.match"] is True
    # DeepSeek-V2's 93.3% holds only with ~6-bit cache elements
    assert m["claim_93_3.ds67b_kv_bytes_per_token_bf16"] == 2 * 8 * 128 * 95 * 2
    assert m["claim_93_3.v2_kv_elements_per_token"] == (512 + 64) * 60
    assert round(m["claim_93_3.reduction_low_bit"], 3) == 0.933 and m["claim_93_3.low_bits"] == 6
    assert round(m["claim_93_3.reduction_bf16"], 3) == 0.822
    assert m["claim_93_3.holds_at_low_bit"] is True and m["claim_93_3.holds_at_bf16"] is False
    assert 6.0 < m["claim_93_3.bits_for_claim"] < 6.1 and "6 bits" in m["claim_93_3.assumption"]
    # both MLA decode paths on the same weights, with FLOPs from the accounting
    for path in ("naive", "absorb"):
        assert m[f"decode.{path}.S32.B1.step_ms"] > 0 and m[f"decode.{path}.S32.B1.tokens_per_s"] > 0
        assert m[f"prefill.{path}.S32.B1.ms"] > 0
    assert m["decode_flops_per_token.absorb.S32"] < m["decode_flops_per_token.naive.S32"]
    assert m["decode.absorb_vs_naive_max_abs_diff"] < 1e-4
    assert m["decode.path_configured"] == "naive"
    assert all(model.layers[i].attn.decode == "naive" for i in range(2))  # restored after timing both paths
    assert m["published.deepseek_v2.kv_bytes_per_token_bf16"] == 69120
    assert (tmp_path / "cost.png").read_bytes()[:8] == PNG_MAGIC
    rec = json.loads((tmp_path / "cost.json").read_text())
    assert set(rec["published"]) == set(load_all())


def test_cost_probe_mha(tmp_path):
    model = Transformer(tiny(attention="gqa", n_kv_heads=2))
    m = run_probes(model, {"cost": {"quick": True, "figures": False, "dtypes": ["bf16"]}}, DATA, tmp_path, CPU)
    assert m["probe.cost.kv_bytes_per_token.bf16.measured"] == 2 * 2 * 8 * 2 * 2
    assert "probe.cost.decode.cached.S32.B1.step_ms" in m and "probe.cost.decode.absorb_vs_naive_max_abs_diff" not in m


# ---- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_with_probes_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = [f"hydra.run.dir={out}", "train.steps=2", "train.eval_every=0", "data.eval_examples=8", "train.batch_size=4",
            "train.progress=false", "device=cpu", "model=mla", "probe=[spectra,cost]", "probe.spectra.max_tokens=256",
            "probe.cost.quick=true"]
    p = subprocess.run([sys.executable, "-m", "mla_analysis.run", *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "ok"
    m = rec["metrics"]
    assert any(k.startswith("probe.spectra.L0.c_kv.") for k in m) and m["probe.spectra.n_tokens"] == 256
    assert m["probe.cost.kv_bytes_per_token.match"] is True and "probe.cost.claim_93_3.reduction_low_bit" in m
    assert "probe_s" in rec["timings"]
    pngs = {f.name for f in out.glob("*.png")}
    assert {"spectra_normalised.png", "spectra_r99_heatmap.png", "cost.png"} <= pngs
    assert (out / "spectra.json").exists() and (out / "cost.json").exists()
