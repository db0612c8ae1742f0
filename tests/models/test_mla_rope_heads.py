"""MLA with several decoupled RoPE keys (``qk_rope_heads``, MHA2MLA's layout) and per-layer RoPE frequencies.

The reference below computes each head's attention from the module's weights with complex multiplication
for the rotation (not the toolkit's apply_rope), so the layout, the key-to-head mapping and the frequencies
are checked against the formula, not against the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from mla_analysis.models.accounting import count_params, kv_bytes_per_token
from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
from mla_analysis.config import ConfigError, tiny
from mla_analysis.interop.hf_io import load_model
from mla_analysis.models.transformer import Transformer

from ..helpers import randomise

VARIANTS = [
    dict(qk_rope_heads=2),
    dict(qk_rope_heads=4, rope_layer_freqs=True),
    dict(qk_rope_heads=2, rope_layer_freqs=True, rope_interleave=True),
    dict(qk_rope_heads=1, rope_layer_freqs=True, kv_norm=False),
]
IDS = ["heads2", "heads4-layer-freqs", "heads2-layer-freqs-interleave", "shared-layer-freqs"]


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny(attention="mla", **overrides)).eval()
    randomise(model, seed=seed + 3)
    with torch.no_grad():
        for blk in model.layers:
            if blk.attn.rope_inv_freq is not None:  # distinct frequencies per layer and rope head
                blk.attn.rope_inv_freq.uniform_(0.01, 1.5)
    return model


def _rotate(x: torch.Tensor, freqs: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x (T, d) rotated at positions 0..T-1 with inverse frequencies freqs (d/2,), by complex multiplication."""
    T, d = x.shape
    a, b = (x[:, 0::2], x[:, 1::2]) if interleave else (x[:, : d // 2], x[:, d // 2 :])
    z = torch.complex(a.double(), b.double()) * torch.polar(torch.ones(T, d // 2, dtype=torch.float64),
                                                           torch.arange(T, dtype=torch.float64)[:, None] * freqs.double())
    out = torch.stack((z.real, z.imag), -1).flatten(-2) if interleave else torch.cat((z.real, z.imag), -1)
    return out.to(x.dtype)


def _reference_attention(attn, x: torch.Tensor, global_freqs: torch.Tensor, interleave: bool) -> torch.Tensor:
    """One MLA layer's output for x (1, T, D) from its weights, head by head."""
    cfg_H, d_n, d_r, d_v, r = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    n_rope = attn.qk_rope_heads
    T = x.shape[1]
    x = x[0]
    q = (x @ attn.wq.weight.T).view(T, cfg_H, d_n + d_r)
    a = x @ attn.wkv_a.weight.T  # (T, r + n_rope d_r)
    c = attn.kv_norm(a[:, :r])
    k_r = a[:, r:].view(T, n_rope, d_r)
    kv = (c @ attn.wkv_b.weight.T).view(T, cfg_H, d_n + d_v)
    outs = []
    for h in range(cfg_H):
        j = h // (cfg_H // n_rope)  # the rope key of query head h
        freqs = global_freqs if attn.rope_inv_freq is None else attn.rope_inv_freq[j]
        qr, kr = _rotate(q[:, h, d_n:], freqs, interleave), _rotate(k_r[:, j], freqs, interleave)
        s = (q[:, h, :d_n] @ kv[:, h, :d_n].T + qr @ kr.T) * attn.scale  # (T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(s.softmax(-1) @ kv[:, h, d_n:])  # (T, d_v)
    return torch.cat(outs, -1) @ attn.wo.weight.T  # (T, D)


@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_attention_matches_per_head_formula(overrides):
    model = _model(**overrides)
    attn = model.layers[1].attn
    x = torch.randn(1, 10, model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    cos, sin = model.rope(torch.arange(10))
    with torch.no_grad():
        got = attn(x, model.rope, cos, sin)[0]
        want = _reference_attention(attn, x, model.rope.inv_freq, model.cfg.rope_interleave)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("decode", ["naive", "absorb"])
@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_cached_decode_equals_full_forward(overrides, decode):
    model = _model(mla_decode=decode, **overrides)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 13)]
        steps.append(model(ids[:, 13:], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # what is cached: d_c + n_rope * d_rope per layer and token, as the accounting says
    assert cache.layers[0]["k_rope"].shape[-1] == model.cfg.qk_rope_heads * model.cfg.qk_rope_head_dim
    for dtype in (torch.float32, torch.bfloat16):
        assert model.new_cache(3, 7, dtype).bytes_per_token() == kv_bytes_per_token(model.cfg, dtype)
    assert count_params(model.cfg) == sum(p.numel() for p in model.parameters())


def test_cache_elements_closed_form():
    cfg = tiny(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4, qk_rope_heads=2)
    assert kv_bytes_per_token(cfg, "fp32") == cfg.n_layers * (16 + 2 * 4) * 4


def test_layer_frequencies_round_trip_through_a_run_dir(tmp_path):
    model = _model(qk_rope_heads=2, rope_layer_freqs=True)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    save_model_config(tmp_path, model.cfg)
    save_checkpoint(tmp_path, model, None, step=0, state={})
    back = load_model(tmp_path)
    for a, b in zip(model.layers, back.layers):
        assert torch.equal(a.attn.rope_inv_freq, b.attn.rope_inv_freq)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    # the frequencies matter: the model's own RoPE frequencies give other logits
    plain = load_model(tmp_path)
    for blk in plain.layers:
        blk.attn.rope_inv_freq.copy_(plain.rope.inv_freq.expand_as(blk.attn.rope_inv_freq))
    with torch.no_grad():
        assert not torch.allclose(plain(ids), model(ids), atol=1e-3)


@pytest.mark.parametrize(
    "overrides,key",
    [(dict(attention="mla", qk_rope_heads=3), "qk_rope_heads"), (dict(attention="mla", qk_rope_heads=0), "qk_rope_heads"),
     (dict(attention="mla_coupled_rope", qk_rope_heads=2), "qk_rope_heads"),
     (dict(attention="gqa", n_kv_heads=2, rope_layer_freqs=True), "rope_layer_freqs")],
)
def test_bad_rope_head_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        tiny(**overrides)
