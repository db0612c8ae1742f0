"""Dense -> MoE: exact partition of neurons, exact upcycling, balanced clusters, shared experts, healing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mla_analysis.config import tiny
from mla_analysis.conversion.job import heal
from mla_analysis.data import DataConfig
from mla_analysis.models.moe import MoE
from mla_analysis.models.transformer import Transformer
from mla_analysis.conversion.moefy import active_experts, active_pattern, balanced_kmeans, dense_to_moe
from mla_analysis.training.trainer import TrainConfig, train


def _source(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny(init_std=0.2, d_ff=64)).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
    return model


def _ids(seed: int = 1, shape=(8, 32)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_routed,n_shared,first_k", [(4, 0, 0), (6, 2, 0), (3, 1, 1)])
def test_kmeans_partition_with_all_experts_and_unit_weights_is_the_dense_ffn(n_routed, n_shared, first_k):
    """Exactness condition: every expert active and every gate weight 1 (gate weight 0 -> equal softmax
    scores, normalised to 1/E, times route_scale = k = E)."""
    src = _source()
    new = dense_to_moe(src, n_routed, n_routed, n_shared, "kmeans", calib=_ids(), first_k_dense_replace=first_k,
                       gate_weights="score").eval()
    assert new.cfg.moe_d_ff == 64 // (n_routed + n_shared) and new.cfg.ffn == "moe"
    assert len(new.moe_layers()) == 2 - first_k
    for moe in new.moe_layers():
        moe.gate.weight.data.zero_()
    ids = _ids(seed=2, shape=(2, 24))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), src(ids), atol=2e-5, rtol=1e-5)
    # the partition covers every neuron once, in equal experts
    for layer in new.moefy_info["layers"]:
        experts = np.array(layer["experts"])  # (E, I)
        assert experts.shape == (n_routed, 64 // (n_routed + n_shared))
        assert sorted(experts.ravel().tolist() + layer["shared"]) == list(range(64))
    # with the learned router and top-2 of the experts, it is an approximation (not silently exact)
    part = dense_to_moe(src, n_routed, 2, n_shared, "kmeans", calib=_ids()).eval()
    with torch.no_grad():
        assert (part(ids) - src(ids)).norm() > 1e-3 * src(ids).norm()


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_with_zero_noise_is_the_dense_ffn(k):
    src = _source()
    new = dense_to_moe(src, 4, k, 0, "upcycle", noise=0.0).eval()
    assert new.cfg.moe_d_ff == 64 and new.cfg.norm_topk_prob
    ids = _ids(seed=2, shape=(2, 24))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), src(ids), atol=2e-5, rtol=1e-5)
        noisy = dense_to_moe(src, 4, k, 0, "upcycle", noise=0.05).eval()
        assert (noisy(ids) - src(ids)).norm() > 1e-4 * src(ids).norm()


def test_balanced_kmeans_equal_sizes_and_recovers_balanced_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 10)) * 10
    blobs = np.concatenate([c + rng.normal(size=(8, 10)) * 0.1 for c in centers])  # 4 blobs of 8
    perm = rng.permutation(32)
    labels = balanced_kmeans(blobs[perm], 4)
    truth = np.repeat(np.arange(4), 8)[perm]
    for c in range(4):  # each cluster is exactly one blob
        assert len(set(truth[labels == c])) == 1 and (labels == c).sum() == 8
    # unbalanced blobs (12, 4, 8, 8) are still cut into equal clusters
    sizes = [12, 4, 8, 8]
    pts = np.concatenate([c + rng.normal(size=(n, 10)) * 0.1 for c, n in zip(centers, sizes)])
    assert np.bincount(balanced_kmeans(pts, 4), minlength=4).tolist() == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        balanced_kmeans(pts[:30], 4)


def test_shared_experts_hold_the_most_frequently_active_neurons():
    src = _source()
    hot = [3, 17, 40, 41, 50, 60, 62, 63]  # 8 neurons = one shared expert of 64 / (7 + 1)
    with torch.no_grad():
        for block in src.layers:
            block.ffn.w3.weight[hot] *= 100.0  # |h| = |silu(w1 x)| |w3 x| of these tops almost every token
    new = dense_to_moe(src, 7, 2, 1, "kmeans", calib=_ids())
    for layer in new.moefy_info["layers"]:
        assert layer["shared"] == hot
    h = torch.tensor([[3.0, -5.0, 1.0, 0.5], [0.1, 0.2, -0.3, 4.0]])
    assert active_pattern(h, 0.5).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_router_points_each_token_to_its_active_cluster():
    """Top-1 routing of the kmeans model picks, more often than chance, the expert with most active neurons."""
    src = _source()
    calib = _ids(shape=(16, 32))
    new = dense_to_moe(src, 4, 1, 0, "kmeans", calib=calib).eval()
    moe = new.layers[0].ffn
    assert isinstance(moe, MoE)
    moe.record_routing = True
    xs = []
    hook = src.layers[0].ffn.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        new(calib)
        src(calib)
    hook.remove()
    x = xs[0]
    ffn = src.layers[0].ffn
    h = torch.nn.functional.silu(ffn.w1(x)) * ffn.w3(x)  # (N, 64)
    active = active_pattern(h, 1 / 4)  # (N, 64)
    idx = torch.tensor(new.moefy_info["layers"][0]["experts"])  # (E, I)
    best = active[:, idx].sum(-1).argmax(-1)  # (N,): expert with the most active neurons
    chosen = moe.last_indices.reshape(-1)
    assert (chosen == best).float().mean() > 0.4  # chance is 0.25


def test_healing_lowers_the_loss_of_the_moefied_model(tmp_path):
    data = DataConfig(vocab_size=128, seq_len=32, eval_examples=32, lm_weight=1.0, tasks={"mqar": 1.0}, eval_tasks=[])
    tcfg = TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=0, progress=False)
    src = train(tiny(d_ff=64), data, tcfg, tmp_path / "src", seed=0, device="cpu")["model"].eval()
    new = dense_to_moe(src, 4, 1, 0, "kmeans", calib=_ids(shape=(16, 32)))
    out = heal(new, data, TrainConfig(lr=1e-3, warmup_steps=0, eval_every=0, progress=False), tmp_path / "heal", 15,
               device="cpu")
    assert out["after"]["val_loss"] < out["before"]["val_loss"], (out["before"], out["after"])
    assert out["model"] is new and new.cfg.ffn == "moe"


@pytest.mark.parametrize("n_routed,n_shared", [(6, 2), (2, 0)])  # fine-grained + shared; coarse (2 x d_ff/2)
def test_unit_gate_at_full_activation_is_the_dense_ffn_with_the_centroid_router(n_routed, n_shared):
    """gate_weights=unit (the kmeans default): with every routed expert active the MoE is the dense FFN whatever
    the router says. Converted at top-1 (at full activation every neuron is active on every token, the
    centroids coincide and the centroid router is 0), then every gate opened to all E experts."""
    src = _source()
    new = dense_to_moe(src, n_routed, 1, n_shared, "kmeans", calib=_ids()).eval()
    scored = dense_to_moe(src, n_routed, 1, n_shared, "kmeans", calib=_ids(), gate_weights="score").eval()
    assert new.cfg.gate_weights == "unit"
    for m in new.moe_layers() + scored.moe_layers():
        m.gate.topk = n_routed  # full activation with the top-1 router
        assert m.gate.weight.std() > 0.1  # a real router: unequal scores
    ids = _ids(seed=3, shape=(2, 24))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), src(ids), atol=2e-5, rtol=1e-5)
        # the same router under DeepSeek's score weights is not the dense FFN: the unit weights do it
        x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(5))  # FFN inputs
        dense_y = src.layers[0].ffn(x)
        torch.testing.assert_close(new.layers[0].ffn(x), dense_y, atol=2e-5, rtol=1e-5)
        assert (scored.layers[0].ffn(x) - dense_y).norm() > 1e-2 * dense_y.norm()
    width = 64 // (n_routed + n_shared)
    for layer in new.moefy_info["layers"]:  # expert widths partition d_ff: every neuron once
        assert np.array(layer["experts"]).shape == (n_routed, width) and len(layer["shared"]) == n_shared * width
        assert sorted(np.ravel(layer["experts"]).tolist() + layer["shared"]) == list(range(64))


def test_unit_gate_passes_the_score_gradient_to_the_router_and_balancing_reaches_the_config():
    src = _source()
    new = dense_to_moe(src, 4, 2, 0, "kmeans", calib=_ids(), aux_alpha=0.01, bias_update_speed=1e-3)
    assert (new.cfg.aux_alpha, new.cfg.bias_update_speed) == (0.01, 1e-3)
    new(_ids(seed=4, shape=(2, 16))).sum().backward()
    for m in new.moe_layers():
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gate_weights"):
        dense_to_moe(src, 4, 2, 0, "upcycle", gate_weights="unit")


def test_active_experts_of_an_active_fraction():
    # SmolLM2 layouts: 2 shared + 62 routed (width 24): 1/8 -> top-6; coarse 8 x 192: 1/8 -> top-1
    assert [active_experts(f, 62, 2) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)] == [2, 6, 14, 30, 62]
    assert active_experts(1 / 8, 8, 0) == 1 and active_experts(1 / 8, 16, 0) == 2
    for bad in (1 / 64, 0.1, 1.5):  # k = 0, off the grid, k > E
        with pytest.raises(ValueError, match="active_fraction"):
            active_experts(bad, 62, 2)


def test_convert_config_errors_name_the_key_before_any_compute():
    from mla_analysis.config import ConfigError, ConvertConfig
    from mla_analysis.conversion.job import moe_top_k, validate_convert

    cfg = tiny(d_ff=64)
    ok = ConvertConfig(direction="moe", n_routed_experts=6, n_shared_experts=2, active_fraction=0.5)
    validate_convert(ok, cfg)
    assert moe_top_k(ok) == 2  # (2 + 2) / 8
    for bad, key in ((ConvertConfig(direction="moe", n_routed_experts=6, n_shared_experts=2, active_fraction=0.3),
                      "active_fraction"),
                     (ConvertConfig(direction="moe", moe_aux_alpha=-1.0), "moe_aux_alpha")):
        with pytest.raises(ConfigError, match=f"convert.{key}"):
            validate_convert(bad, cfg)


def _sse(points: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared distances to the cluster means (the k-means objective)."""
    return float(sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def _balanced_partitions(items: tuple, size: int):
    """Every partition of items into groups of `size` (brute force; groups unordered)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    from itertools import combinations
    for mates in combinations(rest, size - 1):
        left = tuple(i for i in rest if i not in mates)
        for tail in _balanced_partitions(left, size):
            yield [(first, *mates)] + tail


def test_gram_embedding_keeps_every_pairwise_distance_of_activity_patterns():
    """Many more tokens than neurons, duplicate and silent neurons (a rank-deficient Gram)."""
    from mla_analysis.conversion.moefy import gram_embedding

    rng = np.random.default_rng(3)
    pats = rng.random((20, 500)) < 0.2  # (neurons, tokens)
    pats[4] = pats[11]
    pats[7] = False
    y = gram_embedding(pats)
    assert y.shape[0] == 20 and y.shape[1] <= 19  # rank: one duplicate, one zero row
    f = pats.astype(np.float64)
    brute = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)  # (20, 20) Hamming distances
    torch.testing.assert_close(((y[:, None, :] - y[None, :, :]) ** 2).sum(-1), brute, atol=1e-8, rtol=0)
    assert gram_embedding(np.zeros((6, 40), dtype=bool)).tolist() == [[0.0]] * 6  # rank 0


def test_balanced_kmeans_reaches_the_brute_force_optimum_on_planted_co_activation():
    """12 neurons in 3 planted co-activation groups of 4 over 300 tokens (10% of entries flipped): the balanced
    k-means objective equals the minimum over all 5,775 balanced partitions, which is the planted one."""
    rng = np.random.default_rng(0)
    groups = rng.random((3, 300)) < 0.3  # each group's token pattern
    truth = rng.permutation(np.repeat(np.arange(3), 4))
    pats = groups[truth] ^ (rng.random((12, 300)) < 0.1)  # (12, 300) bool
    labels = balanced_kmeans(pats, 3)
    f = pats.astype(np.float64)
    best = min(_sse(f, np.array([next(g for g, part in enumerate(p) if i in part) for i in range(12)]))
               for p in _balanced_partitions(tuple(range(12)), 4))
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert _sse(f, labels) == pytest.approx(best, abs=1e-9)
    assert _sse(f, truth) == pytest.approx(best, abs=1e-9)  # the optimum is the planted partition


def test_balanced_kmeans_recovers_planted_experts_from_long_patterns():
    """The SmolLM2 regime in miniature: tokens >> neurons; 8 planted experts of 6 neurons, 2,000 tokens."""
    rng = np.random.default_rng(1)
    groups = rng.random((8, 2000)) < 0.15
    truth = rng.permutation(np.repeat(np.arange(8), 6))
    pats = groups[truth] ^ (rng.random((48, 2000)) < 0.05)
    labels = balanced_kmeans(pats, 8)
    for c in range(8):  # each cluster is exactly one planted expert
        assert (labels == c).sum() == 6 and len(set(truth[labels == c])) == 1
