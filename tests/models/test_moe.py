"""DeepSeekMoE layer: parity with the Hugging Face DeepSeek-V2/V3 MoE blocks, routing invariants,
hand-computed balance losses, auxiliary-loss-free bias, capacity dropping and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mla_analysis.config import tiny
from mla_analysis.models.mlp import SwiGLU
from mla_analysis.models.moe import (
    MoE,
    capacity_keep_mask,
    comm_balance_loss,
    device_balance_loss,
    device_frequency,
    expert_balance_loss,
    expert_frequency,
    group_limited_mask,
    max_vio,
    mean_affinity,
    routing_load,
)

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE  # noqa: E402


# ---- helpers -------------------------------------------------------------------------------------------


def _randomise_hf(hf: torch.nn.Module, gen: torch.Generator, router_std: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in hf.named_parameters():
            std = router_std if name == "gate.weight" else 0.2  # HF inits the router to zeros -> ties
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _copy_hf_into_ours(hf: torch.nn.Module, ours: MoE) -> None:
    inter = ours.moe_inter_dim
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        if hasattr(hf.gate, "e_score_correction_bias"):
            ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        gate_up = hf.experts.gate_up_proj  # [E, 2I, D] = cat(w1, w3)
        ours.w1.copy_(gate_up[:, :inter])
        ours.w3.copy_(gate_up[:, inter:])
        ours.w2.copy_(hf.experts.down_proj)  # [E, D, I]
        ours.shared_experts.w1.weight.copy_(hf.shared_experts.gate_proj.weight)
        ours.shared_experts.w3.weight.copy_(hf.shared_experts.up_proj.weight)
        ours.shared_experts.w2.weight.copy_(hf.shared_experts.down_proj.weight)


def _naive_moe(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: sum_k g_k * expert_{i_k}(x_t) + shared(x_t)."""
    x_flat = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(x_flat.shape[0]):
        y = torch.zeros_like(x_flat[t])
        for g, e in zip(weights[t], indices[t]):
            h = F.silu(moe.w1[e] @ x_flat[t]) * (moe.w3[e] @ x_flat[t])
            y = y + g * (moe.w2[e] @ h)
        rows.append(y)
    out = torch.stack(rows).view_as(x)
    return out + moe.shared_experts(x) if moe.shared_experts is not None else out


def _moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(tiny(ffn="moe", **overrides))


# ---- parity with the references -----------------------------------------------------------------------


def test_swiglu_vs_hf_deepseek_v3_mlp():
    cfg = transformers.DeepseekV3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4)
    hf = DeepseekV3MLP(cfg)
    ours = SwiGLU(32, 48)
    with torch.no_grad():
        ours.w1.weight.copy_(hf.gate_proj.weight)
        ours.w3.weight.copy_(hf.up_proj.weight)
        ours.w2.weight.copy_(hf.down_proj.weight)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-5)


def test_moe_vs_hf_deepseek_v3():
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=16, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    gen = torch.Generator().manual_seed(0)
    hf = DeepseekV3MoE(hf_cfg)
    _randomise_hf(hf, gen)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.2)
    ours = MoE(tiny(
        ffn="moe", d_model=32, n_routed_experts=8, n_group=4, topk_group=2, n_activated_experts=2,
        n_shared_experts=1, moe_d_ff=16, norm_topk_prob=True, route_scale=2.5, score_func="sigmoid",
    ))
    _copy_hf_into_ours(hf, ours)
    x = torch.randn(3, 16, 32, generator=gen)

    # routing decision itself (HF returns unsorted top-k)
    _, hf_w, hf_i = hf.gate(x)
    w, i, s = ours.gate(x.view(-1, 32))
    hf_i, hf_order = hf_i.sort(dim=-1)
    i, order = i.sort(dim=-1)
    torch.testing.assert_close(i, hf_i)
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, hf_order), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s, (x.view(-1, 32) @ hf.gate.weight.T).sigmoid(), atol=1e-6, rtol=1e-5)

    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = hf(x_hf)
    for mode in (ours.eval, ours.train):  # no dropping / losses configured: train == eval == HF
        mode()
        torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)

    # gradients match too (router gets its gradient through the gate weights)
    probe = torch.randn(ref.shape, generator=gen)
    (ours(x_ours) * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.gate.weight.grad, hf.gate.weight.grad, atol=1e-5, rtol=1e-4)
    gu = hf.experts.gate_up_proj.grad
    torch.testing.assert_close(torch.cat([ours.w1.grad, ours.w3.grad], dim=1), gu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.w2.grad, hf.experts.down_proj.grad, atol=1e-5, rtol=1e-4)

    # the example is strong enough to catch a missing bias or a missing group limit
    with torch.no_grad():
        expected = ref.detach()
        bias = ours.gate.e_score_correction_bias.clone()
        ours.gate.e_score_correction_bias.zero_()
        assert not torch.allclose(ours(x), expected, atol=1e-3)
        ours.gate.e_score_correction_bias.copy_(bias)
        ours.gate.n_groups = 1
        assert not torch.allclose(ours(x), expected, atol=1e-3)


@pytest.mark.parametrize(
    "topk_method,n_group,topk_group,scale",
    [("greedy", 1, 1, 1.0), ("greedy", 1, 1, 16.0), ("group_limited_greedy", 4, 2, 16.0),
     ("group_limited_greedy", 4, 1, 1.0)],
)
def test_moe_vs_hf_deepseek_v2(topk_method, n_group, topk_group, scale):
    n_experts, k = 16, 3
    hf_cfg = transformers.DeepseekV2Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4,
        n_routed_experts=n_experts, num_experts_per_tok=k, n_shared_experts=2, moe_intermediate_size=16,
        topk_method=topk_method, n_group=n_group if n_group > 1 else None,
        topk_group=topk_group if n_group > 1 else None, routed_scaling_factor=scale, norm_topk_prob=False,
    )
    gen = torch.Generator().manual_seed(1)
    hf = DeepseekV2Moe(hf_cfg)
    _randomise_hf(hf, gen)
    ours = MoE(tiny(
        ffn="moe", d_model=32, n_routed_experts=n_experts, n_activated_experts=k, n_shared_experts=2,
        moe_d_ff=16, score_func="softmax", norm_topk_prob=False, route_scale=scale,
        n_group=n_group, topk_group=topk_group,
    ))
    _copy_hf_into_ours(hf, ours)
    x = torch.randn(2, 24, 32, generator=gen)
    with torch.no_grad():
        ref = hf(x)
        torch.testing.assert_close(ours.eval()(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.train()(x), ref, atol=1e-5, rtol=1e-5)
        if n_group > 1:  # the group score is the max affinity (V2), not V3's top-2 sum, and it binds
            ours.gate.n_groups = 1
            assert not torch.allclose(ours(x), ref, atol=1e-3)
            ours.gate.n_groups = n_group
            s = ours.gate(x.view(-1, 32))[2]
            top2 = group_limited_mask(s, n_group, topk_group, "sigmoid")
            assert not torch.equal(top2, group_limited_mask(s, n_group, topk_group, "softmax"))


def test_moe_vs_naive_per_token_loop():
    moe = _moe(n_routed_experts=8, n_activated_experts=3, n_shared_experts=2, score_func="softmax")
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        w, i, _ = moe.gate(x.view(-1, 32))
        torch.testing.assert_close(moe(x), _naive_moe(moe, x, w, i), atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("tokens", [2, 23])  # 2 tokens x top-3 of 8 leaves experts without tokens
def test_moe_grouped_mm_vs_naive_per_token_loop(tokens):
    """The grouped-GEMM expert path (CUDA's default in bf16) computes what the per-expert loop does,
    forward and backward; on CPU in fp32 torch runs the same grouped_mm op with its reference kernel."""
    moe = _moe(n_routed_experts=8, n_activated_experts=3, n_shared_experts=1, score_func="sigmoid")
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        w, i, _ = moe.gate(x.view(-1, 32))
    assert len(set(i.flatten().tolist())) < 8 or tokens > 2
    grads = {}
    for grouped in (False, True):
        moe.grouped_mm = grouped
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = moe(xg)
        if grouped:
            with torch.no_grad():
                torch.testing.assert_close(y, _naive_moe(moe, x, w, i), atol=1e-6, rtol=1e-5)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads[grouped] = [xg.grad] + [p.grad for p in (moe.w1, moe.w3, moe.w2, moe.gate.weight)]
    for got, ref in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_moe_grouped_mm_default_only_on_cuda_bf16():
    moe = _moe(n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(5, 32)
    assert not moe.use_grouped_mm(x) and not moe.use_grouped_mm(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not moe.use_grouped_mm(x)  # CPU: the loop (measured as fast; grouped_mm has no fast CPU kernel)
    moe.grouped_mm = True
    assert moe.use_grouped_mm(x)

# ---- routing invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_each_token_gets_topk_distinct_routed_experts_plus_shared(score_func):
    moe = _moe(n_routed_experts=16, n_activated_experts=4, score_func=score_func)
    x = torch.randn(3, 20, 32)
    w, i, s = moe.gate(x.view(-1, 32))
    assert i.shape == w.shape == (60, 4) and s.shape == (60, 16)
    assert all(len(set(row.tolist())) == 4 for row in i)
    assert int(i.min()) >= 0 and int(i.max()) < 16
    # the selected experts are the k best by affinity (no bias, no groups)
    torch.testing.assert_close(i.sort(-1)[0], s.topk(4, -1)[1].sort(-1)[0])
    # shared expert is always on: with the routed experts silenced every token still gets shared(x)
    with torch.no_grad():
        moe.w2.zero_()
        out = moe(x)
    torch.testing.assert_close(out, moe.shared_experts(x))
    assert (out.abs().sum(-1) > 0).all()
    assert _moe(n_shared_experts=0).shared_experts is None


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_selection_uses_only_topk_group_groups(score_func):
    n_exp, n_group, topk_group, k = 16, 4, 2, 4
    moe = _moe(n_routed_experts=n_exp, n_group=n_group, topk_group=topk_group, n_activated_experts=k,
               score_func=score_func)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.5)
        moe.gate.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(64, 32)
    _, idx, s = moe.gate(x)
    biased = (s + moe.gate.e_score_correction_bias).view(64, n_group, n_exp // n_group)  # [N, G, E/G]
    if score_func == "softmax":
        group_score = biased.amax(-1)
    else:
        group_score = biased.topk(2, -1)[0].sum(-1)
    best_groups = group_score.topk(topk_group, -1)[1].sort(-1)[0]  # [N, topk_group]
    used = idx // (n_exp // n_group)
    for t in range(64):
        assert set(used[t].tolist()) <= set(best_groups[t].tolist())
        allowed = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in best_groups[t].tolist()])
        expected = allowed[biased.view(64, -1)[t, allowed].topk(k)[1]]
        assert sorted(idx[t].tolist()) == sorted(expected.tolist())
    # the limit binds: unrestricted top-k would have used more than topk_group groups for some tokens
    free = (s + moe.gate.e_score_correction_bias).topk(k, -1)[1] // (n_exp // n_group)
    assert any(len(set(row.tolist())) > topk_group for row in free)


def test_mask_top_r_excludes_best_experts():
    moe = _moe(n_routed_experts=8, n_activated_experts=2)
    moe.gate.mask_top_r = 1
    _, idx, s = moe.gate(torch.randn(40, 32))
    assert not (idx == s.argmax(-1, keepdim=True)).any()
    torch.testing.assert_close(idx.sort(-1)[0], s.topk(3, -1)[1][:, 1:].sort(-1)[0])


# ---- balance losses --------------------------------------------------------------------------------------

# 2 sequences x 2 tokens, E = 4, k = 2, 2 devices {0,1},{2,3}; rows sum to 1 (softmax-like)
_SCORES = torch.tensor([
    [0.50, 0.25, 0.15, 0.10],  # seq 0, t0 -> {0, 1}
    [0.40, 0.10, 0.30, 0.20],  # seq 0, t1 -> {0, 2}
    [0.10, 0.10, 0.40, 0.40],  # seq 1, t0 -> {2, 3}
    [0.10, 0.60, 0.10, 0.20],  # seq 1, t1 -> {1, 3}
])
_INDICES = torch.tensor([[0, 1], [0, 2], [2, 3], [1, 3]])
# by hand: seq0 f=[2,1,1,0] P=[.45,.175,.225,.15] -> 1.30; seq1 f=[0,1,1,2] P=[.1,.35,.25,.3] -> 1.20
_EXP_SEQ, _EXP_BATCH = 1.25, 1.0
# devices: seq0 f'=[1.5,.5] P'=[.625,.375] -> 1.125; seq1 f'=[.5,1.5] P'=[.45,.55] -> 1.05; batch f'=[1,1]
_DEV_SEQ, _DEV_BATCH = 1.0875, 1.0
# comm (M=2): seq0 sent=[2,1] f''=[1,.5] -> .8125; seq1 sent=[1,2] f''=[.5,1] -> .775; batch f''=[.75,.75]
_COMM_SEQ, _COMM_BATCH = 0.79375, 0.75


def test_balance_losses_vs_hand_computed():
    per_seq_s, per_seq_i = _SCORES.view(2, 2, 4), _INDICES.view(2, 2, 2)
    f = expert_frequency(per_seq_i, 4)
    p = mean_affinity(per_seq_s)
    torch.testing.assert_close(f, torch.tensor([[2.0, 1, 1, 0], [0, 1, 1, 2]]))
    torch.testing.assert_close(p, torch.tensor([[0.45, 0.175, 0.225, 0.15], [0.1, 0.35, 0.25, 0.3]]))
    assert expert_balance_loss(f, p).item() == pytest.approx(_EXP_SEQ)
    assert device_balance_loss(f, p, 2).item() == pytest.approx(_DEV_SEQ)
    f_comm = device_frequency(per_seq_i, 4, 2, m=2)
    torch.testing.assert_close(f_comm, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert comm_balance_loss(f_comm, p, 2).item() == pytest.approx(_COMM_SEQ)

    batch_s, batch_i = _SCORES.view(1, 4, 4), _INDICES.view(1, 4, 2)
    f_b, p_b = expert_frequency(batch_i, 4), mean_affinity(batch_s)
    assert expert_balance_loss(f_b, p_b).item() == pytest.approx(_EXP_BATCH)
    assert device_balance_loss(f_b, p_b, 2).item() == pytest.approx(_DEV_BATCH)
    assert comm_balance_loss(device_frequency(batch_i, 4, 2, 2), p_b, 2).item() == pytest.approx(_COMM_BATCH)


@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_balance_loss_vs_hand_computed(seq_aux, score_func):
    alphas = dict(aux_alpha=0.1, device_alpha=0.01, comm_alpha=0.001)
    moe = _moe(n_routed_experts=4, n_activated_experts=2, n_devices=2, seq_aux=seq_aux,
               score_func=score_func, **alphas)
    assert moe.comm_m == 2
    scores, indices = _SCORES, _INDICES
    if score_func == "sigmoid":
        # V3: P uses s / sum_j s_j, so per-token rescaled sigmoid scores give the same hand values ...
        scores = _SCORES * torch.tensor([[0.5], [1.7], [0.9], [2.2]])
        # ... and f_i counts the UNBIASED top-k, even when the bias made the router pick other experts
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
        indices = torch.tensor([[0, 3], [0, 3], [2, 3], [1, 3]])
    exp, dev, comm = (_EXP_SEQ, _DEV_SEQ, _COMM_SEQ) if seq_aux else (_EXP_BATCH, _DEV_BATCH, _COMM_BATCH)
    expected = 0.1 * exp + 0.01 * dev + 0.001 * comm
    assert moe.balance_loss(scores, indices, batch=2).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_set_in_training_only_and_differentiable():
    moe = _moe(aux_alpha=0.01, device_alpha=0.05, comm_alpha=0.02, n_devices=4, n_group=4, topk_group=2)
    assert moe.comm_m == 2  # device-limited routing: M = topk_group (<= k)
    x = torch.randn(2, 16, 32)
    moe.train()(x)
    assert moe.aux_loss.item() > 0
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        moe.eval()(x)
    assert moe.aux_loss.item() == 0.0
    plain = _moe().train()
    plain(x)
    assert plain.aux_loss.item() == 0.0 and plain.aux_loss.ndim == 0


# ---- aux-loss-free balancing and MaxVio -----------------------------------------------------------------


def test_max_vio_vs_hand_computed():
    assert max_vio(torch.tensor([4.0, 2.0, 1.0, 1.0])) == pytest.approx(1.0)  # mean 2, max 4
    assert max_vio(torch.tensor([3.0, 3.0, 3.0])) == 0.0
    torch.testing.assert_close(routing_load(torch.tensor([[0, 1], [0, 3]]), 4), torch.tensor([2.0, 1, 0, 1]))


@pytest.mark.parametrize("score_func,speed", [("sigmoid", 0.01), ("softmax", 0.003)])
def test_bias_update_drives_max_vio_down(score_func, speed):
    # softmax affinities of the non-favoured experts are ~0.01 apart, so it needs a finer step
    moe = _moe(n_routed_experts=8, n_activated_experts=2, score_func=score_func, bias_update_speed=speed)
    u = F.normalize(torch.randn(32), dim=0)
    x = torch.randn(8, 32, 32) * 0.5 + u  # every token shares direction u ...
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.3)
        moe.gate.weight[0] += 4 * u  # ... which the router maps onto expert 0
    moe.train()
    vios = []
    with torch.no_grad():
        for _ in range(300):
            moe(x)
            vios.append(max_vio(moe.last_load))
            moe.update_bias()
    assert vios[0] > 2.0  # expert 0 takes most tokens (MaxVio 3 = every token)
    assert sum(vios[-20:]) / 20 < 0.25 * vios[0]
    assert moe.gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down
    assert "gate.e_score_correction_bias" in moe.state_dict()


def test_update_bias_rule_and_noop():
    moe = _moe(n_routed_experts=4, n_activated_experts=1, bias_update_speed=0.1)
    moe._load_since_update = torch.tensor([5.0, 1.0, 2.0, 0.0])  # mean 2
    moe.update_bias()
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))
    # loads accumulate over forwards (gradient accumulation) until the next update
    x = torch.randn(1, 8, 32)
    moe.train()
    moe(x)
    first = moe.last_load.clone()
    moe(x)
    torch.testing.assert_close(moe._load_since_update, 2 * first)
    off = _moe(bias_update_speed=0.0).train()
    off(x)
    off.update_bias()
    assert (off.gate.e_score_correction_bias == 0).all()


# ---- capacity dropping -------------------------------------------------------------------------------------


def test_capacity_keep_mask_vs_hand_computed():
    # E=4 on 2 devices, k=1, N=4, cf=1 -> budget ceil(4/2)=2; device 0 gets t0 (.9), t1 (.2), t2 (.5)
    idx = torch.tensor([[0], [1], [0], [2]])
    aff = torch.tensor([[0.9], [0.2], [0.5], [0.7]])
    keep = capacity_keep_mask(idx, aff, 4, 2, 1.0)
    assert keep.view(-1).tolist() == [True, False, True, True]
    # k=2, N=3 -> budget ceil(6/2)=3; device 1 gets .4 .3 .6 .1 -> .1 goes; the lowest overall (.05)
    # sits on the under-loaded device 0 and stays
    idx = torch.tensor([[2, 3], [3, 0], [2, 1]])
    aff = torch.tensor([[0.4, 0.3], [0.6, 0.2], [0.1, 0.05]])
    assert capacity_keep_mask(idx, aff, 4, 2, 1.0).tolist() == [[True, True], [True, True], [False, True]]
    # capacity factor 2 -> budget 6: nothing dropped
    assert capacity_keep_mask(idx, aff, 4, 2, 2.0).all()


def test_capacity_dropping_lowest_affinity_in_training_only():
    cf, n_dev = 1.0, 4
    moe = _moe(n_routed_experts=8, n_activated_experts=2, n_devices=n_dev, capacity_factor=cf)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.5  # overload device 0 (experts 0, 1)
        w, idx, s = moe.gate(x.view(-1, 32))
        moe.train()
        out = moe(x)
        aff = s.gather(1, idx)
        device = idx // 2
        budget = math.ceil(cf * 2 * 32 / n_dev)
        keep = capacity_keep_mask(idx, aff, 8, n_dev, cf)
        assert moe.last_dropped == pytest.approx(1 - keep.float().mean().item()) and moe.last_dropped > 0
        for d in range(n_dev):
            on_d = device == d
            kept, dropped = aff[on_d & keep], aff[on_d & ~keep]
            assert len(kept) == min(int(on_d.sum()), budget)
            if len(dropped):
                assert kept.min() >= dropped.max()
        # dropped assignments contribute nothing, the others keep their (unrenormalised) weights
        torch.testing.assert_close(out, _naive_moe(moe, x, w * keep, idx), atol=1e-6, rtol=1e-5)
        # eval: nothing dropped
        moe.eval()
        torch.testing.assert_close(moe(x), _naive_moe(moe, x, w, idx), atol=1e-6, rtol=1e-5)
        assert moe.last_dropped == 0.0


# ---- gradients and probes --------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func,norm", [("softmax", False), ("sigmoid", True)])
def test_gradient_flows_to_router_and_experts(score_func, norm):
    moe = _moe(score_func=score_func, norm_topk_prob=norm, capacity_factor=1.5).train()
    x = torch.randn(2, 12, 32)
    moe(x).pow(2).sum().backward()  # no balance loss: the router's gradient comes via the gate weights
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    used = routing_load(moe.gate(x.view(-1, 32))[1], 8) > 0
    for p in (moe.w1, moe.w3, moe.w2):
        g = p.grad.flatten(1).abs().sum(-1)
        assert (g[used] > 0).all() and (g[~used] == 0).all()
    assert all(p.grad.abs().sum() > 0 for p in moe.shared_experts.parameters())


def test_record_routing():
    moe = _moe(n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        moe.eval()(x)
        assert moe.last_indices is None
        moe.record_routing = True
        moe(x)
    w, i, s = moe.gate(x.view(-1, 32))
    assert moe.last_indices.shape == (2, 5, 2) and moe.last_scores.shape == (2, 5, 8)
    torch.testing.assert_close(moe.last_indices.view(-1, 2), i)
    torch.testing.assert_close(moe.last_weights.view(-1, 2), w.detach())
    torch.testing.assert_close(moe.last_scores.view(-1, 8), s.detach())
