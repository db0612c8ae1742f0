"""Hydra launcher plugins of mla-analysis (implementation: ``mla_analysis/runner/launcher.py``)."""
