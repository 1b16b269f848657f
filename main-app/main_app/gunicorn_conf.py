"""gunicorn settings for main-app, from the environment.

Metrics: each worker writes its samples to PROMETHEUS_MULTIPROC_DIR; the master
wipes that directory at start, serves the aggregate on METRICS_PORT (never on
the API port) and marks dead workers so their live gauges drop out.
"""

import os
import shutil

from jobs_contract.settings import env_bool, env_int, env_str

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "/tmp/main-app-metrics")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]

bind = [f"{env_str('HTTP_HOST', '0.0.0.0')}:{env_int('HTTP_PORT', 8000)}"]
worker_class = "gthread"
workers = env_int("GUNICORN_WORKERS", 2, minimum=1)
threads = env_int("GUNICORN_THREADS", 32, minimum=1)
graceful_timeout = env_int("GUNICORN_GRACEFUL_TIMEOUT", 30, minimum=1)
timeout = 30
keepalive = 5
reload = env_bool("GUNICORN_RELOAD", False)
accesslog = "-" if env_bool("ACCESS_LOG", False) else None
errorlog = "-"
loglevel = env_str("LOG_LEVEL", "info").lower()
control_socket_disable = True
# Request-line and header limits: hostile clients get a 4xx from gunicorn itself.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def on_starting(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


def when_ready(server):
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    host, port = env_str("METRICS_HOST", "0.0.0.0"), env_int("METRICS_PORT", 9100)
    start_http_server(port, addr=host, registry=registry)
    server.log.info("metrics on http://%s:%d/metrics", host, port)


def post_worker_init(worker):
    # Accept requests only once this worker's broker connection is up, so a fresh
    # worker does not answer 503 beside a ready one. Bounded: with RabbitMQ down the
    # worker starts anyway, answers 503 and reports not ready until it connects.
    publisher = getattr(worker.wsgi, "extensions", {}).get("publisher")
    if publisher is not None and not publisher.wait_ready(env_int("STARTUP_BROKER_WAIT_SECONDS", 10, minimum=0)):
        worker.log.warning("RabbitMQ not reachable yet; serving (503 for submissions) while reconnecting")


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
