"""Sweep launching: every job's config validated before the first job starts, and per-job worker isolation.

``register_launchers()`` (called by ``mla_analysis.run.cli``) points ``hydra/launcher=basic`` (the default
of ``-m``) and ``hydra/launcher=joblib`` (the studies' launcher) at the plugins in
``hydra_plugins/mla_analysis_launchers``, which call into this module:
- ``prepare_jobs``: compose and validate each job of a batch (``job_config.check_config``); the first invalid one
  ends the sweep with one line naming the job and the key, exit code 2, before any job runs. The basic
  sweeper hands over all jobs at once; Optuna hands over each batch of trials.
- ``launch_isolated``: like Hydra's joblib launcher (loky processes, ``n_jobs`` at a time), but each job
  gets its own worker process. A worker that dies (SIGKILL, OOM, a signal before the trainer's handler)
  then fails only its job, which is recorded ``failed`` with the reason; the other jobs run to the end.
  A SIGINT/SIGTERM to the sweep process is passed on to the running jobs' workers (they checkpoint and
  record ``interrupted``), no further job starts, and the sweep exits 128 + signal.
Of the joblib options only ``n_jobs`` applies (loky is the backend, as in Hydra's launcher).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, open_dict, read_write

from ..config import ConfigError
from ..training.trainer import StopFlag

_PLUGIN_DIR = Path(__file__).resolve().parents[2] / "hydra_plugins"
_LAUNCHED: list[Path] = []  # job directories launched by this process (read by run.cli for the exit code)


def _extend_plugin_path() -> None:
    """In a source checkout the plugin package sits next to ``mla_analysis/``: make Hydra's scan find it."""
    import hydra_plugins

    if (_PLUGIN_DIR / "mla_analysis_launchers").is_dir() and str(_PLUGIN_DIR) not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(str(_PLUGIN_DIR))


_extend_plugin_path()  # before Hydra's first plugin scan (run.py imports this module)


def register_launchers() -> None:
    """Point hydra/launcher=basic and =joblib at this package's launchers (after Hydra's plugin scan)."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

    @dataclass
    class IsolatedJoblibConf(JobLibLauncherConf):
        _target_: str = "hydra_plugins.mla_analysis_launchers.launchers.IsolatedJoblibLauncher"

    Plugins.instance()  # the scan stores the original configs; ours replace them afterwards
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="basic", provider="mla_analysis",
             node={"_target_": "hydra_plugins.mla_analysis_launchers.launchers.ValidatingBasicLauncher"})
    cs.store(group="hydra/launcher", name="joblib", node=IsolatedJoblibConf, provider="mla_analysis")


def launched_dirs() -> list[Path]:
    """Job directories the launchers of this process ran (empty when another launcher ran the sweep)."""
    return list(_LAUNCHED)


def _job_config(launcher: Any, overrides: Sequence[str], idx: int) -> DictConfig:
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx
        sweep_config.hydra.job.num = idx
    return sweep_config


def prepare_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[tuple]:
    """(idx, overrides, task config, job dir) per job, each validated; an invalid job: one line, exit 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import filter_overrides

    from .job_config import check_config

    jobs = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = _job_config(launcher, overrides, idx)
        HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} resolves as in the job
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        task_cfg = copy.deepcopy(sweep_config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        try:
            check_config(task_cfg)
        except ConfigError as e:
            print(f"error: job #{idx} ({' '.join(filter_overrides(overrides))}): {e}", file=sys.stderr)
            sys.exit(2)
        jobs.append((idx, list(overrides), task_cfg, job_dir))
    _LAUNCHED.extend(job[3] for job in jobs)
    return jobs


def _n_workers(n_jobs: Any, n: int) -> int:
    """joblib's n_jobs: a count, or negative for 'all CPUs but |n_jobs| - 1'."""
    cpus = os.cpu_count() or 1
    k = int(n_jobs) if n_jobs is not None else -1
    k = k if k > 0 else cpus + 1 + k
    return max(1, min(k, n))


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _worker_env(n_workers: int) -> dict[str, str]:
    """Thread limits for the workers, as joblib's loky backend sets them (CPUs / workers, unless set already)."""
    threads = max((os.cpu_count() or 1) // n_workers, 1)
    return {var: os.environ.get(var, str(threads)) for var in THREAD_VARS}


def _record_dead_job(task_cfg: DictConfig, job_dir: Path, reason: str) -> None:
    """A job whose worker died: keep its own record if it wrote one (interrupted), else record it failed."""
    from ..training.results import RESULTS_FILE, ResultsError, atomic_write_json, load_record, make_record
    from .job_config import record_config

    from .lock import RunLock

    RunLock(job_dir).clear_stale()  # the dead worker's
    try:
        load_record(job_dir)
        return
    except ResultsError:
        pass
    atomic_write_json(job_dir / RESULTS_FILE, make_record("failed", record_config(task_cfg), {}, error=reason))
    print(f"[failed] {job_dir}: {reason}", file=sys.stderr)


def _death_reason(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"the job exited with code {e.code}"
    text = " ".join(str(e).split())
    marker = "The exit codes of the workers are"
    if marker in text:
        codes = text[text.index(marker) + len(marker):].split("}")[0].strip(" {")
        return f"its worker process died (exit code {codes}); rerun the sweep to run it again"
    return f"its worker process failed ({type(e).__name__}: {text[:200]})"


def launch_isolated(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """Run the jobs, ``n_jobs`` at a time, each in a worker process of its own (see the module docstring)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import execute_job
    from joblib.externals.loky import ProcessPoolExecutor

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = prepare_jobs(launcher, job_overrides, initial_job_idx)
    state = Singleton.get_state()
    n_workers = _n_workers(launcher.joblib.get("n_jobs"), len(jobs))
    env = _worker_env(n_workers)

    stop = StopFlag()  # a signal to the sweep: no new job starts, the running ones are told, then exit 128 + signal

    def one(job: tuple) -> Any:
        idx, overrides, task_cfg, job_dir = job
        if stop.signum is not None:  # not started: a rerun of the sweep runs it
            return JobReturn(overrides=overrides, working_dir=str(job_dir), status=JobStatus.COMPLETED)
        with ProcessPoolExecutor(max_workers=1, env=env) as pool:
            future = pool.submit(execute_job, idx, overrides, launcher.hydra_context, launcher.config,
                                 launcher.task_function, state)
            try:
                return future.result()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # the worker died, or the job exited (an interrupted job: its record stays)
                _record_dead_job(task_cfg, job_dir, _death_reason(e))
        # completed with no value, so the sweeper goes on to the other jobs (the record says what happened)
        return JobReturn(overrides=overrides, working_dir=str(job_dir), status=JobStatus.COMPLETED)

    with stop, ThreadPoolExecutor(max_workers=n_workers) as threads:
        futures = [threads.submit(one, job) for job in jobs]
        told = False
        while not all(f.done() for f in futures):
            wait(futures, timeout=0.5)
            if stop.signum is not None and not told:
                _forward(stop.signum, [job[3] for job in jobs])
                told = True
        runs = [f.result() for f in futures]
    if stop.signum is not None:
        print(f"[interrupted] signal {signal.Signals(stop.signum).name}: the sweep stopped; rerun it with "
              "train.resume=true to continue", file=sys.stderr)
        sys.exit(128 + stop.signum)
    return runs


def _forward(signum: int, job_dirs: list[Path]) -> None:
    """Pass a signal the sweep received to the workers running its jobs (named by their job-dir locks)."""
    import json
    import socket

    from .lock import LOCK_FILE

    for d in job_dirs:
        try:
            holder = json.loads((d / LOCK_FILE).read_text())
        except (OSError, ValueError):
            continue  # not running (finished, or not started)
        pid = holder.get("pid") if isinstance(holder, dict) else None
        if isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.kill(pid, signum)
            except OSError:
                pass
