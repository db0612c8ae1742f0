"""Real-text sources: local files (default: the Python stdlib's ``*.py``) or a Hugging Face dataset.

Text is tokenised by bytes (ids 0..255) or by a byte-level BPE trained offline with ``tokenizers`` on
the same capped corpus, then shifted into the word range of :class:`Vocab` (text id t -> vocab id
``FIRST_WORD + t``); documents are joined with EOS. With a Hugging Face tokenizer (``data.tokenizer``
= an HF dir or name, e.g. the model's own) the ids are the tokenizer's, unshifted, documents joined
with its EOS token, files read as strict UTF-8, and no retrieval tasks are mixed in. The stream is split deterministically: the last
``val_fraction`` of tokens is validation. Retrieval tasks keep their procedural ids (markers, digits,
hex, word ids) in this mode; their haystacks/fillers are windows of this text, so word-typed keys and
copy spans are ids that may or may not be frequent text tokens.
"""

from __future__ import annotations

import functools
import glob
import os
import sysconfig
from typing import List, Optional, Tuple

import numpy as np

from mla_analysis.config.data import HFConfig  # noqa: F401  (importable from here as before)
from mla_analysis.data.vocab import EOS, FIRST_WORD

TOKENIZERS = ("bytes", "bpe")  # the procedural ones; any other data.tokenizer names a Hugging Face tokenizer


def uses_hf_tokenizer(cfg) -> bool:
    """Whether ``cfg.tokenizer`` names a Hugging Face tokenizer (or ``model``) rather than bytes / bpe."""
    return cfg.tokenizer not in TOKENIZERS


class TextCorpus:
    """A token stream (vocab ids) that yields random windows (LM data, haystack filler) or fixed chunks."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample_batch(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` windows of ``length`` tokens at uniformly random offsets, [n, length]."""
        if length > len(self.tokens):
            raise ValueError(f"text corpus has {len(self.tokens)} tokens, fewer than a window of {length}")
        starts = rng.integers(0, len(self.tokens) - length + 1, size=n)
        return self.tokens[starts[:, None] + np.arange(length)[None, :]]

    def chunks(self, n: int, length: int) -> np.ndarray:
        """Up to ``n`` consecutive non-overlapping windows from the start, [min(n, len // length), length]."""
        k = min(n, len(self.tokens) // length)
        return self.tokens[: k * length].reshape(k, length)


# ---- reading ------------------------------------------------------------------------------------------------
def default_paths() -> List[str]:
    """The Python standard library's top-level ``*.py`` files (always present, deterministic)."""
    return [os.path.join(sysconfig.get_paths()["stdlib"], "*.py")]


def resolve_paths(paths: Optional[List[str]]) -> List[str]:
    """Expand files/globs (``**`` allowed) into a sorted, de-duplicated file list; empty -> ValueError."""
    patterns = list(paths) if paths else default_paths()
    files = set()
    for pat in patterns:
        hits = [p for p in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(p)]
        if not hits:
            raise ValueError(f"data.paths: {pat!r} matches no file")
        files.update(hits)
    return sorted(files)


def decode_utf8(docs: List[bytes], names: List[str]) -> List[str]:
    """Strict UTF-8 decoding; ValueError naming the file (and byte) that is not UTF-8."""
    out = []
    for d, name in zip(docs, names):
        try:
            out.append(d.decode("utf-8"))
        except UnicodeDecodeError as e:
            if e.start >= len(d) - 3 and e.reason == "unexpected end of data":  # the max_bytes cut split a character
                out.append(d[: e.start].decode("utf-8"))
                continue
            raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {d[e.start:e.start + 1]!r}; data.tokenizer needs text)") from None
    return out


def tokenize_hf(texts: List[str], tokenizer: str) -> np.ndarray:
    """Documents -> one stream of the HF tokenizer's own ids, its EOS token after each document (if any)."""
    from mla_analysis.data.shakespeare import tokenizer_of

    tok = tokenizer_of(tokenizer)
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    parts = [np.asarray(ids + eos, dtype=np.int64) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def check_utf8_text(path: str, data: bytes) -> None:
    """Raise ValueError naming the file when it is not UTF-8 text (UTF-16, binary): its bytes would train noise."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"data.paths: {path} is UTF-16 text (byte-order mark) (allowed: UTF-8 text files)")
    if b"\x00" in data:
        raise ValueError(f"data.paths: {path} is binary (NUL byte at offset {data.index(0)}) (allowed: UTF-8 text files)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(data) - 3:  # not just a character cut at the max_bytes boundary
            raise ValueError(f"data.paths: {path} is not UTF-8 (invalid byte at offset {e.start}) "
                             "(allowed: UTF-8 text files)") from None


def read_files(files: List[str], max_bytes: int) -> List[bytes]:
    """Raw bytes of each file in order, the last one truncated so the total is at most ``max_bytes``."""
    out, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        with open(f, "rb") as fh:
            data = fh.read(max_bytes - total)
        check_utf8_text(f, data)
        out.append(data)
        total += len(data)
    return out


def load_hf_texts(hf: HFConfig, max_bytes: int) -> List[bytes]:
    """UTF-8 bytes of ``hf.text_column`` of a ``datasets.load_dataset`` split, capped at ``max_bytes``."""
    if not hf.path:
        raise ValueError("data.hf.path must be set when data.source='hf'")
    try:
        import datasets  # imported lazily: it is slow to import and only this source needs it
    except ImportError:
        raise ValueError("data.source='hf' needs the 'datasets' package: pip install datasets") from None
    files = list(hf.data_files) if hf.data_files else None
    ds = datasets.load_dataset(hf.path, hf.name, split=hf.split, data_files=files, cache_dir=hf.cache_dir)
    if hf.text_column not in ds.column_names:
        raise ValueError(f"data.hf.text_column={hf.text_column!r} is not a column of the dataset {ds.column_names}")
    out, total = [], 0
    for text in ds[hf.text_column]:
        if total >= max_bytes:
            break
        b = (text or "").encode("utf-8")[: max_bytes - total]
        out.append(b)
        total += len(b)
    return out


# ---- tokenising ---------------------------------------------------------------------------------------------
def train_bpe(docs: List[bytes], vocab_size: int):
    """Byte-level BPE (``tokenizers``) trained on the documents; unseen characters map to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # limit_alphabet keeps the most frequent byte symbols when vocab_size is below the 256 byte alphabet
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>"], limit_alphabet=vocab_size - 1, show_progress=False
    )
    tok.train_from_iterator([d.decode("utf-8", errors="replace") for d in docs], trainer=trainer)
    return tok


def tokenize_docs(docs: List[bytes], tokenizer: str, vocab_size: int, bpe_vocab_size: Optional[int]) -> np.ndarray:
    """Documents -> one stream of vocab ids (text ids shifted by FIRST_WORD, EOS between documents)."""
    room = vocab_size - FIRST_WORD
    if tokenizer == "bytes":
        if room < 256:
            raise ValueError(
                f"data.vocab_size={vocab_size} is too small for data.tokenizer='bytes': need >= {FIRST_WORD + 256}"
            )
        ids = [np.frombuffer(d, dtype=np.uint8).astype(np.int64) for d in docs]
    elif tokenizer == "bpe":
        size = room if bpe_vocab_size is None else bpe_vocab_size
        if not 2 <= size <= room:
            raise ValueError(
                f"data.bpe_vocab_size={bpe_vocab_size} must be in 2..{room} (data.vocab_size - {FIRST_WORD})"
            )
        tok = train_bpe(docs, size)
        enc = tok.encode_batch([d.decode("utf-8", errors="replace") for d in docs])
        ids = [np.asarray(e.ids, dtype=np.int64) for e in enc]
    else:
        raise ValueError(f"data.tokenizer={tokenizer!r} must be one of {TOKENIZERS}")
    parts = []
    for x in ids:
        parts += [x + FIRST_WORD, np.array([EOS], dtype=np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---- corpora -------------------------------------------------------------------------------------------------
def load_text_corpora(cfg) -> Tuple[TextCorpus, TextCorpus]:
    """(train, val) corpora for ``cfg.source`` in {"text", "hf"} (cached per configuration)."""
    hf = cfg.hf
    key = (
        cfg.source,
        tuple(cfg.paths) if cfg.paths else None,
        cfg.max_bytes,
        cfg.tokenizer,
        cfg.bpe_vocab_size,
        cfg.val_fraction,
        cfg.vocab_size,
        cfg.seq_len,
        (hf.path, hf.name, hf.split, hf.text_column, tuple(hf.data_files) if hf.data_files else None, hf.cache_dir),
    )
    return _load_text_corpora(key)


@functools.lru_cache(maxsize=4)
def _load_text_corpora(key) -> Tuple[TextCorpus, TextCorpus]:
    source, paths, max_bytes, tokenizer, bpe_vocab_size, val_fraction, vocab_size, seq_len, hf_key = key
    if max_bytes < 1:
        raise ValueError(f"data.max_bytes={max_bytes} must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    if source == "text":
        files = resolve_paths(paths)
        docs, where = read_files(files, max_bytes), "data.paths"
    elif source == "hf":
        path, name, split, column, files, cache_dir = hf_key
        docs = load_hf_texts(HFConfig(path, name, split, column, list(files) if files else None, cache_dir), max_bytes)
        files, where = [f"data.hf row {i}" for i in range(len(docs))], "data.hf"
    else:
        raise ValueError(f"data.source={source!r} is not a text source")
    if tokenizer in TOKENIZERS:
        tokens = tokenize_docs(docs, tokenizer, vocab_size, bpe_vocab_size)
    else:
        tokens = tokenize_hf(decode_utf8(docs, list(files)), tokenizer)
    cut = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:cut], tokens[cut:]
    if min(len(train), len(val)) < seq_len + 1:
        raise ValueError(
            f"{where}: too little text ({len(train)} train / {len(val)} val tokens); each split needs "
            f">= data.seq_len + 1 = {seq_len + 1} (raise data.max_bytes or data.val_fraction, or add files)"
        )
    return TextCorpus(train), TextCorpus(val)
