"""Configuration: one dataclass per config group, with its validation, at the bottom of the import graph.

``model`` (``ModelConfig``, every attention/FFN variant), ``data`` (``DataConfig`` and its task knobs),
``probe`` (one dataclass per probe, module ``probes``), ``train`` (``TrainConfig``), ``convert``, ``claims``,
``search`` and ``logger`` each have a module here; nothing in this package imports the rest of
``mla_analysis`` (``tests/test_architecture.py`` checks it).
Closed choices are ``Choice`` Enums (``checks``), which OmegaConf checks when a config composes; what
needs a registry of another package (task names, tokenizers) is checked there. ``mla_analysis.runner.schema``
assembles the groups into the run schema Hydra checks every YAML file of ``conf/`` against.
"""

from .checks import check_finite
from .claims import ClaimsConfig
from .convert import ConvertConfig
from .data import DataConfig, Edition, NiahHaystack, NiahType, Source, check_data
from .logger import LoggerConfig, MLflowConfig, TensorBoardConfig
from .model import (ATTENTION_VARIANTS, FFN_KINDS, MLA_DECODE_PATHS, MLA_VARIANTS, MLP_KINDS, NORMS, POS_EMBS,
                    SCORE_FUNCS, Attention, ConfigError, Ffn, MlaDecode, Mlp, ModelConfig, Norm, PosEmb, RopeScaling,
                    RopeType, ScoreFunc, tiny, validate_model_config)
from .probes import (PROBE_CONFIGS, CopyingConfig, CostConfig, ExpertsConfig, HeadAblationConfig, IntervalConfig,
                     IntervalMethod, KlConfig, LmEvalConfig, NeedlesConfig, NeedleTask, NextLineConfig, RetrievalConfig,
                     SpectraConfig, TokenBinsConfig, probe_config)
from .run import Job, check_job, check_run
from .search import SearchConfig
from .train import PARALLEL, TRAINABLE, Parallel, TrainConfig, Trainable, validate_train

__all__ = [
    "ATTENTION_VARIANTS", "FFN_KINDS", "MLA_DECODE_PATHS", "MLA_VARIANTS", "MLP_KINDS", "NORMS", "POS_EMBS",
    "PARALLEL", "SCORE_FUNCS", "TRAINABLE", "Attention", "ClaimsConfig", "ConfigError", "ConvertConfig",
    "CopyingConfig", "CostConfig", "DataConfig", "Edition", "ExpertsConfig", "Ffn", "HeadAblationConfig",
    "IntervalConfig", "IntervalMethod", "KlConfig", "LmEvalConfig", "LoggerConfig", "MLflowConfig", "MlaDecode",
    "Mlp", "ModelConfig", "NeedlesConfig", "NeedleTask", "NextLineConfig", "NiahHaystack", "NiahType", "Norm",
    "Parallel", "PosEmb", "PROBE_CONFIGS", "RetrievalConfig", "RopeScaling", "RopeType", "ScoreFunc",
    "Job", "SearchConfig", "Source", "SpectraConfig", "TensorBoardConfig", "TokenBinsConfig", "TrainConfig",
    "Trainable", "check_data", "check_finite", "check_job", "check_run", "probe_config", "tiny",
    "validate_model_config", "validate_train",
]
