"""GPT-2 / Qwen2 model knobs (learned positions, LayerNorm, GELU MLP, biases): positions matter, config
validation and old configs. Cached decoding, parameter and FLOP accounting of these variants (``VARIANTS``) are
checked with the other variants' in test_models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mla_analysis.config import ConfigError, ModelConfig, tiny
from mla_analysis.models.transformer import Transformer
from tests.helpers import GPT2, KNOB_VARIANTS as VARIANTS


def _randomised(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 and p.numel() == cfg.d_model else 0.0))
    return model


def test_learned_positions_matter():
    """Permuting the position table changes the logits: positions really enter (no RoPE left)."""
    cfg = tiny(**GPT2)
    model = _randomised(cfg, seed=1)
    assert model.rope is None and model.pos_embed.weight.shape == (cfg.max_seq_len, cfg.d_model)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        model.pos_embed.weight.copy_(model.pos_embed.weight.flip(0))
        assert (model(ids) - ref).abs().max() > 1e-2


def test_default_knobs_add_nothing():
    """The default (RoPE, RMSNorm, SwiGLU, no bias) model has exactly the parameters it had before."""
    names = set(Transformer(tiny()).state_dict())
    assert not any(n.endswith(".bias") or "pos_embed" in n for n in names)
    assert {"layers.0.ffn.w1.weight", "layers.0.ffn.w3.weight", "layers.0.attn_norm.weight"} <= names


def test_old_config_dicts_load_with_defaults():
    new_keys = {"pos_emb", "norm", "mlp", "bias", "attn_qkv_bias", "rope_inv_freq"}
    old = {k: v for k, v in tiny().to_dict().items() if k not in new_keys}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.attn_qkv_bias, cfg.rope_inv_freq) == (
        "rope", "rmsnorm", "swiglu", False, False, None)


def test_rope_inv_freq_replaces_the_computed_frequencies():
    freqs = [1.0, 0.3, 0.0, 0.01]
    model = Transformer(tiny(rope_inv_freq=freqs))
    torch.testing.assert_close(model.rope.inv_freq, torch.tensor(freqs))
    default = Transformer(tiny())
    assert not torch.allclose(default.rope.inv_freq, model.rope.inv_freq)
    # and it survives a config dict round trip (the run directory's model_config.json)
    assert ModelConfig.from_dict(model.cfg.to_dict()).rope_inv_freq == freqs


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(attention="mla", pos_emb="learned"), "pos_emb"),
        (dict(attention="mla", attn_qkv_bias=True), "attn_qkv_bias"),
        (dict(attention="mla", bias=True), "bias"),
        (dict(ffn="moe", mlp="gelu"), "mlp"),
        (dict(ffn="moe", bias=True), "bias"),
        (dict(pos_emb="learned", rope_scaling=dict(factor=2.0)), "rope_scaling"),
        (dict(rope_inv_freq=[1.0, 0.5]), "rope_inv_freq"),
        (dict(rope_inv_freq=[1.0, 0.5, -0.1, 0.0]), "rope_inv_freq"),
        (dict(attention="mla", rope_inv_freq=[1.0, 0.5, 0.2, 0.1]), "rope_inv_freq"),  # qk_rope_head_dim 4: 2 values
    ],
)
def test_invalid_knob_combinations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        tiny(**overrides)


def test_learned_positions_allow_odd_head_dim():
    cfg = tiny(pos_emb="learned", n_heads=4, head_dim=5)  # no RoPE pairs needed
    assert Transformer(cfg)(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, cfg.vocab_size)
    with pytest.raises(ConfigError, match="head_dim"):
        tiny(n_heads=4, head_dim=5)
