"""probe=experts: routing statistics on hand-made routings, and the probe end to end on a tiny MoE model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mla_analysis.checkpoint import save_checkpoint, save_model_config
from mla_analysis.config import ConfigError, tiny
from mla_analysis.data import DataConfig
from mla_analysis.data.tasks import MQARConfig
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

CPU = torch.device("cpu")
DATA = DataConfig(vocab_size=128, seq_len=32, eval_examples=8, eval_tasks=["mqar"], mqar=MQARConfig(num_kv_pairs=2))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
