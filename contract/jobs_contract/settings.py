"""The settings both apps read, declared once (env.py says how fields are declared and read).

Each app's own settings extend SharedSettings in its config module, the one place that
app declares its environment variables.
"""

from dataclasses import dataclass

from jobs_contract.catalog import Limits
from jobs_contract.env import ConfigError, env, env_bool, env_float, env_int, env_str, load, nested

__all__ = ["ConfigError", "LogSettings", "SharedSettings", "env_bool", "env_float", "env_int", "env_str",
           "log_level_from_env"]


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    log_level: str = env("LOG_LEVEL", "INFO")


@dataclass(frozen=True, kw_only=True)
class SharedSettings(LogSettings):
    rabbitmq_url: str = env("RABBITMQ_URL", "amqp://localhost:5672/%2F")  # credentials in it; one user per app
    redis_url: str = env("REDIS_URL", "redis://localhost:6379/0")
    job_ttl_seconds: int = env("JOB_TTL_SECONDS", 7 * 86400, minimum=60)
    declare_topology: bool = env("DECLARE_TOPOLOGY", True)
    limits: Limits = nested(Limits)


def log_level_from_env() -> str:
    """LOG_LEVEL alone, read before the rest, so that a configuration error is logged as configured."""
    return load(LogSettings).log_level
