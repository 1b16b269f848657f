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

# ---------------------------------------------------------------- shared recipes (every mk/*.mk uses them)

# $(call python-venv,DIR,REQUIREMENTS,PIP_FLAGS,THEN): a fresh venv in DIR holding exactly REQUIREMENTS
# (with PIP_FLAGS, e.g. --require-hashes), then `pip install THEN` if given; stamps DIR/.installed.
define python-venv
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11+" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "error: Python's venv module is missing; on Debian: apt-get install python3-venv" >&2; exit 1; }
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(1)/bin/pip install --quiet --disable-pip-version-check $(3) -r $(2)
	$(if $(4),$(1)/bin/pip install --quiet --disable-pip-version-check $(4))
	@touch $(1)/.installed
endef

# $(call pip-compile,IN,OUT): re-resolve OUT, hash-pinned, from IN (needs PyPI).
define pip-compile
	$(PYTHON) -m venv .tools/pip-tools
	.tools/pip-tools/bin/pip install --quiet --disable-pip-version-check pip-tools==7.6.2
	cd $(dir $(1)) && PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= $(CURDIR)/.tools/pip-tools/bin/pip-compile --quiet \
	  --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file $(notdir $(2)) $(notdir $(1))
endef

# $(call debian-package,PACKAGE,COMMANDS): install Debian's PACKAGE (no recommends) when one of
# COMMANDS is missing; as non-root, say how instead.
define debian-package
	@if ! { $(foreach c,$(2),command -v $(c) >/dev/null 2>&1 &&) true; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian package $(1) (no recommends)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null \
	      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null; }; \
	  else \
	    echo "error: '$(2)' not installed: sudo apt-get install --no-install-recommends $(1)" >&2; exit 127; \
	  fi; \
	fi
endef

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Local development

$(VENV)/.installed: requirements/dev.txt main-app/requirements.txt service-app/requirements.txt contract/pyproject.toml main-app/pyproject.toml service-app/pyproject.toml scripts/pyproject.toml
	$(call python-venv,$(VENV),requirements/dev.txt,--require-hashes,--no-deps -e contract -e main-app -e service-app -e scripts)

.PHONY: venv
venv: $(VENV)/.installed ## Create the virtualenv with pinned dependencies

.PHONY: services-deps
services-deps: ## Install RabbitMQ and Redis servers (Debian packages) when missing
	@scripts/ensure-services.sh

.PHONY: run
run: venv services-deps ## Run the whole stack locally: RabbitMQ, Redis, main-app on :8000, WORKERS service-app workers
	@$(PY) -m jobs_devtools.devstack run --workers $(WORKERS) --run-dir $(RUN_DIR)

.PHONY: lock
lock: ## Re-resolve the hash-pinned requirements from the *.in files (needs PyPI)
	$(call pip-compile,main-app/requirements.in,main-app/requirements.txt)
	$(call pip-compile,service-app/requirements.in,service-app/requirements.txt)
	$(call pip-compile,requirements/dev.in,requirements/dev.txt)

##@ Tests

.PHONY: test
test: venv services-deps ## Unit and integration tests against real RabbitMQ and Redis (private nodes)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv, tool installs, local stack state and reports
	rm -rf $(VENV) .tools .cache $(RUN_DIR) reports .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include $(sort $(wildcard mk/*.mk))
