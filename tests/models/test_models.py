"""Model correctness: parity with transformers' DeepSeek-V2/V3 and Llama, cached decoding, accounting."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mla_analysis.models.accounting import count_params, kv_bytes_per_token, kv_elements_per_token_layer
from mla_analysis.config import ModelConfig, tiny
from mla_analysis.conversion.cli import from_hf
from mla_analysis.interop.state_dict import to_hf_config
from mla_analysis.models.transformer import Transformer

from ..helpers import randomise
from tests.helpers import KNOB_VARIANTS

transformers = pytest.importorskip("transformers")


def _hf_and_ours(cfg: ModelConfig, arch: str, path):
    """A random transformers model written with save_pretrained, read back by transformers and by from_hf."""
    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(cfg, arch))
    randomise(hf)
    hf.save_pretrained(path)  # the on-disk layout (per-expert keys), as published checkpoints are
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = from_hf(path)
    assert (ours.cfg.attention, ours.cfg.ffn, ours.cfg.kv_heads) == (cfg.attention, cfg.ffn, cfg.kv_heads)
    return hf, ours


def _check_logits(hf, ours, vocab: int, lengths=(1, 7, 33)) -> None:
    g = torch.Generator().manual_seed(1)
    for T in lengths:
        ids = torch.randint(0, vocab, (2, T), generator=g)
        with torch.no_grad():
            ref = hf(ids).logits
            got = ours(ids)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


DS_BASE = dict(attention="mla", rope_interleave=True, vocab_size=96, max_seq_len=64, n_layers=3)
YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(), id="dense"),
        pytest.param(dict(q_lora_rank=12), id="dense-qlora"),
        pytest.param(
            dict(ffn="moe", score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_group=4, topk_group=2, first_k_dense_replace=1),
            id="moe-sigmoid-grouped",
        ),
        pytest.param(dict(ffn="moe", score_func="sigmoid", q_lora_rank=12, rope_scaling=YARN), id="moe-qlora-yarn"),
        pytest.param(dict(rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0)), id="dense-yarn-v3"),
    ],
)
def test_transformer_vs_hf_deepseek_v3(tmp_path, overrides):
    cfg = tiny(**DS_BASE, **overrides)
    hf, ours = _hf_and_ours(cfg, "deepseek_v3", tmp_path)
    _check_logits(hf, ours, cfg.vocab_size)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(ffn="moe", score_func="softmax", route_scale=1.0), id="moe-greedy"),
        pytest.param(dict(ffn="moe", score_func="softmax", n_group=4, topk_group=2, route_scale=16.0, q_lora_rank=12), id="moe-group-limited-qlora"),
        pytest.param(dict(ffn="moe", rope_scaling=YARN, first_k_dense_replace=1), id="moe-yarn"),
    ],
)
def test_transformer_vs_hf_deepseek_v2(tmp_path, overrides):
    cfg = tiny(**DS_BASE, **overrides)
    hf, ours = _hf_and_ours(cfg, "deepseek_v2", tmp_path)
    _check_logits(hf, ours, cfg.vocab_size)


@pytest.mark.parametrize("attention,n_kv", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_transformer_vs_hf_llama(tmp_path, attention, n_kv):
    cfg = tiny(attention=attention, n_kv_heads=n_kv, vocab_size=96)
    hf, ours = _hf_and_ours(cfg, "llama", tmp_path)
    _check_logits(hf, ours, cfg.vocab_size)


VARIANTS = [
    pytest.param(dict(attention="mha"), id="mha"),
    pytest.param(dict(attention="gqa", n_kv_heads=2), id="gqa"),
    pytest.param(dict(attention="mqa"), id="mqa"),
    pytest.param(dict(attention="mla", mla_decode="naive"), id="mla-naive"),
    pytest.param(dict(attention="mla", mla_decode="absorb"), id="mla-absorb"),
    pytest.param(dict(attention="mla", mla_decode="absorb", q_lora_rank=8, rope_interleave=True), id="mla-absorb-qlora"),
    pytest.param(dict(attention="mla", mla_decode="absorb", ffn="moe", rope_scaling=YARN), id="mla-absorb-moe-yarn"),
    pytest.param(dict(attention="mla_coupled_rope"), id="mla-coupled-rope"),
    pytest.param(dict(attention="mla", mla_decode="naive", kv_norm=False), id="mla-naive-no-kv-norm"),
    pytest.param(dict(attention="mla", mla_decode="absorb", kv_norm=False), id="mla-absorb-no-kv-norm"),
]


@pytest.mark.parametrize("overrides", VARIANTS + KNOB_VARIANTS)  # KNOB_VARIANTS: learned positions, biases, GELU, LayerNorm
def test_cached_decoding_vs_full_forward(overrides):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = Transformer(cfg).eval()
    randomise(model, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        # a prefill chunk, then token by token, then a chunk of 3 (mask with an offset)
        steps = [model(ids[:, :5], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 17)]
        steps.append(model(ids[:, 17:20], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == 20


def test_mla_absorbed_equals_naive_decode():
    torch.manual_seed(0)
    cfg = tiny(attention="mla", mla_decode="naive")
    naive = Transformer(cfg).eval()
    randomise(naive, seed=5)
    absorbed = Transformer(tiny(attention="mla", mla_decode="absorb")).eval()
    absorbed.load_state_dict(naive.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        a = naive.generate(ids, 8)
        b = absorbed.generate(ids, 8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_kv_bytes_match_cache_tensors(overrides):
    cfg = tiny(**overrides)
    model = Transformer(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.new_cache(batch_size=3, max_len=10, dtype=dtype)
        assert cache.bytes_per_token() == kv_bytes_per_token(cfg, dtype)


def test_kv_bytes_closed_forms_published_configs():
    v2 = ModelConfig(attention="mla", n_layers=60, d_model=5120, n_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                     qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536)
    assert kv_elements_per_token_layer(v2) == 512 + 64
    assert kv_bytes_per_token(v2, "bf16") == (512 + 64) * 60 * 2 == 69_120
    ds67b = ModelConfig(attention="gqa", n_layers=95, d_model=8192, n_heads=64, n_kv_heads=8)
    assert kv_bytes_per_token(ds67b, "bf16") == 2 * 8 * 128 * 95 * 2 == 389_120
    # the 93.3% headline needs ~6-bit cache elements for V2 (see shared/reference/published-configs.md)
    assert round(1 - kv_bytes_per_token(v2, 6.0) / kv_bytes_per_token(ds67b, "bf16"), 3) == 0.933
    # Table 1: MLA with d_c = 4 d_h, d_h^R = d_h/2 caches as much as GQA with 2.25 groups
    d_h = 128
    mla = ModelConfig(attention="mla", n_layers=1, d_model=1024, n_heads=8, kv_lora_rank=4 * d_h, qk_rope_head_dim=d_h // 2)
    assert kv_elements_per_token_layer(mla) / (2 * d_h) == 2.25


@pytest.mark.parametrize(
    "overrides",
    VARIANTS + KNOB_VARIANTS + [pytest.param(dict(ffn="moe", n_shared_experts=2, tie_embeddings=True), id="moe-tied")],
)
def test_count_params_matches_module(overrides):
    cfg = tiny(**overrides)
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [pytest.param(dict(attention="mha"), id="mha"), pytest.param(dict(attention="gqa", n_kv_heads=2), id="gqa"),
     pytest.param(dict(attention="mla", q_lora_rank=8), id="mla-qlora"),
     pytest.param(dict(attention="mla_coupled_rope"), id="mla-coupled"),
     pytest.param(dict(attention="mla", ffn="moe", n_shared_experts=2), id="mla-moe"),
     pytest.param(dict(ffn="none"), id="attention-only")] + KNOB_VARIANTS,
)
def test_flops_per_token_vs_torch_flop_counter(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    from mla_analysis.models.accounting import flops_per_token

    cfg = tiny(mla_decode="naive", **overrides)
    model = Transformer(cfg).eval()
    B, T = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    # the math SDPA backend decomposes into counted matmuls (the fused CPU kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    # the flop counter charges SDPA for the full T x T score matrix (causal masking is not subtracted)
    assert counter.get_total_flops() == flops_per_token(cfg, context_len=T) * B * T


@pytest.mark.parametrize(
    "overrides",
    [pytest.param(dict(attention="mha"), id="mha"), pytest.param(dict(attention="mla", mla_decode="naive"), id="mla-naive"),
     pytest.param(dict(attention="mla", mla_decode="absorb"), id="mla-absorb"),
     pytest.param(dict(attention="mla_coupled_rope"), id="mla-coupled")] + KNOB_VARIANTS,
)
def test_decode_flops_per_token_vs_torch_flop_counter(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    from mla_analysis.models.accounting import decode_flops_per_token

    cfg = tiny(**overrides)
    model = Transformer(cfg).eval()
    S = 12
    cache = model.new_cache(1, S + 1)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, S)), cache=cache)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache)
    assert counter.get_total_flops() == decode_flops_per_token(cfg, context_len=S + 1)


def test_per_layer_kv_lora_ranks_cache_and_accounting_vs_tensors():
    """kv_lora_ranks gives each layer its own latent width: cache tensors, params and FLOPs follow it."""
    from mla_analysis.models.accounting import count_params, kv_bytes_per_token
    from mla_analysis.config import ConfigError

    for attention in ("mla", "mla_coupled_rope"):
        cfg = tiny(attention=attention, kv_lora_ranks=[4, 12], vocab_size=64)
        model = Transformer(cfg)
        assert [b.attn.wkv_b.in_features for b in model.layers] == [4, 12]
        cache = model.new_cache(2, 10, dtype=torch.float32)
        assert cache.bytes_per_token() == kv_bytes_per_token(cfg, torch.float32)
        assert count_params(cfg) == sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, 64, (2, 10))
        full = model(ids)
        cache = model.new_cache(2, 10)
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="kv_lora_ranks"):
        tiny(attention="mla", kv_lora_ranks=[4])
    with pytest.raises(ConfigError, match="kv_lora_ranks"):
        Transformer(tiny(attention="mla", kv_lora_ranks=[4, 0]))
