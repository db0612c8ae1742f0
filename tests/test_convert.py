"""Hugging Face checkpoint round trips: to_hf -> transformers loads it; from_hf -> the same logits."""

from __future__ import annotations

import pytest
import torch

from mla_analysis import load_model
from mla_analysis.checkpoint import CheckpointError
from mla_analysis.config import tiny
from mla_analysis.convert import from_hf, to_hf
from mla_analysis.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "overrides,arch",
    [
        (dict(attention="mla", rope_interleave=True, ffn="moe", score_func="sigmoid", norm_topk_prob=True,
              route_scale=2.5, n_group=2, topk_group=1, first_k_dense_replace=1), "DeepseekV3ForCausalLM"),
        (dict(attention="gqa", n_kv_heads=2, tie_embeddings=True), "LlamaForCausalLM"),
    ],
    ids=["mla-moe-v3", "gqa-llama-tied"],
)
def test_to_hf_from_hf_round_trip_vs_transformers(tmp_path, overrides, arch):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)  # exercise the bias export
    to_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(from_hf(tmp_path)(ids), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(tmp_path)(ids), ours, atol=1e-5, rtol=1e-5)


def test_from_hf_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(tmp_path)
    to_hf(Transformer(tiny(attention="mla", rope_interleave=True)), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(tmp_path)
