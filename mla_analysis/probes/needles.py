"""``probe=needles``: needles in a Shakespeare haystack, over context length x depth, scored by log-probability and exact match.

Tasks (text in the model's own tokenizer, data.tokenizer; the haystack is held-out text: a contiguous stretch of
one evaluation play from a random place):

- ``passkey``: the needle "The pass key is 71432. Remember it. 71432 is the pass key." (a random 5-digit key),
  question "What is the pass key? The pass key is", answer " 71432".
- ``kv``: ``kv_needles`` needles "The special magic number for <word> is: <7 digits>." (distinct words of
  :data:`KEYS`), the asked one at the depth, the others at uniform random places; question "What is the special
  magic number for <word>? The special magic number for <word> is:", answer " <7 digits>".

An example is ``instruction + haystack with the needles + question + answer`` of exactly ``length`` tokens (the
haystack is cut to fit); the asked needle starts after ``round(depth x haystack tokens)`` haystack tokens.
Needle, question and answer are tokenised on their own and spliced in as token ids, so the answer's tokens are
known exactly. Scoring, teacher-forced on the answer tokens in one forward pass: ``logprob`` = sum of log p(answer
token | true prefix) (nats), ``exact_match`` = every answer token is the argmax given its true prefix, which is
what greedy decoding from the question would reproduce (mla_analysis/evaluation/cli.py states the equivalence).

Options: ``mla_analysis.config.probes.NeedlesConfig`` (conf/probe/needles.yaml).

Keys (under ``probe.needles.``; ``<cell>`` = ``len<L>.depth<d:.2f>``): ``<task>.<cell>.exact_match.*`` (Wilson
interval over examples), ``<task>.<cell>.logprob.*`` (interval as configured, over examples), ``<task>.exact_match``
/ ``<task>.logprob`` (means over cells), ``lengths``, ``depths``, ``examples``, interval fields (unit = example).
needles.json (atomic) holds the heat-map grids ``grid.<task>.<metric>`` = [len][depth] with the axes;
needles.png the heat maps (``figures``). Functions: :func:`needle_example`, :func:`needle_scores`.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..config.probes import NEEDLE_KEYS, NeedleTask
from . import register
from ._common import figure, options, save_figure
from ._text import (answer_scores, flat, interval_fields, mean_interval, model_tokenizer, shakespeare_split,
                    wilson_interval)

IGNORE = -100


KEYS = ("anchor", "bottle", "candle", "dagger", "falcon", "garden", "harbor", "island", "jacket", "kettle", "ladder",
        "lantern", "marble", "needle", "orchard", "pebble", "quarry", "ribbon", "saddle", "thimble", "umbrella", "velvet",
        "window", "yellow", "zephyr", "copper", "meadow", "signal", "tunnel", "walnut")
assert len(KEYS) == NEEDLE_KEYS  # probe.needles.kv_needles is checked against NEEDLE_KEYS in config
INSTRUCTION = {
    NeedleTask.passkey: "There is a pass key hidden in the text below. Find it and remember it.\n",
    NeedleTask.kv: "Special magic numbers are hidden in the text below. Find them and remember them.\n",
}

def needle_example(encode: Callable[[str], list[int]], haystack: np.ndarray, length: int, depth: float, task: str,
                   rng: np.random.Generator, kv_needles: int = 4) -> tuple[list[int], int]:
    """(token ids of exactly ``length`` tokens, answer token count): the answer is the last tokens."""
    if task == NeedleTask.passkey:
        key = str(int(rng.integers(10000, 100000)))
        needles = [encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")]
        question, answer = encode("\nWhat is the pass key? The pass key is"), encode(f" {key}")
    else:
        words = [KEYS[i] for i in rng.choice(len(KEYS), size=kv_needles, replace=False)]
        values = [str(int(rng.integers(1_000_000, 10_000_000))) for _ in words]
        needles = [encode(f"\nThe special magic number for {w} is: {v}.\n") for w, v in zip(words, values)]
        question = encode(f"\nWhat is the special magic number for {words[0]}? The special magic number for {words[0]} is:")
        answer = encode(f" {values[0]}")
    head = encode(INSTRUCTION[NeedleTask(task)])
    n_hay = length - len(head) - sum(map(len, needles)) - len(question) - len(answer)
    if n_hay < 1:
        raise ValueError(f"needles: length {length} leaves no room for the haystack of task {task}")
    start = int(rng.integers(0, len(haystack) - n_hay + 1))
    hay = [int(t) for t in haystack[start: start + n_hay]]
    # the asked needle (needles[0]) at the depth, the distractors anywhere; insert from the back to keep places valid
    places = [int(round(depth * n_hay))] + [int(rng.integers(0, n_hay + 1)) for _ in needles[1:]]
    for place, needle in sorted(zip(places, needles), key=lambda pn: -pn[0]):
        hay[place:place] = needle
    ids = head + hay + question + answer
    assert len(ids) == length, (len(ids), length)
    return ids, len(answer)


def _haystacks(docs: Mapping[str, np.ndarray], length: int) -> list[np.ndarray]:
    stacks = [np.asarray(d, dtype=np.int64) for d in docs.values() if len(d) >= length]
    if not stacks:
        raise ValueError(f"needles: no held-out document has {length} tokens for a haystack")
    return stacks


def needle_scores(model: torch.nn.Module, encode: Callable[[str], list[int]], docs: Mapping[str, np.ndarray],
                  tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], examples: int,
                  device: torch.device, batch_size: int = 4, kv_needles: int = 4, seed: int = 0) -> dict[tuple, dict]:
    """(task, length, depth) -> {"logprob": [examples], "exact": [examples] bool}, deterministic from ``seed``."""
    out = {}
    for task in tasks:
        for length in lengths:
            stacks = _haystacks(docs, length)
            for depth in depths:
                rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(f"{task}|{length}|{depth:.4f}".encode())]))
                rows, n_answer = [], []
                for _ in range(examples):
                    stack = stacks[int(rng.integers(0, len(stacks)))]
                    ids, n = needle_example(encode, stack, length, depth, task, rng, kv_needles)
                    rows.append(ids)
                    n_answer.append(n)
                seqs = torch.tensor(rows, dtype=torch.long)  # (examples, length)
                x, y = seqs[:, :-1], seqs[:, 1:].clone()
                for r, n in enumerate(n_answer):
                    y[r, : length - 1 - n] = IGNORE  # only the answer's n tokens (the last n targets) are scored
                logp, hit = answer_scores(model, x, y, device, batch_size)
                mask = y != IGNORE
                out[(task, length, depth)] = {
                    "logprob": (logp * mask).sum(1).double().numpy(),
                    "exact": ((hit * mask).sum(1) == mask.sum(1)).numpy(),
                }
    return out


def parse_params(params: dict) -> dict:
    """The options (``mla_analysis.config.probes.NeedlesConfig``) checked and normalised, as a dict."""
    return options("needles", params)


def _plot(grids: dict, lengths: list[int], depths: list[float], path: Path) -> str:
    tasks = list(grids)
    fig, axes = figure(2, len(tasks), 4.0 * len(tasks), 6.5)
    for j, task in enumerate(tasks):
        for i, (metric, cmap) in enumerate((("exact_match", "viridis"), ("logprob", "magma"))):
            ax = axes[i, j]
            m = np.array(grids[task][metric], dtype=np.float64)  # (len, depth)
            im = ax.imshow(m.T, origin="lower", aspect="auto", cmap=cmap,
                           vmin=0.0 if metric == "exact_match" else None, vmax=1.0 if metric == "exact_match" else None)
            ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{task}: {metric}")
            fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


@register("needles")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Passkey / key-value needle retrieval over length x depth in held-out text: exact match and answer log-prob."""
    from ..training.results import atomic_write_json
    from ._common import model_config, unwrap

    p = parse_params(params)
    max_len = model_config(model).max_seq_len
    lengths = [v for v in p["lengths"] if v <= max_len]
    if len(lengths) < len(p["lengths"]):
        warnings.warn(f"probe.needles: lengths above model.max_seq_len={max_len} skipped")
    if not lengths:
        raise ConfigError(f"probe.needles.lengths={p['lengths']}: none fits model.max_seq_len={max_len}")
    tok = model_tokenizer(data_cfg, "needles")
    docs = shakespeare_split(data_cfg, "needles").document_tokens()

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    try:
        scores = needle_scores(unwrap(model), encode, docs, p["tasks"], lengths, p["depths"], p["examples"], device,
                               p["batch_size"], p["kv_needles"], p["seed"])
    except ValueError as e:
        raise ConfigError(f"probe.needles.lengths: {e}") from None
    iv = dict(method=p["interval"], level=p["confidence_level"], resamples=p["resamples"], seed=p["seed"])
    out: dict[str, Any] = {}
    grids: dict[str, dict[str, list]] = {}
    for task in p["tasks"]:
        g = {"exact_match": [], "logprob": []}
        for length in lengths:
            row_em, row_lp = [], []
            for depth in p["depths"]:
                s = scores[(task, length, depth)]
                cell = f"{task}.len{length}.depth{depth:.2f}"
                em = wilson_interval(int(s["exact"].sum()), len(s["exact"]), p["confidence_level"])
                lp = mean_interval(s["logprob"], **iv)
                out.update(flat(f"{cell}.exact_match", em))
                out.update(flat(f"{cell}.logprob", lp))
                row_em.append(em["mean"])
                row_lp.append(lp["mean"])
            g["exact_match"].append(row_em)
            g["logprob"].append(row_lp)
        out[f"{task}.exact_match"] = float(np.mean(g["exact_match"]))
        out[f"{task}.logprob"] = float(np.mean(g["logprob"]))
        grids[task] = g
    out.update({"lengths": lengths, "depths": p["depths"], "examples": p["examples"]})
    out.update(interval_fields(p, "example"))
    record = {**out, "grid": {t: {"lengths": lengths, "depths": p["depths"], **g} for t, g in grids.items()}}
    if p["figures"]:
        record["figure"] = out["figure"] = _plot(grids, lengths, p["depths"], Path(run_dir) / "needles.png")
    atomic_write_json(Path(run_dir) / "needles.json", record)
    return out
