"""mla-analysis: measure what MLA's low-rank KV compression and DeepSeekMoE routing cost a language model."""

from __future__ import annotations

__version__ = "0.1.0"

from ._lazy import lazy_exports  # noqa: E402

# lm-eval's model="mla_analysis": a lazy registry entry added once lm-eval is imported (lm-eval itself is not imported here)
from .evaluation.registration import install as _install_lm_eval_hook  # noqa: E402

_install_lm_eval_hook()


# lazy imports keep `import mla_analysis` cheap (the lm-eval registration is imported on demand too)
__getattr__, __dir__, _lazy_names = lazy_exports(__name__, {
    "interop.hf_io": ("load_model",), "config": ("ModelConfig",), "models.transformer": ("Transformer",)})
__all__ = _lazy_names + ["__version__"]
