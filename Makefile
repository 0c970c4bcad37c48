# vrft: every target sets up .venv first when needed, so each works alone on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vrft-installed
# The CPU build of torch 2.13.0 is what CPU machines and CI get; on a CUDA machine pip picks the CUDA build.
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?=
# `make train`'s figures (README) hang on float rounding: unpinned, torch's CPU kernels, MKL and oneDNN each
# take the widest vector code the CPU has (AVX2, AVX-512, AMX), whose sums round differently, so the sampled
# completions and the figures change with the CPU. Pinned to their AVX2 code and two threads (what CI has),
# a CPU with AVX-512 or AMX computes as one with AVX2 only. `make train CPU_PINS=` runs unpinned.
CPU_PINS ?= ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 DNNL_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint format clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create or refresh .venv (torch 2.13.0, vrft editable, dev tools)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: install ## Run the default job (tiny model, synthetic data, CPU is fine); extra overrides via ARGS="..."
	$(CPU_PINS) $(PY) -m vrft.train $(ARGS)

test: install ## Run the test suite (CPU; GPU tests are skipped without CUDA)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install ## Run the tests without the slow-marked ones
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install ## Ruff lint and format check, and the package's import layers (import-linter)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check vrft tests bench
	$(VENV)/bin/ruff format --check vrft tests bench

format: install ## Ruff autofix and format
	$(VENV)/bin/ruff check --fix vrft tests bench
	$(VENV)/bin/ruff format vrft tests bench

clean: ## Remove run outputs (not the venv or the model cache)
	rm -rf outputs multirun .pytest_cache
