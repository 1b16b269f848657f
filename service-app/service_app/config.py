"""service-app configuration: every environment variable it reads is declared here (see the README
table), beside the ones both apps share (jobs_contract.settings)."""

import os
from dataclasses import dataclass
from typing import Any

from jobs_contract import topology
from jobs_contract.env import ConfigError, declared_env, env, env_int, load
from jobs_contract.settings import SharedSettings


@dataclass(frozen=True, kw_only=True)
class Settings(SharedSettings):
    concurrency: int = env("WORKER_CONCURRENCY", 4, minimum=1)
    # 4 x concurrency, as Celery: a quorum queue settles each ack through Raft, and fewer in
    # flight leave job threads waiting for deliveries (make bench: 1.29x jobs/s over 2 x).
    prefetch: int = env("WORKER_PREFETCH", lambda read: 4 * read["concurrency"], minimum=1, read=env_int)
    max_attempts: int = env("MAX_ATTEMPTS", 5, minimum=1)
    retry_backoff_base_seconds: float = env("RETRY_BACKOFF_BASE_SECONDS", 1.0, minimum=0.0)
    retry_backoff_max_seconds: float = env("RETRY_BACKOFF_MAX_SECONDS", 300.0, minimum=0.0)
    job_timeout_seconds: float = env("JOB_TIMEOUT_SECONDS", 600.0, minimum=0.01)
    shutdown_grace_seconds: float = env("SHUTDOWN_GRACE_SECONDS", 25.0, minimum=0.0)
    max_redeliveries: int = env("MAX_REDELIVERIES", 20, minimum=1)
    metrics_host: str = env("METRICS_HOST", "0.0.0.0")
    metrics_port: int = env("METRICS_PORT", 9101, minimum=0)

    @classmethod
    def from_env(cls) -> "Settings":
        settings = load(cls)
        if settings.max_redeliveries >= topology.BROKER_DELIVERY_LIMIT:
            raise ConfigError(f"MAX_REDELIVERIES must be below the queue's delivery limit "
                              f"({topology.BROKER_DELIVERY_LIMIT}), or the broker dead-letters first "
                              f"and the job never gets a final status")
        if settings.prefetch < settings.concurrency:
            raise ConfigError("WORKER_PREFETCH must be at least WORKER_CONCURRENCY, or threads sit idle")
        return settings


def environment() -> dict[str, Any]:
    """Every environment variable service-app reads, with its default."""
    return declared_env(Settings)


def ignore_multiprocess_metrics_dir() -> None:
    """service-app is one process with a plain metrics registry. An inherited
    PROMETHEUS_MULTIPROC_DIR (meant for main-app's gunicorn, e.g. from a shared ConfigMap or
    env file) would switch prometheus_client to multiprocess files in a directory main-app
    wipes at start: drop it before prometheus_client is imported."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
