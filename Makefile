# Two entry points: `make demo` (main job) and `make test` (the suite CI runs).
# Both create .venv on first use with Python >= 3.12 and the pinned constraints.

PYTHON ?= $(shell for p in python3.12 python3.13 python3 $$(ls -d $$HOME/.pyenv/versions/3.1[23]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && command -v $$p && break; done)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found; set PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m pallax demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(VENV)/.installed
	$(PY) -m ruff check pallax tests benchmarks
	$(PY) -m ruff format --check pallax tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks.attention

clean:
	rm -rf $(VENV)
