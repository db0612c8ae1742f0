"""Hydra entry point: ``python -m mla_analysis.run +experiment=rank_sweep``.

Each job does what ``job`` names (train a model, the default; ``convert`` one and heal it; the ``claims``
audit), evaluates the model and writes ``results.json`` in its Hydra output directory.
A sweep (``-m``, or an experiment declaring ``hydra.mode: MULTIRUN``) ends with ``comparison.md``
and ``comparison.csv`` in the sweep directory (``mla_analysis.runner.callbacks.ComparisonTables``).
Errors: a bad config ends with one line naming the key and exit code 2, and no results file
(``mla_analysis.runner.errors``); in a
sweep every job's config is validated before the first job starts, a failing job records
``status: failed`` with the reason, the other jobs go on, and the sweep exits 1 at the end.
The run (or sweep) directory is locked before Hydra writes into it (``mla_analysis.runner.lock``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .runner import schema  # noqa: F401  (registers the structured configs)
from .config import ConfigError, Job
from .data import prepare_data_config
from .interop.hf_io import load_model, model_config_of, save_tokenizer
from .training.loggers import Tracker, start_tracking
from .probes import ProbeError, check_probes, run_probes
from .training.results import (RESULTS_FILE, ResultsError, atomic_write_json, environment, flatten, is_finished, load_record,
                      make_record)
from .runner.errors import BAD_INPUT, exit_on_bad_input, one_line
from .runner.job_config import (JobResult, check_config, check_job_nodes, job_objects,  # noqa: F401 (run's API)
                                record_config)
from .runner.launcher import launched_dirs, register_launchers
from .analysis.search import objective, resolve_reference
from .training.trainer import NonFiniteLoss, TrainingInterrupted, export_submitit_env, train


def _return_value(cfg: DictConfig, result: JobResult) -> Optional[float]:
    """What the task function returns to a sweeper: the search objective when searching, else val_loss (None: failed)."""
    if result.status not in ("ok", "skipped"):
        return None
    value = result.metrics.get("search.objective" if cfg.get("search") is not None else "val_loss")
    return float(value) if value is not None else None


def format_summary(metrics: dict[str, Any]) -> str:
    """A short human-readable block of the headline metrics of one run."""
    keys = ["val_loss", "val_ppl", "val_loss_optimal", "params", "kv_bytes_per_token", "tokens_per_s"]
    keys += sorted(k for k in metrics if k.endswith(".exact_match") and not k.startswith("probe."))
    lines = []
    for k in keys:
        if metrics.get(k) is None:
            continue
        v = metrics[k]
        lines.append(f"  {k:32s} {v:.4g}" if isinstance(v, float) else f"  {k:32s} {v}")
    return "\n".join(lines)


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> JobResult:
    """Validate, run (``cfg.job``: train, convert or claims), evaluate and record one job; returns how it ended.

    A single run that fails exits here: 2 for bad input (one line, nothing written), 1 for a failed run,
    128 + signal for an interrupted one. A job of a sweep records its failure and returns it (the sweep
    goes on). Signals (SIGINT/SIGTERM) stay deferred until the record is written: a run stopped at any
    point after start-up is recorded ``interrupted`` with a checkpoint to resume from.
    """
    from .training.trainer import StopFlag

    if is_finished(run_dir) and ((multirun and cfg.skip_finished) or cfg.train.resume):
        # a finished run is never rewritten: a sweep rerun skips it, train.resume=true leaves it as it is
        print(f"[skip] {run_dir} already has a complete {RESULTS_FILE}")
        return JobResult("skipped", load_record(run_dir)["metrics"], run_dir / RESULTS_FILE)
    job_lock = None
    if multirun:  # a job dir names its worker (host, pid) while it runs; the sweep dir is locked by cli()
        from .runner.lock import RunLock

        job_lock = RunLock(run_dir).acquire()
    try:
        with StopFlag.get() as stop, exit_on_bad_input():  # bad input reaches here from single runs only
            result = _run_job(cfg, run_dir, multirun, stop)
    finally:
        if job_lock is not None:
            job_lock.release()
    if result.exit_code:
        sys.exit(result.exit_code)
    if stop.signum is not None:  # arrived while the record was written: it stands, and the process stops
        print(f"[interrupted] signal {signal.Signals(stop.signum).name} after {run_dir} was recorded: stopping",
              file=sys.stderr)
        sys.exit(128 + stop.signum)
    return result


def _run_job(cfg: DictConfig, run_dir: Path, multirun: bool, stop: Any) -> JobResult:
    from .runner.schema import kv_cache_warning, validate_run

    results_path = run_dir / RESULTS_FILE
    export_submitit_env()  # a multi-task submitit job: one rank per task, as under torchrun
    is_rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 probes and records
    t0 = time.time()
    config = record_config(cfg)
    tracker = Tracker()  # the experiment trackers (logger=...), started once the config is valid
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        job = check_job_nodes(cfg)
        model_cfg, data_cfg, tcfg = job_objects(cfg)
        probe_cfg = OmegaConf.to_container(cfg.probe, resolve=True)
        init_model = None
        if tcfg.init_from is not None:  # the loaded model's own config replaces the model group
            init_model = load_model(tcfg.init_from)
            model_cfg = init_model.cfg
            config["model"] = model_cfg.to_dict()
        token_source, max_len = tcfg.init_from, init_model.cfg.max_seq_len if init_model else None
        convert_source = cfg.convert.source if job is Job.convert else None
        if init_model is None and convert_source is not None:  # converting an existing model: its shape and tokenizer
            model_cfg = model_config_of(convert_source)
            token_source, max_len = convert_source, model_cfg.max_seq_len
        # real text: data.tokenizer=model -> that model's tokenizer, data.vocab_size = its size
        data_cfg = prepare_data_config(data_cfg, token_source, max_len)
        config["data"].update(tokenizer=data_cfg.tokenizer, vocab_size=data_cfg.vocab_size)
        validate_run(model_cfg, data_cfg, tcfg, cfg.device)
        warning = kv_cache_warning(model_cfg)
        if warning is not None and is_rank0:
            print(warning, file=sys.stderr)
        check_probes(probe_cfg, None if job is Job.convert else model_cfg)  # convert changes the model
        if job is Job.claims and probe_cfg:
            raise ConfigError(f"probe={','.join(probe_cfg)}: the claims audit has no model to probe (use probe=none)")
        search = OmegaConf.to_object(cfg.search) if cfg.get("search") is not None else None
        reference = resolve_reference(search) if search is not None else None
        tracker = start_tracking(cfg, config, run_dir, multirun)
        if job is Job.claims:  # the claims audit: arithmetic, a timing and the studies' records
            from .analysis.claims import run_claims

            out = run_claims(OmegaConf.to_object(cfg.claims), run_dir, cfg.device)
        elif job is Job.convert:  # convert a trained model and heal it (mla_analysis/conversion/job.py)
            from .conversion.job import run_convert

            out = run_convert(OmegaConf.to_object(cfg.convert), model_cfg, data_cfg, tcfg, run_dir, cfg.seed, cfg.device)
            config["model"] = out["model"].cfg.to_dict()
        else:
            out = train(model_cfg, data_cfg, tcfg, run_dir, seed=cfg.seed, device=cfg.device, model=init_model,
                        on_eval=tracker.on_eval, on_step=tracker.on_step)
        if tcfg.init_from is not None and is_rank0:
            save_tokenizer(tcfg.init_from, run_dir)  # a run made from a tokenised source carries its tokenizer
        if probe_cfg and is_rank0:
            t_probe = time.time()
            model = out["model"].eval()
            out["metrics"].update(run_probes(model, probe_cfg, data_cfg, run_dir, next(model.parameters()).device))
            out["timings"]["probe_s"] = time.time() - t_probe
        if search is not None:
            out["metrics"].update(objective(search, reference, flatten(config), out["metrics"]))
        if stop.signum is not None:  # during the probes: the final checkpoint is saved, a resume redoes them
            raise stop.interrupted("after training: checkpoint saved; rerun with train.resume=true to finish")
    except Exception as e:
        tracker.close("interrupted" if isinstance(e, TrainingInterrupted) else "failed")
        return _failed(e, config, run_dir, multirun)
    if not is_rank0:
        return JobResult("ok", out["metrics"])
    failure = out.get("checkpoint_error")  # the metrics are kept, but the model is not saved: not a finished run
    record = make_record(
        "failed" if failure else "ok",
        config,
        out["metrics"],
        timings={**out["timings"], "wall_s": time.time() - t0},
        env=environment(out["device"], cfg.seed),
        history=out["history"],
        **({"error": failure} if failure else {}),
    )
    tracker.finish(record, results_path, write=_write_record)  # results.json (+ logging_errors), trackers closed
    if failure:
        print(f"[failed] {failure}; metrics recorded in {results_path}", file=sys.stderr)
        return JobResult("failed", out["metrics"], results_path, exit_code=0 if multirun else 1)
    print(f"\n{config['model']['name']} done -> {results_path}\n{format_summary(out['metrics'])}")
    return JobResult("ok", out["metrics"], results_path)


def _failed(e: Exception, config: dict[str, Any], run_dir: Path, multirun: bool) -> JobResult:
    """How a job that raised ends: bad input and crashes of a single run are re-raised, the rest recorded.

    A single run's bad input ends in ``exit_on_bad_input`` (one line, exit 2, no record); a crash shows its
    traceback. In a sweep both are recorded ``failed`` and the sweep goes on. An interruption, a
    non-finite loss or a failed probe is recorded in both, and stops a single run (or any interrupted job).
    """
    path = run_dir / RESULTS_FILE
    if isinstance(e, TrainingInterrupted):
        status, code = "interrupted", e.exit_code
    elif isinstance(e, (NonFiniteLoss, ProbeError)):
        status, code = "failed", 0 if multirun else 1
    elif not multirun:
        raise e
    else:  # a bad config or a crash in one job of a sweep must not stop the others
        extra = {} if isinstance(e, BAD_INPUT) else {"traceback": traceback.format_exc()}
        _write_record(path, make_record("failed", config, {}, error=f"{type(e).__name__}: {e}", **extra))
        print(f"[failed] {run_dir}: {one_line(e) or f'{type(e).__name__}: {e}'}", file=sys.stderr)
        return JobResult("failed", {}, path)
    _write_record(path, make_record(status, config, {}, error=str(e)))
    print(f"[{status}] {e}", file=sys.stderr)
    return JobResult(status, {}, path, exit_code=code)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Write results.json; a failed write is one line and exit 1 (nothing else is left to record it)."""
    try:
        atomic_write_json(path, record)
    except OSError as e:
        print(f"error: {path}: results not written ({type(e).__name__}: {e}); status was {record['status']}",
              file=sys.stderr)
        sys.exit(1)


def conf_dir() -> Path:
    """The config folder: ``mla_analysis/conf`` in an installed copy (package data), else the checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"  # pyproject maps the top-level conf/ to the package mla_analysis.conf
    return installed if (installed / "config.yaml").is_file() else here.parent / "conf"


CONF_DIR = conf_dir()


def precheck(argv: list[str]) -> Optional[str]:
    """Compose the config for the command line before Hydra runs; a one-line error, or None when it composes.

    Each value of a sweep override is composed once (with the first value of the other sweeps), so a
    typo in any of them stops the sweep before any job starts. Hydra's own settings are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None  # --cfg, --config-name, ...: Hydra's own modes
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception as e:
        return one_line(e) or str(e).splitlines()[0]
    base, sweeps = [], []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            try:
                sweeps.append((o.get_key_element(), list(o.sweep_string_iterator())))
            except Exception:
                continue  # interval sweeps (Optuna) are validated by their sweeper
        else:
            base.append(o.input_line)
    firsts = [f"{k}={values[0]}" for k, values in sweeps if values]
    candidates = [base + firsts]
    for i, (k, values) in enumerate(sweeps):
        others = firsts[:i] + firsts[i + 1:]
        candidates += [base + others + [f"{k}={v}"] for v in values[1:]]
    for overrides in candidates:
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            check_job_nodes(cfg)
        except Exception as e:  # anything that stops composing is reported here, before any directory is made
            return one_line(e) or unset_node(overrides) or str(e).splitlines()[0]
        try:  # the probes' option values (ranges, lists), which composing checks only for their types
            check_probes(OmegaConf.to_container(cfg.probe, resolve=True), None)
        except ConfigError as e:
            return str(e)
    return None


# how to set a node that is null by default: OmegaConf 2.3 cannot merge a command-line dict (or a field) into it
UNSET_NODES = {"model.rope_scaling": "+model/rope_scaling=yarn model.rope_scaling.factor=N"}


def unset_node(overrides: list[str]) -> Optional[str]:
    """A one-line error for an override that sets a dict or a field under a node that is null, else None."""
    from hydra import compose, initialize_config_dir

    safe = [o for o in overrides if "." not in _override_key(o)]  # group choices and root values: they compose
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=safe)
    except Exception:
        return None
    for o in overrides:
        key = _override_key(o)
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if OmegaConf.select(cfg, prefix) is None and "." in prefix and (i < len(parts) or "={" in o):
                how = UNSET_NODES.get(prefix, f"set {prefix} in a config file of conf/, which is merged into it")
                what = "a dict cannot be merged into it" if key == prefix else f"{key} cannot be set under it"
                return f"{prefix} is null by default: {what} on the command line (allowed: {how})"
    return None


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def resolve_output_dir(argv: list[str]) -> Optional[tuple[Path, bool, Optional[str]]]:
    """(directory, multirun, pin) for the command line, before Hydra runs; None for Hydra's own modes.

    The directory is the run dir (``hydra.run.dir``) or, for a sweep, the sweep dir. ``pin`` is an
    override fixing a time-stamped default (``${now:...}``) to the value resolved here, so the directory
    locked is the one Hydra writes; None when the command line sets the directory itself.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    single = [o.input_line if not o.is_sweep_override() else None for o in parsed]
    for i, o in enumerate(parsed):  # a sweep: its first value stands for it (the directories do not depend on it)
        if single[i] is None:
            try:
                single[i] = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            except Exception:
                single[i] = ""  # an interval (Optuna): left to the sweeper
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in single if o], return_hydra_config=True)
    multirun = "-m" in argv or "--multirun" in argv or str(cfg.hydra.mode).endswith("MULTIRUN")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    directory = str(OmegaConf.select(cfg, key))
    given = any(_override_key(a) == key for a in overrides)
    pin = None if given else f"{key}='" + directory.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return Path(directory), multirun, pin


def lock_output_dir(argv: list[str]) -> tuple[Optional[Any], list[str], Optional[Path], bool]:
    """Lock the run (or sweep) directory before Hydra writes into it; (lock, argv to run, directory, multirun).

    Raises ConfigError naming the directory and the holder when another run holds it, or when the
    directory cannot be written. Under torchrun, ranks > 0 only check that rank 0 holds it for them.
    """
    from .runner.lock import RunLock, launch_group

    try:
        resolved = resolve_output_dir(argv)
    except Exception:  # a command line only Hydra itself understands: it reports the problem
        resolved = None
    if resolved is None:
        return None, argv, None, False
    directory, multirun, pin = resolved
    argv = argv + [pin] if pin is not None else argv
    lock = RunLock(directory)
    if int(os.environ.get("RANK", "0")) != 0:
        lock.wait_for_group(launch_group() or "")
        return None, argv, directory, multirun
    return lock.acquire(), argv, directory, multirun


def sweep_failures(sweep_dir: Path) -> list[str]:
    """'DIR: status' for each job of a sweep whose record is not ok (the jobs the launchers ran, else all found)."""
    from .training.results import find_run_dirs

    dirs = launched_dirs() or [d for d in find_run_dirs([sweep_dir]) if d != sweep_dir]
    bad = []
    for d in dirs:
        try:
            status = load_record(d)["status"]
        except ResultsError as e:
            status = "no record" if "file not found" in str(e) else "corrupt record"
        if status != "ok":
            bad.append(f"{d} ({status})")
    return bad


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra task function."""
    hc = HydraConfig.get()
    return _return_value(cfg, run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN))


def cli() -> None:
    """Console entry: one-line errors for bad overrides, the output directory locked, then the Hydra app.

    Exit codes: 0 ok; 2 bad config or unusable directory (nothing written); 1 a failed run, or a sweep
    with failed or interrupted jobs (after all jobs ran and the tables are written); 130 / 143 an
    interrupted run (SIGINT / SIGTERM), recorded as interrupted and resumable.
    """
    with exit_on_bad_input():
        error = precheck(sys.argv[1:])
        if error is not None:
            raise ConfigError(error)
        lock, argv, directory, multirun = lock_output_dir(sys.argv[1:])
    sys.argv[1:] = argv
    register_launchers()
    try:
        main()
        if multirun and directory is not None:
            failures = sweep_failures(directory)
            if failures:
                print(f"error: {len(failures)} job(s) of the sweep did not finish: {', '.join(failures)}",
                      file=sys.stderr)
                sys.exit(1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    cli()
