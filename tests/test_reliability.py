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

from mla_analysis.report import load_rows, main as report_main
from mla_analysis.results import ResultsError, atomic_write_json, load_record, make_record

from .test_run import FAST, run


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
    assert run(args, cwd=tmp_path).returncode == 0
    first = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(first) == 2
    victim = next(iter(first))
    victim.unlink()  # as if that job had died
    p = run(args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("[skip]") == 1
    for path, mtime in first.items():
        assert path.exists()
        if path != victim:
            assert path.stat().st_mtime_ns == mtime  # untouched
    # resuming with train.resume=true keeps the job directories (the flag is not part of their names)
    dirs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    p = run(args + ["train.resume=true"], cwd=tmp_path)
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
    assert proc.returncode == 130, err[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"]
    step = int((out / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert step > 0
    p = run(args[:4] + [f"train.steps={step + 3}"] + args[5:] + ["train.resume=true"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["steps"] == step + 3
