"""Helpers of the real-text probes (kl, token_bins, copying, needles, next_line): intervals, held-out text, scoring.

Intervals are over *units* (windows of held-out text, or examples), never over tokens: tokens of one
window are correlated, windows are close to independent draws of the held-out text. A statistic is the
token-weighted mean ``r = sum(s_i) / sum(c_i)`` over units i (``s_i`` = sum of the per-token values of
unit i, ``c_i`` = its token count; ``c_i = 1`` for per-example values), with

- ``bootstrap``: the percentile interval of r over ``resamples`` resamplings of the units with
  replacement (numpy PCG64 from ``seed``);
- ``t``: r +- t_{n-1} x SE, SE the delta-method (cluster) standard error of a ratio,
  sqrt(sum (s_i - r c_i)^2 / (n (n - 1))) / mean(c_i); for ``c_i = 1`` the ordinary t-interval.

Proportions (exact match) use the Wilson score interval over examples instead (honest at 0/n and n/n).
Every statistic is written as flat fields ``<name>.mean/.ci_low/.ci_high/.n`` (n = units that contain a
token of it), and each probe states ``interval.method``, ``interval.level`` and ``interval.resamples``.
The interval keys are those of ``mla_analysis.config.probes.IntervalConfig`` (checked there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..config.probes import IntervalMethod


def ratio_interval(sums: np.ndarray, counts: np.ndarray, method: str = "bootstrap", level: float = 0.95,
                   resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Token-weighted mean sum(sums)/sum(counts) over units with its interval: {mean, ci_low, ci_high, n, tokens}."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    n = int((c > 0).sum())
    out = {"mean": float(s.sum() / total) if total > 0 else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "n": n, "tokens": int(total)}
    if n < 2:
        return out  # one unit: no spread to estimate
    r = out["mean"]
    if method == IntervalMethod.t:
        from scipy.stats import t as student_t

        m = len(s)
        se = math.sqrt(float(((s - r * c) ** 2).sum()) / (m * (m - 1))) / float(c.mean())
        half = float(student_t.ppf(0.5 + level / 2, m - 1)) * se
        out["ci_low"], out["ci_high"] = r - half, r + half
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = rng.integers(0, len(s), size=(resamples, len(s)))  # (B, units)
        cs = c[idx].sum(1)
        stats = np.where(cs > 0, s[idx].sum(1) / np.maximum(cs, 1e-300), np.nan)
        lo, hi = np.nanquantile(stats, [0.5 - level / 2, 0.5 + level / 2])
        out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out


def mean_interval(values: np.ndarray, method: str = "bootstrap", level: float = 0.95, resamples: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """Mean of per-example values with its interval over examples: {mean, ci_low, ci_high, n} (unit counts)."""
    v = np.asarray(values, dtype=np.float64)
    out = ratio_interval(v, np.ones_like(v), method, level, resamples, seed)
    del out["tokens"]
    return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> dict[str, float]:
    """Proportion successes/n with its Wilson score interval: {mean, ci_low, ci_high, n}."""
    from scipy.stats import norm

    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half), "n": n}


def flat(prefix: str, stats: dict[str, float]) -> dict[str, float]:
    """``{prefix.mean: .., prefix.ci_low: .., ...}``."""
    return {f"{prefix}.{k}": v for k, v in stats.items()}


def interval_fields(p: dict, unit: str) -> dict[str, Any]:
    """The record fields that state how the intervals were formed."""
    return {"interval.method": str(p["interval"]), "interval.level": float(p["confidence_level"]),
            "interval.resamples": int(p["resamples"]) if p["interval"] == IntervalMethod.bootstrap else 0,
            "interval.unit": unit}


# ---- held-out text and models ----------------------------------------------------------------------------
def shakespeare_split(data_cfg: Any, probe: str, which: str = "evaluation"):
    """The labelled tokens of a Shakespeare split of the run's data config (ConfigError unless data.source=shakespeare)."""
    from ..data.shakespeare import split_tokens

    if getattr(data_cfg, "source", None) != "shakespeare":
        raise ConfigError(
            f"probe.{probe}: needs data.source=shakespeare (the held-out plays), got data.source="
            f"{getattr(data_cfg, 'source', None)!r}"
        )
    try:
        return split_tokens(data_cfg, which)
    except ValueError as e:
        raise ConfigError(f"probe.{probe}: {e}") from None


def load_reference(spec: Optional[str], data_cfg: Any, probe: str, device: torch.device) -> torch.nn.Module:
    """The reference model: ``spec`` (run dir, HF dir, .gguf or model name) or, when null, data.tokenizer's model."""
    from ..training.checkpoint import CheckpointError
    from ..interop.hf_io import load_model

    if spec is None:
        spec = getattr(data_cfg, "tokenizer", None)  # data.tokenizer=model resolves to train.init_from
    try:
        return load_model(str(spec), device=device).eval()
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"probe.{probe}.reference={spec!r}: {e} (allowed: a run dir, HF dir, .gguf or model name)") from None


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as perplexity.py), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def head_chunks(model: torch.nn.Module, h: torch.Tensor, max_logits: int = 1 << 25) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, fp32 logits) of the output head on rows of h [R, D], at most max_logits logits at a time."""
    V = model.head.out_features
    rows = max(1, max_logits // V)
    for i in range(0, h.shape[0], rows):
        yield slice(i, i + rows), model.head(h[i: i + rows]).float()  # (rows, V)


@torch.no_grad()
def answer_scores(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored position (targets != -100): log p(target) and 1[argmax = target], each [n, L] fp32 (0 elsewhere)."""
    was = model.training
    model.eval()
    logp = torch.zeros(inputs.shape, dtype=torch.float32)
    hit = torch.zeros(inputs.shape, dtype=torch.float32)
    try:
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i: i + batch_size].to(device), targets[i: i + batch_size].to(device)
            mask = y != -100
            with autocast(device):
                h = model(x, return_hidden=True)[mask]  # (R, D): only the scored rows reach the head
            t = y[mask]
            lp = torch.empty(t.shape[0], dtype=torch.float32, device=device)
            ok = torch.empty(t.shape[0], dtype=torch.float32, device=device)
            for sl, logits in head_chunks(model, h):
                lp[sl] = logits.gather(-1, t[sl, None]).squeeze(-1) - torch.logsumexp(logits, -1)
                ok[sl] = (logits.argmax(-1) == t[sl]).float()
            for out, v in ((logp, lp), (hit, ok)):
                block = torch.zeros(x.shape, dtype=torch.float32, device=device)
                block[mask] = v
                out[i: i + batch_size] = block.cpu()
    finally:
        model.train(was)
    return logp, hit


def model_tokenizer(data_cfg: Any, probe: str):
    """The run's Hugging Face tokenizer (data.tokenizer), ConfigError when it has none."""
    from ..data.shakespeare import tokenizer_of

    try:
        return tokenizer_of(getattr(data_cfg, "tokenizer", None))
    except (ValueError, OSError) as e:
        raise ConfigError(f"probe.{probe}: data.tokenizer: {e}") from None
