"""The Hydra entry point end to end: results.json contract, sweeps and their tables, clear config errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.helpers import FAST, run_app


def test_single_run_writes_results_json(tmp_path):
    out = tmp_path / "run"
    p = run_app(FAST + [f"hydra.run.dir={out}", "model=mla_r8"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "ok"
    assert rec["config"]["model"]["kv_lora_rank"] == 8 and rec["config"]["model"]["attention"] == "mla"
    assert rec["flat"]["model.kv_lora_rank"] == 8  # config flattened to dotted keys
    m = rec["metrics"]
    for key in ("val_loss", "val_ppl", "params", "kv_bytes_per_token", "flops_per_token", "tokens_per_s", "steps"):
        assert key in m, key
    assert m["steps"] == 4 and m["kv_bytes_per_token"] == (8 + 8) * 2 * 2  # (d_c + d_rope) * layers * bf16
    assert any(k.endswith(".exact_match") for k in m)
    for key in ("torch", "device", "git_commit", "seed"):
        assert key in rec["env"], key
    assert "train_s" in rec["timings"] and rec["history"]
    assert str(out / "results.json") in p.stdout  # the output path is printed at the end

    # evaluate-only from the saved run: the model group (default mha) is replaced by the loaded model's config
    again = tmp_path / "again"
    p = run_app(FAST + [f"hydra.run.dir={again}", f"train.init_from={out}", "train.steps=0"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rec2 = json.loads((again / "results.json").read_text())
    assert rec2["config"]["model"]["attention"] == "mla" and rec2["flat"]["model.kv_lora_rank"] == 8
    assert rec2["metrics"]["steps"] == 0
    assert rec2["metrics"]["val_loss"] == pytest.approx(m["val_loss"], rel=1e-6)
    p = run_app(FAST + [f"hydra.run.dir={tmp_path / 'bad'}", "train.steps=0"], cwd=tmp_path)
    assert p.returncode == 2 and "train.steps=0" in p.stderr and not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.kv_lora_rank=0", "model.kv_lora_rank"),
        ("model.qk_rope_head_dim=7", "model.qk_rope_head_dim"),
        ("data.seq_len=512", "model.max_seq_len"),
        ("model.foo=1", "model.foo"),  # unknown key (structured-config schema)
        ("model.n_heads=abc", "model.n_heads"),  # wrong type
        ("model=nonexistent", "model/nonexistent"),  # unknown group option
        ("seed=0,x", "seed"),  # a bad value inside a sweep is caught before any job starts
        ("+probe.retrieval.lenghts=[64]", "probe.retrieval.lenghts"),  # a probe's unknown key, before training
        ("probe=experts", "probe.experts"),  # a probe that cannot apply to the model (dense), before training
    ],
)
def test_bad_config_fails_with_one_line_and_no_results(tmp_path, override, key):
    out = tmp_path / "run"
    model = "model=gqa" if "n_kv_heads" in override else "model=mla"
    args = FAST + [f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"] + ([] if override.startswith("model=") else [model])
    p = run_app(args + [override] + (["-m"] if "," in override else []), cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and "allowed" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (out / "results.json").exists()
    assert not (out / "checkpoints").exists()  # rejected before any training


@pytest.mark.slow
def test_sweep_writes_comparison_tables_and_report_rebuilds_them(tmp_path):
    sweep = tmp_path / "sweep"
    p = run_app(["-m", "model=mha,mla_r4", f"hydra.sweep.dir={sweep}", *FAST], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    md, csv_path = sweep / "comparison.md", sweep / "comparison.csv"
    assert md.exists() and csv_path.exists()
    assert str(md.resolve()) in p.stdout and str(csv_path.resolve()) in p.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert sorted(r["model.name"] for r in rows) == ["mha", "mla"]
    by = {r["model.name"]: r for r in rows}
    assert float(by["mha"]["kv_ratio_to_mha"]) == 1.0
    assert float(by["mla"]["kv_ratio_to_mha"]) == pytest.approx((4 + 8) / (2 * 64))
    assert by["mla"]["model.kv_lora_rank"] == "4" and by["mha"]["model.kv_lora_rank"] == ""
    figures = sweep / "figures"  # drawn at the end of the sweep too (4 steps learn no task: no rank curve)
    assert (figures / "pareto.png").exists() and (figures / "pareto.pdf").exists()
    before = csv_path.read_text()
    csv_path.unlink()
    r = subprocess.run([sys.executable, "-m", "mla_analysis.report", str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert csv_path.read_text() == before


@pytest.mark.slow
def test_sweep_records_failed_job_and_continues(tmp_path):
    sweep = tmp_path / "sweep"
    missing = "no_such_run"  # a valid config that fails when the job loads it: recorded, the other job goes on
    p = run_app(["-m", f"train.init_from=null,{missing}", f"hydra.sweep.dir={sweep}", *FAST], cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]  # after all jobs ran and the tables were written
    assert "1 job(s) of the sweep did not finish" in p.stderr.strip().splitlines()[-1]
    recs = [json.loads(f.read_text()) for f in sweep.glob("*/results.json")]
    assert sorted(r["status"] for r in recs) == ["failed", "ok"]
    failed = next(r for r in recs if r["status"] == "failed")
    assert missing in failed["error"]
    table = (sweep / "comparison.md").read_text()
    assert "failed" in table and missing in table
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    dirs = sorted(d for r in rows for d in r["run_dirs"].split("; "))
    assert dirs == sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "figures")


@pytest.mark.parametrize("override,key", [("data=hf", "data.hf.path"), ("data.paths=[/nonexistent/x.py]", "data.paths")])
def test_bad_data_source_fails_with_one_line_before_writing(tmp_path, override, key):
    out = tmp_path / "run"
    extra = ["data=text"] if override.startswith("data.paths") else []
    p = run_app(FAST + [f"hydra.run.dir={out}", *extra, override], cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert not (out / "results.json").exists() and not (out / "model_config.json").exists()
