"""Config validation, property-based: valid configs build and run; invalid ones fail with ConfigError naming the key."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mla_analysis.config import ConfigError, ModelConfig, validate_model_config
from mla_analysis.models.transformer import Transformer


@st.composite
def valid_configs(draw) -> ModelConfig:
    attention = draw(st.sampled_from(["mha", "gqa", "mqa", "mla", "mla_coupled_rope"]))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    d_model = n_heads * head_dim * draw(st.sampled_from([1, 2]))
    kw = dict(attention=attention, n_heads=n_heads, d_model=d_model, head_dim=head_dim, vocab_size=draw(st.integers(8, 40)),
              n_layers=draw(st.integers(1, 3)), max_seq_len=32, d_ff=draw(st.sampled_from([8, 16])),
              rope_interleave=draw(st.booleans()))
    if attention == "gqa":
        kw["n_kv_heads"] = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    if attention.startswith("mla"):
        kw.update(kv_lora_rank=draw(st.integers(1, 12)), qk_rope_head_dim=draw(st.sampled_from([2, 4])),
                  qk_nope_head_dim=draw(st.sampled_from([0, 4])), v_head_dim=draw(st.sampled_from([2, 4])),
                  q_lora_rank=draw(st.sampled_from([None, 3])), mla_decode=draw(st.sampled_from(["naive", "absorb"])))
    ffn = draw(st.sampled_from(["dense", "moe", "none"]))
    kw["ffn"] = ffn
    if ffn == "moe":
        n_group = draw(st.sampled_from([1, 2]))
        experts = n_group * draw(st.sampled_from([2, 3]))
        topk_group = draw(st.integers(1, n_group))
        k_max = experts if n_group == 1 else topk_group * (experts // n_group)
        kw.update(n_routed_experts=experts, n_group=n_group, topk_group=topk_group,
                  n_activated_experts=draw(st.integers(1, k_max)), n_shared_experts=draw(st.integers(0, 2)),
                  moe_d_ff=draw(st.sampled_from([4, 8])), score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                  first_k_dense_replace=draw(st.integers(0, 1)), n_devices=draw(st.sampled_from([1, n_group])))
    return ModelConfig(**kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=valid_configs(), batch=st.integers(1, 2), length=st.integers(1, 9))
def test_valid_configs_build_and_run_with_documented_shapes(cfg, batch, length):
    validate_model_config(cfg)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, length))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (batch, length, cfg.vocab_size)  # model(input_ids) -> logits [B, T, vocab]
        assert torch.isfinite(logits).all()
        cache = model.new_cache(batch, length)
        stepwise = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(length)], dim=1)
    torch.testing.assert_close(stepwise, logits, atol=1e-4, rtol=1e-4)


# (field, bad value, base overrides): each is one impossible value or combination
INVALID = [
    ("attention", "mhla", {}),
    ("ffn", "sparse", {}),
    ("n_kv_heads", 3, dict(attention="gqa", n_heads=4)),
    ("n_kv_heads", 0, dict(attention="gqa", n_heads=4)),
    ("n_kv_heads", 2, dict(attention="mha", n_heads=4)),
    ("n_kv_heads", 2, dict(attention="mqa", n_heads=4)),
    ("qk_rope_head_dim", 3, dict(attention="mla")),
    ("qk_rope_head_dim", 0, dict(attention="mla")),
    ("kv_lora_rank", 0, dict(attention="mla")),
    ("kv_lora_rank", -4, dict(attention="mla")),
    ("q_lora_rank", 0, dict(attention="mla")),
    ("v_head_dim", 0, dict(attention="mla")),
    ("mla_decode", "fast", dict(attention="mla")),
    ("n_heads", 3, dict(d_model=64)),
    ("head_dim", 7, dict(attention="mha")),
    ("d_model", 0, {}),
    ("vocab_size", 0, {}),
    ("n_layers", 0, {}),
    ("n_activated_experts", 9, dict(ffn="moe", n_routed_experts=8)),
    ("n_activated_experts", 0, dict(ffn="moe")),
    ("topk_group", 5, dict(ffn="moe", n_routed_experts=8, n_group=4)),
    ("topk_group", 1, dict(ffn="moe", n_routed_experts=8, n_group=4, n_activated_experts=3)),
    ("n_group", 3, dict(ffn="moe", n_routed_experts=8)),
    ("n_devices", 3, dict(ffn="moe", n_routed_experts=8)),
    ("score_func", "relu", dict(ffn="moe")),
    ("capacity_factor", 0.0, dict(ffn="moe")),
    ("aux_alpha", -0.1, dict(ffn="moe")),
    ("bias_update_speed", -1.0, dict(ffn="moe")),
    ("rope_theta", 0.0, {}),
]


@pytest.mark.parametrize("key,value,base", INVALID, ids=[f"{k}={v!r}" for k, v, _ in INVALID])
def test_invalid_configs_fail_naming_the_key(key, value, base):
    cfg = ModelConfig(**{**base, key: value})
    with pytest.raises(ConfigError, match=rf"model\.{key}=.*allowed"):
        validate_model_config(cfg)
    with pytest.raises(ConfigError):
        Transformer(cfg)


def test_context_longer_than_rope_table_needs_scaling():
    cfg = ModelConfig(max_seq_len=64)
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        validate_model_config(cfg, context_len=128)
    validate_model_config(cfg, context_len=64)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["n_heads", "n_kv_heads", "kv_lora_rank", "qk_rope_head_dim", "n_routed_experts",
                                        "n_activated_experts", "n_group", "topk_group"]),
                       st.integers(-3, 9), min_size=1, max_size=4),
       st.sampled_from(["mha", "gqa", "mqa", "mla"]), st.sampled_from(["dense", "moe"]))
def test_random_configs_either_validate_and_run_or_raise_config_error(fields, attention, ffn):
    """No random config crashes with anything but ConfigError, and every accepted one runs."""
    cfg = ModelConfig(attention=attention, ffn=ffn, d_model=32, vocab_size=16, n_layers=1, d_ff=8, moe_d_ff=4, **fields)
    try:
        validate_model_config(cfg)
    except ConfigError as e:
        assert "model." in str(e) and "allowed" in str(e)
        return
    with torch.no_grad():
        assert Transformer(cfg)(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 16)
