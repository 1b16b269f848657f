# Benchmarks (issue 4): `make bench` measures the API, the worker and the end-to-end
# latency against this machine's own ceilings (no-op HTTP, raw pika publish/consume),
# with private RabbitMQ/Redis nodes, the production gunicorn config and wrk.
# Not part of `make test`. Docs: docs/performance.md.

BENCH_TOOLS ?= .tools/bench
BENCH_REPORTS ?= reports/bench
BENCH_ARGS ?=
# py-spy for `make bench-profile`, pinned.
BENCH_PYSPY ?= py-spy==0.4.1
# Peers (Celery, Dramatiq, a naive confirmed-publish endpoint) run inside `make bench`, from
# their own hash-locked venv (scripts/bench/requirements-peers.txt); main-app and contract come
# in --no-deps so that the peers' gunicorn runs with main_app.gunicorn_conf.
BENCH_PEERS ?= .tools/bench-peers

.PHONY: bench-deps
bench-deps: venv services-deps ## Install wrk (Debian package) when missing
	$(call debian-package,wrk,wrk)

##@ Benchmarks

.PHONY: bench
bench: bench-deps $(BENCH_PEERS)/.installed ## Full benchmark with peers (~12–15 min; BENCH_QUICK=1 for a ~2 min smoke run): table, `bench:` line, JSON in reports/bench/
	BENCH_PEERS=$(BENCH_PEERS) $(PY) scripts/bench/bench.py --out $(BENCH_REPORTS) $(BENCH_ARGS)

.PHONY: bench-smoke
bench-smoke: bench-deps $(BENCH_PEERS)/.installed ## Quick bench run (with peers) plus the harness's own unit tests (~2.5 min)
	$(BIN)/pytest -c pytest.ini -p no:cacheprovider -q tests/bench
	BENCH_QUICK=1 BENCH_PEERS=$(BENCH_PEERS) $(PY) scripts/bench/bench.py --out $(BENCH_REPORTS)/smoke $(BENCH_ARGS)

$(BENCH_TOOLS)/.installed:
	python3 -m venv $(BENCH_TOOLS)
	$(BENCH_TOOLS)/bin/pip install --quiet $(BENCH_PYSPY)
	@touch $@

.PHONY: bench-profile
bench-profile: bench-deps $(BENCH_TOOLS)/.installed ## Flame graphs (py-spy) of main-app and service-app under load, in reports/bench/profile/
	$(PY) scripts/bench/pyspy_profile.py --py-spy $(BENCH_TOOLS)/bin/py-spy --out $(BENCH_REPORTS)/profile

.PHONY: bench-trickle
bench-trickle: bench-deps ## Why a job costs more CPU end to end than under saturation: per process and API thread, user/kernel, with the vCPUs kept from halting, perf's symbols (~2 min; reports/bench/trickle/)
	$(call debian-package,linux-perf,perf)
	$(PY) scripts/bench/trickle_profile.py --out $(BENCH_REPORTS)/trickle

$(BENCH_PEERS)/.installed: scripts/bench/requirements-peers.txt
	$(call python-venv,$(BENCH_PEERS),scripts/bench/requirements-peers.txt,--require-hashes,--no-deps -e contract -e main-app -e scripts)

.PHONY: bench-peers
bench-peers: $(BENCH_PEERS)/.installed ## Install the bench's peers (Celery, Dramatiq) into .tools/bench-peers

.PHONY: lock-bench-peers
lock-bench-peers: ## Re-resolve scripts/bench/requirements-peers.txt, hash-pinned (needs PyPI)
	$(call pip-compile,scripts/bench/requirements-peers.in,scripts/bench/requirements-peers.txt)
