"""mla-analysis: measure what MLA's low-rank KV compression and DeepSeekMoE routing cost a language model."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "ModelConfig", "Transformer", "__version__"]

# lm-eval's model="mla_analysis": a lazy registry entry added once lm-eval is imported (lm-eval itself is not imported here)
from .evaluation.registration import install as _install_lm_eval_hook  # noqa: E402

_install_lm_eval_hook()


def __getattr__(name: str):
    # lazy imports keep `import mla_analysis` cheap (the lm-eval registration is imported on demand too)
    if name == "load_model":
        from .interop.hf_io import load_model

        return load_model
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name == "Transformer":
        from .models.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'mla_analysis' has no attribute {name!r}")
