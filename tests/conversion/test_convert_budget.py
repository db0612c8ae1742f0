"""convert.cache_budget / --cache-budget (cache elements per token and layer, RoPE included), its bad input, and
calibration from the Shakespeare calibration plays (never training or evaluation text)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mla_analysis.models.accounting import kv_elements_per_token_layer
from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
from mla_analysis.config import ConfigError, ConvertConfig, tiny
from mla_analysis.conversion.cli import main as convert_main
from mla_analysis.conversion.job import calibration, validate_convert
from mla_analysis.interop.hf_io import load_model
from mla_analysis.models.transformer import Transformer
from mla_analysis.training.results import atomic_write_json

GQA = dict(attention="gqa", n_kv_heads=2)  # d_model 32, 4 heads of 8 over 2 kv heads: K/V rank 32


def _cli(argv, capsys):
    rc = convert_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(init_std=0.2, **GQA)).eval()
    run = tmp_path / "run"
    save_model_config(run, model.cfg)
    save_checkpoint(run, model, None, step=0, state={})
    atomic_write_json(run / "results.json", {"status": "ok", "config": {"data": dict(vocab_size=128, seq_len=32)}})
    return run


@pytest.mark.parametrize(
    "flags,rank,rope",
    [(["--rope-dims", 4, "--rope-heads", "per_kv_head"], 20 - 2 * 4, 2 * 4),  # MHA2MLA: a key per kv head
     (["--rope-dims", 4], 20 - 4, 4),  # DeepSeek: one shared key
     ([], 20, 0)],  # all RoPE kept: coupled, no separate key
    ids=["per-kv-head", "shared", "coupled"],
)
def test_cache_budget_includes_the_rope_keys(run_dir, tmp_path, capsys, flags, rank, rope):
    out = tmp_path / "mla"
    rc, _, err = _cli(["mha-to-mla", run_dir, out, "--cache-budget", 20, *flags], capsys)
    assert rc == 0, err
    cfg = load_model(out).cfg
    assert cfg.kv_lora_rank == rank and cfg.qk_rope_heads * cfg.qk_rope_head_dim * (cfg.attention == "mla") == rope
    assert kv_elements_per_token_layer(cfg) == 20  # what a token costs per layer is the budget asked for


@pytest.mark.parametrize(
    "flags,named",
    [(["--cache-budget", 4 + 32 + 1, "--rope-dims", 4], "--cache-budget"),  # above rope + the full K/V rank (32)
     (["--cache-budget", 8, "--rope-dims", 4, "--rope-heads", "per_kv_head"], "--cache-budget"),  # nothing left
     (["--cache-budget", 20, "--rope-dims", 3], "--rope-dims"),
     (["--cache-budget", 20, "--rope-dims", 10], "--rope-dims"),  # above head_dim 8
     (["--cache-budget", 20, "--rope-dims", 4, "--strategy", "best"], "--strategy"),
     (["--cache-budget", 20, "--rope-dims", 4, "--rope-key", "magic"], "--rope-key"),
     (["--cache-budget", 20, "--rope-dims", 4, "--strategy", "2norm"], "--calib-examples")],
)
def test_bad_budgets_exit_2_with_one_line_before_compute(run_dir, tmp_path, capsys, monkeypatch, flags, named):
    import mla_analysis.conversion as conversion

    def refuse(*a, **k):
        raise AssertionError("converted despite bad input")

    monkeypatch.setattr(conversion, "mha_to_mla", refuse)
    rc, _, err = _cli(["mha-to-mla", run_dir, tmp_path / "o", *flags], capsys)
    assert rc == 2 and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "o").exists()


def test_validate_convert_names_each_key():
    cfg = tiny(**GQA)
    for c, key in ((ConvertConfig(cache_budget=20, kv_lora_rank=16), "kv_lora_rank"),
                   (ConvertConfig(cache_budget=100, rope_dims=4), "cache_budget"),
                   (ConvertConfig(cache_budget=20, rope_dims=4, rope_heads="per_kv_head", rope_key="rorope"), "rope_key"),
                   (ConvertConfig(kv_budget=20, allocation="energy", rope_dims=4, strategy="2norm"), "allocation")):
        with pytest.raises(ConfigError, match=f"convert.{key}"):
            validate_convert(c, cfg)
    validate_convert(ConvertConfig(cache_budget=40, rope_dims=8, target="mla", rope_key="rorope"), cfg)  # 8 + 32


def test_run_cli_bad_cache_budget_exits_2_before_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "mla_analysis.run", "+experiment=convert_mha", "hydra.mode=RUN",
                        f"hydra.run.dir={tmp_path / 'run'}", f"convert.cache_dir={tmp_path / 'cache'}",
                        "convert.kv_budget=null", "convert.cache_budget=100000", "convert.rope_dims=4"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: convert.cache_budget=100000 is invalid"), r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.json").exists()


@pytest.fixture(scope="module")
def shakespeare_data(tmp_path_factory):
    """A DataConfig over the installed plays with a small byte-level BPE tokenizer (trained on a few lines)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mla_analysis.assets import shakespeare_dir
    from mla_analysis.data import DataConfig
    from mla_analysis.data.shakespeare import ShakespeareConfig

    texts = shakespeare_dir()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([(texts / "lear_gut.txt").read_text()[:20000]], trainer=trainer)
    out = tmp_path_factory.mktemp("tok")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(out)
    return DataConfig(source="shakespeare", tokenizer=str(out), vocab_size=400, seq_len=256, lm_weight=1.0, eval_tasks=[],
                      shakespeare=ShakespeareConfig(root=str(texts)))


def test_calibration_comes_from_the_calibration_plays(shakespeare_data, tmp_path, monkeypatch):
    from mla_analysis.data.shakespeare import split_plays, split_tokens

    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(tmp_path / "cache"))
    (inputs, targets), about = calibration(ConvertConfig(calib_examples=3), shakespeare_data)
    assert inputs.shape == targets.shape == (3, 256) and about["convert.calib.tokens"] == 3 * 256
    assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])  # next-token targets of one stream
    named = {n.split(".")[0] for n in about["convert.calib.text"].split(": ")[1].split(", ")}
    split = split_plays()  # the default split, recomputed: every named play is a calibration play
    assert named and all(split[p] == "calibration" for p in named)
    stream = split_tokens(shakespeare_data, "calibration").tokens
    assert torch.equal(inputs.flatten(), torch.as_tensor(stream[: 3 * 256]))
    n = (len(stream) - 1) // 256
    with pytest.raises(ConfigError, match=f"convert.calib_examples={n + 1} is invalid \\(allowed: 1..{n}"):
        calibration(ConvertConfig(calib_examples=n + 1), shakespeare_data)


def test_calibration_offset_reads_the_next_disjoint_windows(shakespeare_data, tmp_path, monkeypatch):
    from mla_analysis.data.shakespeare import split_tokens

    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(tmp_path / "cache"))
    (inputs, targets), _ = calibration(ConvertConfig(calib_examples=2, calib_offset=3), shakespeare_data)
    stream = split_tokens(shakespeare_data, "calibration").tokens
    assert torch.equal(inputs.flatten(), torch.as_tensor(stream[3 * 256: 5 * 256]))  # windows 3 and 4 of the stream
    assert torch.equal(targets.flatten(), torch.as_tensor(stream[3 * 256 + 1: 5 * 256 + 1]))
    n = (len(stream) - 1) // 256
    with pytest.raises(ConfigError, match=f"convert.calib_examples=2 is invalid \\(allowed: 1..{n - (n - 1)}"):
        calibration(ConvertConfig(calib_examples=2, calib_offset=n - 1), shakespeare_data)
    with pytest.raises(ConfigError, match=f"convert.calib_offset={n} is invalid \\(allowed: 0..{n - 2}"):
        calibration(ConvertConfig(calib_examples=2, calib_offset=n), shakespeare_data)
