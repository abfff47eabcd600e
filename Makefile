# `make demo` and `make test` set everything up on a fresh machine (Python 3.11) and run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
# pip's configuration here lists local indexes that may not exist: hide that noise only
PIP_QUIET := 2>&1 | { grep -v 'is ignored: it is neither' || true; }

.PHONY: setup demo test test-quick lint bench bench-smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip $(PIP_QUIET)
	$(VENV)/bin/pip install -q -e '.[dev]' $(PIP_QUIET)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/forge run --config configs/demo.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/pip install -q -e '.[dev,bench]' $(PIP_QUIET)
	$(VENV)/bin/python bench/tokenize_throughput.py
	$(VENV)/bin/python bench/prepare_throughput.py

bench-smoke: setup
	$(VENV)/bin/pip install -q -e '.[dev,bench]' $(PIP_QUIET)
	$(VENV)/bin/python bench/smoke.py

clean:
	rm -rf runs .pytest_cache
