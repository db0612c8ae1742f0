"""The CUDA path: the same models on CUDA compute what they compute on the CPU, bf16 autocast training
runs, grouped-GEMM experts match the per-expert loop, and the bench runs there.

Skipped without a GPU (CI has none); ``bench/device_check.sh`` runs them on a lent GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from mla_analysis.config import tiny
from mla_analysis.models.transformer import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
VARIANTS = [
    dict(attention="mha"),
    dict(attention="gqa", n_kv_heads=2),
    dict(attention="mla", ffn="moe"),
    dict(attention="mla", q_lora_rank=16, ffn="moe", score_func="sigmoid"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 comparisons with the CPU need full fp32 matmuls on the GPU
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(seed: int = 0, **overrides) -> tuple[Transformer, Transformer]:
    torch.manual_seed(seed)
    cpu = Transformer(tiny(**overrides)).eval()
    gpu = Transformer(tiny(**overrides)).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_forward_cuda_vs_cpu(overrides):
    cpu, gpu = _pair(**overrides)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.to(CUDA)).cpu(), cpu(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mla_decode", ["absorb", "naive"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cached_decode_on_cuda_vs_full_forward_on_cpu(mla_decode, cache_dtype):
    cpu, gpu = _pair(attention="mla", mla_decode=mla_decode)
    ids = torch.randint(0, 128, (2, 24))
    tol = 1e-4 if cache_dtype == torch.float32 else 3e-2  # a bf16 cache rounds keys/values to 8 bits of mantissa
    with torch.no_grad():
        ref = cpu(ids)  # [B, T, V]
        cache = gpu.new_cache(2, 24, dtype=cache_dtype)
        steps = [gpu(ids[:, :8].to(CUDA), cache=cache)]
        steps += [gpu(ids[:, t : t + 1].to(CUDA), cache=cache) for t in range(8, 24)]
    got = torch.cat(steps, dim=1).float().cpu()
    assert cache.seq_len == 24
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_moe_grouped_mm_is_cuda_bf16_default_and_matches_loop():
    _, gpu = _pair(attention="mla", ffn="moe")
    gpu.train()
    moe = gpu.moe_layers()[0]
    x = torch.randn(2, 37, 32, device=CUDA)
    outs, grads = {}, {}
    for grouped in (None, False):  # None: the default, which must pick grouped_mm here
        moe.grouped_mm = grouped
        moe.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert moe.use_grouped_mm(x) == (grouped is None)
            y = moe(x)
        y.float().square().sum().backward()
        outs[grouped], grads[grouped] = y.detach().float(), moe.w1.grad.float()
    for got, ref in ((outs[None], outs[False]), (grads[None], grads[False])):
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 1e-2, rel  # bf16 operands: both round the same inputs, accumulate in fp32


def test_train_on_cuda_with_bf16_autocast_learns(tmp_path):
    from mla_analysis.data import DataConfig
    from mla_analysis.training.trainer import TrainConfig, train

    cfg = tiny(attention="mla", ffn="moe", score_func="sigmoid", bias_update_speed=0.001)
    data = DataConfig(vocab_size=128, seq_len=64, eval_examples=32)
    tcfg = TrainConfig(steps=60, batch_size=16, eval_every=20, eval_batch_size=32, warmup_steps=5, progress=False)
    out = train(cfg, data, tcfg, tmp_path, seed=0, device="auto")
    assert out["device"].startswith("cuda")
    losses = [h["val_loss"] for h in out["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < math.log(128) - 0.5, losses  # well below the uniform guess's loss


def test_ours_vs_hf_deepseek_v3_on_cuda():
    from mla_analysis import bench

    cfg = bench.train_config(quick=True)
    ours, hf = bench.build_train_pair(cfg, CUDA)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), device=CUDA)
    assert bench.check_train_parity(ours, hf, ids, atol=1e-4) < 1e-4


def test_bench_quick_on_cuda():
    from mla_analysis import bench

    res = bench.run(bench.parse_args(["--quick", "--device", "cuda", "--no-write", "--sections", "1,2,3"]), log=lambda s: None)
    assert res["train"]["ratio"] > 0 and res["absorb"]["ratio"] > 0
