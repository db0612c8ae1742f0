# Two commands for a fresh machine: `make run` (main job) and `make test` (test suite).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install install-dev run test bench

# The pinned CPU build of torch goes in first, unless some torch (e.g. a user's CUDA build) already
# imports: otherwise pip would resolve the bare requirement to a multi-GB CUDA wheel.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .

install-dev: install
	$(PIP) -e ".[dev]"

run: install
	$(PY) -m mla_analysis.run +experiment=rank_sweep

test: install-dev
	$(PY) -m pytest -q

bench: install
	$(PY) -m mla_analysis.bench
