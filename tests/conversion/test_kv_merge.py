"""Fewer K/V heads by mean-pooling (kv_merge.merge_kv_heads), its CLI subcommand and convert.direction=gqa."""

from __future__ import annotations

import json

import pytest
import torch

from mla_analysis.config import ConfigError, tiny
from mla_analysis.config.convert import ConvertConfig
from mla_analysis.conversion.job import convert_model, validate_convert
from mla_analysis.conversion.kv_merge import merge_kv_heads
from mla_analysis.models.transformer import Transformer

from ..helpers import randomise

GQA = dict(attention="gqa", n_heads=8, n_kv_heads=4, d_model=64, attn_qkv_bias=True)  # head_dim 8


def _model(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(tiny(**{**GQA, **overrides})).eval()
    randomise(model, seed=seed)
    return model


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(0))


def _group_heads_to(model: Transformer, n_kv: int, how) -> None:
    """Set every K/V head of each group of consecutive heads (weights and biases) to how(group rows), in place."""
    r, d_h = model.cfg.kv_heads // n_kv, model.cfg.attn_head_dim
    with torch.no_grad():
        for block in model.layers:
            for lin in (block.attn.wk, block.attn.wv):
                for p in (lin.weight, lin.bias):
                    for g in range(n_kv):
                        heads = [p[(g * r + j) * d_h : (g * r + j + 1) * d_h].clone() for j in range(r)]
                        for j in range(r):
                            p[(g * r + j) * d_h : (g * r + j + 1) * d_h] = how(heads)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_merge_is_exact_when_merged_heads_are_identical(n_kv):
    model = _model()
    _group_heads_to(model, n_kv, lambda heads: heads[0])
    merged = merge_kv_heads(model, n_kv)
    assert merged.cfg.kv_heads == n_kv and merged.cfg.attention == ("mqa" if n_kv == 1 else "gqa")
    assert merged.layers[0].attn.wk.weight.shape == (n_kv * 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()), model(_ids()), atol=1e-5, rtol=1e-5)
        cache = merged.new_cache(2, 12)
        assert cache.bytes_per_token() * (4 // n_kv) == model.new_cache(2, 12).bytes_per_token()


def test_merged_model_equals_the_source_with_each_group_set_to_its_mean():
    """Distinct heads: the merged model = the 4-head source whose heads are replaced by their group's mean
    (same architecture, so the query -> K/V head mapping is checked, not assumed)."""
    model = _model(seed=1)
    merged = merge_kv_heads(model, 2)
    _group_heads_to(model, 2, lambda heads: sum(heads) / len(heads))
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()), model(_ids()), atol=1e-5, rtol=1e-5)


def test_kv_heads_must_divide_the_source():
    model = _model()
    for bad in (3, 0, 8):
        with pytest.raises(ConfigError, match="kv_heads"):
            merge_kv_heads(model, bad)
    with pytest.raises(ConfigError, match="model.attention"):
        merge_kv_heads(Transformer(tiny(attention="mla")), 1)


def test_convert_direction_gqa_merges_and_quantises():
    model = _model()
    c = ConvertConfig(direction="gqa", kv_heads=1, kv_quant_bits=4, kv_quant_group=4)
    validate_convert(c, model.cfg)
    new = convert_model(c, model, (_ids(), _ids()))
    assert (new.cfg.attention, new.cfg.kv_heads, new.cfg.kv_quant_bits, new.cfg.kv_quant_group) == ("mqa", 1, 4, 4)
    # 8 query heads read one K/V head of 8 channels: 2 x (8 x 4 bits + 2 groups x 2 fp16) = 2 x 8 bytes per layer
    assert new.new_cache(1, 4).bytes_per_token() == 2 * 2 * (8 * 4 / 8 + 2 * 4)
    for key, kw in (("kv_heads", dict(kv_heads=3)), ("kv_quant_bits", dict(kv_quant_bits=5)),
                    ("kv_quant_group", dict(kv_quant_bits=8, kv_quant_group=3))):
        with pytest.raises(ConfigError, match=f"convert.{key}"):
            validate_convert(ConvertConfig(direction="gqa", **kw), model.cfg)


def test_cli_merge_kv_heads(tmp_path, capsys):
    from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
    from mla_analysis.conversion.cli import main
    from mla_analysis.interop.hf_io import load_model

    model = _model()
    save_model_config(tmp_path / "run", model.cfg)
    save_checkpoint(tmp_path / "run", model, None, step=0, state={})
    assert main(["merge-kv-heads", str(tmp_path / "run"), str(tmp_path / "out"), "--kv-heads", "2"]) == 0, capsys.readouterr().err
    out = load_model(tmp_path / "out")
    assert out.cfg.kv_heads == 2 and json.loads((tmp_path / "out" / "conversion.json").read_text())["kv_heads"] == [4, 2]
    with torch.no_grad():
        torch.testing.assert_close(out(_ids()), merge_kv_heads(model, 2)(_ids()))
    assert main(["merge-kv-heads", str(tmp_path / "run"), str(tmp_path / "bad"), "--kv-heads", "3"]) == 2
    assert "--kv-heads=3" in capsys.readouterr().err and not (tmp_path / "bad").exists()
