"""Nothing lost, nothing half-written: atomic writes, corrupt files named, sweeps resumable, SIGTERM handled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mla_analysis.analysis.report import load_rows, main as report_main
from mla_analysis.training.results import ResultsError, atomic_write_json, load_record, make_record

from tests.helpers import FAST, run_app


def test_atomic_write_leaves_old_file_intact_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"status": "ok", "flat": {}})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"status": "ok", "bad": object()})  # serialisation fails mid-way
    assert json.loads(path.read_text()) == {"status": "ok", "flat": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_nan_metrics_become_null_not_invalid_json(tmp_path):
    atomic_write_json(tmp_path / "r.json", make_record("ok", {"seed": 0}, {"val_loss": float("nan")}))
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["metrics"]["val_loss"] is None


def test_corrupt_results_json_named_in_error_and_in_table(tmp_path, capsys):
    good, bad = tmp_path / "a", tmp_path / "b"
    atomic_write_json(good / "results.json", make_record("ok", {"model": {"name": "mha"}, "seed": 0}, {"val_loss": 1.0}))
    bad.mkdir()
    (bad / "results.json").write_text('{"status": "ok", "fla')  # truncated
    with pytest.raises(ResultsError, match=str(bad / "results.json")):
        load_record(bad)
    rows = {Path(r["run_dir"]).name: r for r in load_rows([tmp_path])}
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"].startswith("corrupt") and "results.json" in rows["b"]["status"]
    assert report_main([str(tmp_path)]) == 0
    assert "corrupt" in (tmp_path / "comparison.md").read_text()


def test_report_missing_dir_is_one_line_error(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


@pytest.mark.slow
def test_rerun_of_sweep_skips_finished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=mha,mqa", f"hydra.sweep.dir={sweep}", *FAST]
    assert run_app(args, cwd=tmp_path).returncode == 0
    first = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(first) == 2
    victim = next(iter(first))
    victim.unlink()  # as if that job had died after its last checkpoint
    p = run_app(args, cwd=tmp_path)  # a fresh start over that job's checkpoints is refused (one lineage per directory)
    assert p.returncode == 1 and "train.resume=true" in p.stderr, p.stderr[-2000:]
    assert p.stdout.count("[skip]") == 1
    victim.unlink()
    p = run_app(args + ["train.resume=true"], cwd=tmp_path)  # continues it from its checkpoint
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("[skip]") == 1
    for path, mtime in first.items():
        assert path.exists()
        if path != victim:
            assert path.stat().st_mtime_ns == mtime  # untouched
    # resuming with train.resume=true keeps the job directories (the flag is not part of their names)
    dirs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    p = run_app(args + ["train.resume=true"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("[skip]") == 2
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == dirs


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [f"hydra.run.dir={out}", "device=cpu", "train.progress=false", "train.steps=100000", "train.eval_every=0",
            "train.batch_size=4", "data.eval_examples=8"]
    proc = subprocess.Popen([sys.executable, "-m", "mla_analysis.run", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "model_config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"]
    step = int((out / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert step > 0
    p = run_app(args[:4] + [f"train.steps={step + 3}"] + args[5:] + ["train.resume=true"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["steps"] == step + 3


# --- issue 17: faults users hit -------------------------------------------------------------------------------

def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(directory: Path, **holder) -> Path:
    import socket

    from mla_analysis.runner.lock import LOCK_FILE

    directory.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "group": None, "since": "earlier"}
    (directory / LOCK_FILE).write_text(json.dumps({**base, **holder}))
    return directory / LOCK_FILE


def test_lock_names_holder_and_takes_over_only_stale_locks(tmp_path, capsys):
    from mla_analysis.config import ConfigError
    from mla_analysis.runner.lock import RunLock, process_start

    d = tmp_path / "run"
    path = _write_lock(d, start=process_start(os.getpid()))  # a live holder on this host: this process
    with pytest.raises(ConfigError, match=f"{d}: in use by another run \\(pid {os.getpid()} on "):
        RunLock(d).acquire()
    _write_lock(d, host="elsewhere", pid=_dead_pid())  # another host: its pid means nothing here, never broken
    with pytest.raises(ConfigError, match=f"on elsewhere.*delete {path}"):
        RunLock(d).acquire()
    for stale in ({"pid": _dead_pid()}, {"start": "1"}):  # dead process; pid reused by a later process (this one)
        _write_lock(d, **stale)
        lock = RunLock(d).acquire()
        assert json.loads(path.read_text())["pid"] == os.getpid() and "stale lock" in capsys.readouterr().err
        lock.release()
        assert not path.exists()


def test_lock_ranks_above_zero_join_their_own_launch_only(tmp_path):
    from mla_analysis.config import ConfigError
    from mla_analysis.runner.lock import RunLock

    d = tmp_path / "run"
    _write_lock(d, group="run1@host:29500")
    RunLock(d).wait_for_group("run1@host:29500", timeout=1)  # rank 0 of this launch holds it: go on
    with pytest.raises(ConfigError, match="in use by another run"):
        RunLock(d).wait_for_group("run2@host:29501", timeout=1)


def test_second_run_into_a_locked_dir_exits_2_and_touches_nothing(tmp_path):
    from mla_analysis.runner.lock import process_start

    out = tmp_path / "run"
    lock = _write_lock(out, start=process_start(os.getpid()))  # as if a first run were training in it
    before = lock.read_text()
    p = run_app(FAST + [f"hydra.run.dir={out}"], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert str(out) in line and f"pid {os.getpid()}" in line
    assert sorted(x.name for x in out.iterdir()) == [lock.name] and lock.read_text() == before  # no .hydra, no log


def test_run_dir_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "taken").write_text("x")
    p = run_app(FAST + [f"hydra.run.dir={tmp_path / 'taken'}"], cwd=tmp_path)
    assert p.returncode == 2 and "taken: is an existing file" in _one_line(p.stderr)
    p = run_app(FAST + [f"hydra.run.dir={tmp_path / 'taken' / 'sub'}"], cwd=tmp_path)
    assert p.returncode == 2 and "sub: cannot be created" in _one_line(p.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_run_dir_not_writable_exits_2(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    p = run_app(FAST + [f"hydra.run.dir={ro}"], cwd=tmp_path)
    assert p.returncode == 2 and "not writable" in _one_line(p.stderr)


def test_checkpoint_write_failure_still_writes_results(tmp_path, capsys):
    from mla_analysis.run import run_job

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("")  # a file where the folder goes: the final save fails
    with pytest.raises(SystemExit) as info:
        run_job(_compose(FAST), out, multirun=False)
    assert info.value.code == 1
    rec = load_record(out)
    assert rec["status"] == "failed" and "checkpoint of step 4 not saved" in rec["error"]
    assert rec["metrics"]["val_loss"] is not None and rec["metrics"]["steps"] == 4  # the training is not lost


def test_signal_during_final_eval_records_interrupted_and_resume_finishes(tmp_path, monkeypatch):
    import mla_analysis.training.trainer as tr
    from mla_analysis.run import run_job

    real = tr.evaluate

    def evaluate_then_sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    out = tmp_path / "run"
    args = FAST + ["train.eval_every=0", "train.checkpoint_every=0"]
    monkeypatch.setattr(tr, "evaluate", evaluate_then_sigterm)
    with pytest.raises(SystemExit) as info:
        run_job(_compose(args), out, multirun=False)
    assert info.value.code == 143
    rec = load_record(out)
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"] and "train.resume=true" in rec["error"]
    monkeypatch.setattr(tr, "evaluate", real)
    run_job(_compose(args + ["train.resume=true"]), out, multirun=False)
    rec = load_record(out)
    assert rec["status"] == "ok" and rec["metrics"]["steps"] == 4 and rec["metrics"]["train_loss"] is not None
    # resuming a finished run leaves its record as it is
    mtime, text = (out / "results.json").stat().st_mtime_ns, (out / "results.json").read_text()
    run_job(_compose(args + ["train.resume=true"]), out, multirun=False)
    assert (out / "results.json").stat().st_mtime_ns == mtime and (out / "results.json").read_text() == text


@pytest.mark.parametrize("key,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("beta1", 1.0), ("beta2", -0.1), ("threads", -1), ("threads", 0),
    ("weight_decay", -1.0), ("grad_clip", float("nan")), ("keep_checkpoints", 0), ("solve_threshold", 1.5),
    ("warmup_steps", -1), ("min_lr_ratio", float("nan")), ("tokens", 0),
])
def test_every_numeric_train_option_is_validated(key, value):
    import dataclasses

    from mla_analysis.config import ConfigError
    from mla_analysis.runner.schema import validate_train
    from mla_analysis.training.trainer import TrainConfig

    with pytest.raises(ConfigError, match=f"^train.{key}=") as info:
        validate_train(dataclasses.replace(TrainConfig(), **{key: value}))
    assert "allowed" in str(info.value)
    validate_train(TrainConfig())


def test_nonfinite_model_and_data_values_are_rejected():
    from mla_analysis.config import ConfigError, tiny
    from mla_analysis.data import DataConfig
    from mla_analysis.runner.schema import validate_run
    from mla_analysis.training.trainer import TrainConfig

    data = DataConfig(vocab_size=128, seq_len=32)
    validate_run(tiny(), data, TrainConfig(), "cpu")
    with pytest.raises(ConfigError, match=r"^model.rope_theta=nan is invalid \(allowed: a finite number\)"):
        validate_run(tiny(rope_theta=float("nan")), data, TrainConfig(), "cpu")
    with pytest.raises(ConfigError, match=r"^data.lm_weight=inf"):
        validate_run(tiny(), DataConfig(vocab_size=128, seq_len=32, lm_weight=float("inf")), TrainConfig(), "cpu")


def test_bad_train_option_is_one_line_before_compute(tmp_path):
    out = tmp_path / "run"
    p = run_app(FAST + [f"hydra.run.dir={out}", "train.lr=nan"], cwd=tmp_path)
    assert p.returncode == 2 and _one_line(p.stderr).startswith("error: train.lr=nan is invalid")
    assert not (out / "model_config.json").exists() and not (out / "results.json").exists()


def test_sweep_validates_every_job_before_the_first_starts(tmp_path):
    sweep = tmp_path / "sweep"
    p = run_app(["-m", "model=mla", "model.kv_lora_rank=8,0", f"hydra.sweep.dir={sweep}", *FAST], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert "model.kv_lora_rank=0" in line and "allowed" in line
    assert not [d for d in sweep.iterdir() if d.is_dir()]  # no job ran, not even the valid one


def _start_joblib_sweep(tmp_path) -> tuple[Path, subprocess.Popen]:
    """A 2-worker joblib sweep of three jobs: two that run until stopped (steps 100000, 100001), then one of 4 steps."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.steps=100000,100001,4",
            f"hydra.sweep.dir={sweep}", *[a for a in FAST if not a.startswith("train.steps")]]
    proc = subprocess.Popen([sys.executable, "-m", "mla_analysis.run", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return sweep, proc


@pytest.mark.slow
def test_dying_joblib_worker_fails_only_its_job(tmp_path):
    sweep, proc = _start_joblib_sweep(tmp_path)
    from mla_analysis.runner.lock import LOCK_FILE

    pids, deadline = {}, time.time() + 180
    while len(pids) < 2 and time.time() < deadline:  # each running job's lock names its worker process
        for steps in ("100000", "100001"):
            d = next(sweep.glob(f"*train.steps={steps}"), None)
            if d is not None and (d / "model_config.json").exists() and (d / LOCK_FILE).exists():
                pids[steps] = json.loads((d / LOCK_FILE).read_text())["pid"]
        time.sleep(0.2)
    assert len(pids) == 2 and os.getpid() not in pids.values()
    os.kill(pids["100000"], signal.SIGTERM)  # handled: checkpoint, recorded interrupted (resumable)
    os.kill(pids["100001"], signal.SIGKILL)  # the worker dies: its job recorded failed by the launcher
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err[-3000:]
    recs = {r["flat"]["train.steps"]: r for r in map(load_record, (p.parent for p in sweep.glob("*/results.json")))}
    assert recs[100000]["status"] == "interrupted" and "SIGTERM" in recs[100000]["error"]
    assert recs[100001]["status"] == "failed" and "SIGKILL" in recs[100001]["error"]
    assert recs[4]["status"] == "ok"  # started after the deaths, finished
    assert "interrupted" in (sweep / "comparison.md").read_text() and "SIGKILL" in (sweep / "comparison.md").read_text()
    assert "2 job(s) of the sweep did not finish" in err
    assert not list(sweep.glob(f"*/{LOCK_FILE}")) and not (sweep / LOCK_FILE).exists()


def test_failed_row_shows_its_values_and_rows_name_their_run_dirs(tmp_path):
    from mla_analysis.analysis.report import write_tables

    config = {"model": {"name": "mla"}, "train": {"lr": float("inf")}, "seed": 0}
    atomic_write_json(tmp_path / "a" / "results.json", make_record("failed", config, {}, error="ConfigError: lr"))
    atomic_write_json(tmp_path / "b" / "results.json",
                      make_record("ok", {**config, "train": {"lr": 0.1}}, {"val_loss": 1.0}))
    written = write_tables([tmp_path], tmp_path)
    import csv

    rows = {r["train.lr"]: r for r in csv.DictReader(written["csv"].open())}
    assert set(rows) == {"inf", "0.1"} and rows["inf"]["run_dirs"] == "a" and rows["0.1"]["run_dirs"] == "b"
    md = written["md"].read_text()
    assert "| inf |" in md and "run dirs" in md


def test_corrupt_records_are_one_line_and_all_corrupt_fails(tmp_path, capsys):
    from mla_analysis.training.results import is_finished

    for name, rec in (("a", {"status": "ok", "flat": [1]}), ("b", {"status": "ok", "flat": {}}),
                      ("c", {"status": 3, "flat": {}})):
        atomic_write_json(tmp_path / name / "results.json", rec)
        with pytest.raises(ResultsError, match=str(tmp_path / name / "results.json")):
            load_record(tmp_path / name)
        assert not is_finished(tmp_path / name)  # a sweep rerun reruns it instead of reading its metrics
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "all 3 are corrupt" in err
    assert not (tmp_path / "comparison.md").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_json(tmp_path / "r.json", {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_latent_larger_than_k_and_v_warns_in_one_line():
    from mla_analysis.config import tiny
    from mla_analysis.runner.schema import kv_cache_warning

    assert kv_cache_warning(tiny(attention="mla", kv_lora_rank=8)) is None
    assert kv_cache_warning(tiny(attention="mha")) is None
    big = tiny(attention="mla", kv_lora_rank=1000)
    full = big.n_heads * (big.qk_head_dim + big.v_head_dim)  # K and V elements per token and layer
    msg = kv_cache_warning(big)
    assert msg.startswith("warning: model.kv_lora_rank=1000") and f"the {full} of caching K and V" in msg
    assert "\n" not in msg


def test_text_source_rejects_utf16_and_binary_files(tmp_path):
    from mla_analysis.data.text import read_files

    utf16, binary, good = tmp_path / "u16.txt", tmp_path / "blob.bin", tmp_path / "ok.txt"
    utf16.write_bytes("to be or not to be\n".encode("utf-16"))
    binary.write_bytes(bytes(range(256)))
    good.write_bytes("café, naïve — ok\n".encode("utf-8"))
    assert read_files([str(good)], 4) == [good.read_bytes()[:4]]  # "caf" + half of "é": cut at max_bytes, fine
    for path, what in ((utf16, "UTF-16"), (binary, "binary")):
        with pytest.raises(ValueError, match=f"data.paths: {path} is {what}"):
            read_files([str(good), str(path)], 10_000)
    out = tmp_path / "run"
    p = run_app(FAST + [f"hydra.run.dir={out}", "data=text", f"data.paths=[{utf16}]"], cwd=tmp_path)
    assert p.returncode == 2 and "UTF-16" in _one_line(p.stderr) and not (out / "model_config.json").exists()


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_interrupts_its_jobs_and_starts_no_more(tmp_path):
    sweep, proc = _start_joblib_sweep(tmp_path)
    deadline = time.time() + 180
    while len(list(sweep.glob("*/model_config.json"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)  # to the sweep process only: it passes the signal on to its workers
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    recs = [load_record(p.parent) for p in sweep.glob("*/results.json")]
    assert [r["status"] for r in recs] == ["interrupted", "interrupted"] and all("SIGTERM" in r["error"] for r in recs)
    assert not list(sweep.glob("*train.steps=4"))  # never started: a rerun runs it
    assert not list(sweep.rglob(".mla_analysis.lock"))
