"""Embedded, procedural, deterministic data: vocab layout, synthetic language, retrieval tasks, mixtures.

Samples are ``(inputs, targets)`` int64 pairs of equal length; ``targets[t]`` is the token to predict
after ``inputs[:t+1]`` and -100 where unscored. All randomness is ``numpy.random.Generator(PCG64(...))``.
"""

from mla_analysis.data.language import LanguageConfig, MarkovLanguage, get_language
from mla_analysis.data.mixture import (
    DEFAULT_EVAL_TASKS,
    DataConfig,
    TrainBatches,
    build_eval_sets,
    build_train_batches,
    language_optimal_loss,
    make_vocab,
    prepare_data_config,
    resolve_eval_tasks,
    train_batch,
    validate_data_config,
)
from mla_analysis.data.scoring import score_logits, score_predictions
from mla_analysis.data.tasks import (
    IGNORE,
    NIAH_PRESETS,
    TASK_FAMILY,
    TASK_KNOBS,
    TASKS,
    ArithmeticConfig,
    CopyConfig,
    MQARConfig,
    NIAHConfig,
    PasskeyConfig,
    make_arithmetic,
    make_copy,
    make_mqar,
    make_niah,
    make_passkey,
    SeqLenError,
    make_task,
    task_fits,
)
from mla_analysis.data.shakespeare import LabelledTokens, ShakespeareConfig, ShakespeareData, load_shakespeare
from mla_analysis.data.text import HFConfig, TextCorpus, load_text_corpora
from mla_analysis.data.vocab import Vocab

__all__ = [
    "ArithmeticConfig",
    "CopyConfig",
    "DEFAULT_EVAL_TASKS",
    "DataConfig",
    "HFConfig",
    "IGNORE",
    "LanguageConfig",
    "MQARConfig",
    "MarkovLanguage",
    "NIAHConfig",
    "NIAH_PRESETS",
    "PasskeyConfig",
    "SeqLenError",
    "TASKS",
    "TASK_FAMILY",
    "TASK_KNOBS",
    "TextCorpus",
    "TrainBatches",
    "Vocab",
    "build_eval_sets",
    "build_train_batches",
    "get_language",
    "language_optimal_loss",
    "load_text_corpora",
    "make_arithmetic",
    "make_copy",
    "make_mqar",
    "make_niah",
    "make_passkey",
    "make_task",
    "make_vocab",
    "prepare_data_config",
    "LabelledTokens",
    "ShakespeareConfig",
    "ShakespeareData",
    "load_shakespeare",
    "resolve_eval_tasks",
    "score_logits",
    "score_predictions",
    "task_fits",
    "train_batch",
    "validate_data_config",
]
