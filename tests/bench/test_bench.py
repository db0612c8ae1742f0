"""Bench machinery only: no timing is asserted (performance claims live in BENCHMARKS.md, not in tests).

Checked: the --quick run completes and its table has every row; the compared training models are
like for like (same logits, same gradients); the compared decoders agree; the report file keeps other
devices' sections and is written atomically; the sweep wall time is read from results.json files.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from mla_analysis import bench
from mla_analysis.interop.state_dict import state_dict_to_hf
from mla_analysis.models.accounting import kv_bytes_per_token
from mla_analysis.training.results import ResultsError

pytest.importorskip("transformers")

ROWS = (
    "1. training throughput",
    "1b. same, vs HF DeepseekV3 with `eager` attention",  # HF's default attention is not eager
    "`eager` experts (for information)",
    "2. MLA decode tok/s at context",
    "3. MLA absorbed decode KV-read bandwidth",
    "4. streaming spectra, dim",
    "5. rank-sweep wall time",
)


def _fake_sweep(root, walls, status="ok"):
    for i, wall in enumerate(walls):
        d = root / f"{i}_run"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"status": status, "timings": {"wall_s": wall, "train_s": wall - 1}}))
    return root


def test_quick_run_has_every_row_and_keeps_other_sections(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", [10.0, 20.0])
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(bench.merge_section("", "cuda", "## cuda: an earlier run\n"))
    threads = torch.get_num_threads()
    res = bench.main(["--quick", "--threads", "1", "--out", str(out), "--sweep-dir", str(sweep)])

    text = out.read_text()
    for row in ROWS:
        assert row in text, row
    assert "## cuda: an earlier run" in text and "## cpu (quick)" in text
    assert text.count("<!-- bench:cpu:begin -->") == 1
    spectra = next(line for line in text.splitlines() if "streaming spectra" in line)
    assert "tok/s" in spectra and "MiB" in spectra, spectra
    # streaming: ten times the tokens in a fresh process, (almost) no more peak memory
    assert res["spectra"]["mem_ratio"] <= bench.TARGET_SPECTRA_MEM_RATIO, res["spectra"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "sweep"]  # no temp file left behind
    assert res["machine"]["cpu"] and res["machine"]["torch"] == torch.__version__

    sizes = bench.make_sizes(quick=True)
    assert len(res["sweep"]) == len(bench.SWEEP_VARIANTS) * len(sizes.contexts) * len(sizes.batches)
    for r in res["sweep"]:
        assert "skipped" not in r, r
        assert r["kv_bytes_per_step"] == r["kv_bytes_per_token"] * r["context"] * r["batch"]
        assert r["tok_s"] > 0 and 0 < r["bw_fraction"]
    assert res["train"]["tok_s"]["ours"] > 0 and res["absorb"]["ratio"] > 0
    assert res["sweep_wall"]["runs"] == 2
    assert torch.get_num_threads() == threads  # --threads is restored afterwards


def test_train_models_are_like_for_like():
    """Ours and HF DeepseekV3 give the same logits and the same gradients for the bench's training step."""
    cfg = bench.train_config(quick=True)
    ours, hf = bench.build_train_pair(cfg, torch.device("cpu"), seed=3)
    ids, targets = bench.random_batch(cfg, 2, 16, torch.device("cpu"))
    assert bench.check_train_parity(ours, hf, ids) < 1e-4
    ours.eval(), hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)

    ours.train(), hf.train()
    for model, is_hf in ((ours, False), (hf, True)):
        logits = bench.forward_logits(model, ids, is_hf)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    grads.update({n: torch.zeros_like(b) for n, b in ours.named_buffers() if n not in grads})
    ours_as_hf = state_dict_to_hf(cfg, grads, "deepseek_v3")
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert set(hf_grads) <= set(ours_as_hf)
    for name, g in hf_grads.items():
        torch.testing.assert_close(ours_as_hf[name], g, atol=1e-5, rtol=1e-3, msg=name)


def test_train_parity_guard_rejects_different_models():
    cfg = bench.train_config(quick=True)
    ours, hf = bench.build_train_pair(cfg, torch.device("cpu"))
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
    ids, _ = bench.random_batch(cfg, 2, 8, torch.device("cpu"))
    with pytest.raises(bench.BenchError, match="disagree"):
        bench.check_train_parity(ours, hf, ids)


@pytest.mark.parametrize("batch", [1, 3])
def test_naive_and_absorbed_decoders_agree(batch):
    shape = bench.decode_shape(quick=True)
    S = 40
    models = bench.decode_models(shape, S + 1, torch.device("cpu"), torch.float32, ["mla", "mla_naive"], seed=1)
    assert models["mla"].cfg.mla_decode == "absorb" and models["mla_naive"].cfg.mla_decode == "naive"
    cache = models["mla"].new_cache(batch, S + 1)
    bench.fill_cache_(cache, S, seed=2)
    absorbed = bench.make_decode_step(models["mla"], cache, S, batch, torch.device("cpu"))
    naive = bench.make_decode_step(models["mla_naive"], cache, S, batch, torch.device("cpu"))
    first = absorbed()
    assert first.shape == (batch, shape["vocab_size"])
    torch.testing.assert_close(naive(), first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(absorbed(), first, atol=0, rtol=0)  # the step rewinds: every timed step is the same work
    assert bench.check_decode_parity(absorbed, naive, 1e-4) < 1e-4


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_absorbed_decode_with_head_groups_and_prefill_matches_naive(monkeypatch, groups):
    """The absorbed path splits the heads into groups sharing one latent read (as many as threads need);
    every split, with multi-token (masked) chunks through the cache, gives the naive path's logits."""
    from mla_analysis.models import mla

    assert mla.head_groups(16, 1, 2) == 2 and mla.head_groups(16, 8, 2) == 1 and mla.head_groups(6, 1, 4) == 6
    assert mla.head_groups(12, 1, 5) == 6  # the smallest divisor of H that keeps the threads busy
    monkeypatch.setattr(mla, "head_groups", lambda n_heads, batch, threads: groups)
    shape = bench.decode_shape(quick=True)
    models = bench.decode_models(shape, 24, torch.device("cpu"), torch.float32, ["mla", "mla_naive"], seed=4)
    ids = torch.randint(0, shape["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            cache = model.new_cache(2, 24)
            chunks = [(0, 9), (9, 12)] + [(t, t + 1) for t in range(12, 24)]
            outs[name] = torch.cat([model(ids[:, a:b], cache=cache) for a, b in chunks], dim=1)
        full = models["mla_naive"](ids)
    torch.testing.assert_close(outs["mla"], outs["mla_naive"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["mla"], full, atol=1e-4, rtol=1e-4)


def test_bf16_cache_decode_close_to_fp32_and_cache_is_one_buffer():
    """A bf16 cache (figure 3's 'mla, bf16 cache') halves the bytes and stays within bf16 rounding of fp32;
    c_kv and k_rope are views of one [c_kv | k_rope] buffer (what the absorbed path reads in one pass)."""
    shape = bench.decode_shape(quick=True)
    S, B = 48, 2
    model = bench.decode_models(shape, S + 1, torch.device("cpu"), torch.float32, ["mla"], seed=5)["mla"]
    caches = {dt: model.new_cache(B, S + 1, dt) for dt in (torch.float32, torch.bfloat16)}
    for cache in caches.values():
        bench.fill_cache_(cache, S, seed=6)
        layer, joint = cache.layers[0], cache.joint_view(0, S + 1)
        assert layer["c_kv"].data_ptr() == joint.data_ptr()
        torch.testing.assert_close(torch.cat((layer["c_kv"], layer["k_rope"]), -1), joint, atol=0, rtol=0)
    assert caches[torch.bfloat16].nbytes() * 2 == caches[torch.float32].nbytes()
    steps = {dt: bench.make_decode_step(model, c, S, B, torch.device("cpu")) for dt, c in caches.items()}
    ref, got = steps[torch.float32](), steps[torch.bfloat16]()
    assert got.dtype == torch.float32
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 2e-2, err  # bf16 rounding of the cache and the latent attention, not a different result


def test_decode_models_variants_and_kv_accounting():
    shape = bench.decode_shape(quick=True)
    models = bench.decode_models(shape, 65, torch.device("cpu"), torch.float32, ["mla", "mha", "gqa"])
    assert models["gqa"].cfg.kv_heads == shape["gqa_kv_heads"] and models["mha"].cfg.kv_heads == shape["n_heads"]
    for m in models.values():
        cache = m.new_cache(2, 65)
        # accounting's KV bytes/token (used for the bandwidth figure) matches what the cache allocates
        assert cache.bytes_per_token() == kv_bytes_per_token(m.cfg, torch.float32)


def test_skip_reason_extrapolates_time_and_memory():
    dev = torch.device("cpu")
    assert bench.skip_reason(None, 1024, 1, 100.0, dev, 5.0, 3) is None
    prev = {"context": 1024, "step_s": 3.0, "peak_bytes": 1000}
    assert "s/step" in bench.skip_reason(prev, 2048, 1, 100.0, dev, 5.0, 3)
    assert bench.skip_reason(dict(prev, step_s=1.0), 2048, 1, 100.0, dev, 5.0, 3) is None
    huge = dict(prev, step_s=0.1, peak_bytes=10**15)
    assert "GB" in bench.skip_reason(huge, 2048, 1, 100.0, dev, 5.0, 3)
    assert bench.skip_reason({"context": 1024, "skipped": "x"}, 2048, 1, 100.0, dev, 5.0, 3)


def test_sweep_wall_time(tmp_path):
    root = _fake_sweep(tmp_path / "s", [30.0, 50.0, 40.0])
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{trunc")
    now = 1_700_000_000
    for i, end in enumerate((now + 30, now + 60, now + 100)):
        os.utime(root / f"{i}_run" / "results.json", (end, end))
    w = bench.sweep_wall_time(root)
    assert w["runs"] == 3 and w["unreadable"] == 1 and w["statuses"] == {"ok": 3}
    assert w["sum_wall_s"] == 120.0 and w["max_wall_s"] == 50.0
    assert w["span_s"] == pytest.approx(100.0)  # earliest start now+0 (30 - 30) to the last end now+100
    with pytest.raises(ResultsError):
        bench.sweep_wall_time(tmp_path / "missing")


def test_merge_section_replaces_only_its_own():
    text = bench.merge_section("", "cuda", "## cuda old\n")
    text = bench.merge_section(text, "cpu", "## cpu first\n")
    text = bench.merge_section(text, "cpu", "## cpu second\n")
    assert "## cpu first" not in text and "## cpu second" in text and "## cuda old" in text
    assert text.index("## cpu second") < text.index("## cuda old")  # cpu (the targets' device) first
    assert bench.merge_section(text, "cpu", "## cpu second\n") == text  # idempotent


def test_latent_decode_gemm_vs_sdpa():
    """The CUDA decode step's two GEMMs compute SDPA over the latent cache with c_kv as the value."""
    from mla_analysis.models import mla

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 1, 8, 40, generator=g)  # (B, 1, H, d_c + d_rope)
    kv = torch.randn(3, 1, 50, 40, generator=g)  # (B, 1, S, d_c + d_rope)
    ref = F.scaled_dot_product_attention(q, kv, kv[..., :32], scale=0.3)
    torch.testing.assert_close(mla.latent_decode_gemm(q, kv, 32, 0.3), ref, atol=1e-5, rtol=1e-5)


def test_train_target_and_background_depend_on_the_device():
    """Figure 1's target is 1.5x on CPU and 2x on a GPU; other processes' CPU use is judged per core."""
    info = bench.machine_info(torch.device("cpu"), torch.float32)
    train = {"tok_s": {"ours": 180.0, "hf": 100.0}, "ratio": 1.8, "ratios": {},
             "hf_implementations": {"hf": "`sdpa` attention, `grouped_mm` experts"},
             "config": bench.train_config(quick=True), "batch": 2, "seq": 16, "tokens_per_step": 32,
             "times": {"ours": [1.0]}, "max_logit_diff": {"hf": 0.0}}
    for device, cores, target, status, quiet in (("cpu", 2, 1.5, "met", False), ("cuda", 16, 2.0, "MISSED", True)):
        res = {"quick": False, "machine": dict(info, device=device, cores=cores, usable_cores=cores), "wall_s": 1.0,
               "load_before": (0.5, 0.5, 0.5), "other_cpu_cores": 0.14, "train": train}
        text = bench.render(res, [])
        row = next(line for line in text.splitlines() if line.startswith("| 1. training throughput"))
        assert row.endswith(f"| 1.80x | >= {target}x | {status} |"), row
        assert ("otherwise quiet" in text) == quiet and ("busy with other work" in text) != quiet
