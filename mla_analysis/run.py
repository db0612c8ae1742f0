"""Hydra entry point: ``python -m mla_analysis.run +experiment=rank_sweep``.

Each job trains one model, evaluates it and writes ``results.json`` in its Hydra output directory.
A sweep (``-m``, or an experiment declaring ``hydra.mode: MULTIRUN``) ends with ``comparison.md``
and ``comparison.csv`` in the sweep directory (``mla_analysis.callbacks.ComparisonTables``).
Errors: a bad config ends with one line naming the key and exit code 2, and no results file; in a
sweep a failing job records ``status: failed`` with the reason and the other jobs go on.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import schema  # noqa: F401  (registers the structured configs)
from .config import ConfigError, ModelConfig
from .data import DataConfig
from .results import RESULTS_FILE, ResultsError, atomic_write_json, environment, is_finished, load_record, make_record
from .train import NonFiniteLoss, TrainConfig, TrainingInterrupted, train


def _objects(cfg: DictConfig) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    model = OmegaConf.to_object(cfg.model)
    data = OmegaConf.to_object(cfg.data)
    tcfg = OmegaConf.to_object(cfg.train)
    return model, data, tcfg


def _primary_metric(metrics: dict[str, Any]) -> Optional[float]:
    value = metrics.get("val_loss")
    return float(value) if value is not None else None


def format_summary(metrics: dict[str, Any]) -> str:
    """A short human-readable block of the headline metrics of one run."""
    keys = ["val_loss", "val_ppl", "val_loss_optimal", "params", "kv_bytes_per_token", "tokens_per_s"]
    keys += sorted(k for k in metrics if k.endswith(".exact_match"))
    lines = []
    for k in keys:
        if metrics.get(k) is None:
            continue
        v = metrics[k]
        lines.append(f"  {k:32s} {v:.4g}" if isinstance(v, float) else f"  {k:32s} {v}")
    return "\n".join(lines)


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> Optional[float]:
    """Validate, train, evaluate and record one job; returns the validation loss."""
    from .schema import validate_run

    results_path = run_dir / RESULTS_FILE
    if multirun and cfg.skip_finished and is_finished(run_dir):
        print(f"[skip] {run_dir} already has a complete {RESULTS_FILE}")
        return _primary_metric(load_record(run_dir)["metrics"])
    config = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.time()
    try:
        model_cfg, data_cfg, tcfg = _objects(cfg)
        validate_run(model_cfg, data_cfg, tcfg, cfg.device)
        out = train(model_cfg, data_cfg, tcfg, run_dir, seed=cfg.seed, device=cfg.device)
    except (ConfigError, ResultsError) as e:
        if multirun:
            atomic_write_json(results_path, make_record("failed", config, {}, error=f"{type(e).__name__}: {e}"))
            print(f"[failed] {run_dir}: {e}", file=sys.stderr)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingInterrupted, NonFiniteLoss) as e:
        status = "interrupted" if isinstance(e, TrainingInterrupted) else "failed"
        atomic_write_json(results_path, make_record(status, config, {}, error=str(e)))
        print(f"[{status}] {e}", file=sys.stderr)
        if multirun and status == "failed":
            return None
        sys.exit(130 if status == "interrupted" else 1)
    except Exception as e:  # a crash in one job of a sweep must not stop the others
        if not multirun:
            raise
        atomic_write_json(
            results_path,
            make_record("failed", config, {}, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()),
        )
        print(f"[failed] {run_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    record = make_record(
        "ok",
        config,
        out["metrics"],
        timings={**out["timings"], "wall_s": time.time() - t0},
        env=environment(out["device"], cfg.seed),
        history=out["history"],
    )
    atomic_write_json(results_path, record)
    print(f"\n{cfg.model.name} done -> {results_path}\n{format_summary(out['metrics'])}")
    return _primary_metric(out["metrics"])


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra task function."""
    hc = HydraConfig.get()
    return run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
