"""The ``search`` group (+experiment=rank_search): the objective a sweeper minimises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .checks import Choice


class Mode(Choice):
    min = "min"  # lower metric is better (a loss)
    max = "max"  # higher is better (an accuracy)


MODES = Mode.values()


@dataclass
class SearchConfig:
    """What a sweeper minimises: ``cost`` subject to ``metric`` within ``tolerance`` of ``reference``."""

    metric: str = "val_loss"
    mode: Mode = Mode.min  # min: lower metric is better (a loss); max: higher is better (an accuracy)
    reference: Optional[str] = None  # a number, or a run directory whose results.json holds ``metric``
    tolerance: float = 0.01
    relative: bool = False  # tolerance as a fraction of |reference|
    cost: str = "model.kv_lora_rank"  # dotted config key minimised among feasible runs
