"""gunicorn main-app as a real process for the abuse suite, with two clients' tokens."""

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import requests

from jobs_devtools.stack import ROOT, App, app_env, start_api

__all__ = ["ROOT", "Gunicorn", "start_gunicorn", "stop_gunicorn"]


@dataclass
class Gunicorn:
    app: App
    token: str
    other_token: str
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return self.app.url

    @property
    def metrics_url(self) -> str:
        return self.app.metrics_url

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def worker_pids(self) -> set[int]:
        """The gunicorn worker processes: a crashed worker is replaced under another pid."""
        return set(self.app.proc.children())

    def alive(self) -> bool:
        try:
            return self.app.proc.alive() and requests.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def output(self) -> str:
        return self.app.proc.output()


def start_gunicorn(rabbit_url: str, redis_url: str, log_dir: Path, **env: str) -> Gunicorn:
    token, other = "abuse-" + secrets.token_urlsafe(24), "other-" + secrets.token_urlsafe(24)
    app = start_api(app_env(rabbit_url, redis_url, API_TOKENS=f"{token},{other}", GUNICORN_WORKERS="2",
                            LOG_LEVEL="WARNING", **env), log_dir)
    # Readiness is per gunicorn worker (each has its own broker connection) and a fresh
    # connection may land on either: wait for a run of ready answers, so a worker whose
    # publisher is not connected yet does not answer the first test 503.
    app.wait_ready(timeout=30, streak=20, interval=0.05)
    return Gunicorn(app, token, other)


def stop_gunicorn(api: Gunicorn) -> None:
    api.app.stop()
