"""``probe=next_line``: a local lm-eval multiple-choice task from the held-out plays (HellaSwag-style), run offline.

An example: the ``context_lines`` lines of a play before a spoken line (as printed: speaker tags and stage
directions included), then four choices: the true next line and three spoken lines drawn from elsewhere in the
same play (not within the context's reach, distinct texts, of similar length when the play has enough: within
``length_tolerance`` x the true line's characters). Targets are spoken lines (kind "line",
mla_analysis.data.shakespeare.char_kinds) of at least ``min_chars`` characters whose previous line is spoken too
(mid-speech). Examples are drawn uniformly from all such lines of the evaluation plays, deterministically from
``seed``; the gold position is shuffled.

The task is written as lm-eval YAML + JSON lines (``shakespeare_next_line.yaml`` / ``.jsonl``, output_type
multiple_choice, acc and acc_norm, target_delimiter "": each choice continues the context's last newline) into a
content-addressed folder of the cache root (``<cache>/lm_eval_tasks/next_line-<hash>``: the play files, the
parameters and :data:`VERSION`), then run through the registered ``mla_analysis`` lm-eval model
(``MLAnalysisLM`` over the probed model and data.tokenizer; lm-eval's TaskManager with ``include_path`` = that
folder, lm-eval's own task index not built). Run it by hand:
``lm_eval --model mla_analysis --model_args pretrained=RUN_DIR --include_path FOLDER --tasks shakespeare_next_line``
(after ``import mla_analysis``, e.g. ``python -c "import mla_analysis, lm_eval.__main__ as m; m.cli_evaluate()" ...``).

Options: ``mla_analysis.config.probes.NextLineConfig`` (conf/probe/next_line.yaml).

Keys (under ``probe.next_line.``): ``acc.*`` and ``acc_norm.*`` (``.mean/.ci_low/.ci_high/.n``: Wilson interval
over examples, from lm-eval's per-example results), ``examples``, ``task_dir``, ``interval.*``.
Functions: :func:`next_line_docs`, :func:`write_task`, :func:`task_dir`, :func:`evaluate_task`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError
from . import ProbeError, register
from ._common import options
from ._text import flat, model_tokenizer, shakespeare_split, wilson_interval

TASK = "shakespeare_next_line"
VERSION = "1"  # bump when the example construction changes: old cache folders are then unused

def spoken_lines(text: str, kinds: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(lines of the text, [n_lines] bool: the line is spoken: every non-space character of kind "line")."""
    lines, spoken, pos = [], [], 0
    for line in text.split("\n"):
        chars = np.frombuffer(line.encode("utf-32-le"), dtype=np.uint32)
        k = kinds[pos: pos + len(line)]
        nonspace = ~np.isin(chars, [32, 9, 13])
        spoken.append(bool(nonspace.any()) and bool((k[nonspace] == 0).all()))
        lines.append(line)
        pos += len(line) + 1
    return lines, np.array(spoken, dtype=bool)


def next_line_docs(plays: Sequence[tuple[str, str, np.ndarray]], examples: int, context_lines: int = 4,
                   min_chars: int = 20, length_tolerance: float = 0.3, seed: int = 0) -> list[dict]:
    """lm-eval documents ``{context, choices, gold, play, line}`` from (play name, text, char kinds) triples."""
    cands = []  # (play index, line index)
    parsed = []
    for j, (_, text, kinds) in enumerate(plays):
        lines, spoken = spoken_lines(text, kinds)
        long = np.array([len(s.strip()) >= min_chars for s in lines], dtype=bool)
        parsed.append((lines, spoken & long))
        for i in range(context_lines, len(lines)):
            if spoken[i] and long[i] and spoken[i - 1]:
                cands.append((j, i))
    if not cands:
        raise ValueError("next_line: the held-out plays have no spoken line to ask for")
    rng = np.random.Generator(np.random.PCG64([seed, 0x4E58]))
    picks = sorted(rng.choice(len(cands), size=min(examples, len(cands)), replace=False).tolist())
    docs = []
    for c in picks:
        j, i = cands[c]
        lines, pool = parsed[j]
        true = lines[i].rstrip()
        far = np.ones(len(lines), dtype=bool)
        far[max(0, i - context_lines - 1): i + 2] = False  # not the target's neighbourhood
        ok = [k for k in np.flatnonzero(pool & far) if lines[k].strip() != true.strip()]
        near = [k for k in ok if abs(len(lines[k].rstrip()) - len(true)) <= length_tolerance * len(true)]
        source = near if len(set(lines[k].strip() for k in near)) >= 3 else ok
        distractors: list[str] = []
        for k in rng.permutation(source):
            s = lines[int(k)].rstrip()
            if s.strip() not in {d.strip() for d in distractors}:
                distractors.append(s)
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        gold = int(rng.integers(0, 4))
        choices = distractors[:gold] + [true] + distractors[gold:]
        context = "\n".join(lines[i - context_lines: i]) + "\n"
        docs.append({"context": context, "choices": choices, "gold": gold, "play": plays[j][0], "line": int(i)})
    return docs


def task_yaml(data_file: Path, meta: dict) -> str:
    """The lm-eval task config (JSON values are valid YAML)."""
    head = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": float(VERSION), **meta},
    }
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in head.items())


def write_task(out_dir: Path, docs: list[dict], meta: dict, final_dir: Optional[Path] = None) -> Path:
    """Write ``shakespeare_next_line.yaml`` + ``.jsonl`` into ``out_dir`` (the YAML names ``final_dir``'s jsonl)."""
    from ..training.results import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = (Path(final_dir or out_dir) / f"{TASK}.jsonl").resolve()
    atomic_write_text(out_dir / f"{TASK}.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    atomic_write_text(out_dir / f"{TASK}.yaml", task_yaml(data, meta))
    return out_dir


def task_dir(labelled, p: dict) -> Path:
    """The cached task folder for the held-out documents and parameters (built once, under a lock)."""
    from ..assets import build_dir, cache_root, file_digest
    from ..data.shakespeare import char_kinds, read_text

    keys = ("examples", "context_lines", "min_chars", "length_tolerance", "seed")
    meta = {k: p[k] for k in keys}
    h = hashlib.sha256(f"{VERSION}|{json.dumps(meta, sort_keys=True)}".encode())
    for d in labelled.docs:
        h.update(f"|{d.name}|{d.edition}|{d.genre}|{file_digest(d.path)}".encode())
    target = cache_root() / "lm_eval_tasks" / f"next_line-{h.hexdigest()[:24]}"

    def fill(tmp: Path) -> None:
        plays = []
        for d in labelled.docs:
            text = read_text(d.path)
            plays.append((d.name, text, char_kinds(text, d.edition, d.genre)))
        docs = next_line_docs(plays, p["examples"], p["context_lines"], p["min_chars"], p["length_tolerance"], p["seed"])
        write_task(tmp, docs, {**meta, "plays": [d.name for d in labelled.docs]}, final_dir=target)

    return build_dir(target, fill)


def evaluate_task(lm, folder: Path) -> tuple[dict, list[dict]]:
    """Run the task in ``folder`` through lm-eval with ``lm``; (lm-eval results, per-example {acc, acc_norm})."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..evaluation.cli import load_tasks

    tm = TaskManager(include_path=str(folder), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=load_tasks(tm, [TASK]), task_manager=tm, num_fewshot=0,
                                      bootstrap_iters=0, log_samples=True)
    samples = [{"acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])} for s in results["samples"][TASK]]
    return results, samples


def parse_params(params: dict) -> dict:
    """The options (``mla_analysis.config.probes.NextLineConfig``) checked, as a dict."""
    return options("next_line", params)


@register("next_line")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """acc / acc_norm of the held-out next-line task through lm-eval, with Wilson intervals over examples."""
    from ..evaluation.lm_eval_model import MLAnalysisLM
    from ._common import unwrap

    p = parse_params(params)
    labelled = shakespeare_split(data_cfg, "next_line")
    tok = model_tokenizer(data_cfg, "next_line")
    try:
        folder = task_dir(labelled, p)
    except ValueError as e:
        raise ConfigError(f"probe.next_line: {e}") from None
    core = unwrap(model)
    lm = MLAnalysisLM(model=core, tokenizer=tok, batch_size=p["batch_size"], device=str(device),
                      dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(next(core.parameters()).dtype, "float32"))
    try:
        _, samples = evaluate_task(lm, folder)
    except Exception as e:  # lm-eval wraps dataset and template errors in many types
        raise ProbeError(f"probe.next_line: lm-eval failed on {folder}: {type(e).__name__}: {e}") from e
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        k = int(sum(s[metric] for s in samples))
        out.update(flat(metric, wilson_interval(k, len(samples), p["confidence_level"])))
    out.update({"examples": len(samples), "task_dir": str(folder), "interval.method": "wilson",
                "interval.level": float(p["confidence_level"]), "interval.unit": "example"})
    return out
