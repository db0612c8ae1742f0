"""Evaluating a model: sliding-window perplexity and KL, and lm-eval tasks through an lm-eval model adapter.

``perplexity`` scores token streams in chunked sliding windows (equal to transformers' loss) and the per-token
KL to a reference (``mla_analysis.metrics.perplexity``, at the data level, re-exported here); ``lm_eval_model`` is lm-eval's ``model="mla_analysis"`` (KV-cached loglikelihood and greedy
generation); ``registration`` registers that model with lm-eval lazily (``import mla_analysis`` stays cheap);
``cli`` is ``python -m mla_analysis.eval`` and exports the procedural tasks. The ``lm_eval`` probe is in
``mla_analysis.probes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .perplexity import perplexity, kl_divergence, lm_metrics, sliding_windows, document_windows
    from .lm_eval_model import MLAnalysisLM, ProceduralTokenizer
    from .cli import evaluate_tasks, export_procedural_tasks, load_tasks, TaskError

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "perplexity": ("perplexity", "kl_divergence", "lm_metrics", "sliding_windows", "document_windows"),
    "lm_eval_model": ("MLAnalysisLM", "ProceduralTokenizer"),
    "cli": ("evaluate_tasks", "export_procedural_tasks", "load_tasks", "TaskError"),
})
