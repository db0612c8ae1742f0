"""probe=head_ablation: head ablation against zeroed wo columns, key spectra against SVD, Spearman/bootstrap."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from mla_analysis.config import ConfigError, tiny
from mla_analysis.data import build_eval_sets
from mla_analysis.models.transformer import Transformer
from mla_analysis.probes import run_probes
from mla_analysis.probes.head_ablation import (
    _spearman_vec,
    ablated_heads,
    ablation_effects,
    correlate_runs,
    head_keys,
    head_width,
    key_grams,
    main,
    spearman_ci,
)
from mla_analysis.probes.spectra import _features

from tests.helpers import mqar_data

DATA = mqar_data()
from tests.helpers import CPU, PNG_MAGIC

VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mla": dict(attention="mla"),
    "mla_coupled_rope": dict(attention="mla_coupled_rope"),
}


def _ids(n=4, seed=0):
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


# ---- ablation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hook_ablation_equals_a_copy_with_the_heads_wo_columns_zeroed(variant):
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    x = _ids()
    layer, head = 1, 2
    ref_model = copy.deepcopy(model)
    d = head_width(model.layers[layer].attn)
    with torch.no_grad():
        ref_model.layers[layer].attn.wo.weight[:, head * d : (head + 1) * d] = 0.0
        ref = ref_model(x)
        with ablated_heads(model, {layer: [head]}):
            got = model(x)
        plain = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (plain - ref).abs().max() > 1e-4  # the head mattered, and the hook is gone afterwards
    assert not model.layers[layer].attn.wo._forward_pre_hooks


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_ablating_a_head_whose_wo_slice_is_zero_changes_nothing(variant):
    torch.manual_seed(1)
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    d = head_width(model.layers[0].attn)
    with torch.no_grad():
        model.layers[0].attn.wo.weight[:, 1 * d : 2 * d] = 0.0
        x = _ids()
        before = model(x)
        with ablated_heads(model, {0: [1]}):
            after = model(x)
    assert torch.equal(before, after)
    sets = {n: (a[:4], b[:4]) for n, (a, b) in build_eval_sets(DATA).items()}
    base, effects = ablation_effects(model, sets, [0], 4, CPU)
    assert effects[(0, 1)]["delta_loss"] == 0.0 and effects[(0, 1)]["delta_error"] == 0.0
    assert effects[(0, 1)]["delta_token_error"] == 0.0
    assert any(abs(effects[(0, h)]["delta_loss"]) > 0 for h in (0, 2, 3))


# ---- key spectra ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gqa", "mla", "mla_coupled_rope"])
def test_head_keys_and_ner_against_spectra_features_and_numpy_svd(variant):
    torch.manual_seed(2)
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    x = _ids(6)
    got, ref = {}, {}

    def hook(module, args, kwargs, output):
        a = dict(zip(("x", "rope", "cos", "sin"), args))
        got["k"] = head_keys(module, a["x"], a["rope"], a["cos"], a["sin"])
        layer, heads, _ = _features(module, a["x"], a["rope"], a["cos"], a["sin"])
        if "k_nope" in heads:  # MLA: [W^UK_h c_kv ; k_rope]
            H = heads["k_nope"].shape[2]
            ref["k"] = torch.cat((heads["k_nope"], layer["k_rope"][:, :, None, :].expand(-1, -1, H, -1)), -1)
        elif module.__class__.__name__ == "Attention":  # query head h attends with K/V head h // group
            ref["k"] = heads["k"][:, :, torch.arange(module.n_heads) // (module.n_heads // module.n_kv_heads)]
        else:
            ref["k"] = heads["k"]

    h = model.layers[1].attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(x)
    h.remove()
    torch.testing.assert_close(got["k"], ref["k"])
    grams = key_grams(model, x, [1], 3, CPU)
    for head, acc in enumerate(grams[1]):
        rows = ref["k"][:, :, head].reshape(-1, acc.dim).double().numpy()
        sv = np.linalg.svd(rows, compute_uv=False)
        np.testing.assert_allclose(acc.spectrum(), sv, rtol=1e-6, atol=1e-9)


# ---- correlation ------------------------------------------------------------------------------------


def test_spearman_vec_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = np.random.default_rng(0)
    x = g.integers(0, 5, (4, 12)).astype(float)  # ties
    y = x + g.integers(0, 3, (4, 12))
    got = _spearman_vec(x, y)
    for i in range(4):
        assert got[i] == pytest.approx(spearmanr(x[i], y[i]).statistic, rel=1e-12)
    assert math.isnan(_spearman_vec(np.ones(5), np.arange(5.0)))


def test_spearman_ci_on_known_monotone_relations():
    x = np.linspace(0.1, 1.0, 30)
    exact = spearman_ci(x, np.exp(3 * x), n_resamples=199)
    assert exact["rho"] == pytest.approx(1.0)
    assert exact["ci_low"] == pytest.approx(1.0) and exact["ci_high"] == pytest.approx(1.0)  # degenerate -> percentile
    assert exact["ci_method"].startswith("percentile")
    g = np.random.default_rng(1)
    noisy = spearman_ci(x, x**2 + g.normal(0, 0.05, x.size), n_resamples=499)
    assert noisy["rho"] > 0.8 and noisy["ci_method"] == "BCa"
    assert 0 < noisy["ci_low"] < noisy["rho"] < noisy["ci_high"] <= 1
    dec = spearman_ci(x, -x + g.normal(0, 0.05, x.size), n_resamples=499)
    assert dec["rho"] < -0.8 and dec["ci_high"] < 0
    assert spearman_ci([1, 2], [3, 4]) is None and spearman_ci([1, 1, 1], [1, 2, 3]) is None


def _write_run(path, ner, err):
    path.mkdir(parents=True)
    heads = [{"layer": 0, "head": i, "ner": float(a), "energy_dropped": 1 - float(a), "delta_error": float(b)}
             for i, (a, b) in enumerate(zip(ner, err))]
    (path / "head_ablation.json").write_text(json.dumps({"heads": heads}))


def test_correlate_runs_pools_runs(tmp_path, capsys):
    from scipy.stats import spearmanr

    g = np.random.default_rng(2)
    ner = [g.uniform(0.2, 0.9, 8) for _ in range(3)]
    err = [0.5 * a + g.normal(0, 0.03, a.size) for a in ner]  # monotone in ner, plus noise
    dirs = []
    for i, (a, b) in enumerate(zip(ner, err)):
        dirs.append(tmp_path / f"run{i}")
        _write_run(dirs[-1], a, b)
    res = correlate_runs(dirs, n_resamples=499, figure_path=tmp_path / "pooled.png")
    assert res["n"] == 24 and [r["n_heads"] for r in res["runs"]] == [8, 8, 8]
    assert res["rho"] == pytest.approx(spearmanr(np.concatenate(ner), np.concatenate(err)).statistic)
    assert res["rho"] > 0.8 and res["ci_low"] > 0  # the CI excludes 0
    assert (tmp_path / "pooled.png").read_bytes()[:8] == PNG_MAGIC
    neg = correlate_runs(dirs, metric="energy_dropped", n_resamples=199)
    assert neg["rho"] == pytest.approx(-res["rho"])
    main([str(d) for d in dirs] + ["--resamples", "99"])
    assert "rho = " in capsys.readouterr().out
    with pytest.raises(ValueError, match="missing/head_ablation.json"):
        correlate_runs([tmp_path / "missing"])
    with pytest.raises(ValueError, match="effect="):
        correlate_runs(dirs, effect="accuracy")


# ---- the probe --------------------------------------------------------------------------------------


def test_probe_end_to_end_mla(tmp_path):
    torch.manual_seed(3)
    cfg = tiny(attention="mla")
    model = Transformer(cfg)
    m = run_probes(model, {"head_ablation": {"max_examples": 8, "batch_size": 8, "bootstrap_resamples": 99}}, DATA, tmp_path, CPU)
    pre = "probe.head_ablation."
    assert m[pre + "n_heads"] == cfg.n_layers * cfg.n_heads
    rec = json.loads((tmp_path / "head_ablation.json").read_text())
    assert len(rec["heads"]) == cfg.n_layers * cfg.n_heads
    dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    for h in rec["heads"]:
        assert h["dim"] == dim and 1 / dim <= h["ner"] <= 1 and 0 <= h["energy_dropped"] <= 1
        assert h["ner"] == pytest.approx(h["erank"] / dim)
        assert m[f"{pre}L{h['layer']}.h{h['head']}.delta_loss"] == h["delta_loss"]
    c = rec["correlations"]["ner.delta_loss"]
    assert m[pre + "spearman.ner.delta_loss.rho"] == c["rho"] and c["ci_low"] <= c["rho"] <= c["ci_high"]
    assert (tmp_path / "head_ablation_scatter.png").read_bytes()[:8] == PNG_MAGIC
    # the records feed correlate_runs directly
    assert correlate_runs([tmp_path], effect="delta_loss", n_resamples=99)["rho"] == pytest.approx(c["rho"])


@pytest.mark.parametrize("params,key", [
    ({"rank": 0}, "rank"),
    ({"layers": [5]}, "layers"),
    ({"layers": []}, "layers"),
    ({"confidence_level": 1.0}, "confidence_level"),
    ({"center": "yes"}, "center"),
    ({"bootstrap_resamples": -1}, "bootstrap_resamples"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_params_are_config_errors(tmp_path, params, key):
    with pytest.raises(ConfigError, match=rf"probe\.head_ablation\.{key}"):
        run_probes(Transformer(tiny()), {"head_ablation": params}, DATA, tmp_path, CPU)
