"""Held-out perplexity and per-token KL on real text: ``mla_analysis.metrics.perplexity``, importable from here."""

from ..metrics.perplexity import (IGNORE, MAX_LOGITS, EvalWindows, PerplexityResult, document_windows,  # noqa: F401
                                  kl_divergence, lm_metrics, perplexity, scored_nll, sliding_windows, token_kl)
