"""Fixtures shared by the test modules: the tiny model config and a runner for the command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_cfg():
    """The tiny ModelConfig every fast test builds (``mla_analysis.config.tiny``); a fresh copy per test."""
    from mla_analysis.config import tiny

    return tiny()


@pytest.fixture
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    """``run_module("report", DIR)``: ``python -m mla_analysis.report DIR`` as a user calls it, this checkout first."""

    def run(module: str, *args: str, cwd: Optional[Path] = None, env: Optional[dict] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", f"mla_analysis.{module}", *args], cwd=cwd or ROOT,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    return run
