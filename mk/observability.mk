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

$(OBS_TOOLS_STAMP): loadtest/requirements.txt scripts/pyproject.toml
	$(call python-venv,$(OBS_TOOLS_VENV),loadtest/requirements.txt,--require-hashes,--no-deps -e scripts)

.PHONY: loadtest-tools
loadtest-tools: $(OBS_TOOLS_STAMP) ## Install Locust and matplotlib (hash-pinned) in .tools/locust

.PHONY: loadtest-lock
loadtest-lock: ## Re-resolve loadtest/requirements.txt from loadtest/requirements.in (needs PyPI)
	$(call pip-compile,loadtest/requirements.in,loadtest/requirements.txt)

.PHONY: prometheus-server
prometheus-server: ## Ensure Debian's prometheus (server and promtool) is installed; the system service is not used
	$(call debian-package,prometheus,prometheus promtool)

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
	  --csv "$$out" --csv-full-history --json-file "$$out" --html "$$out.html" --only-summary $(LOADTEST_ARGS)

.PHONY: scaling-preview
scaling-preview: venv services-deps k8s-tools prometheus-server loadtest-tools ## No cluster: step load on a local stack, signals from Prometheus, replayed through the HPA -> reports/scaling-preview/ (~7 min)
	PATH="$(CURDIR)/$(K8S_TOOLS_BIN):$$PATH" $(OBS_TOOLS_BIN)/python scripts/observability/scaling_preview.py \
	  --overlay $(PREVIEW_OVERLAY) --app-venv $(VENV) $(PREVIEW_ARGS)

.PHONY: scaling-demo
scaling-demo: loadtest-tools ## On a cluster (make cluster-up + deploy/dev): step load in-cluster, sample replicas/HPA/backlog -> reports/scaling-demo/
	$(call require-tool,kubectl,$(KUBECTL_HINT))
	$(OBS_TOOLS_BIN)/python scripts/observability/scaling_demo.py $(DEMO_ARGS)
