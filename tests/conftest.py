"""Fixtures: private RabbitMQ and Redis nodes, the apps as real processes, HTTP helpers."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from stack import RabbitNode, RedisNode, free_port, wait_for_port  # noqa: E402

from jobs_contract import topology  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jobs-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _check_servers() -> None:
    if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() or not shutil.which("redis-server"):
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
class Proc:
    """An app under test, run as a real process."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


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


def base_env(rabbit_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "REDIS_", "API_TOKENS"))}
    env.update({"RABBITMQ_URL": rabbit_url, "REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def wait_http(url: str, timeout: float = 30.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url, timeout=2).status_code
            if last == status:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    started: list[Proc] = []

    def start(rabbit_url: str, redis_url: str, wait_ready: bool = True, **env: str) -> Api:
        port, metrics_port = free_port(), free_port()
        defaults = {"API_TOKENS": f"{TOKEN},{OTHER_TOKEN}", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
                    "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port), "GUNICORN_WORKERS": "2",
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"prom-{port}")}
        proc_env = base_env(rabbit_url, redis_url, **{**defaults, **env})
        proc = Proc([str(BIN / "gunicorn"), "--config", "python:main_app.gunicorn_conf", "main_app.wsgi:app"],
                    proc_env, tmp_path / f"main-app-{port}.log").start()
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/readyz" if wait_ready else f"{url}/healthz")
        except TimeoutError:
            raise AssertionError(f"main-app did not start:\n{proc.output()}") from None
        return Api(url, f"http://127.0.0.1:{metrics_port}/metrics", proc)

    yield start
    for proc in started:
        proc.stop()


@dataclass
class WorkerProc:
    proc: Proc
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    started: list[Proc] = []

    def start(rabbit_url: str, redis_url: str, wait_ready: bool = True, **env: str) -> WorkerProc:
        port = free_port()
        defaults = {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(port), "RETRY_BACKOFF_BASE_SECONDS": "0.1",
                    "RETRY_BACKOFF_MAX_SECONDS": "1"}
        proc = Proc([sys.executable, "-m", "service_app"], base_env(rabbit_url, redis_url, **{**defaults, **env}),
                    tmp_path / f"service-app-{port}.log").start()
        started.append(proc)
        worker = WorkerProc(proc, port)
        if wait_ready:
            try:
                wait_http(f"{worker.url}/readyz")
            except TimeoutError:
                raise AssertionError(f"service-app did not start:\n{proc.output()}") from None
        return worker

    yield start
    for proc in started:
        proc.stop()


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


__all__ = ["Api", "OTHER_TOKEN", "TOKEN", "queue_depth", "wait_for_port"]
