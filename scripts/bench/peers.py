"""Peers for `make bench`: the same job (an echo) through Celery, Dramatiq and a naive
confirmed-publish endpoint, on the bench's private RabbitMQ and Redis nodes.

Runs from its own venv (.tools/bench-peers, scripts/bench/requirements-peers.txt); the bench
starts each piece with jobs_devtools.stack and RABBITMQ_URL / REDIS_URL in the environment:

- producers, each a Flask app whose POST /jobs answers 202 once the broker confirmed the
  message, under gunicorn with main_app.gunicorn_conf (the very config main-app runs with):
  `peers:celery_api` (`confirm_publish`, quorum queue `peer-celery`), `peers:dramatiq_api`
  (`confirm_delivery=True`, queue `peer-dramatiq`, which Dramatiq declares as a classic durable
  queue) and `peers:naive_api` (a pika BlockingConnection per thread, one confirmed persistent
  publish per request to main-app's `jobs` exchange, nothing stored);
- workers: `celery -A peers:celery_app worker` (`acks_late`, `task_track_started`, results in
  Redis db 1) and `dramatiq peers` (the Redis results backend, db 2).

`python peers.py prefill celery|dramatiq N` puts N echo tasks on a peer's queue for the worker
measurement (without confirms: the pre-fill is not measured).
"""

from __future__ import annotations

import os
import sys
import threading
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pika
from celery import Celery
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from flask import Flask, Response, request

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFILL = os.environ.get("BENCH_PEER_PREFILL") == "1"
CELERY_QUEUE = "peer-celery"
DRAMATIQ_QUEUE = "peer-dramatiq"
CELERY_RESULTS_DB = 1
DRAMATIQ_RESULTS_DB = 2
PAYLOAD = {"n": 1, "text": "hello"}


def redis_db(db: int) -> str:
    parts = urlsplit(REDIS_URL)
    return urlunsplit(parts._replace(path=f"/{db}"))


# ---------------------------------------------------------------- Celery

celery_app = Celery("peers", broker=RABBITMQ_URL, backend=redis_db(CELERY_RESULTS_DB))
celery_app.conf.update(
    broker_transport_options={"confirm_publish": not PREFILL},
    broker_connection_retry_on_startup=True,
    task_default_queue=CELERY_QUEUE,
    task_default_queue_type="quorum",
    worker_detect_quorum_queues=True,
    task_acks_late=True,
    task_track_started=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_send_task_events=False,
)


@celery_app.task(name="echo")
def celery_echo(payload: dict) -> dict:
    return payload


# ---------------------------------------------------------------- Dramatiq

dramatiq_broker = RabbitmqBroker(url=RABBITMQ_URL, confirm_delivery=not PREFILL)
dramatiq_broker.add_middleware(Results(backend=RedisBackend(url=redis_db(DRAMATIQ_RESULTS_DB))))
dramatiq.set_broker(dramatiq_broker)


@dramatiq.actor(actor_name="echo", queue_name=DRAMATIQ_QUEUE, store_results=True, max_retries=0)
def dramatiq_echo(payload: dict) -> dict:
    return payload


# ---------------------------------------------------------------- the producers' HTTP apps

_ACCEPTED = b'{"status":"queued"}'


def _http_app(name: str, submit) -> Flask:
    app = Flask(name)

    @app.post("/jobs")
    def post_job() -> Response:
        submit(request.get_json(force=True))
        return Response(_ACCEPTED, status=202, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return app


celery_api = _http_app("peer_celery", lambda job: celery_echo.apply_async(args=[job.get("payload")]))
dramatiq_api = _http_app("peer_dramatiq", lambda job: dramatiq_echo.send(job.get("payload")))

_local = threading.local()
_PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


def _naive_publish(_job: dict) -> None:
    channel = getattr(_local, "channel", None)
    if channel is None or channel.is_closed:
        channel = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL)).channel()
        channel.confirm_delivery()
        _local.channel = channel
    # main-app's exchange and routing key (jobs_contract.topology); raises if not confirmed.
    channel.basic_publish("jobs", "jobs", request.get_data(), _PERSISTENT, mandatory=True)


naive_api = _http_app("peer_naive", _naive_publish)


# ---------------------------------------------------------------- pre-fill


def prefill(peer: str, count: int) -> None:
    if peer == "celery":
        with celery_app.producer_or_acquire() as producer:
            for _ in range(count):
                celery_echo.apply_async(args=[PAYLOAD], producer=producer)
    elif peer == "dramatiq":
        for _ in range(count):
            dramatiq_echo.send(PAYLOAD)
    else:
        raise SystemExit(f"unknown peer {peer!r}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "prefill":
        raise SystemExit("usage: BENCH_PEER_PREFILL=1 python peers.py prefill celery|dramatiq N")
    prefill(sys.argv[2], int(sys.argv[3]))
