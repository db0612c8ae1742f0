"""Evaluating a model: sliding-window perplexity and KL, and lm-eval tasks through an lm-eval model adapter.

``perplexity`` scores token streams in chunked sliding windows (equal to transformers' loss) and the per-token
KL to a reference (``mla_analysis.metrics.perplexity``, at the data level, re-exported here); ``lm_eval_model`` is lm-eval's ``model="mla_analysis"`` (KV-cached loglikelihood and greedy
generation); ``registration`` registers that model with lm-eval lazily (``import mla_analysis`` stays cheap);
``cli`` is ``python -m mla_analysis.eval`` and exports the procedural tasks. The ``lm_eval`` probe is in
``mla_analysis.probes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .perplexity import perplexity, kl_divergence, lm_metrics, sliding_windows, document_windows
    from .lm_eval_model import MLAnalysisLM, ProceduralTokenizer
    from .cli import evaluate_tasks, export_procedural_tasks, load_tasks, TaskError

_EXPORTS = {name: module for module, names in {
    "perplexity": ("perplexity", "kl_divergence", "lm_metrics", "sliding_windows", "document_windows"),
    "lm_eval_model": ("MLAnalysisLM", "ProceduralTokenizer"),
    "cli": ("evaluate_tasks", "export_procedural_tasks", "load_tasks", "TaskError"),
}.items() for name in names}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy, so that importing one submodule (or `import mla_analysis`) does not import the whole stage
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
