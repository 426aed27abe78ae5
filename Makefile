# The lab's two commands: `make repro` (the cpu pipeline) and `make test`.
# Both create .venv and install the pinned stack first; set-up is skipped when up to date.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-fast bench notebooks clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install --attributes .gitattributes >/dev/null 2>&1 || true
	@touch $(STAMP)

# the cpu pipeline (params.yaml `profile: cpu`); `dvc exp run -S profile=tiny` for the small one
repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/render.py

# regenerate the paired .ipynb files from the py:percent sources (outputs stripped)
notebooks: setup
	$(BIN)/jupytext --sync notebooks/*.py

clean-venv:
	rm -rf $(VENV)
