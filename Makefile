# The two commands a new user needs: `make demo` and `make test`.
# Set-up is part of both: a local .venv with the CPU build of torch pinned first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,tracking]'
	touch $(STAMP)

setup: $(STAMP)

# A fresh synthetic consortium each time: its sites' privacy ledgers live in runs/demo/data and
# a second run on the same data would find its release budget already spent (as it should).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/equifed-simulate simulations/scenarios/default.toml --out runs/demo -c statistics=shift,fairness \
		-c secagg=true -c secagg-statistics=true -c stats-fairness-once=true -c stats-fairness-noise=2.7

# The import rule between rooms first (seconds), then the suite on two workers (tests/conftest.py says
# which tests share one).
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf runs .pytest_cache
