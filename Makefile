# memzoo: `make demo` (train, evaluate, report on CPU) and `make test` (the whole suite).
# Both create .venv and install the package with its test extra on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast test-all lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memzoo demo configs/demo.yaml
	@echo "report: runs/demo/report.md"

# The suite CI runs: everything but the tests marked `slow` (long training runs, exhaustive
# grids), plus the notebooks: 19 minutes on 2 idle cores (969 tests).
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -m "not slow or notebook" tests

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -m "not slow and not notebook" tests

# Everything, including the slow set (~25 more minutes on 2 cores).
test-all: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check ops zoo pipelines tests
	$(VENV)/bin/ruff format --check ops zoo pipelines tests

format: $(STAMP)
	$(VENV)/bin/ruff format ops zoo pipelines tests
	$(VENV)/bin/ruff check --fix ops zoo pipelines tests

clean:
	rm -rf $(VENV) runs build *.egg-info
