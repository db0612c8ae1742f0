"""Real domains for the experts probe (``real_domains: true``, data.source=shakespeare): the held-out plays cut
into windows, and per-token labels genre / play / kind / token class; the chance-corrected MI of each with the
chosen expert (``statistics.calibrated_mi``). ``probe.py`` defines the reported keys.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch

from ...config import ConfigError

# Token classes of spoken text (kind "line"); other kinds are left out of the token-class MI.
TOKEN_CLASSES = ("name", "numeral", "function", "word")
NAME_CLASS, NUMERAL_CLASS, FUNCTION_CLASS, WORD_CLASS = range(4)
# Function words: English closed-class words frequent in Early Modern English drama (articles, pronouns with the
# thou / ye forms, prepositions, conjunctions, auxiliaries with -th / -st forms, negation, wh-words). Number words
# are numerals (mla_analysis.probes.token_bins), not function words.
FUNCTION_WORDS = tuple("""
a an the
i me my mine myself thou thee thy thine thyself you ye your yours yourself he him his himself she her hers herself
it its itself we us our ours they them their theirs this that these those who whom whose which what
of to in on at by for with from into upon unto about against among before behind below beneath beside between
beyond during through throughout toward towards under until till within without after over o'er
and or but nor yet so if then than though although because since unless whether while whilst ere lest
is am are was were be been being art wast wert have has hath had hast do does doth did dost didst
shall will would should may might must can could shalt wilt wouldst shouldst mayst canst couldst
not no nay aye yea there here where when how why whence whither thence hence thus as too very
""".split())
KIND_LABELS = ("line", "stage", "speaker")  # data.shakespeare.KINDS[:3]; "other" (headings, blank lines) left out

_FUNCTION = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(FUNCTION_WORDS, key=len, reverse=True)) + r")\b",
                       re.I)


def token_classes(text: str, offsets: np.ndarray, names: list[str]) -> np.ndarray:
    """Class id per token [N] (index into TOKEN_CLASSES): a token overlapping a persons-list name is "name", else a
    numeral, else a function word (whole-word match of FUNCTION_WORDS, any case), else "word"."""
    from ..token_bins import NAME, NUMERAL, token_flags

    flags = token_flags(text, offsets, names)  # (N,) NAME / NUMERAL bits
    n = len(text)
    char = np.zeros(n, dtype=bool)
    for m in _FUNCTION.finditer(text):
        char[m.start(): m.end()] = True
    c = np.concatenate([[0], np.cumsum(char)])  # prefix counts
    s, e = np.clip(offsets[:, 0], 0, n), np.clip(offsets[:, 1], 0, n)
    function = c[e] - c[s] > 0
    out = np.full(len(offsets), WORD_CLASS, dtype=np.int64)
    out[function] = FUNCTION_CLASS
    out[(flags & NUMERAL) > 0] = NUMERAL_CLASS
    out[(flags & NAME) > 0] = NAME_CLASS
    return out


def stream_labels(labelled: Any, tokenizer: Any) -> dict[str, Any]:
    """Per token of the labelled stream [N]: genre, play (index into ``plays``), kind (index into KIND_LABELS,
    -1 = other) and token_class (index into TOKEN_CLASSES, -1 outside spoken lines); names found per document."""
    from ...data.shakespeare import GENRES, PLAYS, read_text
    from ..token_bins import persons

    n = len(labelled.tokens)
    token_class = np.full(n, -1, dtype=np.int64)
    found: dict[str, list[str]] = {}
    eos = labelled.eos_count
    for d, (s, e) in zip(labelled.docs, labelled.spans):
        text = read_text(d.path)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if not np.array_equal(ids, labelled.tokens[s: e - eos]):
            raise ConfigError(f"probe.experts: {d.path}: re-tokenising does not reproduce the cached tokens")
        names = persons(text) if d.genre != "poem" else []
        found[d.name] = names
        token_class[s: e - eos] = token_classes(text, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2), names)
    kind = labelled.kind.astype(np.int64)
    token_class[kind != 0] = -1  # names / numerals / function words counted in spoken text only
    all_plays = list(PLAYS)
    play_codes = labelled.play
    plays = [all_plays[i] for i in sorted(set(play_codes.tolist()))]
    remap = {all_plays.index(p): j for j, p in enumerate(plays)}
    return {
        "genre": labelled.genre.astype(np.int64), "genres": list(GENRES),
        "play": np.array([remap[int(c)] for c in play_codes], dtype=np.int64), "plays": plays,
        "kind": np.where(kind < len(KIND_LABELS), kind, -1), "token_class": token_class, "names": found,
    }


def play_windows(labelled: Any, length: int, max_per_doc: Optional[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Non-overlapping windows of ``length`` tokens inside each document (the tail shorter than a window dropped),
    at most ``max_per_doc`` per document evenly spaced: (ids [n, length], stream positions [n, length])."""
    rows = []
    for s, e in labelled.spans:
        e = e - labelled.eos_count
        n_win = (e - s) // length
        if n_win == 0:
            continue
        pick = np.arange(n_win) if max_per_doc is None or n_win <= max_per_doc else \
            np.unique(np.round(np.linspace(0, n_win - 1, max_per_doc)).astype(np.int64))
        rows.extend(s + w * length + np.arange(length) for w in pick)
    if not rows:
        raise ConfigError(f"probe.experts.window={length}: no held-out document is that long (allowed: a shorter window)")
    pos = np.stack(rows)  # (n, length)
    return torch.from_numpy(np.asarray(labelled.tokens, dtype=np.int64)[pos]), pos


__all__ = ["FUNCTION_WORDS", "KIND_LABELS", "TOKEN_CLASSES", "play_windows", "stream_labels", "token_classes"]
