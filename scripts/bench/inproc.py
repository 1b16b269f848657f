"""CPU per part of a job submission, in one process, one request at a time: the Flask
test client's own cost (GET /healthz), a whole POST /jobs, the store write, and a
confirmed publish through the publisher thread. process_time() counts every thread.

    .venv/bin/python scripts/bench/inproc.py
"""

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from jobs_devtools.stack import PrivateStack


def timed(name: str, call, n: int = 2000) -> None:
    for _ in range(200):
        call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        call()
    print(f"{name:30s} CPU {(time.process_time() - cpu) / n * 1e6:7.1f} us   "
          f"wall {(time.perf_counter() - wall) / n * 1e6:7.1f} us", flush=True)


def main() -> int:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="jobs-inproc-metrics-"))
    with PrivateStack(Path(tempfile.mkdtemp(prefix="jobs-inproc-")), f"jobs-inproc-{os.getpid()}") as stack:
        return measure(stack)


def measure(stack: PrivateStack) -> int:
    token = "inproc-token-0123456789"
    os.environ.update(RABBITMQ_URL=stack.rabbit.url, REDIS_URL=stack.redis.url, API_TOKENS=token)
    from jobs_contract import JobMessage, topology
    from jobs_contract.store import utcnow
    from main_app.api import create_app

    app = create_app()
    publisher, store = app.extensions["publisher"], app.extensions["job_store"]
    try:
        publisher.wait_ready(10)
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        job = {"type": "echo", "payload": {"n": 1, "text": "hello"}}
        message = JobMessage(id=str(uuid.uuid4()), type="echo", payload=job["payload"], client="c",
                             created_at=utcnow())
        body, properties = message.encode()
        for _ in range(2):
            timed("GET /healthz (test client)", lambda: client.get("/healthz"))
            timed("POST /jobs", lambda: client.post("/jobs", json=job, headers=headers))
            timed("store.create", lambda: store.create(str(uuid.uuid4()), "c", "echo", utcnow()))
            timed("publish + confirm", lambda: publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, body,
                                                                 properties, timeout=5))
    finally:
        publisher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
