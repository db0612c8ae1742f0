"""``probe=lm_eval``: lm-evaluation-harness scores of the trained model (procedural tasks offline, standard ones by name).

The procedural tasks are exported (``mla_analysis.evaluation.cli.export_procedural_tasks``) into ``<run>/lm_eval_tasks/``
from the run's own data config, so the examples are the run's eval sets and ``<task>.exact_match`` matches the
toolkit's exact match (``mla_analysis/evaluation/cli.py`` explains the generate_until formulation). The model is wrapped in
``mla_analysis.evaluation.lm_eval_model.MLAnalysisLM`` (procedural tokenizer, KV-cached greedy decoding).

Keys (under ``probe.lm_eval.`` in results.json):

- ``<task>.<metric>``: floats for the tables; procedural tasks under their toolkit name (``mqar.exact_match``,
  ``mqar.span_exact_match``), lm-eval tasks under theirs (``hellaswag.acc``; a filter other than "none" is appended).
- ``results``: lm-eval's own ``results["results"]`` dict, unchanged (task -> "metric,filter" -> value).

Parameters: ``tasks`` (null = the data config's eval tasks that fit ``seq_len``; names from
``mla_analysis.data.tasks.TASKS`` or lm-eval task names), ``examples`` (procedural examples per task; null =
``data.eval_examples``), ``limit`` (lm-eval documents per task; null = all), ``batch_size``, ``num_fewshot``
(null = each task's default), ``bootstrap_iters`` (lm-eval stderr iterations; 0 = none).
lm_eval.json (the JSON-safe part of lm-eval's output) is written to the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from . import ProbeError, register
from ._common import options



def _parse(params: dict) -> dict:
    return options("lm_eval", params)  # checked in mla_analysis.config.probes


@register("lm_eval")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """lm-eval scores: lm-eval's ``results`` dict plus ``<task>.<metric>`` floats."""
    from ..data import resolve_eval_tasks
    from ..evaluation.cli import TaskError, evaluate_tasks, flat_scores, results_record
    from ..evaluation.lm_eval_model import MLAnalysisLM
    from ..training.results import atomic_write_json
    from ._common import unwrap

    p = _parse(params)
    tasks = p["tasks"] if p["tasks"] is not None else resolve_eval_tasks(data_cfg)
    if not tasks:
        raise ConfigError("probe.lm_eval.tasks: no task fits data.seq_len (allowed: a list of task names)")
    lm = MLAnalysisLM(model=unwrap(model), batch_size=p["batch_size"], device=str(device))
    run_dir = Path(run_dir)
    try:
        results, rename = evaluate_tasks(
            lm, tasks, data_cfg, run_dir / "lm_eval_tasks", limit=p["limit"], num_fewshot=p["num_fewshot"],
            examples=p["examples"], bootstrap_iters=p["bootstrap_iters"],
        )
    except TaskError as e:  # unknown name: a config error; dataset not loadable: the probe failed
        raise (ConfigError if str(e).startswith("unknown") else ProbeError)(f"probe.lm_eval.tasks: {e}") from None
    except ValueError as e:  # a task that does not fit data.seq_len, text the tokenizer cannot encode, ...
        raise ConfigError(f"probe.lm_eval: {e}") from None
    atomic_write_json(run_dir / "lm_eval.json", results_record(results))
    return {"results": results["results"], **flat_scores(results, rename)}
