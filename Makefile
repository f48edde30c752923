# delinea: `make demo` runs the main job on the bundled sample, `make test` runs the tests.
# Both create the virtual environment in .venv and install the package first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install test test-slow lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install delinea with its test extras

test: $(STAMP)  ## run the fast test suite (under 10 minutes on 2 cores)
	$(PY) -m pytest

test-slow: $(STAMP)  ## run every test, the slow ones (DDP, demo smoke) included
	$(PY) -m pytest -m ''

lint: $(STAMP)  ## ruff (lint and formatting) and mypy; CI runs it after the tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: $(STAMP)  ## the whole MedDelinea protocol on the bundled real CT and MR sample
	$(PY) -m delinea.demo

bench: $(STAMP)  ## speed and memory benchmarks; writes benchmarks/results/latest.json
	$(PY) benchmarks/run.py

clean:  ## remove run outputs (not the environment)
	rm -rf runs lightning_logs .pytest_cache
