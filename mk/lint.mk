# Lint: ruff over the Python code, yamllint over every YAML file, actionlint (with
# shellcheck for `run:` scripts), check-jsonschema and checkov over the GitHub Actions
# files, the CI consistency tests in tests/ci, and every other topic's own
# `lint-<topic>` target found in mk/*.mk (lint-images: hadolint + checkov on the
# Dockerfiles, ...). Docs: docs/ci-cd.md.
#
# The tools are pinned with hashes in .github/tools/requirements-*.txt and installed
# into git-ignored venvs: .tools/lint (ruff, yamllint, actionlint, shellcheck,
# check-jsonschema, pytest) and .tools/lint-checkov. A fresh Debian 12 machine needs
# only python3 (with venv), make and git; the wheels carry the binaries.

LINT_VENV ?= .tools/lint
LINT_CHECKOV_VENV ?= .tools/lint-checkov
LINT_LOCKS := .github/tools
# The one list of checkov skips for the GitHub Actions files, each with its reason.
LINT_SKIPS := .github/lint-skips.yaml
LINT_WORKFLOWS = $(sort $(wildcard .github/workflows/*.yml .github/workflows/*.yaml))
LINT_DEPENDABOT := .github/dependabot.yml
LINT_REPORTS ?= reports/lint
LINT_OWN_TARGETS := lint-python lint-yaml lint-actions lint-ci-tests lint-tools lint-lock
# Other topics' lint targets: every `lint-<name>:` rule in mk/*.mk that is not ours.
LINT_TOPIC_TARGETS := $(filter-out $(LINT_OWN_TARGETS),$(sort $(shell \
  sed -n 's/^\(lint-[A-Za-z0-9_-]*\):.*/\1/p' $(wildcard mk/*.mk))))

$(LINT_VENV)/.installed: $(LINT_LOCKS)/requirements-lint.txt
	$(call python-venv,$(LINT_VENV),$<,--require-hashes --no-deps --only-binary=:all:)

$(LINT_CHECKOV_VENV)/.installed: $(LINT_LOCKS)/requirements-checkov.txt
	$(call python-venv,$(LINT_CHECKOV_VENV),$<,--require-hashes --no-deps --only-binary=:all:)

##@ Lint and CI

.PHONY: lint
lint: lint-python lint-yaml lint-actions lint-ci-tests $(LINT_TOPIC_TARGETS) ## Everything below plus each topic's lint-* target (tools pinned under .tools/)

.PHONY: lint-tools
lint-tools: $(LINT_VENV)/.installed $(LINT_CHECKOV_VENV)/.installed ## Install the pinned lint tools into .tools/lint and .tools/lint-checkov

.PHONY: lint-python
lint-python: $(LINT_VENV)/.installed ## ruff (ruff.toml: E, F, W, I, B, UP) over all Python code
	$(LINT_VENV)/bin/ruff --version
	$(LINT_VENV)/bin/ruff check .

.PHONY: lint-yaml
lint-yaml: $(LINT_VENV)/.installed ## yamllint (.yamllint.yaml) over every YAML file in the repository
	$(LINT_VENV)/bin/yamllint --version
	$(LINT_VENV)/bin/yamllint --config-file .yamllint.yaml .

.PHONY: lint-actions
lint-actions: $(LINT_VENV)/.installed $(LINT_CHECKOV_VENV)/.installed ## actionlint+shellcheck, JSON schemas and checkov on .github/
	@echo "actionlint $$($(LINT_VENV)/bin/actionlint --version | head -1), $$($(LINT_VENV)/bin/shellcheck --version | sed -n 's/^version: /shellcheck /p')"
	$(LINT_VENV)/bin/actionlint -shellcheck $(abspath $(LINT_VENV)/bin/shellcheck) -pyflakes= $(LINT_WORKFLOWS)
	$(LINT_VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows $(LINT_WORKFLOWS)
	$(LINT_VENV)/bin/check-jsonschema --builtin-schema vendor.dependabot $(LINT_DEPENDABOT)
	@skips=$$($(LINT_VENV)/bin/python tests/ci/lint_skips.py $(LINT_SKIPS) checkov); \
	  echo "checkov $$($(LINT_CHECKOV_VENV)/bin/checkov --version) (skips: $${skips:-none}; reasons in $(LINT_SKIPS))"; \
	  $(LINT_CHECKOV_VENV)/bin/checkov --framework github_actions --skip-download --compact --quiet \
	    $${skips:+--skip-check "$$skips"} $(addprefix -f ,$(LINT_WORKFLOWS))

.PHONY: lint-ci-tests
lint-ci-tests: $(LINT_VENV)/.installed ## tests/ci: workflows call existing make targets, README quickstart = CI, pins, permissions
	@mkdir -p $(LINT_REPORTS)
	$(LINT_VENV)/bin/python -m pytest -c tests/ci/pytest.ini --rootdir=. --confcutdir=tests/ci \
	  --junitxml=$(LINT_REPORTS)/ci-tests.xml tests/ci

.PHONY: lint-lock
# The locks must install on Debian 12's Python 3.11.2: cap in the .in file any package
# whose newer releases need a later Python (see requirements-checkov.in).
lint-lock: ## Re-resolve the lint tools' hash-locked requirements from .github/tools/*.in (needs PyPI)
	$(call pip-compile,$(LINT_LOCKS)/requirements-lint.in,$(LINT_LOCKS)/requirements-lint.txt)
	$(call pip-compile,$(LINT_LOCKS)/requirements-checkov.in,$(LINT_LOCKS)/requirements-checkov.txt)