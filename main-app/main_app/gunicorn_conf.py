"""gunicorn settings for main-app, from its ServerSettings (config.py).

Metrics: each worker writes its samples to PROMETHEUS_MULTIPROC_DIR; the master
wipes that directory at start, serves the aggregate on METRICS_PORT (never on
the API port) and marks dead workers so their live gauges drop out.
"""

import errno
import gc
import os
import shutil
import socket

from gunicorn import sock, util

from main_app.config import ServerSettings

_server = ServerSettings.from_env()
# prometheus_client in the workers reads it from the environment.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _server.metrics_dir

bind = [f"{_server.http_host}:{_server.http_port}"]
worker_class = "gthread"
workers = _server.workers
# A listening socket per worker (SO_REUSEPORT), so that the kernel spreads new connections over
# the workers. On one shared socket whichever worker wakes first accepts, and a burst of
# connections can all land on one worker, which then serves alone, bound by its GIL, while the
# other idles (docs/performance.md). A worker opens its socket only once it is ready
# (post_worker_init). The cost: a worker that hangs keeps the connections the kernel hands its
# socket waiting, until gunicorn's timeout replaces it (docs/guarantees.md, "Known limits and findings").
reuse_port = workers > 1
threads = _server.threads
graceful_timeout = _server.graceful_timeout
timeout = 30
keepalive = 5
reload = _server.reload
accesslog = "-" if _server.access_log else None
errorlog = "-"
loglevel = _server.log_level.lower()
control_socket_disable = True
# Request-line and header limits: hostile clients get a 4xx from gunicorn itself.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def on_starting(server):
    if server.cfg.reuse_port:
        _fail_if_address_in_use(server.cfg.address)
    shutil.rmtree(_server.metrics_dir, ignore_errors=True)
    os.makedirs(_server.metrics_dir, exist_ok=True)


def _fail_if_address_in_use(addresses) -> None:
    # With reuse_port the master binds nothing and each worker binds its own socket: a port that
    # is taken would only make workers fail to start, one after another, and another server on
    # it with SO_REUSEPORT would share its connections with us. Stop at once instead.
    for address in addresses:
        probe = socket.socket(socket.AF_INET6 if util.is_ipv6(address[0]) else socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise RuntimeError(f"{address[0]}:{address[1]} is already in use") from None
            raise
        finally:
            probe.close()


def post_fork(server, worker):
    # With reuse_port the kernel hashes new connections over every socket bound to the port, so a
    # worker that is still loading the app or connecting to RabbitMQ would hold its share waiting.
    # Its socket is opened in post_worker_init instead, once it is ready (as on a shared socket,
    # where a worker accepts only once it runs).
    if server.cfg.reuse_port:
        for listener in worker.sockets:
            listener.close()
        worker.sockets = []


def when_ready(server):
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(_server.metrics_port, addr=_server.metrics_host, registry=registry)
    server.log.info("metrics on http://%s:%d/metrics", _server.metrics_host, _server.metrics_port)


def post_worker_init(worker):
    # The app is loaded: what exists now lives as long as the worker. Frozen, it is no longer
    # scanned by every full garbage collection, which otherwise stalled all of the worker's
    # threads for ~30 ms each time (gc.freeze, as pre-fork servers use it).
    gc.freeze()
    # Accept requests only once this worker's broker connection is up, so a fresh
    # worker does not answer 503 beside a ready one. Bounded: with RabbitMQ down the
    # worker starts anyway, answers 503 and reports not ready until it connects.
    publisher = getattr(worker.wsgi, "extensions", {}).get("publisher")
    if publisher is not None and not publisher.wait_ready(_server.startup_broker_wait_seconds):
        worker.log.warning("RabbitMQ not reachable yet; serving (503 for submissions) while reconnecting")
    if worker.cfg.reuse_port:
        worker.sockets = sock.create_sockets(worker.cfg, worker.log)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
