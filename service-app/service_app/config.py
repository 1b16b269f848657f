"""service-app configuration, all from environment variables (see the README table)."""

from dataclasses import dataclass

from jobs_contract import topology
from jobs_contract.catalog import Limits
from jobs_contract.settings import ConfigError, env_bool, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    rabbitmq_url: str
    redis_url: str
    concurrency: int
    prefetch: int
    max_attempts: int
    retry_backoff_base_seconds: float
    retry_backoff_max_seconds: float
    job_timeout_seconds: float
    shutdown_grace_seconds: float
    max_redeliveries: int
    job_ttl_seconds: int
    metrics_host: str
    metrics_port: int
    declare_topology: bool
    limits: Limits

    @classmethod
    def from_env(cls) -> "Settings":
        concurrency = env_int("WORKER_CONCURRENCY", 4, minimum=1)
        settings = cls(
            rabbitmq_url=env_str("RABBITMQ_URL", "amqp://localhost:5672/%2F"),
            redis_url=env_str("REDIS_URL", "redis://localhost:6379/0"),
            concurrency=concurrency,
            prefetch=env_int("WORKER_PREFETCH", 2 * concurrency, minimum=1),
            max_attempts=env_int("MAX_ATTEMPTS", 5, minimum=1),
            retry_backoff_base_seconds=env_float("RETRY_BACKOFF_BASE_SECONDS", 1.0, minimum=0.0),
            retry_backoff_max_seconds=env_float("RETRY_BACKOFF_MAX_SECONDS", 300.0, minimum=0.0),
            job_timeout_seconds=env_float("JOB_TIMEOUT_SECONDS", 600.0, minimum=0.01),
            shutdown_grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 25.0, minimum=0.0),
            max_redeliveries=env_int("MAX_REDELIVERIES", 20, minimum=1),
            job_ttl_seconds=env_int("JOB_TTL_SECONDS", 7 * 86400, minimum=60),
            metrics_host=env_str("METRICS_HOST", "0.0.0.0"),
            metrics_port=env_int("METRICS_PORT", 9101, minimum=0),
            declare_topology=env_bool("DECLARE_TOPOLOGY", True),
            limits=Limits.from_env(),
        )
        if settings.max_redeliveries >= topology.BROKER_DELIVERY_LIMIT:
            raise ConfigError(f"MAX_REDELIVERIES must be below the queue's delivery limit "
                              f"({topology.BROKER_DELIVERY_LIMIT}), or the broker dead-letters first "
                              f"and the job never gets a final status")
        if settings.prefetch < settings.concurrency:
            raise ConfigError("WORKER_PREFETCH must be at least WORKER_CONCURRENCY, or threads sit idle")
        return settings
