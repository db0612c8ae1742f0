"""Architecture configs of published models (``ModelConfig`` dicts), for KV-memory and FLOPs extrapolation.

Sources for every figure are in ``SOURCES.md`` next to the JSON files (``ModelConfig.from_dict``
rejects unknown keys, so the files cannot carry them).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig

PUBLISHED_DIR = Path(__file__).resolve().parent


def published_names() -> list[str]:
    """Names (file stems) of the shipped configs, sorted."""
    return sorted(p.stem for p in PUBLISHED_DIR.glob("*.json"))


def load_published(name: str) -> ModelConfig:
    """The ModelConfig of one shipped model (``name`` = file stem, e.g. ``deepseek_v2``)."""
    path = PUBLISHED_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"published config {name!r} not found (allowed: {', '.join(published_names())})")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_all() -> dict[str, ModelConfig]:
    """Every shipped config by name."""
    return {name: load_published(name) for name in published_names()}


__all__ = ["PUBLISHED_DIR", "load_all", "load_published", "published_names"]
