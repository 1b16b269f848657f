# The sandbox: a real single-node Kubernetes built on this machine from pinned Go modules
# (k8s/sandbox/tools), with a local registry, KEDA and the Prometheus Operator. Needs root.
# Docs: docs/kubernetes.md ("The sandbox cluster").

SANDBOX_TOOLS := k8s/sandbox/tools/build.sh
SANDBOX_BIN := .sandbox/bin
SANDBOX_KUBECONFIG := $(CURDIR)/.sandbox/kubeconfig
SANDBOX_ENV = PATH="$(CURDIR)/$(SANDBOX_BIN):$(CURDIR)/$(K8S_TOOLS_BIN):$$PATH" KUBECONFIG="$(SANDBOX_KUBECONFIG)"

##@ Sandbox cluster (a real Kubernetes on this machine)

.PHONY: sandbox-tools
sandbox-tools: k8s-tools ## Build the pinned Kubernetes, Skaffold, Tilt, KEDA, ... into a cache outside the repo (SANDBOX_CACHE)
	@command -v go >/dev/null || { echo "error: Go >= 1.26 is needed to build the sandbox tools" >&2; exit 127; }
	@$(SANDBOX_TOOLS) >/dev/null
	@mkdir -p $(SANDBOX_BIN)
	@ln -sf "$$($(SANDBOX_TOOLS) skaffold)/skaffold" $(SANDBOX_BIN)/skaffold
	@ln -sf "$$($(SANDBOX_TOOLS) tilt)/tilt" $(SANDBOX_BIN)/tilt
	@ln -sf "$(CURDIR)/$(KUBECTL_PINNED)" $(SANDBOX_BIN)/kubectl
	@# Skaffold and Tilt build with `docker build` + BuildKit: the engine's own client (Debian's
	@# docker.io) has it built in, a newer client without the buildx plugin refuses.
	@if [ -x /usr/bin/docker ]; then ln -sf /usr/bin/docker $(SANDBOX_BIN)/docker; fi
	@echo "sandbox tools ready; skaffold, tilt and kubectl are linked in $(SANDBOX_BIN)"

.PHONY: sandbox-up
sandbox-up: sandbox-tools images-base ## Start the sandbox cluster (idempotent); kubeconfig in .sandbox/kubeconfig
	@k8s/sandbox/sandbox.sh up
	@echo 'use it: export PATH="$(CURDIR)/$(SANDBOX_BIN):$$PATH" KUBECONFIG="$(SANDBOX_KUBECONFIG)"'

.PHONY: sandbox-down
sandbox-down: ## Stop the sandbox and remove its processes, mounts, interfaces, rules and state
	@k8s/sandbox/sandbox.sh down
	@k8s/sandbox/sandbox.sh leftovers

.PHONY: sandbox-status
sandbox-status: ## Show which sandbox components run
	@k8s/sandbox/sandbox.sh status

.PHONY: test-cluster
test-cluster: sandbox-up k8s-secrets ## On the sandbox: make deploy (skaffold build, deploy, verify -p ci), tilt ci, live update, jobs round trip, PodSecurity and NetworkPolicy enforcement (SANDBOX_KEEP=1 keeps it up)
	@status=0; $(SANDBOX_ENV) $(K8S_TOOLS_BIN)/python k8s/sandbox/test_cluster.py --report-dir reports/cluster || status=$$?; \
	  if [ "$${SANDBOX_KEEP:-}" != 1 ]; then \
	    k8s/sandbox/sandbox.sh down && k8s/sandbox/sandbox.sh leftovers && echo "sandbox-down left nothing behind" || status=1; \
	  fi; exit $$status

.PHONY: test-cluster-scaling
test-cluster-scaling: sandbox-up k8s-secrets loadtest-tools ## On the sandbox: Locust step load scales both apps up and down (KEDA), HPA model vs real, nothing lost; prod topology under faults (~20 min)
	@status=0; $(SANDBOX_ENV) $(OBS_TOOLS_BIN)/python k8s/sandbox/test_scaling.py --report-dir reports/cluster-scaling \
	  --python $(OBS_TOOLS_BIN)/python $(SCALING_ARGS) || status=$$?; \
	  if [ "$${SANDBOX_KEEP:-}" != 1 ]; then \
	    k8s/sandbox/sandbox.sh down && k8s/sandbox/sandbox.sh leftovers && echo "sandbox-down left nothing behind" || status=1; \
	  fi; exit $$status
