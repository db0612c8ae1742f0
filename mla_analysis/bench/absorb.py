"""Figure 2: absorbed vs naive MLA decode at one long context, same weights and cache."""

from __future__ import annotations

from typing import Any

import torch

from ..metrics.timing import median, time_interleaved
from .sizes import Sizes
from .decode import check_decode_parity, decode_models, fill_cache_, make_decode_step, parity_atol

# -------------------------------------------------------------------- figure 2: absorbed vs naive
def bench_absorb(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Figure 2: absorbed vs naive MLA decode at ``sizes.absorb_context`` (batch 1), same weights and cache."""
    S, B = sizes.absorb_context, 1
    models = decode_models(sizes.decode_kw, S + 1, device, dtype, ["mla", "mla_naive"], seed)
    cache = models["mla"].new_cache(B, S + 1, dtype)
    fill_cache_(cache, S, seed)
    steps = {
        "absorb": make_decode_step(models["mla"], cache, S, B, device, seed),
        "naive": make_decode_step(models["mla_naive"], cache, S, B, device, seed),
    }
    diff = check_decode_parity(steps["absorb"], steps["naive"], parity_atol(dtype))
    times = time_interleaved(steps, device, warmup=1, iters=sizes.absorb_iters)
    tok_s = {k: B / median(v) for k, v in times.items()}
    return {
        "config": models["mla"].cfg, "context": S, "batch": B, "max_logit_diff": diff, "times": times,
        "tok_s": tok_s, "ratio": tok_s["absorb"] / tok_s["naive"], "_steps": steps, "_keep": (models, cache),
    }
