"""lm-eval on toolkit models: procedural tasks exported as local lm-eval tasks, and ``python -m mla_analysis.eval``.

Procedural tasks (MQAR, passkey, NIAH presets, copy, arithmetic; ``mla_analysis.data.tasks``) become lm-eval
tasks named ``mla_<task>`` (prefixed: lm-eval ships its own ``arithmetic`` and RULER ``niah_*``): a YAML file
plus a JSON-lines data file each, and ``mla_utils.py`` (scoring hooks), in one directory that lm-eval reads
as ``include_path``. Examples are the toolkit's own eval sets (``build_eval_sets``: same seed stream, same
``eval_examples``), so the scores are comparable with a run's ``<task>.exact_match``.

Formulation: ``generate_until`` with greedy decoding. Every *answer span* of an example (a maximal run of
scored positions whose answers are teacher-forced, e.g. a passkey's digits, one NIAH value, one sum; one
MQAR query each) is one lm-eval document: context = the example's tokens up to the span, target = its
tokens. Greedy generation reproduces a span iff the argmax is right at every position of it given the true
prefix, which is the toolkit's teacher-forced criterion, so ``exact_match`` (all spans of an example right,
averaged over examples; ``data/scoring.py``) equals the toolkit's exact match on the same set.
``span_exact_match`` is the mean over spans (for MQAR: per-query accuracy). ``--limit`` counts documents
(spans), so a limit may end inside an example.

CLI (lm-eval's own argument names)::

    python -m mla_analysis.eval --pretrained RUN_DIR --tasks mqar,passkey --limit 64 --output_path out.json
    python -m mla_analysis.eval --pretrained HF_DIR --tasks hellaswag,arc_easy --batch_size 8

Procedural names (``mqar`` or ``mla_mqar``) are exported into ``--include_path`` when given (else a temporary
directory); any other name is an lm-eval task. Bad paths, unknown tasks and tasks whose dataset cannot be
loaded (e.g. no internet: set ``HF_DATASETS_OFFLINE=1`` to fail fast) end with one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Optional

PREFIX = "mla_"
UTILS_MODULE = "mla_utils"
_UTILS_SOURCE = (
    '"""Scoring hooks of the exported mla_analysis procedural tasks (see mla_analysis/evaluation/cli.py)."""\n'
    "from mla_analysis.evaluation.cli import example_exact_match, process_results  # noqa: F401\n"
)


class TaskError(ValueError):
    """A task name lm-eval does not know, or whose dataset cannot be loaded; the message names the task."""


# ---- procedural tasks -> lm-eval documents --------------------------------------------------------------
def procedural_task_names() -> list[str]:
    """Toolkit task names that export to lm-eval (every registered task except the training-only ``niah_all``)."""
    from ..data.tasks import TASKS

    return [t for t in TASKS if t != "niah_all"]


def procedural_name(name: str) -> Optional[str]:
    """The toolkit task behind ``name`` (``mqar`` or ``mla_mqar``), or None for an lm-eval task."""
    base = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    return base if base in procedural_task_names() else None


def answer_spans(inputs: Iterable[int], targets: Iterable[int]) -> list[tuple[int, int]]:
    """Answer spans ``(s, e)`` of one example: scored positions s..e (inclusive), consecutive and teacher-forced.

    Position t is scored when ``targets[t] != -100``; t and t+1 share a span when both are scored and the
    answer at t is the next input (``inputs[t+1] == targets[t]``), so MQAR queries stay separate spans.
    """
    from ..data.tasks import IGNORE

    x, y = list(inputs), list(targets)
    spans: list[tuple[int, int]] = []
    for t, target in enumerate(y):
        if target == IGNORE:
            continue
        if spans and spans[-1][1] == t - 1 and x[t] == y[t - 1]:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


def task_documents(inputs, targets, names) -> list[dict]:
    """lm-eval documents of one task's eval set: one per answer span (``names`` maps ids to token names)."""
    docs = []
    for i, (x, y) in enumerate(zip(inputs.tolist(), targets.tolist())):
        for j, (s, e) in enumerate(answer_spans(x, y)):
            docs.append(
                {
                    "example": i,
                    "span": j,
                    "context": " ".join(names[t] for t in x[: s + 1]),
                    "target": " ".join(names[t] for t in y[s : e + 1]),
                }
            )
    return docs


def _task_yaml(task: str, data_file: Path, max_gen_toks: int, source: dict) -> str:
    """The lm-eval task config of one exported procedural task (JSON is valid YAML; !function needs raw text)."""
    import json

    head = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metadata": {"version": 1.0, **source},
    }
    lines = [f"{k}: {json.dumps(v)}" for k, v in head.items()]
    lines += [
        f"process_results: !function {UTILS_MODULE}.process_results",
        "metric_list:",
        "  - metric: exact_match",
        f"    aggregation: !function {UTILS_MODULE}.example_exact_match",
        "    higher_is_better: true",
        "  - metric: span_exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    return "\n".join(lines) + "\n"


def export_procedural_tasks(data_cfg, tasks: Iterable[str], out_dir: str | Path, examples: Optional[int] = None) -> dict[str, str]:
    """Write ``mla_<task>.yaml`` + ``.jsonl`` (+ ``mla_utils.py``) into ``out_dir``; returns {toolkit name: lm-eval name}.

    The examples are ``build_eval_sets`` of ``data_cfg`` with ``eval_examples = examples`` (None = the config's),
    i.e. the toolkit's own eval sets. ValueError names an unknown task or one that does not fit ``seq_len``.
    """
    import dataclasses
    import json

    from ..data import build_eval_sets, make_vocab
    from .lm_eval_model import ProceduralTokenizer
    from ..training.results import atomic_write_text

    wanted = []
    for name in tasks:
        base = procedural_name(name)
        if base is None:
            raise ValueError(f"{name!r} is not a procedural task (allowed: {', '.join(procedural_task_names())})")
        wanted.append(base)
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise ValueError(f"examples={examples!r} is invalid (allowed: an integer > 0)")
    cfg = dataclasses.replace(data_cfg, eval_tasks=wanted, eval_examples=examples or data_cfg.eval_examples)
    sets = build_eval_sets(cfg)
    names = ProceduralTokenizer(make_vocab(cfg).vocab_size).id_to_name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{UTILS_MODULE}.py", _UTILS_SOURCE)
    exported = {}
    for base in wanted:
        task = PREFIX + base
        docs = task_documents(*sets[base], names)
        data_file = (out / f"{task}.jsonl").resolve()
        atomic_write_text(data_file, "".join(json.dumps(d) + "\n" for d in docs))
        max_gen = max(len(d["target"].split()) for d in docs)
        source = {"toolkit_task": base, "examples": cfg.eval_examples, "seq_len": cfg.seq_len,
                  "vocab_size": cfg.vocab_size, "seed": cfg.seed}
        atomic_write_text(out / f"{task}.yaml", _task_yaml(task, data_file, max_gen, source))
        exported[base] = task
    return exported


# ---- scoring hooks (referenced by the exported YAMLs through mla_utils.py) -------------------------------------
def process_results(doc: dict, results: list[str]) -> dict:
    """Per document: span correct (first len(target) generated tokens equal the target), keyed by its example."""
    target = doc["target"].split()
    ok = int(results[0].split()[: len(target)] == target)
    return {"exact_match": (doc["example"], ok), "span_exact_match": ok}


def example_exact_match(items: list) -> float:
    """Mean over examples of 1[every answer span of the example right] (the toolkit's exact_match)."""
    per_example: dict[Any, bool] = {}
    for example, ok in items:
        per_example[example] = per_example.get(example, True) and bool(ok)
    return sum(per_example.values()) / len(per_example)


# ---- running lm-eval ------------------------------------------------------------------------------------------
def load_tasks(task_manager, names: list[str]) -> list:
    """lm-eval Task/Group objects for ``names`` (one at a time, so a failure names its task); TaskError otherwise."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            raise TaskError(f"unknown lm-eval task {name!r} (procedural tasks: {', '.join(procedural_task_names())})")
    objs = []
    for name in names:
        try:
            loaded = task_manager.load([name])
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TaskError(f"lm-eval task {name!r}: dataset could not be loaded ({type(e).__name__}: {msg})") from None
        children = {c for kids in loaded["group_map"].values() for c in kids}
        objs += [g for n, g in loaded["groups"].items() if n not in children]
        objs += [t for n, t in loaded["tasks"].items() if n not in children]
    return objs


def flat_scores(results: dict, rename: Optional[dict] = None) -> dict[str, float]:
    """``<task>.<metric>`` floats from lm-eval's ``results["results"]`` (filter appended unless it is "none")."""
    rename = rename or {}
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            col = f"{rename.get(task, task)}.{metric}" + ("" if filt in ("", "none") else f".{filt}")
            out[col] = float(value)
    return out


def evaluate_tasks(
    lm,
    task_names: list[str],
    data_cfg=None,
    task_dir: Optional[str | Path] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    examples: Optional[int] = None,
    bootstrap_iters: int = 0,
) -> tuple[dict, dict[str, str]]:
    """Export the procedural tasks among ``task_names`` into ``task_dir`` and run lm-eval; returns (results, {lm-eval name: column name})."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    procedural = [procedural_name(n) for n in task_names if procedural_name(n) is not None]
    others = [n for n in task_names if procedural_name(n) is None]
    rename: dict[str, str] = {}
    tmp = None
    if procedural:
        if data_cfg is None:
            raise ValueError("procedural tasks need a data config (vocab, seq_len, knobs)")
        if task_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="mla_lm_eval_")
            task_dir = tmp.name
        exported = export_procedural_tasks(data_cfg, procedural, task_dir, examples)
        rename = {v: k for k, v in exported.items()}
    try:
        # the default index scans every lm-eval task YAML (~10 s): only build it for lm-eval's own tasks
        tm = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=bool(others))
        names = [PREFIX + p for p in procedural] + others
        tasks = load_tasks(tm, names)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=False,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results, rename


def data_config_for(path: str | Path, model) -> Any:
    """The DataConfig of a run directory (its results.json), else defaults sized to the model's vocab and context."""
    from omegaconf import OmegaConf

    from ..data import DataConfig
    from ..training.results import ResultsError, read_json

    rec_path = Path(path) / "results.json"
    if rec_path.exists():
        try:
            data = read_json(rec_path).get("config", {}).get("data")
        except ResultsError:
            data = None
        if data:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))
    return DataConfig(vocab_size=model.cfg.vocab_size, seq_len=min(DataConfig.seq_len, model.cfg.max_seq_len))


def results_record(results: dict) -> dict:
    """The JSON-safe part of lm-eval's results (task configs hold functions)."""
    keep = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "higher_is_better", "versions")
    return {k: results[k] for k in keep if k in results}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: evaluate one model on lm-eval tasks; prints lm-eval's table, exit 2 on bad input."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mla_analysis.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="run dir, Hugging Face checkpoint dir, .gguf file or model name")
    ap.add_argument("--tasks", required=True, help="comma-separated: procedural (mqar, passkey, ...) and/or lm-eval tasks")
    ap.add_argument("--include_path", default=None, help="directory for the exported procedural tasks (and your own YAMLs)")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's limit; < 1 = fraction)")
    ap.add_argument("--num_fewshot", type=int, default=None)
    ap.add_argument("--batch_size", default="8", help="rows per forward pass (an integer or auto)")
    ap.add_argument("--max_batch_size", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--output_path", default=None, help="write the results JSON here")
    ap.add_argument("--tokenizer", default=None, help="procedural | a tokenizer path (default: the checkpoint's, else procedural)")
    ap.add_argument("--examples", type=int, default=None, help="examples per procedural task (default: data.eval_examples)")
    ap.add_argument("--bootstrap_iters", type=int, default=0, help="lm-eval stderr bootstrap iterations (0 = none)")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    path = Path(args.pretrained)
    from ..assets import NAMED_MODELS

    # checked before torch / lm-eval are imported: a typo fails at once
    if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf") or args.pretrained in NAMED_MODELS):
        return fail(f"--pretrained {path}: no such directory, .gguf file or model name ({', '.join(NAMED_MODELS)})")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        return fail("--tasks is empty (allowed: comma-separated task names)")

    from ..interop.hf_io import load_model
    from ..training.results import ResultsError, atomic_write_json
    try:
        model = load_model(path, device=args.device or "cpu")
        from .lm_eval_model import MLAnalysisLM

        lm = MLAnalysisLM(pretrained=str(path), model=model, tokenizer=args.tokenizer, batch_size=args.batch_size,
                          max_batch_size=args.max_batch_size, device=args.device)
        data_cfg = data_config_for(path, model) if any(procedural_name(t) for t in tasks) else None
        results, rename = evaluate_tasks(lm, tasks, data_cfg, args.include_path, args.limit, args.num_fewshot,
                                   args.examples, args.bootstrap_iters)
    except (ResultsError, TaskError, ValueError) as e:  # CheckpointError is a ResultsError; ConfigError a ValueError
        return fail(str(e).splitlines()[0])
    from lm_eval.utils import make_table

    print(make_table(results))
    for col, v in sorted(flat_scores(results, rename).items()):
        print(f"  {col:40s} {v:.4g}")
    if args.output_path:
        atomic_write_json(args.output_path, {"pretrained": str(path), **results_record(results)})
        print(f"results -> {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
