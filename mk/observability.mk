# Observability: the autoscaling signals on a real Prometheus, Locust load tests,
# the offline scaling preview and the cluster scaling demo. See docs/observability.md.

OBS_TOOLS_VENV := .tools/locust
OBS_TOOLS_BIN := $(OBS_TOOLS_VENV)/bin
OBS_TOOLS_STAMP := $(OBS_TOOLS_VENV)/.installed
OBS_REPORTS := reports/observability
OBS_PYTEST_ARGS ?=

# make loadtest: target API (HOST= is an alias), profile and token.
HOST ?=
LOADTEST_HOST ?= $(if $(HOST),$(HOST),http://127.0.0.1:8000)
LOADTEST_PROFILE ?= smoke
LOADTEST_TOKEN_FILE ?=
LOADTEST_REPORTS := reports/loadtest
LOADTEST_ARGS ?=
# make scaling-preview / scaling-demo
PREVIEW_OVERLAY ?= dev
PREVIEW_ARGS ?=
DEMO_ARGS ?=

##@ Observability

$(OBS_TOOLS_STAMP): loadtest/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11+" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "error: Python's venv module is missing; on Debian: apt-get install python3-venv" >&2; exit 1; }
	rm -rf $(OBS_TOOLS_VENV)
	$(PYTHON) -m venv $(OBS_TOOLS_VENV)
	$(OBS_TOOLS_BIN)/pip install --quiet --upgrade pip==25.3
	$(OBS_TOOLS_BIN)/pip install --quiet --require-hashes -r loadtest/requirements.txt
	@touch $@

.PHONY: loadtest-tools
loadtest-tools: $(OBS_TOOLS_STAMP) ## Install Locust and matplotlib (hash-pinned) in .tools/locust

.PHONY: loadtest-lock
loadtest-lock: ## Re-resolve loadtest/requirements.txt from loadtest/requirements.in (needs PyPI)
	$(PYTHON) -m venv .tools/pip-tools && .tools/pip-tools/bin/pip install --quiet pip-tools==7.6.2
	PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= .tools/pip-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links -o loadtest/requirements.txt loadtest/requirements.in

.PHONY: prometheus-server
prometheus-server: ## Ensure Debian's prometheus (server and promtool) is installed; the system service is not used
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian package prometheus (no recommends)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
	      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; \
	  else \
	    echo "error: prometheus/promtool not installed: sudo apt-get install --no-install-recommends prometheus" >&2; exit 127; \
	  fi; \
	fi

.PHONY: test-observability
test-observability: venv services-deps k8s-tools prometheus-server loadtest-tools ## Autoscaling signals on a real Prometheus, HPA algorithm, Locust smoke (~6 min)
	@mkdir -p $(OBS_REPORTS)
	PATH="$(CURDIR)/$(K8S_TOOLS_BIN):$$PATH" $(BIN)/pytest tests/observability -c pytest.ini -p no:cacheprovider \
	  -o timeout=900 --junitxml=$(OBS_REPORTS)/junit.xml $(OBS_PYTEST_ARGS)

.PHONY: loadtest
loadtest: loadtest-tools ## Locust headless against HOST (default: make run's API); LOADTEST_PROFILE=smoke|step|soak; TOKEN=...
	@mkdir -p $(LOADTEST_REPORTS)
	@stamp=$$(date -u +%Y%m%dT%H%M%SZ); out=$(LOADTEST_REPORTS)/$(LOADTEST_PROFILE)-$$stamp; \
	echo "locust: profile $(LOADTEST_PROFILE) against $(LOADTEST_HOST); reports: $$out*"; \
	LOADTEST_PROFILE=$(LOADTEST_PROFILE) LOADTEST_TOKEN_FILE="$(LOADTEST_TOKEN_FILE)" \
	  $(OBS_TOOLS_BIN)/locust -f loadtest/locustfile.py --headless --host "$(LOADTEST_HOST)" \
	  --csv "$$out" --csv-full-history --html "$$out.html" --only-summary $(LOADTEST_ARGS)

.PHONY: scaling-preview
scaling-preview: venv services-deps k8s-tools prometheus-server loadtest-tools ## No cluster: step load on a local stack, signals from Prometheus, replayed through the HPA -> reports/scaling-preview/ (~7 min)
	PATH="$(CURDIR)/$(K8S_TOOLS_BIN):$$PATH" $(OBS_TOOLS_BIN)/python scripts/observability/scaling_preview.py \
	  --overlay $(PREVIEW_OVERLAY) --app-venv $(VENV) $(PREVIEW_ARGS)

.PHONY: scaling-demo
scaling-demo: loadtest-tools ## On a cluster (make cluster-up + deploy/dev): step load in-cluster, sample replicas/HPA/backlog -> reports/scaling-demo/
	$(call require-tool,kubectl,$(KUBECTL_HINT))
	$(OBS_TOOLS_BIN)/python scripts/observability/scaling_demo.py $(DEMO_ARGS)
