"""The ``claims`` group (+experiment=claims): where the studies' records are and how the audit measures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass
class ClaimsConfig:
    """``claims`` node: where the studies are and how the arithmetic and the timing are done."""

    studies: Dict[str, Optional[str]] = field(default_factory=lambda: {
        "rank_sweep": "experiments/rank_sweep/run10",  # 10 seeds, data seed = seed (3-seed run: run/)
        "attention_variants": "experiments/attention_variants/run5",  # 5 seeds (3-seed run: run/)
        "long_context": "experiments/long_context/run10",  # rank_sweep/run10 probed, queries uniform
        "moe_study": "experiments/moe_study/run5",  # 5 seeds, 1,000 steps, two gammas (3-seed run: run/)
        "moe_probes": "experiments/moe_study/probes5",  # experts probe of run5 (3-seed: probes/)
        "real_conversion": "experiments/real_conversion/run",  # the real-model study (SmolLM2-135M): one-shot sweep
        "real_conversion_heal": "experiments/real_conversion/heal",  # its healed runs
        "real_conversion_full": "experiments/real_conversion/full",  # copying + next_line probes; absent until run
        "real_experts_before": "experiments/real_experts/before",  # SmolLM2 MoEfied, unhealed layouts (CPU)
        "real_experts": "experiments/real_experts/run",  # its healed runs (GPU); absent until run
    })
    out: Optional[str] = "CLAIMS.md"  # also written here (relative to the working directory); null = run dir only
    cache_bits: float = 6.0  # bits per cached element of DeepSeek-V2's deployment (its paper's KV quantisation)
    context: int = 4096  # decode timing context and the arithmetic's reference context
    decode_steps: int = 8
    repeats: int = 5  # decode timings repeated (interleaved across variants): median and spread per variant
    quick: bool = False  # tiny decode shape (tests)
    tolerance: float = 0.01  # "performance loss under 1%": relative
