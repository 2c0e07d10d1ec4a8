# Two entry points: `make demo` (main job) and `make test` (the suite CI runs).
# Both create .venv on first use with Python >= 3.12 and the pinned constraints.

PYTHON ?= $(shell for p in python3.12 python3.13 python3 $$(ls -d $$HOME/.pyenv/versions/3.1[23]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && command -v $$p && break; done)
VENV := .venv
PY := $(VENV)/bin/python
# Hugging Face reference (torch CPU) for the model parity tests, in its own venv:
# the local torch CPU wheel is built for Python 3.11.
HF_PYTHON ?= $(shell for p in python3.11 $$(ls -d $$HOME/.pyenv/versions/3.11*/bin/python3 2>/dev/null) python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && command -v $$p && break; done)
HF_VENV := .venv-hf

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found; set PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m pallax demo

$(HF_VENV)/.installed: tests/hf_requirements.txt
	@test -n "$(HF_PYTHON)" || { echo "error: Python 3.11 (for torch CPU) not found; set HF_PYTHON"; exit 1; }
	$(HF_PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install -q -r tests/hf_requirements.txt
	@touch $@

test: $(VENV)/.installed $(HF_VENV)/.installed
	PALLAX_HF_PYTHON=$(HF_VENV)/bin/python $(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(VENV)/.installed
	$(PY) -m ruff check pallax tests benchmarks examples
	$(PY) -m ruff format --check pallax tests benchmarks examples

bench: $(VENV)/.installed
	$(PY) -m pallax bench attention

clean:
	rm -rf $(VENV) $(HF_VENV)
