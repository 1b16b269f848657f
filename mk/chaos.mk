# Chaos and abuse suites (docs/guarantees.md).
#
# test-chaos: the seven fault scenarios of tests/chaos against the real processes
# (private RabbitMQ and Redis nodes, gunicorn main-app, several service-app workers),
# with lost-job accounting; prints one table and writes reports/chaos/chaos.{md,json}.
# Then the abuse suite. Fails if any accepted job is lost.
#
# test-abuse: tests/abuse against a real gunicorn main-app with real RabbitMQ and
# Redis: schemathesis/hypothesis fuzzing from /openapi.json, hostile inputs, auth,
# and the bad-request flood bound. schemathesis and hypothesis live in their own
# hash-locked venv (.tools/abuse: tests/abuse/requirements.txt, which is
# requirements/dev.txt plus those two), so the app venv stays lean.

ABUSE_VENV ?= .tools/abuse
ABUSE_STAMP := $(ABUSE_VENV)/.installed
CHAOS_PYTEST_ARGS ?=
ABUSE_PYTEST_ARGS ?=

$(ABUSE_STAMP): tests/abuse/requirements.txt contract/pyproject.toml main-app/pyproject.toml service-app/pyproject.toml scripts/pyproject.toml
	$(call python-venv,$(ABUSE_VENV),tests/abuse/requirements.txt,--require-hashes,--no-deps -e contract -e main-app -e service-app -e scripts)

##@ Chaos and abuse

.PHONY: abuse-tools
abuse-tools: $(ABUSE_STAMP) ## Install schemathesis + hypothesis (hash-locked) and the apps into .tools/abuse

.PHONY: test-chaos
test-chaos: venv services-deps ## Fault scenarios with lost-job accounting (~4 min), then test-abuse (~1 min); table in reports/chaos/
	@status=0; \
	$(BIN)/pytest tests/chaos -c pytest.ini -p no:cacheprovider $(CHAOS_PYTEST_ARGS) || status=$$?; \
	$(MAKE) test-abuse || status=$$((status ? status : $$?)); \
	exit $$status

.PHONY: test-abuse
test-abuse: $(ABUSE_STAMP) services-deps ## Fuzz the API from its OpenAPI document, hostile inputs, auth, flood bound (~2 min)
	$(ABUSE_VENV)/bin/pytest tests/abuse -c pytest.ini -p no:cacheprovider $(ABUSE_PYTEST_ARGS)

.PHONY: lock-abuse
lock-abuse: ## Re-resolve tests/abuse/requirements.txt (hash-pinned) from tests/abuse/requirements.in
	$(call pip-compile,tests/abuse/requirements.in,tests/abuse/requirements.txt)

.PHONY: chaos-docs
chaos-docs: ## Copy the table of the last chaos run (reports/chaos/chaos.md) into docs/guarantees.md
	$(PYTHON) scripts/chaos/update_guarantees.py
