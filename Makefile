# The lab's three commands: `make repro` (the cpu pipeline), `make test` and `make lab` (JupyterLab, ready to run).
# Each creates .venv and installs the pinned stack first; set-up is skipped when up to date.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-fast lab bench notebooks clean-venv

setup: $(STAMP)

# offline `dvc plots show/diff`: pinned vega libraries from npm, inlined into a DVC HTML template
# (nifi_utils/pipeline/plots_offline.py); DVC resolves plots.html_template relative to .dvc/
VEGA_NPM := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
# the 3DGS ecosystem's converter (.spz/.sog/compressed.ply codec anchors, the offline HTML viewer)
SPLAT_NPM := @playcanvas/splat-transform@3.7.0
NPM_DIR := $(VENV)/npm
PLOTS_TEMPLATE := $(VENV)/dvc-plots-offline.html

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install --attributes .gitattributes >/dev/null 2>&1 || true
	@if ! command -v npm >/dev/null 2>&1; then echo "warning: npm not found: dvc plots show/diff will load vega from the CDN (blank offline)"; \
	elif npm install --prefix $(NPM_DIR) --no-audit --no-fund --silent --save-exact $(VEGA_NPM) \
	  && $(BIN)/python -m nifi_utils.pipeline.plots_offline --node-modules $(NPM_DIR)/node_modules --out $(PLOTS_TEMPLATE) >/dev/null; then \
	  test ! -d .dvc || $(BIN)/dvc config --local plots.html_template ../$(PLOTS_TEMPLATE); \
	else echo "warning: npm install $(VEGA_NPM) failed: dvc plots show/diff will load vega from the CDN (blank offline)"; fi
	@if command -v npm >/dev/null 2>&1 && ! npm install --prefix $(NPM_DIR) --no-audit --no-fund --silent --save-exact $(SPLAT_NPM); then \
	  echo "warning: npm install $(SPLAT_NPM) failed: codec anchors and the 3D viewer are skipped"; fi
	@touch $(STAMP)

# the cpu pipeline (params.yaml `profile: cpu`); `dvc exp run -S profile=tiny` for the small one
repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# JupyterLab on the repository, opened at the tour: first the tiny profile's stage outputs that the notebooks' committed
# parameters read (`python -m nifi_utils.pipeline.lab prepare`: a few minutes on 2 cores, once; nothing reruns while they are there),
# then the server on localhost, printing its URL with the token; no browser is started (open the URL yourself).
# As root (containers, CI) JupyterLab refuses to start without --allow-root.
LAB_PORT ?= 8888
lab: setup
	$(BIN)/python -m nifi_utils.pipeline.lab prepare --profile tiny
	$(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --ServerApp.root_dir=$(CURDIR) \
	  --LabApp.default_url=/lab/tree/notebooks/tour.ipynb $(if $(filter 0,$(shell id -u)),--allow-root)

bench: setup
	$(BIN)/python benchmarks/render.py

# regenerate the paired .ipynb files from the py:percent sources (outputs stripped)
notebooks: setup
	$(BIN)/jupytext --sync notebooks/*.py

clean-venv:
	rm -rf $(VENV)
