"""Tests for mla_analysis.data: determinism, task construction vs the reference definitions, scoring, sources."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mla_analysis.data import (
    DEFAULT_EVAL_TASKS,
    IGNORE,
    NIAH_PRESETS,
    TASKS,
    DataConfig,
    HFConfig,
    LanguageConfig,
    SeqLenError,
    MarkovLanguage,
    Vocab,
    build_eval_sets,
    build_train_batches,
    language_optimal_loss,
    load_text_corpora,
    make_arithmetic,
    make_copy,
    make_mqar,
    make_niah,
    make_passkey,
    make_task,
    resolve_eval_tasks,
    score_logits,
    score_predictions,
    train_batch,
)
from mla_analysis.data import vocab as V
from mla_analysis.data.text import tokenize_docs

VOCAB = Vocab(256)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def scored(targets: torch.Tensor, i: int) -> tuple[list[int], list[int]]:
    """(positions, target tokens) of example i's scored positions."""
    pos = torch.nonzero(targets[i] != IGNORE).flatten().tolist()
    return pos, targets[i, pos].tolist()


# ---- vocab --------------------------------------------------------------------------------------------------
def test_vocab_layout():
    v = Vocab(128)
    specials = [v.PAD, v.BOS, v.EOS, v.QUERY, v.KV, v.IS, v.PASSKEY, v.COPY, v.PLUS, v.EQUALS, v.ANSWER]
    assert specials == list(range(11)) and v.SEP == v.EOS
    assert list(v.digit_ids) == list(range(16, 26)) and v.digit(7) == 23 and v.digit_value(23) == 7
    assert list(v.hex_ids) == list(range(16, 32)) and v.hex_digit(15) == 31
    assert v.word_ids == range(32, 128)
    assert set(v.key_ids).isdisjoint(v.value_ids) and len(v.key_ids) == len(v.value_ids) == 48
    assert set(v.key_ids) | set(v.value_ids) == set(v.word_ids)
    assert set(specials).isdisjoint(v.hex_ids) and set(v.hex_ids).isdisjoint(v.word_ids)
    d = v.describe()
    assert d["vocab_size"] == 128 and d["words"] == [32, 128] and d["specials"]["QUERY"] == 3


def test_vocab_too_small_names_key_and_minimum():
    with pytest.raises(ValueError, match=r"data\.vocab_size.*128"):
        Vocab(100)


# ---- determinism ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_determinism(name):
    a = make_task(name, 8, rng(5), VOCAB, 128)
    b = make_task(name, 8, rng(5), VOCAB, 128)
    c = make_task(name, 8, rng(6), VOCAB, 128)
    assert all(t.dtype == torch.int64 and t.shape == (8, 128) for t in a)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_pinned_hashes():
    """Catches cross-machine / cross-version drift: a training batch (language + default mixture) and eval sets."""
    x, y = build_train_batches(DataConfig(seq_len=64), batch_size=16).batch_at(3)
    h = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes())
    for name, (ex, ey) in build_eval_sets(DataConfig(seq_len=64, eval_examples=4)).items():
        h.update(name.encode() + ex.numpy().tobytes() + ey.numpy().tobytes())
    assert h.hexdigest()[:16] == PINNED_SHA256


PINNED_SHA256 = "e5daa87ae11815ed"  # update only for an intended change of the generators


# ---- MQAR ---------------------------------------------------------------------------------------------------
def test_mqar_matches_reference_construction():
    P, L, n = 8, 128, 64
    x, y = make_mqar(n, rng(1), VOCAB, L, num_kv_pairs=P, random_non_queries=False)
    keys_ok, vals_ok = set(VOCAB.key_ids), set(VOCAB.value_ids)
    for i in range(n):
        ctx = x[i, : 2 * P].tolist()
        keys, vals = ctx[0::2], ctx[1::2]
        assert set(keys) <= keys_ok and set(vals) <= vals_ok
        assert len(set(keys)) == P and len(set(vals)) == P
        pair = dict(zip(keys, vals))
        pos, tgt = scored(y, i)
        # targets sit exactly on the query-key positions (even offsets in the query region) ...
        assert len(pos) == P and all(p >= 2 * P and (p - 2 * P) % 2 == 0 for p in pos)
        assert sorted(x[i, pos].tolist()) == sorted(keys)
        # ... and equal the value paired with that key in the context
        assert tgt == [pair[k] for k in x[i, pos].tolist()]
        # everything else in the query region is the filler token
        rest = [t for j, t in enumerate(x[i, 2 * P :].tolist()) if j + 2 * P not in pos]
        assert set(rest) == {V.PAD}


def test_mqar_random_non_queries_fill_from_mqar_vocab():
    P = 4
    x, y = make_mqar(32, rng(2), VOCAB, 64, num_kv_pairs=P, random_non_queries=True)
    allowed = {V.PAD} | set(VOCAB.key_ids) | set(VOCAB.value_ids)
    assert set(x.flatten().tolist()) <= allowed
    region = x[:, 2 * P :]
    assert (region != V.PAD).float().mean() > 0.9  # filler is no longer the constant 0
    assert int((y != IGNORE).sum()) == 32 * P


def test_mqar_power_law_slot_bias():
    P, L, n = 4, 128, 2000
    g = (L - 2 * P) // 2

    def slot_freq(a):
        _, y = make_mqar(n, rng(3), VOCAB, L, num_kv_pairs=P, power_a=a, random_non_queries=False)
        slots = (torch.nonzero(y != IGNORE)[:, 1] - 2 * P) // 2
        return torch.bincount(slots, minlength=g).double() / n  # per-example occupancy of each slot

    biased, uniform = slot_freq(0.01), slot_freq(1.0)
    assert abs(uniform[:4].mean().item() - P / g) < 0.02  # a = 1: every slot holds a key w.p. P/g
    assert biased[0] > 0.5 and biased[0] > 5 * uniform[0]
    assert biased[:4].sum() > 3 * uniform[:4].sum()
    assert biased[:8].mean() > biased[-8:].mean() * 5


def test_mqar_validation_names_knob():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make_mqar(1, rng(), VOCAB, 64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make_mqar(1, rng(), VOCAB, 128, num_kv_pairs=20, key_vocab_size=10)


# ---- NIAH ----------------------------------------------------------------------------------------------------
def parse_niah(seq: list[int], klen: int, vlen: int):
    """Needles (in order: (start, key, value)) and query blocks (key) of one NIAH sequence."""
    needles, queries = [], []
    for p, t in enumerate(seq):
        if t == V.KV:
            key = tuple(seq[p + 1 : p + 1 + klen])
            assert seq[p + 1 + klen] == V.IS and seq[p + 2 + klen + vlen] == V.EOS
            needles.append((p, key, tuple(seq[p + 2 + klen : p + 2 + klen + vlen])))
        if t == V.QUERY:
            assert seq[p + 1 + klen] == V.ANSWER
            queries.append((p, tuple(seq[p + 1 : p + 1 + klen])))
    return needles, queries


TYPE_IDS = {"words": set(VOCAB.word_ids), "numbers": set(VOCAB.digit_ids), "uuids": set(VOCAB.hex_ids)}


@pytest.mark.parametrize("name", sorted(NIAH_PRESETS))
def test_niah_presets_answer_is_needle_value(name):
    pre = NIAH_PRESETS[name]
    klen = {"words": 2, "numbers": 7, "uuids": 8}[pre["key_type"]]
    vlen = {"words": 2, "numbers": 7, "uuids": 8}[pre["value_type"]]
    n = 24
    x, y = TASKS[name](n, rng(7), VOCAB, 128)
    for i in range(n):
        seq = x[i].tolist()
        needles, queries = parse_niah(seq, klen, vlen)
        assert len(queries) == pre["num_queries"]
        by_key: dict = {}
        for _, k, v in needles:
            by_key.setdefault(k, []).append(v)
        expected = []
        for _, k in queries:
            assert len(by_key[k]) == pre["num_values"]  # every value of an asked key is in the haystack
            expected += [tok for v in by_key[k] for tok in v]  # in haystack order
            assert set(k) <= TYPE_IDS[pre["key_type"]]
        for _, _, v in needles:
            assert set(v) <= TYPE_IDS[pre["value_type"]]
        pos, tgt = scored(y, i)
        assert tgt == expected
        assert [seq[p + 1] for p in pos] == tgt  # teacher forced: position t predicts input t+1
        assert min(pos) > max(p for p, _, _ in needles)  # answers come after every needle
        asked = {k for _, k in queries}
        distractors = {k for k in by_key if k not in asked}
        if pre["haystack"] == "needle":
            assert len(distractors) >= 3  # the haystack is made of other needles
        else:
            assert len(distractors) == pre["num_keys"] - pre["num_queries"]


def test_niah_noise_haystack_is_one_repeated_sentence():
    sentences = set()
    for seed in (0, 9):
        x, _ = TASKS["niah_single_1"](4, rng(seed), VOCAB, 128)
        for i in range(4):
            seq = x[i].tolist()
            needles, queries = parse_niah(seq, 2, 7)
            (start, _, _), = needles
            hay = seq[:start] + seq[start + 12 : queries[0][0]]  # drop the 12-token needle and the query
            sent = hay[:13]  # noise_sentence_len 12 + EOS
            assert sent[-1] == V.EOS
            assert hay == (sent * 20)[: len(hay)]
            assert start % 13 == 0 or start == len(hay)  # needles go in at sentence boundaries (or the end)
            sentences.add(tuple(sent))
    assert len(sentences) == 1  # one fixed sentence, whatever the sample seed


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth_places_needle(depth):
    L, klen, vlen = 128, 2, 7
    x, _ = make_niah(6, rng(4), VOCAB, L, haystack="language", depth=depth)
    needle_len, query_len = klen + vlen + 3, klen + 2 + vlen
    H = L - needle_len - query_len
    for i in range(6):
        start = x[i].tolist().index(V.KV)
        assert abs(start - depth * H) <= 0.5


def test_niah_depth_in_needle_haystack_orders_target_needle():
    L = 128
    x, _ = make_niah(6, rng(4), VOCAB, L, haystack="needle", depth=1.0)
    for i in range(6):
        needles, queries = parse_niah(x[i].tolist(), 2, 7)
        assert needles[-1][1] == queries[0][1]  # depth 1: the asked needle is the deepest one
    x, _ = make_niah(6, rng(4), VOCAB, L, haystack="needle", depth=0.0)
    for i in range(6):
        needles, queries = parse_niah(x[i].tolist(), 2, 7)
        assert needles[0][1] == queries[0][1]


def test_niah_validation():
    with pytest.raises(ValueError, match="data.seq_len"):
        make_niah(1, rng(), VOCAB, 32, num_keys=4)
    with pytest.raises(ValueError, match="haystack"):
        make_niah(1, rng(), VOCAB, 128, haystack="essay")


# ---- passkey / copy / arithmetic -------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [None, 0.0, 0.25, 1.0])
def test_passkey_answer_and_depth(depth):
    L, d = 96, 5
    x, y = make_passkey(16, rng(8), VOCAB, L, n_digits=d, depth=depth)
    H = L - 2 * (d + 2)
    for i in range(16):
        seq = x[i].tolist()
        p = seq.index(V.PASSKEY)
        stated = seq[p + 1 : p + 1 + d]
        assert seq[p + 1 + d] == V.EOS and set(stated) <= set(VOCAB.digit_ids)
        assert seq[-d - 2 : -d] == [V.PASSKEY, V.QUERY]
        pos, tgt = scored(y, i)
        assert tgt == stated and pos == list(range(L - d - 1, L - 1))
        if depth is not None:
            assert p == round(depth * H)


@pytest.mark.parametrize("distance", [None, 10])
def test_copy_reproduces_span(distance):
    L, S = 64, 8
    x, y = make_copy(16, rng(9), VOCAB, L, span_len=S, distance=distance)
    for i in range(16):
        seq = x[i].tolist()
        first = seq.index(V.COPY)
        span = seq[first + 1 : first + 1 + S]
        assert seq[first + 1 + S] == V.SEP and set(span) <= set(VOCAB.word_ids)
        second = L - S - 1
        assert seq[second] == V.COPY and seq[second + 1 :] == span
        pos, tgt = scored(y, i)
        assert tgt == span and pos == list(range(second, L - 1))
        if distance is not None:
            assert second - (first + S + 2) == distance


@pytest.mark.parametrize("reverse", [False, True])
def test_arithmetic_answers_are_sums(reverse):
    nd, L = 3, 64
    x, y = make_arithmetic(16, rng(10), VOCAB, L, n_digits=nd, reverse_answer=reverse)
    n_checked = 0
    for i in range(16):
        seq = x[i].tolist()
        tgt_at = {p + 1: t for p, t in zip(*scored(y, i))}  # input position -> expected token there
        for p, t in enumerate(seq):
            if t != V.EQUALS:
                continue
            plus = seq.index(V.PLUS, p - nd - 1)
            a = int("".join(str(VOCAB.digit_value(d)) for d in seq[plus - nd : plus]))
            b = int("".join(str(VOCAB.digit_value(d)) for d in seq[plus + 1 : p]))
            ans = [tgt_at[q] for q in range(p + 1, p + nd + 2)]
            digits = "".join(str(VOCAB.digit_value(d)) for d in ans)
            assert int(digits[::-1] if reverse else digits) == a + b
            assert seq[p + nd + 2] == V.EOS
            n_checked += 1
    assert n_checked == 16 * (L // (3 * nd + 4))
    assert len(tgt_at) == (L // (3 * nd + 4)) * (nd + 1)


# ---- synthetic language ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("order,vocab_size", [(1, 256), (2, 128)])
def test_entropy_rate_matches_monte_carlo(order, vocab_size):
    lang = MarkovLanguage(Vocab(vocab_size), LanguageConfig(order=order), seed=11)
    x = lang.sample_batch(100, 1500, rng(12))
    nll = -np.concatenate([lang.log_probs(row) for row in x])
    se = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - lang.entropy_rate()) < max(5 * se, 0.02)
    assert 0.5 < lang.entropy_rate() < np.log(vocab_size)  # structured, far from uniform


def test_language_sampling_matches_its_distribution():
    lang = MarkovLanguage(Vocab(128), LanguageConfig(order=1), seed=3)
    x = lang.sample_batch(400, 200, rng(4))
    ctx = int(x[0, 10])
    p = lang.next_token_probs([ctx])
    assert abs(p.sum() - 1) < 1e-12 and set(np.flatnonzero(p)) <= set(VOCAB.word_ids) | {V.EOS}
    prev, nxt = x[:, :-1].ravel(), x[:, 1:].ravel()
    follow = nxt[prev == ctx]
    emp = np.bincount(follow, minlength=128) / len(follow)
    assert np.abs(emp - p).sum() < 6 * np.sqrt(128 / len(follow))  # L1 distance at sampling-noise level
    lp = lang.log_probs(x[0])
    assert np.allclose(lp[5], np.log(lang.next_token_probs(x[0, 5:6])[x[0, 6]]))


def test_language_structure_fixed_by_language_seed():
    a = MarkovLanguage(VOCAB, seed=1)
    assert a.entropy_rate() == MarkovLanguage(VOCAB, seed=1).entropy_rate()
    assert a.entropy_rate() != MarkovLanguage(VOCAB, seed=2).entropy_rate()
    assert np.array_equal(a.sample(50, rng(0)), a.sample(50, rng(0)))


# ---- scoring ----------------------------------------------------------------------------------------------------
def test_score_predictions():
    _, y = make_task("niah_multivalue", 8, rng(0), VOCAB, 128)
    assert score_predictions(y.clone(), y) == {"exact_match": 1.0, "token_acc": 1.0}
    wrong = torch.full_like(y, V.PAD)  # PAD is never an answer
    assert score_predictions(wrong, y) == {"exact_match": 0.0, "token_acc": 0.0}
    # per-example then mean: example 0 half right, example 1 fully right, example 2 unscored (excluded)
    t = torch.tensor([[5, 6, -100, -100], [7, -100, -100, -100], [-100] * 4])
    p = torch.tensor([[5, 0, 0, 0], [7, 0, 0, 0], [1, 1, 1, 1]])
    s = score_predictions(p, t)
    assert s["exact_match"] == pytest.approx(0.5) and s["token_acc"] == pytest.approx(0.75)
    logits = torch.nn.functional.one_hot(p, 16).float()  # [N, L, V]
    assert score_logits(logits, t) == s


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_score_predictions_matches_reference_loop(data):
    n, L = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 8))
    tok = st.integers(0, 3)
    t = torch.tensor([[data.draw(st.one_of(tok, st.just(IGNORE))) for _ in range(L)] for _ in range(n)])
    p = torch.tensor([[data.draw(tok) for _ in range(L)] for _ in range(n)])
    em, acc = [], []
    for i in range(n):
        pairs = [(int(p[i, j]), int(t[i, j])) for j in range(L) if t[i, j] != IGNORE]
        if pairs:
            right = sum(a == b for a, b in pairs)
            em.append(float(right == len(pairs)))
            acc.append(right / len(pairs))
    s = score_predictions(p, t)
    if not em:
        assert np.isnan(s["exact_match"]) and np.isnan(s["token_acc"])
    else:
        assert s["exact_match"] == pytest.approx(np.mean(em)) and s["token_acc"] == pytest.approx(np.mean(acc))


# ---- mixture / batches / eval -------------------------------------------------------------------------------------
def test_batch_at_resume_and_ranks():
    cfg = DataConfig(seq_len=64)
    run = build_train_batches(cfg, 8)
    batches = [next(run) for _ in range(4)]
    resumed = build_train_batches(cfg, 8, start_step=2)
    for k in (2, 3):
        x, y = next(resumed)
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    assert torch.equal(run.batch_at(1)[0], batches[1][0])
    assert torch.equal(train_batch(cfg, 3, 8)[1], batches[3][1])
    cfg.seed = 1  # an edited config is a different key, not a stale cache hit
    assert not torch.equal(train_batch(cfg, 3, 8)[0], batches[3][0])
    r1 = build_train_batches(cfg, 8, rank=1, world_size=2)
    assert not torch.equal(r1.batch_at(0)[0], batches[0][0])
    assert not torch.equal(batches[0][0], batches[1][0])
    with pytest.raises(ValueError, match="rank"):
        build_train_batches(cfg, 8, rank=2, world_size=2)


def test_mixture_weights_and_lm_rows():
    cfg = DataConfig(seq_len=64, lm_weight=0.3, tasks={"mqar": 1.0})
    it = build_train_batches(cfg, 64)
    lm_rows = 0
    for k in range(10):
        x, y = it.batch_at(k)
        is_lm = (y != IGNORE).all(dim=1)
        lm_rows += int(is_lm.sum())
        assert torch.equal(y[is_lm, :-1], x[is_lm, 1:])  # LM targets are the next token
        assert ((y[~is_lm] != IGNORE).sum(dim=1) == cfg.mqar.num_kv_pairs).all()
    assert abs(lm_rows / 640 - 0.3) < 0.06


def test_config_validation_names_keys():
    with pytest.raises(ValueError, match=r"data\.tasks"):
        build_train_batches(DataConfig(tasks={"nope": 1.0}), 4)
    with pytest.raises(ValueError, match=r"data\.source"):
        build_eval_sets(DataConfig(source="web"))
    with pytest.raises(ValueError, match=r"data\.copy_task"):
        build_train_batches(DataConfig(seq_len=32, lm_weight=0.0, tasks={"copy": 1.0}), 4).batch_at(0)


def test_eval_sets_fixed_and_held_out():
    cfg = DataConfig(seq_len=64, eval_examples=16, eval_tasks=["mqar", "passkey", "niah_single_2"])
    ev = build_eval_sets(cfg)
    assert list(ev) == ["lm", "mqar", "passkey", "niah_single_2"]
    again = build_eval_sets(cfg)
    assert all(torch.equal(ev[k][0], again[k][0]) and torch.equal(ev[k][1], again[k][1]) for k in ev)
    train_x = torch.cat([build_train_batches(cfg, 16).batch_at(k)[0] for k in range(4)])
    assert not any(torch.equal(row, train_x[j]) for row in ev["mqar"][0] for j in range(len(train_x)))
    assert ev["lm"][0].shape == (16, 64) and torch.equal(ev["lm"][1][:, :-1], ev["lm"][0][:, 1:])


def test_default_eval_tasks_follow_seq_len():
    assert resolve_eval_tasks(DataConfig(seq_len=128)) == list(DEFAULT_EVAL_TASKS)
    short = resolve_eval_tasks(DataConfig(seq_len=64))
    assert {"mqar", "passkey", "niah_single_1", "copy", "arithmetic"} <= set(short)
    assert "niah_multiquery" not in short  # 4 needles + 4 queries need > 64 tokens
    with pytest.raises(SeqLenError, match=r"data\.seq_len"):
        build_eval_sets(DataConfig(seq_len=64, eval_tasks=["niah_multiquery"]))
    x, y = make_task("niah_all", 32, rng(0), VOCAB, 64)  # the training mixture keeps only presets that fit
    assert ((y != IGNORE).sum(dim=1) > 0).all()


def test_language_optimal_loss():
    cfg = DataConfig()
    lang = MarkovLanguage(Vocab(cfg.vocab_size), cfg.language, cfg.language_seed)
    assert language_optimal_loss(cfg) == pytest.approx(lang.entropy_rate())
    assert language_optimal_loss(DataConfig(source="text")) is None


def test_structured_config_roundtrip():
    omegaconf = pytest.importorskip("omegaconf")
    c = omegaconf.OmegaConf.structured(DataConfig(seq_len=64))
    x = build_train_batches(c, 8).batch_at(0)[0]  # a DictConfig works as well as the dataclass
    assert torch.equal(x, build_train_batches(DataConfig(seq_len=64), 8).batch_at(0)[0])


# ---- text / hf sources --------------------------------------------------------------------------------------------
def _write_corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    texts = {f"f{i}.txt": "".join(f"def fn_{i}_{j}(x):\n    return x * {j}\n" for j in range(60)) for i in range(3)}
    for name, t in texts.items():
        (d / name).write_text(t)
    return d, texts


def test_text_source_bytes(tmp_path):
    d, texts = _write_corpus(tmp_path)
    cfg = DataConfig(source="text", paths=[str(d / "*.txt")], tokenizer="bytes", vocab_size=288, seq_len=64)
    train, val = load_text_corpora(cfg)
    stream = np.concatenate([train.tokens, val.tokens])
    expect = []
    for name in sorted(texts):
        expect += [b + V.FIRST_WORD for b in texts[name].encode()] + [V.EOS]
    assert stream.tolist() == expect
    assert len(val) == len(stream) - int(len(stream) * 0.95)
    x, y = build_train_batches(cfg, 4).batch_at(0)
    assert x.shape == (4, 64) and int(x.max()) < 288
    ev = build_eval_sets(DataConfig(**{**cfg.__dict__, "eval_examples": 4, "eval_tasks": ["niah_single_2"]}))
    assert torch.equal(ev["lm"][0][0], torch.from_numpy(val.tokens[:64]))
    with pytest.raises(ValueError, match=r"data\.vocab_size.*288"):
        load_text_corpora(DataConfig(source="text", paths=[str(d / "*.txt")], tokenizer="bytes", vocab_size=256))


def test_text_source_bpe_deterministic(tmp_path):
    d, texts = _write_corpus(tmp_path)
    docs = [texts[k].encode() for k in sorted(texts)]
    a = tokenize_docs(docs, "bpe", 256, 120)
    b = tokenize_docs(docs, "bpe", 256, 120)
    assert np.array_equal(a, b)
    assert len(a) < sum(len(x) for x in docs) / 2  # merges learned: far fewer tokens than bytes
    body = a[a != V.EOS]
    assert body.min() >= V.FIRST_WORD and body.max() < V.FIRST_WORD + 120
    cfg = DataConfig(source="text", paths=[str(d)+"/f*.txt"], tokenizer="bpe", bpe_vocab_size=120, seq_len=32)
    train, _ = load_text_corpora(cfg)
    assert np.array_equal(np.concatenate([train.tokens, _.tokens]), a)


def test_text_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data\.paths"):
        load_text_corpora(DataConfig(source="text", paths=[str(tmp_path / "missing.txt")]))
    with pytest.raises(ValueError, match=r"data\.paths"):
        load_text_corpora(DataConfig(source="text", paths=[str(tmp_path / "*.nothing")]))
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"too little text"):
        load_text_corpora(DataConfig(source="text", paths=[str(tmp_path / "tiny.txt")], tokenizer="bytes", vocab_size=512))


def test_hf_source_json(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"body": f"row {i}: " + "lorem ipsum dolor sit amet " * 4, "id": i} for i in range(40)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    hf = HFConfig(path="json", data_files=[str(f)], text_column="body", cache_dir=str(tmp_path / "cache"))
    cfg = DataConfig(source="hf", hf=hf, tokenizer="bytes", vocab_size=300, seq_len=64)
    train, val = load_text_corpora(cfg)
    expect = []
    for r in rows:
        expect += [b + V.FIRST_WORD for b in r["body"].encode()] + [V.EOS]
    assert np.concatenate([train.tokens, val.tokens]).tolist() == expect
    x, _ = build_train_batches(cfg, 4).batch_at(0)
    assert x.shape == (4, 64)
    bad = HFConfig(path="json", data_files=[str(f)], text_column="text", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data\.hf\.text_column"):
        load_text_corpora(DataConfig(source="hf", hf=bad, tokenizer="bytes", vocab_size=300, seq_len=32))


def test_hf_source_without_datasets_is_one_line_error(monkeypatch):
    from mla_analysis.data.text import load_hf_texts

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"^data\.source='hf' needs the 'datasets' package"):
        load_hf_texts(HFConfig(path="json"), 100)


def test_mqar_num_queries_reasks_every_key_and_train_only_override():
    """num_queries > P asks every key at least once and the extra queries still answer their own value;
    train_num_queries changes the training mixture only, never the eval set."""
    from mla_analysis.data import DataConfig, build_eval_sets, train_batch
    from mla_analysis.data.tasks import MQARConfig, make_mqar
    from mla_analysis.data.vocab import Vocab

    vocab = Vocab(128)
    rng = np.random.Generator(np.random.PCG64(5))
    x, y = make_mqar(32, rng, vocab, 64, num_kv_pairs=4, random_non_queries=False, num_queries=20)
    for i in range(32):
        pairs = {int(x[i, 2 * j]): int(x[i, 2 * j + 1]) for j in range(4)}
        scored = (y[i] != -100).nonzero().flatten().tolist()
        assert len(scored) == 20
        assert {int(x[i, p]) for p in scored} == set(pairs)  # every key asked
        assert all(int(y[i, p]) == pairs[int(x[i, p])] for p in scored)
    with pytest.raises(ValueError, match="num_queries"):
        make_mqar(1, rng, vocab, 64, num_kv_pairs=4, num_queries=3)
    cfg = DataConfig(vocab_size=128, seq_len=64, lm_weight=0.0, tasks={"mqar": 1.0},
                     mqar=MQARConfig(num_kv_pairs=4, random_non_queries=False, train_num_queries=12),
                     eval_tasks=["mqar"], eval_examples=8)
    _, ty = train_batch(cfg, 0, 8)
    assert ((ty != -100).sum(1) == 12).all()
    _, ey = build_eval_sets(cfg)["mqar"]
    assert ((ey != -100).sum(1) == 4).all()
