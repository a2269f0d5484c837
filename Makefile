# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo's embedded Ray in a new empty TMPDIR (its default temp root), removed after it: no
# stale cluster address or session that earlier Ray runs on this host left behind.
demo: $(STAMP)
	fresh=$$(mktemp -d) && trap 'rm -rf "$$fresh"' EXIT && \
	  TMPDIR=$$fresh RAY_TMPDIR=$$fresh $(BIN)/python jobs/demo.py

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check vision_ops tests jobs benchmarks
	$(BIN)/ruff format --check vision_ops tests jobs benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
