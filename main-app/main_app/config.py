"""main-app configuration: every environment variable it reads is declared here (see the README
table), beside the ones both apps share (jobs_contract.settings)."""

import os
from dataclasses import dataclass
from typing import Any

from jobs_contract.env import ConfigError, declared_env, env, load
from jobs_contract.settings import LogSettings, SharedSettings


def read_tokens(name: str, default: tuple[str, ...], minimum: None = None) -> tuple[str, ...]:
    """Comma-separated tokens in `name`, plus one per line in the file `name`_FILE names."""
    tokens = [t.strip() for t in os.environ.get(name, "").split(",")]
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                tokens += [line.strip() for line in handle]
        except OSError as exc:
            raise ConfigError(f"{name}_FILE {path!r} cannot be read: {exc.strerror}") from None
    tokens = [t for t in tokens if t and not t.startswith("#")]
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise ConfigError("every API token must be at least 16 characters long")
    return tuple(dict.fromkeys(tokens))


@dataclass(frozen=True, kw_only=True)
class Settings(SharedSettings):
    """What the Flask app needs (create_app)."""

    api_tokens: tuple[str, ...] = env("API_TOKENS", (), read=read_tokens, also=("API_TOKENS_FILE",))
    auth_disabled: bool = env("AUTH_DISABLED", False)
    max_body_bytes: int = env("MAX_BODY_BYTES", 64 * 1024, minimum=1)
    publish_timeout_seconds: float = env("PUBLISH_TIMEOUT_SECONDS", 5.0, minimum=0.1)
    idempotency_ttl_seconds: int = env("IDEMPOTENCY_TTL_SECONDS", 86400, minimum=60)

    @classmethod
    def from_env(cls) -> "Settings":
        settings = load(cls)
        if not settings.api_tokens and not settings.auth_disabled:
            raise ConfigError(
                "no API tokens configured: set API_TOKENS (comma-separated) or API_TOKENS_FILE "
                "(one token per line), or AUTH_DISABLED=true to run without authentication"
            )
        return settings


@dataclass(frozen=True, kw_only=True)
class ServerSettings(LogSettings):
    """What gunicorn needs (gunicorn_conf.py): where to listen, how many workers, where metrics go."""

    http_host: str = env("HTTP_HOST", "0.0.0.0")
    http_port: int = env("HTTP_PORT", 8000)
    workers: int = env("GUNICORN_WORKERS", 2, minimum=1)
    threads: int = env("GUNICORN_THREADS", 32, minimum=1)
    graceful_timeout: int = env("GUNICORN_GRACEFUL_TIMEOUT", 30, minimum=1)
    reload: bool = env("GUNICORN_RELOAD", False)
    access_log: bool = env("ACCESS_LOG", False)
    metrics_host: str = env("METRICS_HOST", "0.0.0.0")
    metrics_port: int = env("METRICS_PORT", 9100)
    # Each gunicorn worker's metric samples; wiped at start.
    metrics_dir: str = env("PROMETHEUS_MULTIPROC_DIR", "/tmp/main-app-metrics")
    # How long a fresh gunicorn worker waits for its broker connection before serving.
    startup_broker_wait_seconds: int = env("STARTUP_BROKER_WAIT_SECONDS", 10, minimum=0)

    @classmethod
    def from_env(cls) -> "ServerSettings":
        return load(cls)


def environment() -> dict[str, Any]:
    """Every environment variable main-app reads, with its default."""
    return declared_env(Settings, ServerSettings)
