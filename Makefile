# fleetserve: `make up` serves the embedded model, `make test` runs the whole suite.
# Both install what is missing first (system packages, the virtualenv, the CPU torch pin, the default model).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH_PIN := torch==2.13.0

.PHONY: install model browser compiler up serve test test-fast lint bench audit clean

install: $(STAMP) model browser compiler

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	@# SGLang's own argument parser validates the planner's command lines (no deps: it never runs here).
	$(PY) -m pip install -q --no-deps sglang==0.5.23
	@rm -f $(VENV)/.installed-*
	@touch $@

model: $(STAMP)
	$(VENV)/bin/fleetserve models pull default

# Chromium for the console's browser tests (Playwright drives Debian's chromium; its own download is not used).
browser:
	@command -v chromium >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "install chromium for the browser tests (tests/test_console.py skips without it)"; \
	  elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else sudo apt-get update && sudo apt-get install -y chromium; fi; }

# A C compiler: the engine builds its CPU kernels (paged decode attention, fused norms) on first start; without
# one it falls back to the slower PyTorch path and tests/test_cpu_kernels.py skips.
compiler:
	@command -v cc >/dev/null || command -v gcc >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "install a C compiler (gcc or clang) for the CPU kernels"; \
	  elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y gcc libc6-dev; \
	  else sudo apt-get update && sudo apt-get install -y gcc libc6-dev; fi; }

up: install
	$(VENV)/bin/fleetserve up

serve: install
	$(VENV)/bin/fleetserve serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check fleetserve tests benchmarks

bench: install
	$(PY) benchmarks/engine_vs_hf.py

# Known vulnerabilities in the installed dependencies (pip-audit asks its advisory database over the network,
# so it is not part of `make test`). fleetserve itself is skipped: it is not a published package.
audit: install
	$(PY) -m pip install -q 'pip-audit>=2.7'
	$(PY) -m pip_audit --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
