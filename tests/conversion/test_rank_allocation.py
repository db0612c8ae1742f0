"""Per-layer rank allocation at a fixed KV budget: budgets, bounds, optimality by brute force, per-layer MLA."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from mla_analysis.models.accounting import kv_bytes_per_token
from mla_analysis.conversion.mla import mha_to_mla
from mla_analysis.models.transformer import Transformer
from mla_analysis.conversion.rank_allocation import METHODS, allocate_ranks, energy_ranks, fisher_rows, water_fill

from tests.helpers import source_model as conversion_source

D = 32  # tiny preset: d_model 32, 4 heads of 8, 2 layers -> latent matrix (64, 32), max rank 32


def _source(seed: int = 0, **overrides) -> Transformer:
    """test_conversion's random source, with anisotropic embedding dims (so allocations differ by layer)."""
    model = conversion_source(seed, **overrides)
    with torch.no_grad():
        model.embed.weight.mul_(torch.logspace(-1.0, 0.5, D))
    return model


def _ids(seed: int = 1, shape=(8, 48)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _low_rank_first_layer(model: Transformer, rank: int = 2) -> Transformer:
    """Layer 0's K and V projections share one rank-`rank` row space: its latent matrix has rank `rank`."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(rank, D, generator=g)
    with torch.no_grad():
        at = model.layers[0].attn
        at.wk.weight.copy_(torch.randn(at.wk.weight.shape[0], rank, generator=g) @ rows * 0.3)
        at.wv.weight.copy_(torch.randn(at.wv.weight.shape[0], rank, generator=g) @ rows * 0.3)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [2, 25, 63, 64])
def test_allocations_sum_to_budget_within_bounds(method, budget):
    src = _source()
    ranks = allocate_ranks(src, budget, method, calib=_ids())
    assert sum(ranks) == budget and len(ranks) == 2
    assert all(1 <= r <= D for r in ranks), ranks
    capped = allocate_ranks(src, 30, method, calib=_ids(), max_rank=16)
    assert sum(capped) == 30 and max(capped) <= 16


def test_uniform_is_uniform_and_bad_budgets_fail():
    src = _source()
    assert allocate_ranks(src, 24, "uniform") == [12, 12]
    assert allocate_ranks(src, 25, "uniform") == [13, 12]
    for bad in (1, 65):
        with pytest.raises(ValueError, match="budget"):
            allocate_ranks(src, bad, "uniform")
    with pytest.raises(ValueError, match="needs calib"):
        allocate_ranks(src, 24, "whitened")
    with pytest.raises(ValueError, match="method"):
        allocate_ranks(src, 24, "random")


@pytest.mark.parametrize("method,calib", [("energy", False), ("energy", True), ("whitened", True), ("fisher", True)])
def test_low_rank_layer_gets_fewer_dims(method, calib):
    src = _low_rank_first_layer(_source())
    ranks = allocate_ranks(src, 24, method, calib=_ids() if calib else None)
    assert ranks[0] <= 2 and ranks[1] == 24 - ranks[0], ranks
    assert allocate_ranks(src, 24, "uniform") == [12, 12]


def _layer_whitened_errors(src: Transformer, calib: torch.Tensor) -> dict[int, list[float]]:
    """E||(W_ref - wkv_b wkv_a) x||^2 per layer of the converted model, for every rank r, from the weights alone."""
    xs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [
        b.attn.register_forward_pre_hook(lambda m, args, i=i: xs[i].append(args[0].reshape(-1, D)))
        for i, b in enumerate(src.layers)
    ]
    with torch.no_grad():
        src(calib)
    for h in hooks:
        h.remove()
    errs: dict[int, list[float]] = {0: [], 1: []}
    for r in range(1, D + 1):
        new = mha_to_mla(src, r, calib=calib, kv_lora_ranks=[r, r])
        for i, (b_src, b_new) in enumerate(zip(src.layers, new.layers)):
            w_ref = torch.cat((b_src.attn.wk.weight.view(4, 8, D), b_src.attn.wv.weight.view(4, 8, D)), 1)  # (H, 16, D)
            w_hat = b_new.attn.wkv_b.weight.double() @ b_new.attn.wkv_a.weight.double()  # (H*16, D), kv_norm ~ identity
            e = (w_ref.reshape(-1, D).double() - w_hat).detach()  # (64, D)
            x = torch.cat(xs[i]).double()  # (N, D)
            errs[i].append(float((x @ e.T).pow(2).sum(1).mean()))
    return errs


def test_whitened_water_filling_is_the_brute_force_optimum():
    """Over every split r0 + r1 = budget, the whitened allocation attains the least total whitened error."""
    src = _source()
    with torch.no_grad():  # layer 0 with a steep K/V spectrum so the optimum is far from uniform
        for w in (src.layers[0].attn.wk.weight, src.layers[0].attn.wv.weight):
            w.mul_(torch.logspace(0.0, -2.0, D))
    calib, budget = _ids(), 24
    errs = _layer_whitened_errors(src, calib)
    total = {r0: errs[0][r0 - 1] + errs[1][budget - r0 - 1] for r0 in range(max(1, budget - D), min(D, budget - 1) + 1)}
    best = min(total.values())
    ranks = allocate_ranks(src, budget, "whitened", calib=calib)
    got = total[ranks[0]]
    assert got == pytest.approx(best, rel=1e-6, abs=1e-9), (ranks, got, best)
    assert got < 0.9 * total[12], (ranks, got, total[12])  # strictly better than uniform here


def test_water_fill_and_energy_ranks_match_brute_force():
    g = torch.Generator().manual_seed(0)
    gains = [torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values ** p
             for n, p in ((6, 1.0), (5, 4.0), (7, 0.5))]
    maxes = [6, 4, 7]
    for budget in range(3, sum(maxes) + 1):
        allocs = [a for a in itertools.product(*[range(1, m + 1) for m in maxes]) if sum(a) == budget]
        kept = lambda a: sum(float(gi[:r].sum()) for gi, r in zip(gains, a))  # noqa: E731
        wf = water_fill(gains, budget, maxes)
        assert sum(wf) == budget and kept(wf) == pytest.approx(max(kept(a) for a in allocs))
        shares = lambda a: min(float(gi[:r].sum() / gi.sum()) for gi, r in zip(gains, a))  # noqa: E731
        en = energy_ranks(gains, budget, maxes)
        assert sum(en) == budget and all(1 <= r <= m for r, m in zip(en, maxes))
        assert shares(en) == pytest.approx(max(shares(a) for a in allocs), abs=1e-9)  # max-min kept share


def test_fisher_rows_equal_per_batch_squared_gradients():
    """The FWSVD row Fisher, against backward() per micro-batch on a copy (GQA: repeated rows share it)."""
    src = _source(attention="gqa", n_kv_heads=2)
    calib = _ids(shape=(4, 33))
    rows = torch.arange(8)
    got = fisher_rows(src, calib, rows, batch_size=2)
    ref = copy.deepcopy(src)
    acc = [torch.zeros(32, D, dtype=torch.float64) for _ in range(2)]  # per layer: wk rows then wv rows
    for chunk in calib.split(2):
        ref.zero_grad()
        logits = ref(chunk[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 128), chunk[:, 1:].reshape(-1)).backward()
        for i, b in enumerate(ref.layers):
            g = b.attn_norm.weight.detach().double()
            acc[i] += torch.cat((b.attn.wk.weight.grad, b.attn.wv.weight.grad)).double().div(g).pow(2)  # (2*H_kv*d_h, D)
    for i in range(2):
        row = acc[i].sum(1) / 2  # (2*16,): mean over the two micro-batches
        k, v = row[:16].view(2, 8), row[16:].view(2, 8)
        want = torch.cat((k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)), 1).reshape(-1) / 2  # /group
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("target_rope_dims", [None, 4])
def test_converted_model_at_per_layer_ranks_runs_and_caches_right_sizes(target_rope_dims):
    src = _source()
    calib = _ids()
    ranks = allocate_ranks(src, 20, "energy", calib=calib, rope_dims=target_rope_dims)
    if ranks[0] == ranks[1]:
        ranks = [ranks[0] - 3, ranks[1] + 3]  # the point is unequal ranks
    new = mha_to_mla(src, 10, rope_dims=target_rope_dims, calib=calib, kv_lora_ranks=ranks).eval()
    assert new.cfg.kv_lora_ranks == ranks and new.conversion_info["kv_lora_ranks"] == ranks
    assert [b.attn.wkv_a.weight.shape[0] - (4 if target_rope_dims else 0) for b in new.layers] == ranks
    ids = _ids(seed=3, shape=(2, 12))
    cache = new.new_cache(2, 12)
    with torch.no_grad():
        full = new(ids)
        steps = [new(ids[:, :8], cache=cache)] + [new(ids[:, t : t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)
    assert [layer["c_kv"].shape[-1] for layer in cache.layers] == ranks
    assert cache.bytes_per_token() == kv_bytes_per_token(new.cfg, torch.float32)
    # full rank in every layer through kv_lora_ranks is the scalar full-rank conversion
    with torch.no_grad():
        torch.testing.assert_close(mha_to_mla(src, 7, kv_lora_ranks=[D, D])(ids), mha_to_mla(src, D)(ids))
