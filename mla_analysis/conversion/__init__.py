"""Converting a trained model: MHA/GQA -> MLA and dense FFN -> DeepSeekMoE, with the rank budget per layer.

``mla`` factorises the K/V projections into MLA's latent (``mha_to_mla``, ``factorize``, RoPE-pair
selection); ``rank_allocation`` splits a KV budget over layers; ``moefy`` splits dense FFNs into experts
(``dense_to_moe``); ``job`` is the ``convert`` job of ``mla_analysis.run`` (convert, then heal by training);
``cli`` is ``python -m mla_analysis.convert`` (from-hf / to-hf / mha-to-mla).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .mla import (mha_to_mla, factorize, collect_attention_covariances, select_rope_pairs, pair_dims,
        pair_norm_scores)
    from .rank_allocation import allocate_ranks
    from .moefy import dense_to_moe
    from .job import run_convert, convert_model, heal

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mla": ("mha_to_mla", "factorize", "collect_attention_covariances", "select_rope_pairs", "pair_dims",
        "pair_norm_scores"),
    "rank_allocation": ("allocate_ranks",),
    "moefy": ("dense_to_moe",),
    "job": ("run_convert", "convert_model", "heal"),
})
