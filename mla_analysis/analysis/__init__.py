"""Reading run records back: comparison tables, figures, the claims audit and the rank-search objective.

``report`` builds comparison tables (markdown, CSV, LaTeX) from run or sweep directories (``python -m
mla_analysis.report``); ``figures`` draws them (``python -m mla_analysis.figures``); ``claims`` audits the
papers' claims against the closed forms and the committed studies (``+experiment=claims``); ``search`` is
the objective of the Optuna rank search. Records are read through ``mla_analysis.training.results``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .report import load_rows, aggregate, write_tables
    from .figures import make_figures, pareto_front, figure, save_figure
    from .claims import run_claims, audit, VERDICTS
    from .search import objective, resolve_reference

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "report": ("load_rows", "aggregate", "write_tables"),
    "figures": ("make_figures", "pareto_front", "figure", "save_figure"),
    "claims": ("run_claims", "audit", "VERDICTS"),
    "search": ("objective", "resolve_reference"),
})
