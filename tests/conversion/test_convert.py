"""Hugging Face checkpoint round trips: to_hf -> transformers loads it; from_hf -> the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from mla_analysis import load_model
from mla_analysis.training.checkpoint import CheckpointError
from mla_analysis.config import tiny
from mla_analysis.conversion.cli import from_hf, to_hf
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


# ------------------------------------------------------------------------------- Qwen2 and GPT-2
GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, rms_norm_eps=1e-5)
QWEN2 = dict(attention="gqa", n_kv_heads=2, attn_qkv_bias=True)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (HF and our inits set biases to 0 and norm weights to 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _ids(vocab: int, shape=(2, 13), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_tiny(kind: str, tied: bool):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tied,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("gpt2", False), ("qwen2", False)])
def test_from_hf_qwen2_gpt2_logits_vs_transformers(tmp_path, kind, tied):
    torch.manual_seed(0)
    hf = _hf_tiny(kind, tied).eval()
    _randomise(hf, seed=2)
    hf.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # what is on disk, read by transformers
    ours = from_hf(tmp_path)
    cfg = ours.cfg
    if kind == "gpt2":
        assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.d_ff, cfg.tie_embeddings) == (
            "learned", "layernorm", "gelu", True, 128, tied)
    else:
        assert cfg.attn_qkv_bias and not cfg.bias and cfg.attention == "gqa"
    ids = _ids(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_from_hf_gpt2_hub_layout_without_transformer_prefix(tmp_path):
    """The hub's gpt2 stores GPT2Model keys (wte.weight, h.0...) plus attn.bias mask buffers."""
    from safetensors.torch import save_file

    hf = _hf_tiny("gpt2", True).eval()
    _randomise(hf, seed=4)
    sd = {k[len("transformer."):]: v.contiguous() for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the old causal-mask buffer, ignored
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers reads that layout too
    ids = _ids(96)
    with torch.no_grad():
        torch.testing.assert_close(from_hf(tmp_path)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides,arch",
    [
        (dict(**GPT2, tie_embeddings=True), "GPT2LMHeadModel"),
        (dict(**GPT2, d_ff=48), "GPT2LMHeadModel"),
        (QWEN2, "Qwen2ForCausalLM"),
    ],
    ids=["gpt2-tied", "gpt2-untied", "qwen2-gqa"],
)
def test_to_hf_qwen2_gpt2_vs_transformers(tmp_path, overrides, arch):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = Transformer(cfg).eval()
    _randomise(model, seed=3)
    to_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == arch
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=1e-4)
        back = from_hf(tmp_path)
        keys = ("attention", "kv_heads", "attn_head_dim", "d_ff", "pos_emb", "norm", "mlp", "bias", "attn_qkv_bias",
                "tie_embeddings", "rms_norm_eps", "max_seq_len")
        assert {k: getattr(back.cfg, k) for k in keys} == {k: getattr(cfg, k) for k in keys}
        torch.testing.assert_close(back(ids), ref, atol=1e-6, rtol=1e-6)


def test_to_hf_bias_free_model_as_qwen2_writes_zero_biases(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(attention="gqa", n_kv_heads=2)).eval()
    _randomise(model, seed=5)
    to_hf(model, tmp_path, arch="qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert float(hf.model.layers[0].self_attn.k_proj.bias.detach().abs().sum()) == 0.0
    ids = _ids(128)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides,arch,key",
    [
        (GPT2, "llama", "pos_emb"),
        (QWEN2, "llama", "attn_qkv_bias"),
        (dict(GPT2, pos_emb="rope"), None, "pos_emb"),  # GPT-2 needs every GPT-2 knob
        (dict(rope_inv_freq=[1.0, 0.5, 0.25, 0.125]), None, "rope_inv_freq"),
        (dict(attention="mla", mlp="gelu"), None, "mlp"),
        (dict(), "gpt3", "arch"),
    ],
)
def test_to_hf_rejects_what_the_architecture_cannot_express(tmp_path, overrides, arch, key):
    model = Transformer(tiny(**overrides))
    with pytest.raises(ValueError, match=key):
        to_hf(model, tmp_path / "out", arch=arch)
    assert not (tmp_path / "out").exists()


def test_from_hf_rejects_unsupported_hf_options(tmp_path):
    from mla_analysis.interop.state_dict import from_hf_config

    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config(transformers.LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match="activation_function"):
        from_hf_config(transformers.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_hf_config(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="sliding"):
        from_hf_config(transformers.Qwen2Config(use_sliding_window=True, sliding_window=16))


# ------------------------------------------------------------------------------------------ CLI
def _cli(argv, capsys):
    from mla_analysis.conversion.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_from_hf_then_to_hf(tmp_path, capsys):
    torch.manual_seed(0)
    hf = _hf_tiny("gpt2", True).eval()
    _randomise(hf, seed=6)
    hf.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    rc, out, err = _cli(["from-hf", tmp_path / "hf", tmp_path / "run"], capsys)
    assert rc == 0, err
    ids = _ids(96)
    with torch.no_grad():
        ref = hf(ids).logits
        run_model = load_model(tmp_path / "run")  # a toolkit run dir: model_config.json + checkpoints/
        assert (tmp_path / "run" / "model_config.json").exists()
        torch.testing.assert_close(run_model(ids), ref, atol=1e-4, rtol=1e-4)
        rc, out, err = _cli(["to-hf", tmp_path / "run", tmp_path / "hf2"], capsys)
        assert rc == 0, err
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
        assert type(back).__name__ == "GPT2LMHeadModel"
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf2", "run"]  # no temporary leftovers


def test_cli_to_hf_arch_and_mha_to_mla(tmp_path, capsys):
    from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
    from mla_analysis.conversion.mla import mha_to_mla
    from mla_analysis.data import DataConfig, build_train_batches
    from mla_analysis.training.results import atomic_write_json

    torch.manual_seed(0)
    model = Transformer(tiny(attention="gqa", n_kv_heads=2)).eval()
    _randomise(model, seed=7)
    run = tmp_path / "run"
    save_model_config(run, model.cfg)
    save_checkpoint(run, model, None, step=0, state={})
    data = dict(vocab_size=128, seq_len=64, lm_weight=1.0)
    atomic_write_json(run / "results.json", {"status": "ok", "config": {"data": data}, "flat": {}})
    ids = _ids(128)

    rc, _, err = _cli(["to-hf", run, tmp_path / "qwen", "--arch", "qwen2"], capsys)
    assert rc == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)

    argv = ["mha-to-mla", run, tmp_path / "mla", "--kv-lora-rank", 24, "--rope-dims", 4, "--strategy", "low",
            "--calib-examples", 6]
    rc, _, err = _cli(argv, capsys)
    assert rc == 0, err
    calib = build_train_batches(DataConfig(**data), 6).batch_at(0)[0]
    want = mha_to_mla(model, 24, rope_dims=4, strategy="low", calib=calib).eval()
    got = load_model(tmp_path / "mla")
    assert got.cfg.attention == "mla" and got.cfg.rope_inv_freq == want.cfg.rope_inv_freq is not None
    info = json.loads((tmp_path / "mla" / "conversion.json").read_text())
    assert info["rope_pairs"] == [2, 3] and info["whiten"] is True
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), atol=0, rtol=0)


def test_cli_errors_one_line_exit_2_nothing_written(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = Transformer(tiny(**GPT2))
    to_hf(gpt2, tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    cases = [
        (["from-hf", tmp_path / "missing", tmp_path / "o1"], "missing"),
        (["from-hf", tmp_path / "empty", tmp_path / "o2"], "config.json"),
        (["to-hf", tmp_path / "hf", tmp_path / "o3", "--arch", "gpt5"], "--arch"),
        (["to-hf", tmp_path / "hf", tmp_path / "o4", "--arch", "llama"], "pos_emb"),
        (["to-hf", tmp_path / "empty", tmp_path / "o5"], "empty"),
        (["from-hf", tmp_path / "hf", tmp_path / "full"], "full"),
        (["mha-to-mla", tmp_path / "hf", tmp_path / "o6", "--kv-lora-rank", 8], "pos_emb"),
    ]
    for argv, named in cases:
        rc, out, err = _cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full", "hf"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_cli_mha_to_mla_calibration_needs_the_run_record(tmp_path, capsys):
    model = Transformer(tiny())
    to_hf(model, tmp_path / "hf")
    rc, _, err = _cli(["mha-to-mla", tmp_path / "hf", tmp_path / "o", "--kv-lora-rank", 8, "--calib-examples", 2], capsys)
    assert rc == 2 and "results.json" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_module_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "mla_analysis.convert", "from-hf", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and str(tmp_path / "nope") in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_from_hf_reads_configs_written_without_the_newer_fields(tmp_path):
    """An older llama config.json (no attention_bias / mlp_bias / head_dim) still loads, bias-free."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    to_hf(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("attention_bias", "mlp_bias", "head_dim", "layer_types"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    back = from_hf(tmp_path)
    assert not back.cfg.attn_qkv_bias and not back.cfg.bias and back.cfg.pos_emb == "rope"
    ids = _ids(128)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)


def test_cli_mha_to_mla_without_the_latent_norm_is_exact_at_the_kv_rank(tmp_path, capsys):
    """--no-kv-norm at the rank of the source's K/V maps (2 x 2 kv heads x 8 = 32 < d_model 64) reproduces its logits."""
    from mla_analysis.training.checkpoint import save_checkpoint, save_model_config

    torch.manual_seed(0)
    src = Transformer(tiny(d_model=64, n_heads=4, head_dim=8, attention="gqa", n_kv_heads=2, init_std=0.2)).eval()
    save_model_config(tmp_path / "run", src.cfg)
    save_checkpoint(tmp_path / "run", src, None, step=0, state={})
    ids = torch.randint(0, src.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for flag, exact in (["--no-kv-norm"], True), ([], False):
        out = tmp_path / f"mla{len(flag)}"
        rc, _, err = _cli(["mha-to-mla", tmp_path / "run", out, "--kv-lora-rank", 32, *flag], capsys)
        assert rc == 0, err
        assert json.loads((out / "conversion.json").read_text())["kv_norm"] is (not flag)
        new = load_model(out)
        with torch.no_grad():
            rel = float((new(ids) - src(ids)).norm() / src(ids).norm())
        assert (rel < 1e-5) is exact, rel
