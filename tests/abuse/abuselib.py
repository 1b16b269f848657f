"""gunicorn main-app as a real process for the abuse suite, with two clients' tokens."""

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from stack import free_port  # noqa: E402


@dataclass
class Gunicorn:
    url: str
    metrics_url: str
    token: str
    other_token: str
    process: subprocess.Popen
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def worker_pids(self) -> set[int]:
        """The gunicorn worker processes: a crashed worker is replaced under another pid."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return {int(pid) for pid in children}

    def alive(self) -> bool:
        try:
            return self.process.poll() is None and \
                requests.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gunicorn(rabbit_url: str, redis_url: str, log_dir: Path, **env: str) -> Gunicorn:
    port, metrics_port = free_port(), free_port()
    token, other = "abuse-" + secrets.token_urlsafe(24), "other-" + secrets.token_urlsafe(24)
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "REDIS_", "API_TOKENS"))}
    proc_env.update({
        "RABBITMQ_URL": rabbit_url, "REDIS_URL": redis_url, "API_TOKENS": f"{token},{other}",
        "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port), "GUNICORN_WORKERS": "2", "LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"prom-{port}"), "PYTHONUNBUFFERED": "1", **env,
    })
    log_path = log_dir / f"main-app-{port}.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "--config", "python:main_app.gunicorn_conf",
         "main_app.wsgi:app"],
        env=proc_env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    # Readiness is per gunicorn worker (each has its own broker connection) and a fresh
    # connection may land on either: wait for a run of ready answers, so a worker whose
    # publisher is not connected yet does not answer the first test 503.
    deadline = time.monotonic() + 30
    streak = 0
    while time.monotonic() < deadline:
        try:
            streak = streak + 1 if requests.get(f"{url}/readyz", timeout=2).status_code == 200 else 0
        except requests.RequestException:
            streak = 0
        if streak >= 20:
            return Gunicorn(url, f"http://127.0.0.1:{metrics_port}/metrics", token, other, process, log_path)
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"main-app did not become ready:\n{log_path.read_text(errors='replace')}")


def stop_gunicorn(api: Gunicorn) -> None:
    if api.process.poll() is None:
        api.process.terminate()
        try:
            api.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(api.process.pid, signal.SIGKILL)
            api.process.wait(10)
