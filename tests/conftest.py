"""Fixtures: private RabbitMQ and Redis nodes, the apps as real processes, HTTP helpers."""

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest
import redis
import requests

from jobs_contract import topology
from jobs_devtools import stack
from jobs_devtools.stack import App, Proc, RabbitNode, RedisNode, app_env, free_port, servers_installed

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jobs-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _check_servers() -> None:
    if not servers_installed():
        pytest.exit("RabbitMQ and Redis servers are required: run `make services-deps`", returncode=2)


@pytest.fixture(scope="session")
def rabbit(tmp_root: Path) -> Iterator[RabbitNode]:
    _check_servers()
    node = RabbitNode(tmp_root / "rabbitmq", name=f"jobs-test-{os.getpid()}")
    node.start()
    yield node
    node.kill()  # its data is thrown away: no need for a graceful stop


@pytest.fixture(scope="session")
def redis_node(tmp_root: Path) -> Iterator[RedisNode]:
    _check_servers()
    node = RedisNode(tmp_root / "redis")
    node.start()
    yield node
    node.stop()


@pytest.fixture
def redis_client(redis_node: RedisNode) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_node.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def amqp(rabbit: RabbitNode) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the test broker; the job queues start empty for each test."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    channel = connection.channel()
    topology.declare(channel)
    for queue in topology.QUEUES:
        channel.queue_purge(queue.name)
    yield channel
    if connection.is_open:
        connection.close()


def queue_depth(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


@dataclass
class Api:
    url: str
    metrics_url: str
    proc: Proc
    token: str = TOKEN
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}", **extra}

    def submit(self, job_type: str, payload: dict | None = None, **kwargs) -> requests.Response:
        body = {"type": job_type} if payload is None else {"type": job_type, "payload": payload}
        return self.session.post(f"{self.url}/jobs", json=body, headers=self.headers(), timeout=10, **kwargs)

    def get(self, job_id: str, token: str | None = None) -> requests.Response:
        return self.session.get(f"{self.url}/jobs/{job_id}", headers=self.headers(token), timeout=10)

    def wait_final(self, job_id: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = self.get(job_id).json()
            if job.get("status") in {"succeeded", "failed"}:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not final after {timeout}s: {job}")


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    started: list[App] = []

    def start(rabbit_url: str, redis_url: str, wait_ready: bool = True, **env: str) -> Api:
        app = stack.start_api(app_env(rabbit_url, redis_url, **{"API_TOKENS": f"{TOKEN},{OTHER_TOKEN}",
                                                             "GUNICORN_WORKERS": "2", **env}), tmp_path)
        started.append(app)
        app.wait_ready("/readyz" if wait_ready else "/healthz")
        return Api(app.url, app.metrics_url, app.proc)

    yield start
    for app in started:
        app.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., App]]:
    started: list[App] = []

    def start(rabbit_url: str, redis_url: str, wait_ready: bool = True, **env: str) -> App:
        worker = stack.start_worker(app_env(rabbit_url, redis_url, **{"RETRY_BACKOFF_BASE_SECONDS": "0.1",
                                                                  "RETRY_BACKOFF_MAX_SECONDS": "1", **env}), tmp_path)
        started.append(worker)
        return worker.wait_ready() if wait_ready else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def private_rabbit(tmp_path: Path) -> Iterator[RabbitNode]:
    """A broker of the test's own, for tests that kill or restart it."""
    node = RabbitNode(tmp_path / "rabbitmq-own", name=f"jobs-own-{os.getpid()}-{free_port()}")
    node.start()
    yield node
    node.kill()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisNode]:
    node = RedisNode(tmp_path / "redis-own")
    node.start()
    yield node
    node.stop()


