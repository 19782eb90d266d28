# The two commands the README promises: `make demo` and `make test`.
# Each creates .venv when missing (pip takes torch 2.14.1 from this machine's disk).
# `make demo` installs casebase alone; `make test` adds the test extras (pytest, ray,
# playwright, grad-cam, ruff). Each has its own stamp, remade when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.casebase-demo
TEST_STAMP := $(VENV)/.casebase-test
# the FAISS flavour (pyproject extras): cpu, or gpu for faiss-gpu-cu12 (never both)
FAISS ?= cpu

.PHONY: demo test lint system-deps

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(FAISS)]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(FAISS),test]'
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/casebase demo

system-deps:
	bash scripts/system-deps.sh

test: $(TEST_STAMP) system-deps
	$(VENV)/bin/python -m bench.report --check
	$(VENV)/bin/python -m pytest -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
