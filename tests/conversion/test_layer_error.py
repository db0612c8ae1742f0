"""Teacher-forced per-layer damage of a conversion: closed forms on perturbed copies, and layer 0 against the
converted model's own forward (whose layer-0 input is the source's: embeddings and norms are shared)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mla_analysis.config import tiny
from mla_analysis.conversion.layer_error import attach
from mla_analysis.conversion.mla import mha_to_mla
from mla_analysis.models.transformer import Transformer
from mla_analysis.training.forward_hooks import run_hooked


def _source(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny(attention="gqa", n_kv_heads=2, init_std=0.2)).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)  # an O(1) residual stream, as in trained models
    return model


def _ids(shape=(3, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _errors(source, converted, ids, batch_size=2):
    errors, handles = attach(source, converted)
    run_hooked(source, handles, ids, batch_size)
    return errors


def test_scaled_output_projection_gives_exactly_that_relative_error_in_that_layer_only():
    source = _source()
    converted = copy.deepcopy(source)
    with torch.no_grad():
        converted.layers[0].attn.wo.weight.mul_(1.25)  # y' = 1.25 y in layer 0: relative error exactly 0.25
    errors = _errors(source, converted, _ids())
    assert errors[0].rel_err() == pytest.approx(0.25, rel=1e-5)
    np.testing.assert_allclose(errors[0].per_sequence(), 0.25, rtol=1e-5)
    assert len(errors[0].err2) == 3  # one entry per sequence, across batches of 2 and 1
    # teacher forcing: layer 1 sees the source's input, so layer 0's change does not reach it
    assert errors[1].rel_err() == 0.0
    # and the hooks are gone: a further forward adds nothing
    source(_ids())
    assert len(errors[0].err2) == 3


def test_exact_conversion_has_no_damage_and_a_low_rank_one_matches_its_own_layer_0():
    source = _source()
    D = source.cfg.d_model
    exact = mha_to_mla(source, D, kv_norm=False)  # all RoPE kept (coupled), full rank, no latent norm: exact
    for e in _errors(source, exact, _ids()):
        assert e.rel_err() < 1e-5
    low = mha_to_mla(source, 6, rope_dims=4, calib=_ids((4, 24), seed=2), kv_norm=False)  # shared RoPE key, rank 6
    errors = _errors(source, low, _ids())
    assert all(e.rel_err() > 1e-2 for e in errors)
    # layer 0's input is the same in both models (shared embedding and attn_norm): the converted model's own
    # forward gives the reference for the teacher-forced error there
    outs = {}

    def keep(name):
        def fn(module, args, output):
            outs[name] = output.detach().double()
        return fn

    h = [source.layers[0].attn.register_forward_hook(keep("src")), low.layers[0].attn.register_forward_hook(keep("low"))]
    with torch.no_grad():
        source(_ids())
        low(_ids())
    for handle in h:
        handle.remove()
    ref = float((outs["low"] - outs["src"]).norm() / outs["src"].norm())
    assert errors[0].rel_err() == pytest.approx(ref, rel=1e-5)


def test_layer_counts_must_match():
    source = _source()
    other = Transformer(tiny(attention="gqa", n_kv_heads=2, n_layers=1))
    with pytest.raises(ValueError, match="2 source layers vs 1 converted"):
        attach(source, other)
