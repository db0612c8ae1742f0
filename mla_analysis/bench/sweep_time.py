"""Figure 5: the wall time of a finished sweep, read from its results.json records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..training.results import ResultsError, read_json

# ---------------------------------------------------------------------- figure 5: sweep wall time
def sweep_wall_time(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Wall time of a finished sweep from its results.json files.

    ``sum_wall_s``: sum of the runs' ``timings.wall_s`` (sequential cost); ``span_s``: from the earliest
    run start (file time - wall_s) to the latest results.json (elapsed time with parallel jobs).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ResultsError(f"{root}: no such directory")
    walls, starts, ends, statuses, unreadable = [], [], [], {}, 0
    for path in sorted(root.rglob("results.json")):
        try:
            rec = read_json(path)
            wall = float(rec["timings"]["wall_s"])
            status = str(rec.get("status", "unknown"))
        except (ResultsError, KeyError, TypeError, ValueError):
            unreadable += 1
            continue
        statuses[status] = statuses.get(status, 0) + 1
        walls.append(wall)
        end = path.stat().st_mtime
        ends.append(end)
        starts.append(end - wall)
    if not walls:
        raise ResultsError(f"{root}: no results.json with timings.wall_s")
    return {
        "dir": str(root), "runs": len(walls), "statuses": statuses, "unreadable": unreadable,
        "sum_wall_s": sum(walls), "max_wall_s": max(walls), "span_s": max(ends) - min(starts),
    }
