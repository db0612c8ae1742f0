"""Token-id layout shared by every data source: fixed specials, digit/hex tokens, then "word" tokens.

Layout (ids are fixed for every ``vocab_size``, so a checkpoint's task tokens never move)::

    0 PAD   1 BOS   2 EOS (= SEP)   3 QUERY   4 KV (needle marker)   5 IS   6 PASSKEY
    7 COPY  8 PLUS  9 EQUALS  10 ANSWER   11..15 reserved
    16..25 digits 0-9      26..31 hex letters a-f   (16..31 = hex digit 0..f)
    32..vocab_size-1 words: synthetic-language tokens, MQAR keys (first half) and values (second half),
                            and, for ``source: text|hf``, the text tokenizer's ids shifted by 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

PAD = 0
BOS = 1
EOS = 2
SEP = EOS  # one id: a sentence end and a list separator are the same boundary token
QUERY = 3
KV = 4
NEEDLE = KV
IS = 5
PASSKEY = 6
COPY = 7
PLUS = 8
EQUALS = 9
ANSWER = 10
N_SPECIAL = 16  # ids 11..15 are reserved so new markers do not shift digits or words
FIRST_DIGIT = N_SPECIAL
FIRST_HEX_LETTER = FIRST_DIGIT + 10
FIRST_WORD = FIRST_DIGIT + 16
MIN_VOCAB_SIZE = 128

SPECIAL_NAMES = {
    PAD: "PAD",
    BOS: "BOS",
    EOS: "EOS",
    QUERY: "QUERY",
    KV: "KV",
    IS: "IS",
    PASSKEY: "PASSKEY",
    COPY: "COPY",
    PLUS: "PLUS",
    EQUALS: "EQUALS",
    ANSWER: "ANSWER",
}


@dataclass(frozen=True)
class Vocab:
    """Id layout for a model with ``vocab_size`` embeddings (see the module docstring)."""

    vocab_size: int

    PAD: ClassVar[int] = PAD
    BOS: ClassVar[int] = BOS
    EOS: ClassVar[int] = EOS
    SEP: ClassVar[int] = SEP
    QUERY: ClassVar[int] = QUERY
    KV: ClassVar[int] = KV
    IS: ClassVar[int] = IS
    PASSKEY: ClassVar[int] = PASSKEY
    COPY: ClassVar[int] = COPY
    PLUS: ClassVar[int] = PLUS
    EQUALS: ClassVar[int] = EQUALS
    ANSWER: ClassVar[int] = ANSWER

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"data.vocab_size={self.vocab_size!r} is too small: the task layout needs >= {MIN_VOCAB_SIZE} "
                f"({FIRST_WORD} special/digit ids plus word tokens)"
            )

    # ---- ranges ---------------------------------------------------------------------------
    @property
    def digit_ids(self) -> range:
        return range(FIRST_DIGIT, FIRST_DIGIT + 10)

    @property
    def hex_ids(self) -> range:
        """Sixteen hex-digit tokens (0-9 then a-f), used for the RULER "uuid" strings."""
        return range(FIRST_DIGIT, FIRST_DIGIT + 16)

    @property
    def word_ids(self) -> range:
        return range(FIRST_WORD, self.vocab_size)

    @property
    def n_words(self) -> int:
        return self.vocab_size - FIRST_WORD

    @property
    def key_ids(self) -> range:
        """MQAR keys: first half of the words (Zoology's {1..V/2-1})."""
        return range(FIRST_WORD, FIRST_WORD + self.n_words // 2)

    @property
    def value_ids(self) -> range:
        """MQAR values: second half of the words, disjoint from the keys (Zoology's {V/2..V-1})."""
        return range(FIRST_WORD + self.n_words // 2, self.vocab_size)

    def digit(self, d: int) -> int:
        """Token id of decimal digit ``d``."""
        if not 0 <= d <= 9:
            raise ValueError(f"digit must be in 0..9, got {d}")
        return FIRST_DIGIT + d

    def hex_digit(self, h: int) -> int:
        """Token id of hex digit ``h`` (0..15)."""
        if not 0 <= h <= 15:
            raise ValueError(f"hex digit must be in 0..15, got {h}")
        return FIRST_DIGIT + h

    def digit_value(self, token: int) -> int:
        """Inverse of :meth:`digit`: the digit a digit token stands for."""
        if token not in self.digit_ids:
            raise ValueError(f"token {token} is not a digit token")
        return token - FIRST_DIGIT

    def name(self, token: int) -> str:
        """Readable name of one id, for debugging and docs."""
        if token in SPECIAL_NAMES:
            return SPECIAL_NAMES[token]
        if token < FIRST_DIGIT:
            return f"RESERVED{token}"
        if token < FIRST_WORD:
            return "0123456789abcdef"[token - FIRST_DIGIT]
        if token < self.vocab_size:
            return f"w{token - FIRST_WORD}"
        raise ValueError(f"token {token} outside vocab_size={self.vocab_size}")

    def describe(self) -> dict:
        """Plain-dict summary of the layout (for logs and run metadata)."""
        return {
            "vocab_size": self.vocab_size,
            "specials": {name: tok for tok, name in SPECIAL_NAMES.items()},
            "digits": [self.digit_ids.start, self.digit_ids.stop],
            "hex": [self.hex_ids.start, self.hex_ids.stop],
            "words": [self.word_ids.start, self.word_ids.stop],
            "keys": [self.key_ids.start, self.key_ids.stop],
            "values": [self.value_ids.start, self.value_ids.stop],
        }
