# The project's one pipeline: local stack, tests, lint, images, cluster.
# `make` (or `make help`) lists every target. Topic targets live in mk/*.mk.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN_DIR ?= .run
WORKERS ?= 2
PYTEST_ARGS ?=

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Local development

$(VENV)/.installed: requirements/dev.txt main-app/requirements.txt service-app/requirements.txt contract/pyproject.toml main-app/pyproject.toml service-app/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11+" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "error: Python's venv module is missing; on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e contract -e main-app -e service-app
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create the virtualenv with pinned dependencies

.PHONY: services-deps
services-deps: ## Install RabbitMQ and Redis servers (Debian packages) when missing
	@scripts/ensure-services.sh

.PHONY: run
run: venv services-deps ## Run the whole stack locally: RabbitMQ, Redis, main-app on :8000, WORKERS service-app workers
	@$(PY) scripts/devstack.py run --workers $(WORKERS) --run-dir $(RUN_DIR)

.PHONY: lock
lock: ## Re-resolve the hash-pinned requirements from the *.in files (needs PyPI)
	$(PYTHON) -m venv .tools/pip-tools && .tools/pip-tools/bin/pip install --quiet pip-tools==7.6.2
	for dir in main-app service-app requirements; do \
	  in=$$(ls $$dir/*.in | head -1); \
	  (cd $$dir && PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= ../.tools/pip-tools/bin/pip-compile --quiet --generate-hashes \
	    --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	    -o $$(basename $$in .in).txt $$(basename $$in)); \
	done

##@ Tests

.PHONY: test
test: venv services-deps ## Unit and integration tests against real RabbitMQ and Redis (private nodes)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv, tool installs, local stack state and reports
	rm -rf $(VENV) .tools .cache $(RUN_DIR) reports .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include $(sort $(wildcard mk/*.mk))
