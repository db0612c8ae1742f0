"""``probe=copying``: NLL and top-1 accuracy on the second occurrence of a repeated held-out passage, against distance.

An example is ``passage + filler[:d] + passage``: a passage of ``passage_len`` tokens of the evaluation plays,
then ``d`` tokens of other held-out text (a different place of the plays, never overlapping the passage),
then the passage again; ``d`` (the distance: tokens between the end of the first occurrence and the start of
the second) runs over ``distances``. The same passages and fillers (the first d tokens of one filler) serve
every distance, so the curve is paired. Scored: the passage's tokens 1 .. passage_len - 1 in the second
occurrence (token 0 follows the filler and cannot be copied), each predicted from its true prefix
(teacher-forced); ``first`` is the same tokens in the first occurrence (no copy possible), the no-copy
baseline. Distances whose example does not fit ``model.max_seq_len`` are skipped (``skipped``).

Options: ``mla_analysis.config.probes.CopyingConfig`` (conf/probe/copying.yaml).

Keys (under ``probe.copying.``; statistics ``.mean/.ci_low/.ci_high/.n`` over examples, each example's value
the mean over its scored tokens): ``d<d>.nll``, ``d<d>.top1``, ``first.nll``, ``first.top1``, ``distances``
(those run), ``skipped``, ``examples``, ``passage_len``, interval fields (unit = example).
Functions: :func:`copy_examples` (the token sequences) and :func:`copying_scores`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import ConfigError
from . import register
from ._common import options
from ._text import answer_scores, flat, interval_fields, mean_interval, shakespeare_split

IGNORE = -100

def _pick(docs: list[np.ndarray], length: int, rng: np.random.Generator, avoid=None) -> tuple[int, int]:
    """(doc index, start) of a uniformly placed span of ``length`` tokens inside one document, not overlapping ``avoid``."""
    sizes = np.array([max(0, len(d) - length + 1) for d in docs], dtype=np.float64)
    if sizes.sum() == 0:
        raise ValueError(f"copying: no held-out document has {length} tokens")
    for _ in range(1000):
        j = int(rng.choice(len(docs), p=sizes / sizes.sum()))
        s = int(rng.integers(0, int(sizes[j])))
        if avoid is None or avoid[0] != j or s + length <= avoid[1] or s >= avoid[2]:
            return j, s
    raise ValueError("copying: the held-out text is too short for a filler apart from the passage")


def copy_examples(docs: Mapping[str, np.ndarray], passage_len: int, max_distance: int, n: int, seed: int = 0):
    """n (passage [P], filler [max_distance]) pairs of held-out tokens, deterministic from ``seed``."""
    arrays = [np.asarray(d, dtype=np.int64) for d in docs.values()]
    rng = np.random.Generator(np.random.PCG64([seed, 0xC0B1]))
    out = []
    for _ in range(n):
        j, a = _pick(arrays, passage_len, rng)
        k, b = _pick(arrays, max_distance, rng, avoid=(j, a, a + passage_len))
        out.append((arrays[j][a: a + passage_len], arrays[k][b: b + max_distance]))
    return out


def copy_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [n, T], targets of the second occurrence [n, T], targets of the first [n, T]) at distance d."""
    P = len(pairs[0][0])
    seqs = np.stack([np.concatenate([p, f[:d], p]) for p, f in pairs])  # [n, 2P + d]
    x, y = seqs[:, :-1], seqs[:, 1:]
    second = np.full(y.shape, IGNORE, dtype=np.int64)
    first = np.full(y.shape, IGNORE, dtype=np.int64)
    # y[t] = seqs[t + 1]: passage token j of the second copy sits at seqs[P + d + j], i.e. y[P + d + j - 1]
    second[:, P + d: 2 * P + d - 1] = y[:, P + d: 2 * P + d - 1]
    first[:, : P - 1] = y[:, : P - 1]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(second), torch.from_numpy(first)


def _per_example(values: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    mask = (targets != IGNORE).double()
    return ((values.double() * mask).sum(1) / mask.sum(1)).numpy()


def copying_scores(model: torch.nn.Module, docs: Mapping[str, np.ndarray], distances: Sequence[int], passage_len: int,
                   examples: int, device: torch.device, batch_size: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-example mean NLL / top-1 on the second occurrence per distance (``d<d>.nll``, ``d<d>.top1``) and ``first.*``."""
    pairs = copy_examples(docs, passage_len, max(distances), examples, seed)
    out: dict[str, np.ndarray] = {}
    for d in distances:
        x, second, first = copy_batch(pairs, d)
        both = torch.where(second != IGNORE, second, first)  # one pass scores both occurrences
        logp, hit = answer_scores(model, x, both, device, batch_size)
        out[f"d{d}.nll"], out[f"d{d}.top1"] = _per_example(-logp, second), _per_example(hit, second)
        if "first.nll" not in out:  # causal: the first occurrence does not depend on d
            out["first.nll"], out["first.top1"] = _per_example(-logp, first), _per_example(hit, first)
    return out


def parse_params(params: dict) -> dict:
    """The options (``mla_analysis.config.probes.CopyingConfig``) checked and normalised, as a dict."""
    return options("copying", params)


@register("copying")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Second-occurrence NLL / top-1 of repeated held-out passages against the distance, with intervals over examples."""
    from ._common import model_config, unwrap

    p = parse_params(params)
    max_len = model_config(model).max_seq_len
    run_d = [d for d in p["distances"] if 2 * p["passage_len"] + d - 1 <= max_len]
    skipped = [d for d in p["distances"] if d not in run_d]
    if skipped:
        warnings.warn(f"probe.copying: distances {skipped} do not fit model.max_seq_len={max_len}: skipped")
    if not run_d:
        raise ConfigError(f"probe.copying.distances={p['distances']}: none fits model.max_seq_len={max_len}")
    docs = shakespeare_split(data_cfg, "copying").document_tokens()
    scores = copying_scores(unwrap(model), docs, run_d, p["passage_len"], p["examples"], device, p["batch_size"], p["seed"])
    iv = dict(method=p["interval"], level=p["confidence_level"], resamples=p["resamples"], seed=p["seed"])
    out: dict[str, Any] = {}
    for key, values in scores.items():
        out.update(flat(key, mean_interval(values, **iv)))
    out.update({"distances": run_d, "skipped": skipped, "examples": p["examples"], "passage_len": p["passage_len"]})
    out.update(interval_fields(p, "example"))
    return out
