"""probe=experts: routing statistics on hand-made routings, and the probe end to end on a tiny MoE model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
from mla_analysis.config import ConfigError, tiny
from mla_analysis.models.moe import max_vio, routing_load
from mla_analysis.models.transformer import Transformer
from mla_analysis.probes import PROBES, run_probes
from mla_analysis.probes.experts import (
    coactivation,
    coactivation_counts,
    domain_specialisation,
    entropy,
    expert_label_mi,
    load_cv,
    load_fraction,
    mean_offdiag,
    mutual_information,
    rank_by_score,
    saturation,
    top_domain_share,
    vocab_specialisation,
)

from tests.helpers import CPU, PNG_MAGIC, mqar_data

DATA = mqar_data()


# ---- co-activation --------------------------------------------------------------------------------


def test_coactivation_all_pairs_both_directions_by_hand():
    # 3 tokens, E=4, k=3: S1={0,1,2}, S2={0,2,3}, S3={1,2,3}
    idx = torch.tensor([[0, 1, 2], [0, 2, 3], [1, 2, 3]])
    n = coactivation_counts(idx, 4)
    expected_n = torch.tensor(
        [[2, 1, 2, 1], [1, 2, 2, 1], [2, 2, 3, 2], [1, 1, 2, 2]], dtype=torch.float64
    )  # N(0,2)=2: the non-adjacent pair (0,2) of token 1 counts (adjacent-pair variant would give 1)
    torch.testing.assert_close(n, expected_n)
    co = coactivation(n)
    h, t, o = 0.5, 2 / 3, 1.0
    expected = torch.tensor(
        [[1, h, o, h], [h, 1, o, h], [t, t, 1, t], [h, h, o, 1]], dtype=torch.float64
    )  # row i: CoAct(i -> j) = N(i,j)/N(i); asymmetric: CoAct(0->2)=1, CoAct(2->0)=2/3
    torch.testing.assert_close(co, expected)
    assert mean_offdiag(co, n) == pytest.approx(8 / 12)


def test_coactivation_unused_expert_row_is_zero_and_excluded():
    idx = torch.tensor([[0, 1], [0, 1]])  # E=3, expert 2 never chosen
    n = coactivation_counts(idx, 3)
    co = coactivation(n)
    assert torch.all(co[2] == 0)
    # rows 0, 1: CoAct(0->1)=CoAct(1->0)=1, CoAct(0->2)=CoAct(1->2)=0 -> mean 0.5
    assert mean_offdiag(co, n) == pytest.approx(0.5)


# ---- load, MaxVio, CV, entropy --------------------------------------------------------------------


def test_load_maxvio_cv_by_hand():
    idx = torch.tensor([[0, 1], [0, 0]])  # counts [3, 1, 0, 0] over E=4 (a repeat only to shape the load)
    load = routing_load(idx, 4)
    assert load.tolist() == [3, 1, 0, 0]
    # mean = k*N/E = 4/4 = 1; MaxVio = (3 - 1)/1
    assert max_vio(load) == pytest.approx(2.0)
    # population std of [3,1,0,0] around 1: sqrt((4+0+1+1)/4)
    assert load_cv(load) == pytest.approx(math.sqrt(1.5))
    frac = load_fraction(idx, 4)
    torch.testing.assert_close(frac, torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64))
    assert float(entropy(frac)) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert load_cv(torch.ones(8)) == 0.0 and max_vio(torch.ones(8)) == 0.0


def test_token_entropy_normalises_affinities():
    s = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])  # sigmoid-like, not summing to 1
    torch.testing.assert_close(entropy(s), torch.tensor([math.log(4), 0.0], dtype=torch.float64))


# ---- domain specialisation and mutual information -------------------------------------------------


def test_domain_specialisation_by_hand():
    # E=4, k=2; domain 0: 2 tokens {0,1},{0,2}; domain 1: 1 token {0,3}
    idx = torch.tensor([[0, 1], [0, 2], [0, 3]])
    dom = torch.tensor([0, 0, 1])
    ds = domain_specialisation(idx, dom, 2, 4)
    expected = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(ds, expected)
    # each column sums to k (every token picks k experts)
    torch.testing.assert_close(ds.sum(0), torch.tensor([2.0, 2.0], dtype=torch.float64))
    # expert 0: 2/3 from domain 0; experts 1, 2, 3: all from one domain -> mean (2/3 + 3)/4
    assert top_domain_share(idx, dom, 2, 4) == pytest.approx((2 / 3 + 3) / 4)


def test_mi_perfect_split_is_log2_and_independent_is_zero():
    dom = torch.tensor([0, 0, 1, 1])
    split = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])  # domain 0 -> {0,1}, domain 1 -> {2,3}
    assert expert_label_mi(split, dom) == pytest.approx(math.log(2))
    split_k1 = torch.tensor([[0], [0], [1], [1]])
    assert expert_label_mi(split_k1, dom) == pytest.approx(math.log(2))
    indep = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])  # same expert distribution in both domains
    assert expert_label_mi(indep, dom) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_matches_sklearn_plugin():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(0)
    x = g.integers(0, 5, 400)
    y = (x + g.integers(0, 3, 400)) % 7
    assert mutual_information(torch.tensor(x), torch.tensor(y)) == pytest.approx(
        sklearn_metrics.mutual_info_score(x, y), rel=1e-9
    )


def test_vocab_specialisation_by_hand():
    # E=3, k=1; token 5 -> experts 0, 0, 1 (max share 2/3); token 7 -> expert 2 (share 1)
    idx = torch.tensor([[0], [0], [1], [2]])
    tok = torch.tensor([5, 5, 5, 7])
    assert vocab_specialisation(idx, tok, 3) == pytest.approx((2 / 3 + 1) / 2)


# ---- saturation -----------------------------------------------------------------------------------


def test_saturation_identical_and_partial_overlap():
    a = torch.tensor([[0, 1], [2, 3]])
    assert saturation(a, a, 1) == 1.0 and saturation(a, a, 2) == 1.0
    b = torch.tensor([[1, 0], [2, 4]])
    # k=2: token 1 same set (2/2), token 2 shares {2} (1/2) -> 0.75; k=1: 0 vs 1 differ, 2 vs 2 equal -> 0.5
    assert saturation(a, b, 2) == pytest.approx(0.75)
    assert saturation(a, b, 1) == pytest.approx(0.5)


def test_rank_by_score_orders_by_affinity():
    idx = torch.tensor([[0, 2], [1, 0]])
    s = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    assert rank_by_score(idx, s).tolist() == [[2, 0], [0, 1]]


# ---- end to end -----------------------------------------------------------------------------------


def test_probe_end_to_end_with_compare_to(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(ffn="moe")
    model = Transformer(cfg)
    ref_dir = tmp_path / "ref"
    save_model_config(ref_dir, cfg)
    save_checkpoint(ref_dir, model, None, step=1, state={})  # the same weights -> saturation 1
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    m = run_probes(model, {"experts": {"max_examples": 8, "batch_size": 4, "compare_to": str(ref_dir)}}, DATA, out_dir, CPU)
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    moe_idx = [i for i, b in enumerate(model.layers) if b.ffn.__class__.__name__ == "MoE"]
    assert moe_idx and m["probe.experts.n_moe_layers"] == len(moe_idx)
    assert m["probe.experts.n_tokens"] == 2 * 8 * 32  # "lm" + "mqar", 8 sequences of 32
    for li in moe_idx:
        pre = f"probe.experts.L{li}."
        loads = [m[f"{pre}load.e{e}"] for e in range(E)]
        assert sum(loads) == pytest.approx(1.0)
        for key in ("load_cv", "max_vio", "entropy_token", "entropy_load", "coact_mean_offdiag",
                    "mi_expert_domain", "mi_expert_token", "top_domain_share", "vocab_spec",
                    "domspec.lm.max", "domspec.mqar.max"):
            assert math.isfinite(m[pre + key]), key
        assert m[pre + "max_vio"] == pytest.approx((max(loads) - 1 / E) * E)
        assert 0 <= m[pre + "entropy_token"] <= math.log(E) + 1e-9
        assert m[pre + "sat_k1"] == 1.0 and m[pre + f"sat_k{k}"] == 1.0
    assert not model.moe_layers()[0].record_routing  # restored
    rec = json.loads((out_dir / "experts.json").read_text())
    assert rec["domains"] == ["lm", "mqar"] and len(rec["layers"]) == len(moe_idx)
    lay = rec["layers"][0]
    assert len(lay["coact"]) == E and len(lay["domspec"]["mqar"]) == E
    # domain specialisation columns sum to k; co-activation diagonal = expert token counts = load counts / 1
    assert sum(lay["domspec"]["lm"]) == pytest.approx(k)
    assert [lay["coact_counts"][i][i] for i in range(E)] == lay["load_counts"]
    for name in ("experts_load.png", "experts_coact.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_dense_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="probe.experts: model has no MoE layers"):
        PROBES["experts"](Transformer(tiny()), {}, DATA, tmp_path, CPU)


def test_unknown_param_is_a_config_error(tmp_path):
    model = Transformer(tiny(ffn="moe"))
    with pytest.raises(ConfigError, match="probe.experts.bogus"):
        run_probes(model, {"experts": {"bogus": 1}}, DATA, tmp_path, CPU)


# ---- expert redundancy (DeepSeekMoE Fig. 4) -------------------------------------------------------

import copy  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from mla_analysis.models.moe import routing_scores  # noqa: E402
from mla_analysis.probes.experts import (  # noqa: E402
    dense_neuron_fraction,
    dense_redundancy,
    dropped_energy,
    energy_routing_data,
    energy_routing_stats,
    eval_losses,
    ffn_neuron_activity,
    group_expert_mi,
    masked_top_experts,
    redundancy,
    top_neurons,
)


def _expert(moe, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e of a MoE applied to x [D], written out (reference for MoE.routed)."""
    return (F.silu(x @ moe.w1[e].T) * (x @ moe.w3[e].T)) @ moe.w2[e].T


def _brute_gate(gate, x: torch.Tensor, r: int):
    """DeepSeekMoE redundancy routing per token, by loops: drop the r highest unbiased affinities, take the
    top-k of (s + bias) among the rest, gate weights = the unmasked s (renormalised when norm_topk_prob)."""
    scores = routing_scores(x.float() @ gate.weight.float().T, gate.score_func)  # (N, E)
    weights, indices = [], []
    for s in scores:
        banned = set(torch.argsort(s, descending=True)[:r].tolist())
        choice = [(float(s[e] + gate.e_score_correction_bias[e]), e) for e in range(s.numel()) if e not in banned]
        sel = [e for _, e in sorted(choice, reverse=True)[: gate.topk]]
        w = s[sel]
        if gate.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * gate.route_scale)
        indices.append(torch.tensor(sel))
    return torch.stack(weights), torch.stack(indices), scores


@pytest.mark.parametrize("score_func,norm", [("softmax", False), ("sigmoid", True)])
def test_mask_top1_equals_removing_the_dominant_expert_by_hand(score_func, norm):
    torch.manual_seed(0)
    cfg = tiny(ffn="moe", n_layers=1, score_func=score_func, norm_topk_prob=norm, route_scale=2.5 if norm else 1.0)
    model = Transformer(cfg).eval()
    moe = model.layers[0].ffn
    E, k, D = cfg.n_routed_experts, cfg.n_activated_experts, cfg.d_model
    with torch.no_grad():
        moe.gate.weight[0].zero_()
        moe.gate.weight[0, 0] = 4.0  # expert 0 carries all the routing: x[0] >= 3 below
        moe.gate.e_score_correction_bias.copy_(0.01 * torch.randn(E))
    x = torch.randn(2, 16, D)
    x[..., 0] = 3.0 + x[..., 0].abs()
    xf = x.reshape(-1, D)
    s = routing_scores(xf @ moe.gate.weight.T, score_func)
    assert bool((s.argmax(-1) == 0).all())
    # reference: every token's output with expert 0 removed from its top-k, written out expert by expert
    ref = []
    with torch.no_grad():
        for t in range(xf.shape[0]):
            choice = s[t] + moe.gate.e_score_correction_bias
            choice[0] = float("-inf")
            sel = choice.topk(k).indices
            w = s[t, sel] / (s[t, sel].sum() if norm else 1.0) * cfg.route_scale
            ref.append(sum(w[j] * _expert(moe, int(e), xf[t]) for j, e in enumerate(sel)) + moe.shared_experts(xf[t]))
        ref = torch.stack(ref).view_as(x)
        with masked_top_experts(model, 1):
            got = moe(x)
        unmasked = moe(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (unmasked - ref).abs().max() > 1e-3  # expert 0 did contribute before
    assert moe.gate.mask_top_r == 0  # restored


class _BruteGate(torch.nn.Module):
    def __init__(self, gate, r: int):
        super().__init__()
        self.inner, self.r = gate, r

    def forward(self, x):
        return _brute_gate(self.inner, x, self.r)


def test_redundancy_losses_equal_a_model_with_a_brute_force_gate():
    torch.manual_seed(1)
    cfg = tiny(ffn="moe", first_k_dense_replace=1, n_layers=3)
    model = Transformer(cfg)
    sets = {name: (xy[0][:4], xy[1][:4]) for name, xy in __import__("mla_analysis.data", fromlist=["x"]).build_eval_sets(DATA).items()}
    res = redundancy(model, sets, [1, 3], batch_size=4, device=CPU)
    assert res["base"] == eval_losses(model, sets, 4, CPU)
    for r in (1, 3):
        ref_model = copy.deepcopy(model)
        for m in ref_model.moe_layers():
            m.gate = _BruteGate(m.gate, r)
        ref = eval_losses(ref_model, sets, 4, CPU)
        for name in sets:
            assert res["masked"][r][name]["loss"] == pytest.approx(ref[name]["loss"], rel=1e-5)
        assert res["masked"][r]["lm"]["loss"] != pytest.approx(res["base"]["lm"]["loss"], rel=1e-7)


def test_dense_ablation_equals_zeroed_w2_columns_and_activity_by_hand():
    torch.manual_seed(2)
    model = Transformer(tiny(d_ff=40))
    from mla_analysis.data import build_eval_sets

    sets = {name: (xy[0][:4], xy[1][:4]) for name, xy in build_eval_sets(DATA).items()}
    layers = [0, 1]
    act = ffn_neuron_activity(model, layers, sets, 4, CPU)
    # reference: the SwiGLU hidden silu(w1 h) * w3 h from the FFN's input h, captured by a forward hook
    inputs = {l: [] for l in layers}
    hooks = [model.layers[l].ffn.register_forward_hook(lambda mod, a, o, l=l: inputs[l].append(a[0].detach())) for l in layers]
    with torch.no_grad():
        for x, _ in sets.values():
            model(x)
    for h in hooks:
        h.remove()
    for l in layers:
        ffn = model.layers[l].ffn
        hid = torch.cat([F.silu(ffn.w1(h)) * ffn.w3(h) for h in inputs[l]]).reshape(-1, 40)
        torch.testing.assert_close(act[l], hid.abs().double().mean(0), rtol=1e-5, atol=1e-8)
    res = dense_redundancy(model, layers, sets, {1: 1 / 3, 2: 2 / 3}, 4, CPU)
    for r, f in {1: 1 / 3, 2: 2 / 3}.items():
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for l in layers:
                idx = torch.argsort(act[l], descending=True)[: round(f * 40)]
                ref_model.layers[l].ffn.w2.weight[:, idx] = 0.0
        assert res["n_zeroed"][r] == {0: round(f * 40), 1: round(f * 40)}
        ref = eval_losses(ref_model, sets, 4, CPU)
        for name in sets:
            assert res["masked"][r][name]["loss"] == pytest.approx(ref[name]["loss"], rel=1e-6)
    assert res["masked"][2]["lm"]["loss"] != pytest.approx(res["base"]["lm"]["loss"], rel=1e-6)


def test_dense_fraction_and_top_neurons():
    assert dense_neuron_fraction(1, 8, 2, 1, "active") == pytest.approx(1 / 3)
    assert dense_neuron_fraction(4, 8, 2, 1, "active") == 1.0  # clipped
    assert dense_neuron_fraction(2, 8, 2, 1, "routed") == pytest.approx(0.25)
    a = torch.tensor([0.1, 0.5, 0.5, 0.3], dtype=torch.float64)
    assert top_neurons(a, 0.5).tolist() == [1, 2]  # ties: lower index first
    assert top_neurons(a, 0.1).numel() == 0  # round(0.4) = 0


def test_redundancy_probe_end_to_end_with_dense_baseline(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(ffn="moe", attention="mla", first_k_dense_replace=1)
    model = Transformer(cfg)
    dense_cfg = tiny(attention="mla", d_ff=48)
    dense_dir = tmp_path / "dense"
    save_model_config(dense_dir, dense_cfg)
    save_checkpoint(dense_dir, Transformer(dense_cfg), None, step=1, state={})
    out = tmp_path / "run"
    params = {"max_examples": 8, "batch_size": 4, "dense_baseline": str(dense_dir), "redundancy_r": [1, 4],
              "permutation_resamples": 99}
    m = run_probes(model, {"experts": params}, DATA, out, CPU)
    pre = "probe.experts.redundancy."
    from mla_analysis.data import build_eval_sets

    sets = {name: (xy[0][:8], xy[1][:8]) for name, xy in build_eval_sets(DATA).items()}
    base = eval_losses(model, sets, 4, CPU)
    assert m[pre + "base.loss"] == pytest.approx(base["lm"]["loss"], rel=1e-6)
    with masked_top_experts(model, 4):
        r4 = eval_losses(model, sets, 4, CPU)
    assert m[pre + "r4.loss_delta"] == pytest.approx(r4["lm"]["loss"] - base["lm"]["loss"], abs=1e-6)
    assert m[pre + "r4.mqar.loss_delta"] == pytest.approx(r4["mqar"]["loss"] - base["mqar"]["loss"], abs=1e-6)
    assert m[pre + "r1.fraction"] == pytest.approx(1 / 8)
    assert m[pre + "dense.r1.neuron_fraction"] == pytest.approx(1 / 3)  # r / (k + n_shared) = 1/3
    assert math.isfinite(m[pre + "dense.r1.loss_delta"]) and math.isfinite(m[pre + "dense.r4.mqar.loss_delta"])
    assert m[pre + "active_params"] > 0 and m[pre + "dense.active_params"] > 0
    rec = json.loads((out / "experts.json").read_text())
    assert rec["redundancy"]["dense"]["n_zeroed"]["1"] == {"1": 16}  # round(48/3), MoE layers only (layer 1)
    assert (out / "experts_redundancy.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("params,key", [
    ({"redundancy_r": [7]}, "redundancy_r"),  # E - k = 6
    ({"redundancy_r": [0]}, "redundancy_r"),
    ({"dense_fraction": "all"}, "dense_fraction"),
    ({"energy_rank": 16}, "energy_rank"),  # = d_c: nothing is dropped
    ({"energy_quantile": 1.0}, "energy_quantile"),
    ({"dense_baseline": 3}, "dense_baseline"),
])
def test_bad_redundancy_and_energy_params(tmp_path, params, key):
    model = Transformer(tiny(ffn="moe", attention="mla"))
    with pytest.raises(ConfigError, match=rf"probe\.experts\.{key}"):
        run_probes(model, {"experts": {"max_examples": 2, "figures": False, **params}}, DATA, tmp_path, CPU)


def test_dense_baseline_with_moe_layers_is_a_config_error(tmp_path):
    cfg = tiny(ffn="moe")
    save_model_config(tmp_path / "moe", cfg)
    save_checkpoint(tmp_path / "moe", Transformer(cfg), None, step=1, state={})
    with pytest.raises(ConfigError, match=r"probe\.experts\.dense_baseline=.*MoE layers"):
        run_probes(Transformer(cfg), {"experts": {"max_examples": 2, "figures": False, "energy_rank": None,
                                                  "dense_baseline": str(tmp_path / "moe")}}, DATA, tmp_path, CPU)


# ---- low-rank K/V energy vs routing ---------------------------------------------------------------


def test_dropped_energy_matches_numpy_svd():
    g = np.random.default_rng(0)
    z = g.standard_normal((200, 12)) @ np.diag([5, 4, 3, 1, 1, 1, 0.5, 0.5, 0.2, 0.1, 0.1, 0.1])
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    ref = 1 - np.linalg.norm(z @ vt[:3].T, axis=1) ** 2 / np.linalg.norm(z, axis=1) ** 2
    got = dropped_energy(torch.tensor(z), torch.tensor(vt[:3].T)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert dropped_energy(torch.zeros(1, 12), torch.tensor(vt[:3].T)).item() == 0.0


def test_group_expert_mi_equals_plugin_mi_and_vectorises():
    g = np.random.default_rng(1)
    idx = torch.tensor(g.integers(0, 6, (300, 1)))
    idx = torch.cat([idx, (idx + 1) % 6], 1)  # k = 2 distinct experts
    lab = g.integers(0, 2, 300)
    from mla_analysis.probes.experts import membership

    member = membership(idx, 6).numpy()
    assert float(group_expert_mi(lab, member)) == pytest.approx(expert_label_mi(idx, torch.tensor(lab)), rel=1e-9)
    batch = np.stack([lab, 1 - lab, g.integers(0, 2, 300)])
    vec = group_expert_mi(batch, member)
    assert vec.shape == (3,) and vec[0] == pytest.approx(vec[1])  # swapping the labels leaves MI unchanged
    assert vec[2] == pytest.approx(expert_label_mi(idx, torch.tensor(batch[2])), rel=1e-9)


def _rigged_mla_moe(route_by: str) -> Transformer:
    """One MLA + MoE block whose K/V energy outside the top-2 latent directions grows with the token's
    class a = id // 16, and whose router picks experts {j, j+1} from a one-hot feature j: j = a
    (route_by="energy") or j = (id % 16) % 8, independent of a (route_by="other")."""
    torch.manual_seed(0)
    model = Transformer(tiny(attention="mla", ffn="moe", n_layers=1)).eval()
    V, D = 128, 32
    ids = torch.arange(V)
    a, b = ids // 16, (ids % 16) % 8
    theta = 2 * math.pi * torch.rand(V, generator=torch.Generator().manual_seed(0))
    emb = torch.zeros(V, D)
    emb[:, 0], emb[:, 1] = 3 * theta.cos(), 3 * theta.sin()  # dominant latent directions: little dropped
    emb[ids, 8 + a] = 2.0 * (a + 1) / 8  # energy outside them, growing with a
    emb[ids, 20 + b] = 1.0  # outside the latent (c_kv = x[:16]): routing feature only
    attn, gate = model.layers[0].attn, model.layers[0].ffn.gate
    with torch.no_grad():
        model.embed.weight.copy_(emb)
        attn.wkv_a.weight[:16].copy_(torch.eye(16, D))  # c_kv = RMSNorm(x[:16])
        attn.wkv_b.weight.copy_(torch.eye(16).repeat(4, 1))  # each head's [k_nope; v] = c_kv
        attn.wo.weight.zero_()  # the MoE sees the token's own features
        gate.weight.zero_()
        base = 8 if route_by == "energy" else 20
        for j in range(8):
            gate.weight[j, base + j] = 5.0
            gate.weight[(j + 1) % 8, base + j] = 2.0
    return model


def _energy_stats(model, seed: int, n_resamples: int = 199):
    x = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(seed))  # iid uniform ids
    d = energy_routing_data(model, [x], rank=2, batch_size=32, device=CPU)
    return x, d, energy_routing_stats(d["energy"][0], d["indices"][0], d["entropy"][0], 8, 0.75, n_resamples, seed)


def test_energy_routing_detects_routing_by_the_dropped_energy():
    model = _rigged_mla_moe("energy")
    x, d, st = _energy_stats(model, seed=0)
    # per-token energy against a brute-force SVD of the layer's per-head keys/values
    with torch.no_grad():
        h = model.layers[0].attn_norm(model.embed(x))
        z = model.layers[0].attn.wkv_b(model.layers[0].attn.kv_norm(h[..., :16])).reshape(-1, 64).double().numpy()
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    ref = 1 - np.linalg.norm(z @ vt[:2].T, axis=1) ** 2 / np.linalg.norm(z, axis=1) ** 2
    np.testing.assert_allclose(d["energy"][0], ref, atol=1e-9)
    # the dropped energy is (nearly) a function of the class a, increasing
    a = (x.reshape(-1) // 16).numpy()
    class_mean = [d["energy"][0][a == c].mean() for c in range(8)]
    assert all(np.diff(class_mean) > 0)
    assert st["mi"] > 0.1 and st["mi"] <= st["mi_max"] + 1e-12
    assert st["p_value"] <= 0.01  # 1/200 is the smallest p with 199 resamples
    assert st["entropy_diff"] < 0 and st["entropy_p_value"] <= 0.01  # larger feature -> sharper routing
    assert 0.2 <= st["high_fraction"] <= 0.45


def test_energy_routing_independent_router_gives_large_p():
    model = _rigged_mla_moe("other")
    ps = []
    for seed in (1, 2, 3):
        _, _, st = _energy_stats(model, seed)
        assert st["mi"] < 0.01
        ps.append(st["p_value"])
    assert min(ps) > 0.01 and np.mean(ps) > 0.15, ps  # p ~ Uniform(0, 1) under independence


def test_the_experts_package_keeps_the_public_names_of_the_old_module():
    import mla_analysis.probes.experts as experts
    from mla_analysis.probes import PROBES, check_probes

    old = ["check_model", "load_fraction", "load_cv", "entropy", "token_entropy_sum", "membership",
           "coactivation_counts", "coactivation", "mean_offdiag", "domain_counts", "domain_specialisation",
           "top_domain_share", "mutual_information", "expert_label_mi", "vocab_specialisation", "rank_by_score",
           "saturation", "masked_top_experts", "eval_losses", "redundancy", "dense_neuron_fraction",
           "ffn_neuron_activity", "zeroed_neurons", "top_neurons", "dense_redundancy", "kv_content", "kv_rank_bound",
           "dropped_energy", "energy_routing_data", "group_expert_mi", "energy_routing_stats", "run"]
    assert all(callable(getattr(experts, n)) for n in old) and set(old) <= set(experts.__all__)
    check_probes({"experts": {}}, tiny(ffn="moe"))  # registers the built-in probes
    assert PROBES["experts"] is experts.run
    with pytest.raises(ConfigError, match="probe.experts: model.ffn=dense"):  # its check_model is found
        check_probes({"experts": {}}, tiny())
