"""KV-cache quantisation (models/kv_quant.py): codes against optimum-quanto and a float64 brute force, the
error bound, int4 packing, cached decode == full forward, K quantised after RoPE, bytes measured == analytic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mla_analysis.models import accounting
from mla_analysis.config import ConfigError, tiny
from mla_analysis.models.kv_quant import dequantize, fake_quant, quantize, unpack_int4
from mla_analysis.models.transformer import Transformer

from ..helpers import randomise


def brute_force(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, step and x_hat per group, one group at a time in float64 (scale / zero rounded to fp16 as stored)."""
    flat = x.reshape(-1, group).astype(np.float64)
    codes, steps, x_hat = np.zeros(flat.shape, np.int64), np.zeros(len(flat)), np.zeros(flat.shape)
    for i, g in enumerate(flat):
        zero = float(np.float16(g.min()))
        scale = float(np.float16((g.max() - g.min()) / (2**bits - 1)))
        c = np.clip(np.rint((g - zero) / scale), 0, 2**bits - 1) if scale > 0 else np.zeros(group)
        codes[i], steps[i], x_hat[i] = c, (g.max() - g.min()) / (2**bits - 1), c * scale + zero
    return codes.reshape(x.shape), steps, x_hat.reshape(x.shape)


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 3, 64, generator=g) * 3 + 0.5  # (B, T, H_kv, d_h)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_codes_match_optimum_quanto(group):
    """optimum-quanto's MaxOptimizer + quantize_weight (what transformers' QuantoQuantizedCache calls)."""
    quanto = pytest.importorskip("optimum.quanto")
    x = _x()
    flat = x.reshape(-1, 64)  # (B T H_kv, d_h): quanto's axis-0 groups are consecutive channels of a row
    scale, shift = quanto.MaxOptimizer()(flat, quanto.qint4, 0, group)
    ref = quanto.quantize_weight(flat, quanto.qint4, 0, scale, shift, group, optimized=False)
    ref_codes = ref._data.unpack().reshape(x.shape).int()
    q = quantize(x, 4, group)
    codes = unpack_int4(q["codes"]).int()
    # quanto keeps the scale in fp32, the cache stores fp16: a rounding tie may move a code by one step
    assert (codes - ref_codes).abs().max() <= 1 and (codes != ref_codes).float().mean() < 0.01
    step = (scale.reshape(*x.shape[:-1], -1, 1) * torch.ones(group)).flatten(-2)  # (B, T, H_kv, d_h)
    diff = (dequantize(q["codes"], q["scale"], q["zero"], 4, torch.float32) - ref.dequantize().reshape(x.shape)).abs()
    assert (diff <= step * 1.01 + 1e-3).all() and diff.mean() < 0.02 * step.mean()


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 64), (4, 16)])
def test_codes_and_values_match_brute_force(bits, group):
    x = _x(1)
    codes, _, x_hat = brute_force(x.numpy(), bits, group)
    q = quantize(x, bits, group)
    got = q["codes"] if bits == 8 else unpack_int4(q["codes"])
    diff = np.abs(got.numpy().astype(np.int64) - codes)
    assert diff.max() <= 1 and (diff != 0).mean() < 1e-3  # float32 vs float64 only at rounding ties
    x_ours = dequantize(q["codes"], q["scale"], q["zero"], bits, torch.float64).numpy()
    agree = diff == 0
    np.testing.assert_allclose(x_ours[agree], x_hat[agree], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [8, 4])
def test_error_bound(bits):
    """|x - x_hat| <= step / 2 plus the fp16 rounding of scale and zero; and not far below (the resolution is real)."""
    x = _x(2)
    _, step, _ = brute_force(x.numpy(), bits, 32)
    flat = x.reshape(-1, 32).double().numpy()
    err = np.abs(fake_quant(x, bits, 32).reshape(-1, 32).double().numpy() - flat)  # (groups, g)
    lo = np.abs(flat.min(1))
    bound = step / 2 * (1 + 2**-11) + 2**-11 * ((2**bits - 1) * step + lo) + 1e-6
    assert (err.max(1) <= bound).all()
    assert (err.max(1) >= 0.3 * step).mean() > 0.9
    if bits == 8:  # int8: max error under 0.63 / 255 of each group's range + |min| / 2048
        assert (err.max(1) <= 0.63 * step + lo / 2048 + 1e-6).all()


def test_int4_packing_two_codes_per_byte():
    q = quantize(_x(3), 4, 64)
    codes, _, _ = brute_force(_x(3).numpy(), 4, 64)
    packed = q["codes"].numpy().astype(np.int64)  # (B, T, H_kv, 32)
    assert q["codes"].dtype == torch.uint8 and packed.shape[-1] == 32
    ok = (codes[..., 0::2] == packed & 15) & (codes[..., 1::2] == packed >> 4)
    assert ok.mean() > 0.999
    assert torch.equal(unpack_int4(q["codes"]).reshape(*packed.shape[:-1], 32, 2)[..., 0], q["codes"] & 15)


def test_constant_group_is_exact():
    x = torch.full((1, 2, 1, 8), 0.375)  # fp16-representable: scale 0, code 0, x_hat = zero = x
    for bits in (8, 4):
        assert torch.equal(fake_quant(x, bits, 4), x)


QUANT_VARIANTS = [
    pytest.param(dict(attention="gqa", n_kv_heads=2, kv_quant_bits=8, kv_quant_group=4), id="gqa-int8-g4"),
    pytest.param(dict(attention="gqa", n_kv_heads=2, kv_quant_bits=4, kv_quant_group=8), id="gqa-int4-g8"),
    pytest.param(dict(attention="mha", kv_quant_bits=4, kv_quant_group=2), id="mha-int4-g2"),
    pytest.param(dict(attention="mqa", kv_quant_bits=8, kv_quant_group=8, pos_emb="learned", bias=True, norm="layernorm",
                      mlp="gelu"), id="mqa-int8-learned-bias"),
]


@pytest.mark.parametrize("overrides", QUANT_VARIANTS)
def test_cached_decoding_vs_full_forward_quantised(overrides):
    """float64, so no rounding tie differs between the paths: the cache's dequantised K/V = the forward's."""
    cfg = tiny(**overrides)
    model = Transformer(cfg).eval().double()
    randomise(model, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    plain = Transformer(tiny(**{**overrides, "kv_quant_bits": 16})).eval().double()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :5], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 17)]
        steps.append(model(ids[:, 17:20], cache=cache))
        unquantised = plain(ids)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=1e-10)
    assert (full - unquantised).abs().max() > 1e-4  # the quantisation is applied
    assert all(t.dtype in (torch.uint8, torch.float16) for layer in cache.layers for t in layer.values())


def test_attention_quantises_k_after_rope_and_v():
    """One attention layer against SDPA on brute-force-quantised rope(k) and v (GQA heads repeated by hand)."""
    cfg = tiny(attention="gqa", n_kv_heads=2, kv_quant_bits=4, kv_quant_group=4)
    model = Transformer(cfg).eval().double()
    randomise(model, seed=4)
    attn, T = model.layers[0].attn, 9
    x = torch.randn(1, T, cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos, sin = model.rope(torch.arange(T))
    with torch.no_grad():
        got = attn(x, model.rope, cos, sin)
        q = model.rope.rotate(attn.wq(x).view(1, T, 4, 8), cos, sin)  # (B, T, H, d_h)
        k = model.rope.rotate(attn.wk(x).view(1, T, 2, 8), cos, sin)  # (B, T, H_kv, d_h)
        v = attn.wv(x).view(1, T, 2, 8)
        k_hat = torch.from_numpy(brute_force(k.numpy(), 4, 4)[2])
        v_hat = torch.from_numpy(brute_force(v.numpy(), 4, 4)[2])
        rep = lambda t: t.repeat_interleave(2, dim=2).transpose(1, 2)  # (B, H, T, d_h)  # noqa: E731
        o = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k_hat), rep(v_hat), is_causal=True, scale=1 / math.sqrt(8))
        want = attn.wo(o.transpose(1, 2).reshape(1, T, -1))  # (B, T, D)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


SMOLLM2_LAYER = dict(attention="gqa", d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, n_layers=1, vocab_size=64)


@pytest.mark.parametrize("bits,group,expected", [(16, 64, 768), (8, 32, 432), (8, 64, 408), (4, 32, 240), (4, 64, 216)])
def test_cache_bytes_measured_equal_analytic(bits, group, expected):
    """SmolLM2's layer (3 K/V heads x 64): 2 x 3 x (64 bits/8 + 64/g x (2 + 2)) bytes, by hand."""
    cfg = tiny(**SMOLLM2_LAYER, kv_quant_bits=bits, kv_quant_group=group)
    cache = Transformer(cfg).new_cache(2, 8, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == accounting.kv_bytes_per_token(cfg, "bf16") == expected


def test_bad_quant_configs_name_the_key():
    with pytest.raises(ConfigError, match="model.kv_quant_bits"):
        tiny(kv_quant_bits=3)
    with pytest.raises(ConfigError, match="model.kv_quant_group"):
        tiny(kv_quant_bits=8, kv_quant_group=3)  # head_dim 8
    with pytest.raises(ConfigError, match="model.kv_quant_bits"):
        tiny(attention="mla", kv_quant_bits=8, kv_quant_group=4)
    from mla_analysis.interop.state_dict import to_hf_config

    with pytest.raises(ConfigError, match="model.kv_quant_bits=8 cannot be exported"):
        to_hf_config(tiny(kv_quant_bits=8, kv_quant_group=4), "llama")
