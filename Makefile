# The two commands the README promises: `make demo` and `make test`.
# Each creates .venv when missing (pip takes torch 2.14.1 from this machine's disk).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.casebase-installed

.PHONY: demo test lint system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/casebase demo

system-deps:
	bash scripts/system-deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
