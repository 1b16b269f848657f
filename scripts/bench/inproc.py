"""CPU per part of a job submission, in one process, one request at a time: the Flask
test client's own cost (GET /healthz), a whole POST /jobs, the same without any I/O (a
publisher that answers at once; WSGI calls, no test client) beside a bare Flask view, the
store write, a confirmed publish through the publisher thread (with and without its
record), and a confirmed publish from the calling thread (a BlockingConnection, the naive
peer's way). process_time() counts every thread.

    .venv/bin/python scripts/bench/inproc.py
"""

import io
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from werkzeug.test import EnvironBuilder

from jobs_devtools.stack import PrivateStack


def timed(name: str, call, n: int = 2000) -> None:
    for _ in range(200):
        call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        call()
    print(f"{name:40s} CPU {(time.process_time() - cpu) / n * 1e6:7.1f} us   "
          f"wall {(time.perf_counter() - wall) / n * 1e6:7.1f} us", flush=True)


def wsgi_post(app, path: str, document: dict, headers: dict[str, str]):
    """A call of the app's WSGI callable with one POST, without the test client's own cost."""
    body = orjson.dumps(document)
    environ = EnvironBuilder(path=path, method="POST", data=body, content_type="application/json",
                             headers=headers).get_environ()

    def call() -> None:
        for _ in app.wsgi_app({**environ, "wsgi.input": io.BytesIO(body)}, lambda *_: None):
            pass

    return call


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jobs-inproc-") as work:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(Path(work) / "metrics"))
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(exist_ok=True)
        with PrivateStack(Path(work) / "nodes", f"jobs-inproc-{os.getpid()}") as stack:
            return measure(stack)


def measure(stack: PrivateStack) -> int:
    token = "inproc-token-0123456789"
    os.environ.update(RABBITMQ_URL=stack.rabbit.url, REDIS_URL=stack.redis.url, API_TOKENS=token)
    import pika
    from flask import Flask, Response, request

    from jobs_contract import JobMessage, topology
    from jobs_contract.store import NewJob, utcnow
    from main_app.api import create_app

    class AnswersAtOnce:
        ready = True

        def publish(self, *_args, **_kwargs):
            return None

    bare = Flask("bare")

    @bare.post("/jobs")
    def bare_submit():
        request.get_json(force=True)
        return Response(b'{"status":"queued"}', status=202, mimetype="application/json")

    app = create_app()
    publisher, store = app.extensions["publisher"], app.extensions["job_store"]
    try:
        publisher.wait_ready(10)
        client = app.test_client()
        no_io = create_app(store=store, publisher=AnswersAtOnce())
        blocking = pika.BlockingConnection(pika.URLParameters(stack.rabbit.url)).channel()
        blocking.confirm_delivery()
        headers = {"Authorization": f"Bearer {token}"}
        job = {"type": "echo", "payload": {"n": 1, "text": "hello"}}
        message = JobMessage(id=str(uuid.uuid4()), type="echo", payload=job["payload"], client="c",
                             created_at=utcnow())
        body, properties = message.encode()
        for _ in range(2):
            timed("GET /healthz (test client)", lambda: client.get("/healthz"))
            timed("POST /jobs", lambda: client.post("/jobs", json=job, headers=headers))
            timed("POST /jobs, no I/O (WSGI call)", wsgi_post(no_io, "/jobs", job, headers))
            timed("POST /jobs, bare Flask view (WSGI call)", wsgi_post(bare, "/jobs", job, headers))
            timed("store.create", lambda: store.create(str(uuid.uuid4()), "c", "echo", utcnow()))
            timed("publish + confirm (loop)", lambda: publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, body,
                                                                        properties, timeout=5))
            timed("record + publish + confirm (loop)", lambda: publisher.publish(
                topology.EXCHANGE, topology.ROUTING_KEY, body, properties, timeout=5,
                record=NewJob(str(uuid.uuid4()), "c", "echo", utcnow(), None, 25)))
            timed("publish + confirm (this thread)", lambda: blocking.basic_publish(
                topology.EXCHANGE, topology.ROUTING_KEY, body, properties, mandatory=True))
    finally:
        publisher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
