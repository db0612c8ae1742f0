"""Checkpoints as transformers writes them to disk: every parity check goes through ``save_pretrained``.

Import: transformers builds a model from its own config class, writes it with ``save_pretrained`` (per-expert
DeepSeek keys, tied embeddings left out, shards with an index, bf16), reads it back with ``from_pretrained``;
``from_hf`` of the same directory must give the same logits. Export: ``to_hf`` writes a directory,
``from_pretrained`` reads it and must reproduce the toolkit's logits, and a second ``save_pretrained`` of
that model writes the very same tensors (lossless both ways).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mla_analysis import load_model
from mla_analysis.training.checkpoint import CheckpointError
from mla_analysis.config import tiny
from mla_analysis.conversion.cli import from_hf, main, to_hf
from mla_analysis.models.transformer import Transformer

from ..helpers import randomise

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
             intermediate_size=48)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5)

HF_CONFIGS = {
    "v3-moe-shared-grouped-qlora": lambda: transformers.DeepseekV3Config(
        **SMALL, **MLA, **MOE, q_lora_rank=12, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5),
    "v3-moe-yarn": lambda: transformers.DeepseekV3Config(
        **SMALL, **MLA, **MOE, q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1, rope_parameters=YARN),
    "v2-moe-group-limited-qlora": lambda: transformers.DeepseekV2Config(
        **SMALL, **MLA, **MOE, q_lora_rank=12, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=16.0),
    "v2-moe-greedy-yarn": lambda: transformers.DeepseekV2Config(
        **SMALL, **MLA, **MOE, q_lora_rank=None, n_shared_experts=0, topk_method="greedy", rope_parameters=YARN),
    "llama-gqa-tied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-gqa": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral-mqa": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None,
                                                      tie_word_embeddings=False),
    "gpt2-tied": lambda: transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def _ids(vocab: int = 96, shape=(2, 17), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _saved_by_transformers(kind: str, path, **save_kw):
    """A random transformers model of ``kind`` written with save_pretrained, and the model read back from it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind]())
    randomise(model)
    dtype = save_kw.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kw)
    back = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return back.eval()


def _file_keys(path) -> set[str]:
    keys: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_from_hf_of_save_pretrained_dir_vs_transformers(tmp_path, kind):
    ref = _saved_by_transformers(kind, tmp_path)
    keys = _file_keys(tmp_path)
    if "moe" in kind:  # the on-disk layout: one set of keys per routed expert, no fused tensors
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    if "tied" in kind:
        assert "lm_head.weight" not in keys
    ours = from_hf(tmp_path)
    assert ours.cfg.tie_embeddings == ("tied" in kind)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_model(tmp_path)(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


EXPORTS = {
    "deepseek_v3": dict(attention="mla", rope_interleave=True, ffn="moe", score_func="sigmoid", norm_topk_prob=True,
                        route_scale=2.5, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=12),
    "deepseek_v2": dict(attention="mla", rope_interleave=True, ffn="moe", score_func="softmax", n_shared_experts=1,
                        rope_scaling=dict(factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                                          mscale_all_dim=0.5)),
    "llama": dict(attention="gqa", n_kv_heads=2, tie_embeddings=True),
    "qwen2": dict(attention="gqa", n_kv_heads=2, attn_qkv_bias=True),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("arch", list(EXPORTS))
def test_to_hf_then_from_pretrained_reproduces_ours_and_saves_back_identically(tmp_path, arch):
    torch.manual_seed(0)
    model = Transformer(tiny(**EXPORTS[arch])).eval()
    randomise(model, seed=3)
    if arch == "deepseek_v2":  # V2 has no routing bias: a nonzero one is refused (test below)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.zero_()
    to_hf(model, tmp_path / "ours", arch=arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert hf.config.model_type == arch
    ids = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "theirs")  # what transformers writes for the same model
    ours_sd, theirs_sd = load_file(str(tmp_path / "ours" / "model.safetensors")), load_file(
        str(tmp_path / "theirs" / "model.safetensors"))
    assert sorted(ours_sd) == sorted(theirs_sd)
    for k, v in ours_sd.items():
        assert torch.equal(v, theirs_sd[k]), k
    with torch.no_grad():
        torch.testing.assert_close(from_hf(tmp_path / "theirs")(ids), ref, atol=1e-6, rtol=1e-6)


def test_to_hf_refuses_to_drop_a_routing_bias(tmp_path):
    model = Transformer(tiny(**EXPORTS["deepseek_v2"]))
    randomise(model, seed=3)  # e_score_correction_bias nonzero: routing DeepseekV2 cannot express
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        to_hf(model, tmp_path / "out", arch="deepseek_v2")
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_both_ways_and_a_missing_shard(tmp_path, capsys):
    ref = _saved_by_transformers("v3-moe-shared-grouped-qlora", tmp_path / "hf", max_shard_size="40KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = _ids()
    ours = from_hf(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
    # export sharded: transformers reads our index and shards
    to_hf(ours, tmp_path / "out", max_shard_size="40KB")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        from_hf(tmp_path / "hf")
    capsys.readouterr()  # progress bars of the saves above
    rc = main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and shards[1].name in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_as_fp32(tmp_path, dtype):
    ref = _saved_by_transformers("v2-moe-group-limited-qlora", tmp_path, dtype=dtype)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == dtype
    ours = from_hf(tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ids = _ids()
    with torch.no_grad():  # the same half-precision values, both upcast to fp32
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_cli_from_hf_of_a_saved_deepseek_dir(tmp_path, capsys):
    ref = _saved_by_transformers("v3-moe-yarn", tmp_path / "hf")
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0, capsys.readouterr().err
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run")(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any("tokenizer" in p.name for p in (tmp_path / "run").iterdir())  # the source has none


def test_missing_expert_key_names_it(tmp_path):
    from safetensors.torch import save_file

    _saved_by_transformers("v3-moe-yarn", tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight"):
        from_hf(tmp_path)


def test_cli_from_hf_carries_the_source_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mla_analysis.conversion.cli import load_tokenizer, save_tokenizer

    vocab = {w: i for i, w in enumerate(["[UNK]", "to", "be", "or", "not", ",", "that", "is", "the", "question"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    _saved_by_transformers("llama-gqa-tied", tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0, capsys.readouterr().err
    text = "to be , or not to be , that is the question whether"
    want = fast(text).input_ids
    assert want[-1] == 0 and load_tokenizer(tmp_path / "run")(text).input_ids == want
    assert save_tokenizer(tmp_path / "run", tmp_path / "copy") and load_tokenizer(tmp_path / "copy")(text).input_ids == want
