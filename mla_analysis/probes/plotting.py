"""Matplotlib figures without pyplot's global state, written atomically: the probes' and ``analysis.figures``' style.

Here, below the analysis stage, so that the probes draw their figures without importing ``mla_analysis.analysis``.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..training.results import atomic_write_bytes


def figure(nrows: int, ncols: int, width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot global state) and its axes array [nrows, ncols]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix (png, pdf, ...); returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip("."), dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())
