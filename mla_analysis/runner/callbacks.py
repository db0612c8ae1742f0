"""Hydra callbacks: before a sweep, prepare its tracking store; at its end, write the comparison tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ComparisonTables(Callback):
    """Writes comparison.md / .csv / .tex and figures/ in the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..analysis.report import write_tables
        from ..training.results import ResultsError

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        try:
            written = write_tables([sweep_dir], sweep_dir)
        except ResultsError as e:  # e.g. no readable record: the jobs' own records say why
            print(f"warning: no comparison tables: {e}")
            return
        print("\n" + written["md"].read_text())
        for path in written.values():
            print(f"wrote {path.resolve()}")
        try:  # a figure that cannot be drawn must not hide the tables
            from ..analysis.figures import make_figures

            for path in make_figures([sweep_dir], sweep_dir / "figures"):
                print(f"wrote {path.resolve()}")
        except Exception as e:
            print(f"warning: figures not drawn: {type(e).__name__}: {e}")
        print(f"sweep directory: {sweep_dir.resolve()}")


class TrackingStore(Callback):
    """Before a sweep's jobs start: checks the loggers' packages and creates the MLflow store once (loggers.py)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ..training.loggers import prepare_sweep

        prepare_sweep(config)
