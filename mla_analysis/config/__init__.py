"""Configuration: one dataclass per config group, with its validation, at the bottom of the import graph.

``model`` (``ModelConfig``, every attention/FFN variant), ``train`` (``TrainConfig``), ``convert``,
``claims``, ``search`` and ``logger`` each have a module here; nothing in this package imports the rest
of ``mla_analysis`` (``tests/test_architecture.py`` checks it). The ``data`` group's dataclasses live
with the data generators (``mla_analysis.data``), and ``mla_analysis.runner.schema`` assembles the groups into
the run schema Hydra checks every YAML file of ``conf/`` against.
"""

from .checks import check_finite
from .claims import ClaimsConfig
from .convert import ConvertConfig
from .logger import LoggerConfig, MLflowConfig, TensorBoardConfig
from .model import (ATTENTION_VARIANTS, FFN_KINDS, MLA_DECODE_PATHS, MLA_VARIANTS, MLP_KINDS, NORMS, POS_EMBS,
                    SCORE_FUNCS, ConfigError, ModelConfig, RopeScaling, tiny, validate_model_config)
from .search import SearchConfig
from .train import TrainConfig, validate_train

__all__ = [
    "ATTENTION_VARIANTS", "FFN_KINDS", "MLA_DECODE_PATHS", "MLA_VARIANTS", "MLP_KINDS", "NORMS", "POS_EMBS",
    "SCORE_FUNCS", "ClaimsConfig", "ConfigError", "ConvertConfig", "LoggerConfig", "MLflowConfig", "ModelConfig",
    "RopeScaling", "SearchConfig", "TensorBoardConfig", "TrainConfig", "check_finite", "tiny", "validate_model_config",
    "validate_train",
]
