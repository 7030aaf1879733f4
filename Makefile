# `make run` and `make test` each set up what is missing first: OS packages (apt), the .venv,
# and the default guest image (built once, then cached under ~/.cache/gondolin).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test bench deps venv image lint typecheck clean

deps:
	@scripts/ensure-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: deps $(STAMP)

image: venv
	@$(VENV)/bin/gondolin image build

run: image
	$(VENV)/bin/gondolin doctor
	$(VENV)/bin/gondolin demo
	$(PY) cookbook/data_task.py

test: image
	$(PY) -m pytest $(PYTEST_ARGS)

bench: image
	$(PY) -m benchmarks

lint: venv
	$(VENV)/bin/ruff check gondolin guest integrations mcp_server benchmarks cookbook tests
	$(VENV)/bin/mypy gondolin

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
