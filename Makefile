# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
# A Python the dependencies take, 3.10 to 3.12 (the OCR extra's rapidocr_onnxruntime stops at
# 3.12): python3 where it is one, else the newest that runs (a pyenv shim may not).
SUPPORTED := import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))
ifndef PYTHON
PYTHON := $(shell for p in python3 python3.12 python3.11 python3.10; do \
  $$p -c '$(SUPPORTED)' 2>/dev/null && { command -v $$p; exit; }; done; echo python3)
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c '$(SUPPORTED)' || { \
	  echo "vision-ops needs Python 3.10 to 3.12; $(PYTHON) is $$($(PYTHON) -V 2>&1): install one" \
	    "(e.g. python3.12) or run make PYTHON=/path/to/python3.12" >&2; exit 1; }
	{ $(BIN)/python -c '$(SUPPORTED)' && $(BIN)/python -m pip --version; } >/dev/null 2>&1 \
	  || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
	  || { echo "$(PYTHON) -m venv failed (on Debian and Ubuntu: apt install python3-venv)" >&2; \
	    rm -rf $(VENV); exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo's embedded Ray in a new empty TMPDIR (its default temp root), removed after it: no
# stale cluster address or session that earlier Ray runs on this host left behind. Under /tmp,
# whatever the shell's TMPDIR: Ray's socket paths in it must stay within 107 bytes. Never a
# cluster RAY_ADDRESS names: the demo's S3 server is this machine's.
demo: $(STAMP)
	fresh=$$(mktemp -d /tmp/vo-demo.XXXXXX) && trap 'rm -rf "$$fresh"' EXIT && \
	  env -u RAY_ADDRESS TMPDIR=$$fresh RAY_TMPDIR=$$fresh $(BIN)/python jobs/demo.py

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
