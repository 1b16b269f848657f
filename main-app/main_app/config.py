"""main-app configuration, all from environment variables (see the README table)."""

import os
from dataclasses import dataclass

from jobs_contract.catalog import Limits
from jobs_contract.settings import ConfigError, env_bool, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    rabbitmq_url: str
    redis_url: str
    api_tokens: tuple[str, ...]
    auth_disabled: bool
    max_body_bytes: int
    publish_timeout_seconds: float
    job_ttl_seconds: int
    idempotency_ttl_seconds: int
    limits: Limits
    declare_topology: bool

    @classmethod
    def from_env(cls) -> "Settings":
        settings = cls(
            rabbitmq_url=env_str("RABBITMQ_URL", "amqp://localhost:5672/%2F"),
            redis_url=env_str("REDIS_URL", "redis://localhost:6379/0"),
            api_tokens=load_tokens(),
            auth_disabled=env_bool("AUTH_DISABLED", False),
            max_body_bytes=env_int("MAX_BODY_BYTES", 64 * 1024, minimum=1),
            publish_timeout_seconds=env_float("PUBLISH_TIMEOUT_SECONDS", 5.0, minimum=0.1),
            job_ttl_seconds=env_int("JOB_TTL_SECONDS", 7 * 86400, minimum=60),
            idempotency_ttl_seconds=env_int("IDEMPOTENCY_TTL_SECONDS", 86400, minimum=60),
            limits=Limits.from_env(),
            declare_topology=env_bool("DECLARE_TOPOLOGY", True),
        )
        if not settings.api_tokens and not settings.auth_disabled:
            raise ConfigError(
                "no API tokens configured: set API_TOKENS (comma-separated) or API_TOKENS_FILE "
                "(one token per line), or AUTH_DISABLED=true to run without authentication"
            )
        return settings


def load_tokens() -> tuple[str, ...]:
    tokens = [t.strip() for t in os.environ.get("API_TOKENS", "").split(",")]
    path = os.environ.get("API_TOKENS_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                tokens += [line.strip() for line in handle]
        except OSError as exc:
            raise ConfigError(f"API_TOKENS_FILE {path!r} cannot be read: {exc.strerror}") from None
    tokens = [t for t in tokens if t and not t.startswith("#")]
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise ConfigError("every API token must be at least 16 characters long")
    return tuple(dict.fromkeys(tokens))
