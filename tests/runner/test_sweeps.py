"""Sweeps beyond one process: Optuna rank search (objective and constraint), the submitit launcher."""

from __future__ import annotations

import json

import pytest
import yaml

from mla_analysis.config import ConfigError
from mla_analysis.analysis.search import PENALTY, SearchConfig, objective, resolve_reference

from tests.helpers import FAST, run_app



def test_objective_is_cost_when_within_tolerance_and_penalised_otherwise():
    s = SearchConfig(metric="acc", mode="max", tolerance=0.05, cost="model.kv_lora_rank")
    flat = {"model.kv_lora_rank": 8}
    ok = objective(s, 0.9, flat, {"acc": 0.86})
    assert ok["search.feasible"] and ok["search.objective"] == 8.0 and ok["search.shortfall"] == 0
    bad = objective(s, 0.9, flat, {"acc": 0.80})
    assert not bad["search.feasible"] and bad["search.shortfall"] == pytest.approx(0.05)
    assert bad["search.objective"] == pytest.approx(PENALTY + 0.05)
    worse = objective(s, 0.9, flat, {"acc": 0.5})
    assert worse["search.objective"] > bad["search.objective"] > 64  # any feasible rank beats any infeasible run
    loss = SearchConfig(metric="val_loss", mode="min", tolerance=0.1, relative=True)
    assert objective(loss, 2.0, flat, {"val_loss": 2.19})["search.feasible"]
    assert not objective(loss, 2.0, flat, {"val_loss": 2.21})["search.feasible"]
    with pytest.raises(ConfigError, match="search.metric='acc'"):
        objective(s, 0.9, flat, {"val_loss": 1.0})


def test_reference_from_number_or_run_dir(tmp_path):
    assert resolve_reference(SearchConfig(reference="0.5")) == 0.5
    run_dir = tmp_path / "ref"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "metrics": {"val_loss": 1.25}, "config": {}, "flat": {}}))
    assert resolve_reference(SearchConfig(reference=str(run_dir))) == 1.25
    with pytest.raises(ConfigError, match="search.reference"):
        resolve_reference(SearchConfig(reference=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="search.reference is unset"):
        resolve_reference(SearchConfig())


@pytest.mark.slow
def test_rank_search_optuna_picks_smallest_feasible_rank(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the [dev] extra installs it
    sweep = tmp_path / "search"
    p = run_app(["+experiment=rank_search", "search.reference=0.0", "hydra.sweeper.n_trials=2",
             f"hydra.sweep.dir={sweep}", *FAST], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(f.read_text()) for f in sweep.glob("*/results.json")]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["metrics"]["search.feasible"] for r in recs)
    for r in recs:  # every trial is within tolerance of 0: its objective is its rank
        assert r["metrics"]["search.objective"] == r["flat"]["model.kv_lora_rank"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    smallest = min(r["flat"]["model.kv_lora_rank"] for r in recs)
    assert best["best_value"] == smallest and best["best_params"]["model.kv_lora_rank"] == smallest
    p = run_app(["+experiment=rank_search", f"hydra.sweep.dir={tmp_path / 'x'}", *FAST], cwd=tmp_path)
    assert p.returncode != 0 and "search.reference" in p.stderr


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sub"
    p = run_app(["-m", "model=mha,mqa", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
             f"hydra.sweep.dir={sweep}", *FAST], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = sorted((json.loads(f.read_text()) for f in sweep.glob("*/results.json")), key=lambda r: r["flat"]["model.name"])
    assert [(r["flat"]["model.name"], r["status"]) for r in recs] == [("mha", "ok"), ("mqa", "ok")]
    assert (sweep / "comparison.md").exists()
