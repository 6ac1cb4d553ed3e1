# Two entry points for a fresh clone: `make repro` (pipeline on the sample data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test bench lint plots-template

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

repro: setup  ## install, then run the whole pipeline on the generated sample data
	dvc repro

test: setup  ## install, then run the test suite (unit + end-to-end)
	python -m pytest -q

bench: setup  ## benchmarks -> bench/results/*.json and BENCHMARKS.md (add ARGS=--quick)
	python bench/run.py $(ARGS)

lint: setup
	ruff check src stages tests bench

plots-template: setup  ## rebuild .dvc/plots/offline.html (the offline `dvc plots` page) with npm
	python -m retrieval.offline_plots
