"""Deterministic training batches (a mixture of language and tasks) and fixed eval sets.

Every batch is a pure function of (seed, rank, step): training resumed at step k sees exactly the batches
of an uninterrupted run, and DDP ranks draw from distinct streams (the rank, not world_size, keys the
stream: each rank's batch is its local ``batch_size``). Eval sets come from a separate stream keyed by
the set's name, so they are independent draws from the training ones.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from mla_analysis.config.data import SOURCES, DataConfig, Source, check_data  # noqa: F401  (DataConfig: importable from here)
from mla_analysis.data.language import get_language
from mla_analysis.data.text import TextCorpus
from mla_analysis.data.tasks import (
    NIAH_PRESETS,
    TASK_FAMILY,
    TASKS,
    check_task,
    make_task,
    task_fits,
)
from mla_analysis.data.shakespeare import split_tokens, tokenizer_of, validate_shakespeare_config
from mla_analysis.data.text import load_text_corpora, uses_hf_tokenizer
from mla_analysis.data.vocab import Vocab

MODEL_TOKENIZER = "model"  # data.tokenizer: the tokenizer of train.init_from (resolved by prepare_data_config)
_TRAIN_STREAM = 0x7A41  # arbitrary tags that separate the training and eval seed streams
_EVAL_STREAM = 0xE7A1

Batch = Tuple[torch.Tensor, torch.Tensor]

DEFAULT_EVAL_TASKS = ("mqar", "passkey", *NIAH_PRESETS, "copy", "arithmetic")


def validate_data_config(cfg) -> None:
    """Raise ValueError (a ConfigError) naming the offending ``data.*`` key for any invalid setting."""
    Vocab(cfg.vocab_size)
    check_data(cfg)  # ranges and choices (mla_analysis.config.data); the task registry and tokenizers below
    if cfg.source == Source.shakespeare:
        if not uses_hf_tokenizer(cfg):
            raise ValueError(
                f"data.tokenizer={cfg.tokenizer} is invalid for data.source=shakespeare "
                "(allowed: model = train.init_from's tokenizer, or an HF tokenizer dir or name)"
            )
        validate_shakespeare_config(cfg.shakespeare)
    if uses_hf_tokenizer(cfg) and cfg.eval_tasks:
        raise ValueError(
            f"data.eval_tasks={list(cfg.eval_tasks)} is invalid with data.tokenizer={cfg.tokenizer} "
            "(procedural tasks need the procedural vocabulary; allowed: [] or null)"
        )
    for name in dict(cfg.tasks):
        if name not in TASKS:
            raise ValueError(f"data.tasks: unknown task {name!r}; known: {sorted(TASKS)}")
    for name in cfg.eval_tasks or ():
        if name not in TASKS:
            raise ValueError(f"data.eval_tasks: unknown task {name!r}; known: {sorted(TASKS)}")


def resolve_eval_tasks(cfg) -> List[str]:
    """``cfg.eval_tasks``, or (when None) every default eval task whose knobs fit ``cfg.seq_len``."""
    if cfg.eval_tasks is not None:
        return list(cfg.eval_tasks)
    if uses_hf_tokenizer(cfg):  # real-text ids: no procedural tasks
        return []
    vocab = make_vocab(cfg)
    return [t for t in DEFAULT_EVAL_TASKS if task_fits(t, vocab, cfg.seq_len, _task_knobs(cfg, t))]


def make_vocab(cfg) -> Vocab:
    """The :class:`Vocab` of a data config."""
    return Vocab(cfg.vocab_size)


def _fillers(cfg):
    """(train, eval) token sources: the synthetic language (both) or the text train/val corpora."""
    vocab = make_vocab(cfg)
    if cfg.source == Source.synthetic:
        lang = get_language(vocab, cfg.language, cfg.language_seed)
        return lang, lang
    if cfg.source == Source.shakespeare:
        _check_tokenizer_vocab(cfg)
        return TextCorpus(split_tokens(cfg, "train").tokens), split_tokens(cfg, "evaluation")
    if uses_hf_tokenizer(cfg):
        _check_tokenizer_vocab(cfg)
    return load_text_corpora(cfg)


def _check_tokenizer_vocab(cfg) -> None:
    if cfg.tokenizer == MODEL_TOKENIZER:
        raise ValueError(
            "data.tokenizer=model: no model to take the tokenizer from "
            "(set train.init_from, or data.tokenizer to an HF tokenizer dir or name)"
        )
    n = len(tokenizer_of(cfg.tokenizer))
    if n > cfg.vocab_size:
        raise ValueError(
            f"data.vocab_size={cfg.vocab_size} is smaller than the {n} ids of data.tokenizer={cfg.tokenizer} "
            f"(allowed: >= {n})"
        )


def prepare_data_config(cfg, init_from: Optional[str] = None, max_seq_len: Optional[int] = None):
    """Resolve ``data.tokenizer=model`` to ``init_from`` and, for an HF tokenizer, set ``vocab_size`` to its size.

    Also checks ``data.seq_len`` against the loaded model's context (``max_seq_len``). Raises
    ConfigError naming the key; returns a new DataConfig (``cfg`` itself for procedural tokenizers).
    """
    from mla_analysis.config import ConfigError

    if max_seq_len is not None and cfg.seq_len > max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.seq_len} is beyond the model's context (max_seq_len={max_seq_len} of "
            f"train.init_from={init_from}; allowed: <= {max_seq_len})"
        )
    if not uses_hf_tokenizer(cfg):
        return cfg
    tokenizer = cfg.tokenizer
    if tokenizer == MODEL_TOKENIZER:
        if init_from is None:
            raise ConfigError(
                "data.tokenizer=model: no model to take the tokenizer from "
                "(set train.init_from, or data.tokenizer to an HF tokenizer dir or name)"
            )
        tokenizer = str(init_from)
    try:
        n = len(tokenizer_of(tokenizer))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, tokenizer=tokenizer, vocab_size=n)


def _lm_batch(filler, n: int, seq_len: int, rng: np.random.Generator) -> Batch:
    w = filler.sample_batch(n, seq_len + 1, rng)  # [n, L+1]
    return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))


def _task_knobs(cfg, name: str, train: bool = False):
    knobs = getattr(cfg, TASK_FAMILY[name])
    if train and TASK_FAMILY[name] == "mqar" and knobs.train_num_queries is not None:
        knobs = dataclasses.replace(knobs, num_queries=knobs.train_num_queries)  # denser training queries
    return knobs


class TrainBatches:
    """Infinite deterministic iterator of training batches ``(inputs [B, L], targets [B, L])``.

    ``batch_at(step)`` depends only on (cfg, batch_size, rank, step); iteration starts at ``start_step``.
    Each example is language with probability ``lm_weight``, else a task by the ``tasks`` weights.
    """

    def __init__(self, cfg, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        validate_data_config(cfg)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.step = start_step
        self.vocab = make_vocab(cfg)
        self.filler, _ = _fillers(cfg)
        # sorted names: the mixture must not depend on the YAML/dict order of `tasks`
        tasks = sorted((k, float(w)) for k, w in dict(cfg.tasks).items() if w > 0)
        if uses_hf_tokenizer(cfg):  # real-text ids: pure language (tasks need the procedural vocabulary)
            tasks = []
        total = sum(w for _, w in tasks)
        lm = cfg.lm_weight if tasks else 1.0
        self.kinds = ["lm"] + [k for k, _ in tasks]
        self.probs = np.array([lm] + [(1.0 - lm) * w / total for _, w in tasks])
        self.probs /= self.probs.sum()
        for name in self.kinds[1:]:  # fail at construction, not thousands of steps in
            check_task(name, self.vocab, cfg.seq_len, _task_knobs(cfg, name, train=True))

    def batch_at(self, step: int) -> Batch:
        """The batch of training step ``step`` on this rank."""
        rng = np.random.Generator(np.random.PCG64([self.cfg.seed, _TRAIN_STREAM, self.rank, step]))
        B, L = self.batch_size, self.cfg.seq_len
        kind = rng.choice(len(self.kinds), size=B, p=self.probs)
        inputs = torch.empty((B, L), dtype=torch.int64)
        targets = torch.empty((B, L), dtype=torch.int64)
        for j, name in enumerate(self.kinds):
            idx = torch.from_numpy(np.flatnonzero(kind == j))
            if len(idx) == 0:
                continue
            if name == "lm":
                x, y = _lm_batch(self.filler, len(idx), L, rng)
            else:
                x, y = make_task(name, len(idx), rng, self.vocab, L, _task_knobs(self.cfg, name, train=True), self.filler)
            inputs[idx], targets[idx] = x, y
        return inputs, targets

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch


def build_train_batches(cfg, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0) -> TrainBatches:
    """Infinite deterministic training iterator (per-rank ``batch_size``) starting at ``start_step``."""
    return TrainBatches(cfg, batch_size, rank=rank, world_size=world_size, start_step=start_step)


_BATCHES_CACHE: Dict[tuple, TrainBatches] = {}


def train_batch(cfg, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
    """Training batch of ``step`` on ``rank``: ``build_train_batches(...).batch_at(step)`` without rebuilding."""
    key = (repr(cfg), batch_size, rank, world_size)  # repr covers every field, nested configs included
    if key not in _BATCHES_CACHE:
        if len(_BATCHES_CACHE) >= 8:
            _BATCHES_CACHE.pop(next(iter(_BATCHES_CACHE)))
        # a private copy: later in-place edits of cfg must not change what this key produces
        _BATCHES_CACHE[key] = TrainBatches(copy.deepcopy(cfg), batch_size, rank=rank, world_size=world_size)
    return _BATCHES_CACHE[key].batch_at(step)


def _eval_rng(cfg, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([cfg.seed, _EVAL_STREAM, zlib.crc32(name.encode())]))


def build_eval_sets(cfg) -> Dict[str, Batch]:
    """Fixed eval sets: "lm" (held-out language / text val split / evaluation plays) and one per ``cfg.eval_tasks``."""
    from mla_analysis.metrics.perplexity import document_windows

    validate_data_config(cfg)
    vocab = make_vocab(cfg)
    _, filler = _fillers(cfg)
    n, L = cfg.eval_examples, cfg.seq_len
    out: Dict[str, Batch] = {}
    if cfg.source == Source.synthetic:
        out["lm"] = _lm_batch(filler, n, L, _eval_rng(cfg, "lm"))
    elif cfg.source == Source.shakespeare:  # sliding windows over the evaluation plays, per document
        out["lm"] = document_windows(filler.document_tokens(), L, cfg.eval_stride, max_windows=n)
    else:  # consecutive chunks of the validation split: every held-out token at most once
        w = filler.chunks(n, L + 1)  # [<=n, L+1]
        out["lm"] = (torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:])))
    for name in resolve_eval_tasks(cfg):
        out[name] = make_task(name, n, _eval_rng(cfg, name), vocab, L, _task_knobs(cfg, name), filler)
    return out


def language_optimal_loss(cfg) -> Optional[float]:
    """Entropy rate (nats/token) of the synthetic language = the optimal LM loss; None for text sources."""
    if cfg.source != Source.synthetic:
        return None
    return get_language(make_vocab(cfg), cfg.language, cfg.language_seed).entropy_rate()
