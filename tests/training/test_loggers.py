"""Experiment trackers (logger=tensorboard / mlflow): what the libraries' own readers get back from a run.

Runs are in-process (run_job on a composed config: torch, tensorboard and mlflow are imported once);
the sweep is a real Hydra multirun in a subprocess (its callback creates the MLflow store).
A blank MLflow store is created once per session and copied (its schema migrations take seconds).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mla_analysis.training.results import find_run_dirs, load_record

FAST = ["train.steps=4", "train.eval_every=2", "data.eval_examples=8", "train.progress=false", "train.batch_size=4",
        "device=cpu", "data.eval_tasks=[mqar]", "train.threads=1"]


def run_inprocess(overrides: list[str], run_dir: Path) -> None:
    """One job as the Hydra app runs it (run_job), on the composed config."""
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR, run_job

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=FAST + overrides)
    threads = torch.get_num_threads()
    try:
        run_job(cfg, run_dir, multirun=False)
    finally:  # train.threads=1 must not slow down the tests that follow in this process
        torch.set_num_threads(threads)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag, as TensorBoard's event reader returns it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def write_png(path: Path, width: int = 40, height: int = 30) -> None:
    """A stand-in for a probe's figure in the run directory."""
    import numpy as np
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, np.linspace(0, 1, width * height).reshape(height, width), cmap="viridis")


@pytest.fixture(scope="session")
def blank_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store to copy."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


def store_copy(blank_store: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(blank_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def test_tensorboard_events_hold_the_runs_losses_lr_and_figures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    write_png(run_dir / "probe_fig.png")
    run_inprocess(["logger=tensorboard", "logger.tensorboard.log_every=1", "train.warmup_steps=2", "train.lr=0.01"],
                  run_dir)
    rec = load_record(run_dir)
    assert rec["status"] == "ok" and "logging_errors" not in rec
    history = [(h["step"], h["val_loss"]) for h in rec["history"]]
    got = scalars(run_dir, "eval/val_loss")
    assert [s for s, _ in got] == [s for s, _ in history] == [2, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in history], rel=1e-6)  # events store float32
    assert [s for s, _ in scalars(run_dir, "train/loss")] == [1, 2, 3, 4]
    # warmup 2 steps to lr, then cosine to 0.1 lr over the remaining 2: steps 0..3 -> 0.005, 0.01, 0.01, 0.0055
    lr = [v for _, v in scalars(run_dir, "train/lr")]
    assert lr == pytest.approx([0.005, 0.01, 0.01, 0.001 + 0.009 * 0.5 * (1 + 0)], rel=1e-6)
    assert all(v > 0 for _, v in scalars(run_dir, "train/grad_norm") + scalars(run_dir, "train/tokens_per_s"))
    tasks = [k[: -len(".exact_match")] for k in rec["metrics"] if k.endswith(".exact_match")]
    assert tasks and all(scalars(run_dir, f"eval/{t}.exact_match") for t in tasks)
    final = scalars(run_dir, "summary/params")
    assert final == [(4, float(rec["metrics"]["params"]))]
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("figures/probe_fig")
    assert (image.width, image.height, image.step) == (40, 30, 4)


def test_sweep_is_one_mlflow_experiment_with_a_run_per_job(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "mla_analysis.run", "-m", "model=mha,mla_r8", "logger=mlflow",
                        f"hydra.sweep.dir={sweep}", "~hydra.callbacks.comparison", *FAST],  # tables: test_run.py
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    job_dirs = sorted(sweep.glob("[0-9]_*"))
    assert len(job_dirs) == 2
    assert find_run_dirs([sweep]) == job_dirs  # the store's results.json copies (mlartifacts/) are not runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{sweep / 'mlflow.db'}")
    experiments = [e.name for e in mlflow.search_experiments() if e.name != "Default"]
    assert experiments == [str(sweep)]  # an ad-hoc sweep: named by its directory
    runs = mlflow.search_runs(experiment_names=[str(sweep)], output_format="list")
    assert len(runs) == 2
    assert sorted(Path(run.data.tags["run_dir"]) for run in runs) == [d.resolve() for d in job_dirs]
    for run in runs:
        rec = load_record(run.data.tags["run_dir"])
        config = {k: str(v) for k, v in rec["flat"].items() if not k.startswith("metrics.") and k != "status"}
        assert run.data.params == config
        numbers = {k: float(v) for k, v in rec["metrics"].items()
                   if isinstance(v, (int, float))}  # bools count as 0 / 1
        assert {k: run.data.metrics[k] for k in numbers} == numbers
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == rec["env"]["git_commit"]
        model_override = next(o for o in Path(rec["run_dir"]).name.split(",") if o.startswith("model="))
        assert model_override in run.data.tags["overrides"].split()
        assert "logger=mlflow" in run.data.tags["overrides"].split()
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval/val_loss")
        assert [(m.step, m.value) for m in history] == [(h["step"], h["val_loss"]) for h in rec["history"]]
        artifacts = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="results.json",
                                                        dst_path=str(tmp_path / run.info.run_id))
        assert json.loads(Path(artifacts).read_text())["metrics"] == rec["metrics"]


def test_resumed_job_appends_to_its_runs_without_duplicate_steps(tmp_path, blank_store):
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    uri = store_copy(blank_store, tmp_path / "store")
    common = ["logger=[tensorboard,mlflow]", "logger.tensorboard.log_every=1", "logger.mlflow.log_every=1",
              f"logger.mlflow.tracking_uri='{uri}'", "train.checkpoint_every=2"]
    write_png(run_dir / "probe_fig.png")
    run_inprocess(common, run_dir)
    first = load_record(run_dir)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    # an attempt that died after step 4 with its last checkpoint at step 2: steps 3-4 are logged twice
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-0000004")
    (ckpts / "LATEST").write_text("step-0000002\n")
    (run_dir / "results.json").unlink()
    run_inprocess(common + ["train.resume=true"], run_dir)
    second = load_record(run_dir)
    assert second["status"] == "ok" and "logging_errors" not in second
    assert second["metrics"]["val_loss"] == first["metrics"]["val_loss"]  # a resumed run is the same run

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4]
    assert runs[0].data.params["train.resume"] == "False"  # params keep their first value
    assert sorted(a.path for a in client.list_artifacts(run_id, "figures")) == ["figures/probe_fig.png"]

    tb = scalars(run_dir, "train/loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4]  # the events of steps 3-4 from the first attempt are purged
    assert [s for s, _ in scalars(run_dir, "eval/val_loss")] == [h["step"] for h in second["history"]] == [2, 4]


def test_broken_tracking_uri_leaves_the_results_intact(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    run_dir = tmp_path / "run"
    run_inprocess(["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri='sqlite:///{blocker}/mlflow.db'"],
                  run_dir)
    rec = load_record(run_dir)
    assert rec["status"] == "ok" and [h["step"] for h in rec["history"]] == [2, 4]
    assert rec["metrics"]["val_loss"] > 0
    (error,) = rec["logging_errors"]
    assert error.startswith("mlflow: start: ")
    assert [s for s, _ in scalars(run_dir, "eval/val_loss")] == [2, 4]  # the other logger went on


def test_store_failing_mid_run_is_noted_and_the_run_finishes(tmp_path, blank_store, monkeypatch):
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    from mla_analysis.training.loggers import MLflowLogger

    flush = MLflowLogger.flush
    calls = []

    def flaky_flush(self):
        calls.append(1)
        if len(calls) == 2:  # the second eval: the disk is full
            raise OSError(28, "No space left on device")
        flush(self)

    monkeypatch.setattr(MLflowLogger, "flush", flaky_flush)
    uri = store_copy(blank_store, tmp_path / "store")
    run_dir = tmp_path / "run"
    run_inprocess(["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri='{uri}'"], run_dir)
    rec = load_record(run_dir)
    assert rec["status"] == "ok" and rec["metrics"]["val_loss"] > 0
    assert rec["logging_errors"] == ["mlflow: eval metrics: OSError: [Errno 28] No space left on device"]
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "eval/val_loss")] == [2]
    assert [s for s, _ in scalars(run_dir, "eval/val_loss")] == [2, 4]


def test_default_logger_none_writes_no_tracker_files(tmp_path):
    run_dir = tmp_path / "run"
    run_inprocess([], run_dir)
    assert load_record(run_dir)["status"] == "ok"
    assert not list(run_dir.glob("events.out.tfevents.*")) and not list(run_dir.glob("mlflow*"))


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_absent_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, name):
    from omegaconf import OmegaConf

    from mla_analysis.training.loggers import prepare_sweep

    monkeypatch.setitem(sys.modules, name, None)  # `import NAME` raises ImportError
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_inprocess([f"logger={name}"], run_dir)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'pip install "mla-analysis[{name}]"' in err and f"logger={name}" in err
    assert not (run_dir / "results.json").exists()
    # a sweep stops before its first job
    sweep_cfg = OmegaConf.create({"logger": {name: {}}, "experiment": "none",
                                  "hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as exit_:
        prepare_sweep(sweep_cfg)
    assert exit_.value.code == 2 and f"mla-analysis[{name}]" in capsys.readouterr().err
