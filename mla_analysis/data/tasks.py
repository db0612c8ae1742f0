"""Procedural retrieval / fine-detail tasks: MQAR (Zoology), passkey, RULER-style NIAH, copy, arithmetic.

Every generator is ``make_<task>(n, rng, vocab, seq_len, *, filler=None, **knobs) -> (inputs, targets)``
with int64 tensors ``[n, seq_len]``. ``targets[t]`` is the token to predict after ``inputs[:t+1]``
(already shifted); unscored positions are -100. For the teacher-forced tasks (all but MQAR) the answer
tokens also appear in ``inputs``: a position is scored exactly when the *next* input token is an answer
token. ``filler`` is any object with ``sample_batch(n, length, rng) -> np.ndarray[n, length]`` (the
synthetic language or a real-text corpus); ``None`` uses the default synthetic language, so a model
trained on the language has seen every haystack. All randomness comes from ``rng``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from mla_analysis.config.data import (ArithmeticConfig, CopyConfig, MQARConfig, NIAHConfig,  # noqa: F401
                                      NiahHaystack, NiahType, PasskeyConfig)
from mla_analysis.data.language import get_language
from mla_analysis.data.vocab import ANSWER, COPY, EOS, EQUALS, IS, KV, PAD, PASSKEY, PLUS, QUERY, SEP, Vocab

IGNORE = -100
Batch = Tuple[torch.Tensor, torch.Tensor]

# seed of the one fixed sentence that makes RULER's "noise" haystack; fixed so every sample repeats it
_NOISE_SENTENCE_SEED = 20240406


# ---- helpers ------------------------------------------------------------------------------------------------
def _default_filler(vocab: Vocab, filler):
    return filler if filler is not None else get_language(vocab)


def _to_batch(inputs: np.ndarray, targets: np.ndarray) -> Batch:
    return torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)), torch.from_numpy(
        np.ascontiguousarray(targets, dtype=np.int64)
    )


def _shift_targets(seq: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Targets for teacher-forced answers: position t is scored iff token t+1 is an answer token, [n, L]."""
    tgt = np.full_like(seq, IGNORE)
    tgt[:, :-1] = np.where(answer[:, 1:], seq[:, 1:], IGNORE)
    return tgt


def _check_depth(depth: Optional[float], key: str) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"{key}={depth} must be in [0, 1] or None")


class SeqLenError(ValueError):
    """A task, with its knobs, needs more tokens than ``data.seq_len`` provides."""


def _check_fits(needed: int, seq_len: int, what: str) -> None:
    if needed > seq_len:
        raise SeqLenError(f"data.seq_len={seq_len} is too short for {what} (needs {needed} tokens)")


class _ConstantFiller:
    """Stand-in filler for shape/validity checks: never touches the (possibly expensive) real source."""

    def sample_batch(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        return np.full((n, length), EOS, dtype=np.int64)


# ---- MQAR ----------------------------------------------------------------------------------------------------
def make_mqar(
    n: int,
    rng: np.random.Generator,
    vocab: Vocab,
    seq_len: int,
    *,
    num_kv_pairs: int = 8,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    key_vocab_size: Optional[int] = None,
    value_vocab_size: Optional[int] = None,
    num_queries: Optional[int] = None,
    train_num_queries: Optional[int] = None,
    filler=None,
) -> Batch:
    """Zoology MQAR: context k1 v1 .. kP vP, then the keys again at power-law slots; predict each value.

    ``num_queries`` (default P) > P is our extension: Q distinct slots are drawn the same way, the first
    P of them (in draw order) ask every key once and the others ask keys drawn uniformly again.
    ``train_num_queries`` is not used here: the training mixture substitutes it for ``num_queries``.
    Departure from Zoology's token ids only: its key range {1..V/2-1} is ``vocab.key_ids``, its value
    range {V/2..V-1} is ``vocab.value_ids``, its filler 0 is PAD, and ``random_non_queries`` draws from
    {PAD} ∪ keys ∪ values (the image of Zoology's [0, V)). ``filler`` is unused.
    """
    P, L = num_kv_pairs, seq_len
    for name, size in (("key_vocab_size", key_vocab_size), ("value_vocab_size", value_vocab_size)):
        if size is not None and size < 1:
            raise ValueError(f"data.mqar.{name}={size} must be >= 1 or None")
    keys_pool = np.asarray(vocab.key_ids[:key_vocab_size])
    vals_pool = np.asarray(vocab.value_ids[:value_vocab_size])
    if L % 2:
        raise ValueError(f"data.seq_len={L} must be even for mqar")
    if P < 1:
        raise ValueError(f"data.mqar.num_kv_pairs={P} must be >= 1")
    if 4 * P > L:
        raise SeqLenError(f"data.mqar.num_kv_pairs={P} needs 4*num_kv_pairs <= data.seq_len={L} (Zoology's bound)")
    if P > len(keys_pool) or P > len(vals_pool):
        raise ValueError(
            f"data.mqar.num_kv_pairs={P} exceeds the key/value vocab ({len(keys_pool)}/{len(vals_pool)} ids; "
            "see data.mqar.key_vocab_size, data.mqar.value_vocab_size, data.vocab_size)"
        )
    if power_a <= 0:
        raise ValueError(f"data.mqar.power_a={power_a} must be > 0")
    # P distinct keys and values per example (uniform random permutation prefix)
    keys = keys_pool[np.argsort(rng.random((n, len(keys_pool))), axis=1)[:, :P]]  # [n, P]
    vals = vals_pool[np.argsort(rng.random((n, len(vals_pool))), axis=1)[:, :P]]  # [n, P]
    g = (L - 2 * P) // 2  # query slots
    Q = P if num_queries is None else num_queries
    if not P <= Q <= g:
        raise ValueError(f"data.mqar.num_queries={num_queries} must be None or in [num_kv_pairs={P}, {g}] for seq_len={L}")
    logp = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, g + 1))
    # Gumbel-top-Q = Q distinct slots drawn successively ∝ p, as np.random.choice(replace=False, p=p)
    slots = np.argsort(-(logp[None, :] + rng.gumbel(size=(n, g))), axis=1)[:, :Q]  # [n, Q]
    if Q > P:  # re-asked keys: pair index per extra slot, then the matching key/value
        which = np.concatenate([np.tile(np.arange(P), (n, 1)), rng.integers(0, P, size=(n, Q - P))], axis=1)
        q_keys, q_vals = np.take_along_axis(keys, which, 1), np.take_along_axis(vals, which, 1)  # [n, Q]
    else:
        q_keys, q_vals = keys, vals
    inputs = np.full((n, L), PAD, dtype=np.int64)
    inputs[:, 0 : 2 * P : 2] = keys
    inputs[:, 1 : 2 * P : 2] = vals
    pos = 2 * P + 2 * slots
    np.put_along_axis(inputs, pos, q_keys, axis=1)
    targets = np.full((n, L), IGNORE, dtype=np.int64)
    np.put_along_axis(targets, pos, q_vals, axis=1)
    if random_non_queries:
        pool = np.concatenate([[PAD], keys_pool, vals_pool])
        noise = pool[rng.integers(0, len(pool), size=(n, L))]
        inputs = np.where(inputs == PAD, noise, inputs)
    return _to_batch(inputs, targets)


# ---- passkey --------------------------------------------------------------------------------------------------
def make_passkey(
    n: int,
    rng: np.random.Generator,
    vocab: Vocab,
    seq_len: int,
    *,
    n_digits: int = 5,
    depth: Optional[float] = None,
    filler=None,
) -> Batch:
    """Filler with ``[PASSKEY d1..dn EOS]`` at ``depth``; ends ``[PASSKEY QUERY d1..dn]``, digits scored.

    The statement starts at token ``round(depth * H)`` of the H filler tokens (token-level depth, not a
    sentence boundary as in RULER's essay haystack).
    """
    if n_digits < 1:
        raise ValueError(f"data.passkey.n_digits={n_digits} must be >= 1")
    _check_depth(depth, "data.passkey.depth")
    stmt_len, query_len = n_digits + 2, n_digits + 2
    _check_fits(stmt_len + query_len, seq_len, f"passkey with data.passkey.n_digits={n_digits}")
    H = seq_len - stmt_len - query_len
    hay = _default_filler(vocab, filler).sample_batch(n, H, rng)  # [n, H]
    digits = np.asarray(vocab.digit_ids)[rng.integers(0, 10, size=(n, n_digits))]  # [n, d]
    where = np.full(n, round(depth * H)) if depth is not None else rng.integers(0, H + 1, size=n)
    seq = np.empty((n, seq_len), dtype=np.int64)
    answer = np.zeros((n, seq_len), dtype=bool)
    for i in range(n):
        p = where[i]
        stmt = np.concatenate([[PASSKEY], digits[i], [EOS]])
        query = np.concatenate([[PASSKEY, QUERY], digits[i]])
        seq[i] = np.concatenate([hay[i, :p], stmt, hay[i, p:], query])
    answer[:, seq_len - n_digits :] = True
    return _to_batch(seq, _shift_targets(seq, answer))


# ---- NIAH ------------------------------------------------------------------------------------------------------
NIAH_TYPES = NiahType.values()
NIAH_HAYSTACKS = NiahHaystack.values()
_TYPE_LEN = {"words": 2, "numbers": 7, "uuids": 8}

# RULER's table (reference section 4) in our token world: essay -> "language"; words = word-token
# tuples; numbers = digit strings; uuids = hex-token strings.
NIAH_PRESETS: Dict[str, Dict] = {
    "niah_single_1": dict(haystack="noise", key_type="words", value_type="numbers", num_keys=1, num_values=1, num_queries=1),
    "niah_single_2": dict(haystack="language", key_type="words", value_type="numbers", num_keys=1, num_values=1, num_queries=1),
    "niah_single_3": dict(haystack="language", key_type="words", value_type="uuids", num_keys=1, num_values=1, num_queries=1),
    "niah_multikey_1": dict(haystack="language", key_type="words", value_type="numbers", num_keys=4, num_values=1, num_queries=1),
    "niah_multikey_2": dict(haystack="needle", key_type="words", value_type="numbers", num_keys=1, num_values=1, num_queries=1),
    "niah_multikey_3": dict(haystack="needle", key_type="uuids", value_type="uuids", num_keys=1, num_values=1, num_queries=1),
    "niah_multivalue": dict(haystack="language", key_type="words", value_type="numbers", num_keys=1, num_values=4, num_queries=1),
    "niah_multiquery": dict(haystack="language", key_type="words", value_type="numbers", num_keys=4, num_values=1, num_queries=4),
}


def _draw_strings(rng: np.random.Generator, vocab: Vocab, kind: str, length: int, count: int) -> np.ndarray:
    """``count`` random token strings of one NIAH type, [count, length]."""
    if kind == "words":
        return np.asarray(vocab.word_ids)[rng.integers(0, vocab.n_words, size=(count, length))]
    if kind == "numbers":
        d = rng.integers(0, 10, size=(count, length))
        d[:, 0] = rng.integers(1, 10, size=count)  # RULER numbers are 7-digit integers: no leading zero
        return np.asarray(vocab.digit_ids)[d]
    return np.asarray(vocab.hex_ids)[rng.integers(0, 16, size=(count, length))]


def _distinct_strings(rng, vocab, kind, length, count, avoid=()) -> np.ndarray:
    """Like ``_draw_strings`` but all rows distinct and not in ``avoid`` (rejection; collisions are rare)."""
    seen = {tuple(a) for a in avoid}
    out = []
    while len(out) < count:
        for row in _draw_strings(rng, vocab, kind, length, count - len(out)):
            t = tuple(row)
            if t not in seen:
                seen.add(t)
                out.append(row)
    return np.asarray(out, dtype=np.int64).reshape(count, length)


def _noise_sentence(vocab: Vocab, filler, length: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(_NOISE_SENTENCE_SEED))
    return np.concatenate([filler.sample_batch(1, length, rng)[0], [EOS]]).astype(np.int64)


def make_niah(
    n: int,
    rng: np.random.Generator,
    vocab: Vocab,
    seq_len: int,
    *,
    haystack: str = "language",
    key_type: str = "words",
    value_type: str = "numbers",
    key_len: Optional[int] = None,
    value_len: Optional[int] = None,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    depth: Optional[float] = None,
    noise_sentence_len: int = 12,
    filler=None,
) -> Batch:
    """RULER NIAH: needles ``[KV key IS value EOS]`` in a haystack; ends ``[QUERY key ANSWER v1 SEP v2 ..]``.

    One query block per asked key (in key order); its values are listed in haystack order and every value
    token is scored. Departures from RULER: token strings instead of words; insertion at token positions
    for the "language" haystack (sentence boundaries for "noise", needle boundaries for "needle");
    ``depth`` fixes only the first answer needle, the others take distinct random positions.
    """
    for name, v, allowed in (
        ("haystack", haystack, NIAH_HAYSTACKS),
        ("key_type", key_type, NIAH_TYPES),
        ("value_type", value_type, NIAH_TYPES),
    ):
        if v not in allowed:
            raise ValueError(f"data.niah.{name}={v!r} must be one of {allowed}")
    klen = _TYPE_LEN[key_type] if key_len is None else key_len
    vlen = _TYPE_LEN[value_type] if value_len is None else value_len
    if klen < 1 or vlen < 1:
        raise ValueError(f"data.niah.key_len/value_len must be >= 1, got {klen}/{vlen}")
    if num_keys < 1 or num_values < 1 or not 1 <= num_queries <= num_keys:
        raise ValueError(
            f"data.niah needs num_keys >= 1, num_values >= 1 and 1 <= num_queries <= num_keys; "
            f"got {num_keys}, {num_values}, {num_queries}"
        )
    _check_depth(depth, "data.niah.depth")
    filler = _default_filler(vocab, filler)
    needle_len = klen + vlen + 3
    n_needles = num_keys * num_values
    query_len = num_queries * (klen + 2 + num_values * vlen + num_values - 1)
    _check_fits(n_needles * needle_len + query_len, seq_len, f"niah with {n_needles} needles of {needle_len} tokens")
    H = seq_len - n_needles * needle_len - query_len

    if haystack == "language":
        hays = filler.sample_batch(n, H, rng)  # [n, H]
    elif haystack == "noise":
        sent = _noise_sentence(vocab, filler, noise_sentence_len)
        noise = np.resize(sent, H)  # the sentence repeated and cut to H tokens
        bounds = np.unique(np.append(np.arange(0, H + 1, len(sent)), H))

    seqs = np.empty((n, seq_len), dtype=np.int64)
    answer = np.zeros((n, seq_len), dtype=bool)
    for i in range(n):
        keys = _distinct_strings(rng, vocab, key_type, klen, num_keys)  # [K, klen]
        vals = np.concatenate([_distinct_strings(rng, vocab, value_type, vlen, num_values) for _ in range(num_keys)])
        needles = [np.concatenate([[KV], keys[j // num_values], [IS], vals[j], [EOS]]) for j in range(n_needles)]
        if haystack == "language":
            hay, b = hays[i], None
        elif haystack == "noise":
            hay, b = noise, bounds
        else:  # a haystack made only of distractor needles (other keys, same types), left-padded
            m = H // needle_len
            dkeys = _distinct_strings(rng, vocab, key_type, klen, m, avoid=keys)
            dvals = _draw_strings(rng, vocab, value_type, vlen, m)
            pad = H - m * needle_len
            parts = [np.full(pad, PAD)] + [np.concatenate([[KV], dkeys[j], [IS], dvals[j], [EOS]]) for j in range(m)]
            hay, b = np.concatenate(parts).astype(np.int64), pad + needle_len * np.arange(m + 1)
        # insertion points (token offsets into the haystack); needle 0 is the first answer needle
        cand = np.arange(H + 1) if b is None else b
        pts = rng.choice(cand, size=n_needles, replace=len(cand) < n_needles)
        if depth is not None:
            pts[0] = cand[np.abs(cand - depth * H).argmin()]
        order = np.lexsort((np.arange(n_needles), pts))  # by position, ties in needle order
        parts, prev = [], 0
        for j in order:
            parts += [hay[prev : pts[j]], needles[j]]
            prev = pts[j]
        parts.append(hay[prev:])
        rank = np.empty(n_needles, dtype=np.int64)
        rank[order] = np.arange(n_needles)
        # query blocks: values of each asked key in haystack order
        q_tok, q_ans = [], []
        for k in range(num_queries):
            q_tok.append(np.concatenate([[QUERY], keys[k], [ANSWER]]))
            q_ans.append(np.zeros(klen + 2, dtype=bool))
            js = sorted(range(k * num_values, (k + 1) * num_values), key=lambda j: rank[j])
            for r, j in enumerate(js):
                if r:
                    q_tok.append(np.array([SEP]))
                    q_ans.append(np.zeros(1, dtype=bool))
                q_tok.append(vals[j])
                q_ans.append(np.ones(vlen, dtype=bool))
        body = np.concatenate(parts)
        seqs[i] = np.concatenate([body] + q_tok)
        answer[i, len(body) :] = np.concatenate(q_ans)
    return _to_batch(seqs, _shift_targets(seqs, answer))


def _niah_preset(name: str) -> Callable[..., Batch]:
    preset = NIAH_PRESETS[name]

    def make(n, rng, vocab, seq_len, *, filler=None, **knobs) -> Batch:
        knobs.update(preset)  # the preset's structure wins; lengths/depth come from the caller
        return make_niah(n, rng, vocab, seq_len, filler=filler, **knobs)

    make.__name__ = f"make_{name}"
    make.__doc__ = f"RULER {name} ({preset}) via make_niah."
    return make


def make_niah_all(n: int, rng: np.random.Generator, vocab: Vocab, seq_len: int, *, filler=None, **knobs) -> Batch:
    """Each example is one of the RULER NIAH presets that fit ``seq_len``, chosen uniformly (for training)."""
    names = [p for p in NIAH_PRESETS if task_fits(p, vocab, seq_len, knobs)]
    if not names:
        raise SeqLenError(f"data.seq_len={seq_len} is too short for every NIAH preset (see data.niah lengths)")
    which = rng.integers(0, len(names), size=n)
    inputs = torch.empty((n, seq_len), dtype=torch.int64)
    targets = torch.empty((n, seq_len), dtype=torch.int64)
    for j, name in enumerate(names):
        idx = np.flatnonzero(which == j)
        if len(idx):
            x, y = TASKS[name](len(idx), rng, vocab, seq_len, filler=filler, **knobs)
            inputs[idx], targets[idx] = x, y
    return inputs, targets


# ---- copy ---------------------------------------------------------------------------------------------------------
def make_copy(
    n: int,
    rng: np.random.Generator,
    vocab: Vocab,
    seq_len: int,
    *,
    span_len: int = 16,
    distance: Optional[int] = None,
    filler=None,
) -> Batch:
    """``[filler][COPY span SEP][distance filler][COPY span]``: reproduce the uniform-random word span.

    The span is uniform over all word ids (not language), so only exact recall predicts it; the
    leading filler absorbs whatever ``distance`` leaves of ``seq_len``.
    """
    fixed = 2 * span_len + 3
    if span_len < 1:
        raise ValueError(f"data.copy_task.span_len={span_len} must be >= 1")
    _check_fits(fixed, seq_len, f"copy with data.copy_task.span_len={span_len}")
    D = seq_len - fixed if distance is None else distance
    if D < 0 or D > seq_len - fixed:
        raise ValueError(f"data.copy_task.distance={distance} must be in 0..{seq_len - fixed} for data.seq_len={seq_len}")
    pre = seq_len - fixed - D
    fill = _default_filler(vocab, filler).sample_batch(n, pre + D, rng)  # [n, pre + D]
    span = np.asarray(vocab.word_ids)[rng.integers(0, vocab.n_words, size=(n, span_len))]
    col = lambda v: np.full((n, 1), v, dtype=np.int64)  # noqa: E731
    seq = np.concatenate([fill[:, :pre], col(COPY), span, col(SEP), fill[:, pre:], col(COPY), span], axis=1)
    answer = np.zeros_like(seq, dtype=bool)
    answer[:, seq_len - span_len :] = True
    return _to_batch(seq, _shift_targets(seq, answer))


# ---- arithmetic ----------------------------------------------------------------------------------------------------
def _digits(x: np.ndarray, width: int) -> np.ndarray:
    """Decimal digits of non-negative ints, most significant first, zero-padded, [..., width]."""
    return (x[..., None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10


def make_arithmetic(
    n: int,
    rng: np.random.Generator,
    vocab: Vocab,
    seq_len: int,
    *,
    n_digits: int = 3,
    reverse_answer: bool = False,
    n_problems: Optional[int] = None,
    filler=None,
) -> Batch:
    """Packed ``a PLUS b EQUALS c EOS`` problems (fixed width: a, b n digits, c n+1), left-padded with PAD.

    Every digit of every c is scored. ``filler`` is unused.
    """
    if not 1 <= n_digits <= 17:
        raise ValueError(f"data.arithmetic.n_digits={n_digits} must be in 1..17")
    plen = 3 * n_digits + 4
    k = seq_len // plen if n_problems is None else n_problems
    if k < 1 or k * plen > seq_len:
        raise SeqLenError(
            f"data.arithmetic: {k} problem(s) of {plen} tokens (n_digits={n_digits}) do not fit data.seq_len={seq_len}"
        )
    a = rng.integers(0, 10**n_digits, size=(n, k))
    b = rng.integers(0, 10**n_digits, size=(n, k))
    c = _digits(a + b, n_digits + 1)
    if reverse_answer:
        c = c[..., ::-1]
    dig = np.asarray(vocab.digit_ids)
    col = lambda v: np.full((n, k, 1), v, dtype=np.int64)  # noqa: E731
    prob = np.concatenate(
        [dig[_digits(a, n_digits)], col(PLUS), dig[_digits(b, n_digits)], col(EQUALS), dig[c], col(EOS)], axis=2
    )  # [n, k, plen]
    ans = np.zeros(plen, dtype=bool)
    ans[2 * n_digits + 2 : 3 * n_digits + 3] = True
    pad = seq_len - k * plen
    seq = np.concatenate([np.full((n, pad), PAD, dtype=np.int64), prob.reshape(n, k * plen)], axis=1)
    answer = np.concatenate([np.zeros((n, pad), dtype=bool), np.tile(ans, (n, k))], axis=1)
    return _to_batch(seq, _shift_targets(seq, answer))


# ---- registry ---------------------------------------------------------------------------------------------------------
TASKS: Dict[str, Callable[..., Batch]] = {
    "mqar": make_mqar,
    "passkey": make_passkey,
    "niah": make_niah,
    **{name: _niah_preset(name) for name in NIAH_PRESETS},
    "niah_all": make_niah_all,
    "copy": make_copy,
    "arithmetic": make_arithmetic,
}

# which DataConfig knob group (attribute name) feeds each task ("copy_task": DictConfig has a copy())
TASK_FAMILY: Dict[str, str] = {
    "mqar": "mqar",
    "passkey": "passkey",
    "niah": "niah",
    **{name: "niah" for name in NIAH_PRESETS},
    "niah_all": "niah",
    "copy": "copy_task",
    "arithmetic": "arithmetic",
}

TASK_KNOBS: Dict[str, type] = {
    "mqar": MQARConfig,
    "passkey": PasskeyConfig,
    "niah": NIAHConfig,
    "copy_task": CopyConfig,
    "arithmetic": ArithmeticConfig,
}


def make_task(name: str, n: int, rng: np.random.Generator, vocab: Vocab, seq_len: int, knobs=None, filler=None) -> Batch:
    """Generate ``n`` examples of a registered task; ``knobs`` is its family's dataclass or dict (None = defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    kw = _knob_dict(TASK_FAMILY[name], knobs)
    return TASKS[name](n, rng, vocab, seq_len, filler=filler, **kw)


def task_fits(name: str, vocab: Vocab, seq_len: int, knobs=None) -> bool:
    """Whether ``name`` with these knobs fits in ``seq_len`` tokens (other invalid knobs still raise)."""
    try:
        make_task(name, 1, np.random.Generator(np.random.PCG64(0)), vocab, seq_len, knobs, _ConstantFiller())
    except SeqLenError:
        return False
    return True


def check_task(name: str, vocab: Vocab, seq_len: int, knobs=None) -> None:
    """Raise the task's own ValueError now (bad knob, too short ``seq_len``) instead of mid-training."""
    make_task(name, 1, np.random.Generator(np.random.PCG64(0)), vocab, seq_len, knobs, _ConstantFiller())


def _knob_dict(family: str, knobs) -> dict:
    cls = TASK_KNOBS[family]
    if knobs is None:
        knobs = cls()
    if isinstance(knobs, dict):
        names = {f for f in cls.__dataclass_fields__}
        bad = set(knobs) - names
        if bad:
            raise ValueError(f"unknown data.{family} knob(s) {sorted(bad)}; known: {sorted(names)}")
        knobs = cls(**knobs)
    return {f: getattr(knobs, f) for f in cls.__dataclass_fields__}

