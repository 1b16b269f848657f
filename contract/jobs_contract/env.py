"""Settings read from the environment, declared as dataclass fields.

A settings class declares each variable once, on its field:

    @dataclass(frozen=True, kw_only=True)
    class Settings:
        port: int = env("HTTP_PORT", 8000, minimum=1)
        limits: Limits = nested(Limits)

load(Settings) reads them (errors name the variable) and declared_env(Settings) lists them,
with their defaults, for whoever checks a deployment's environment against the code.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

_ENV = "jobs_contract.env"
_NESTED = "jobs_contract.nested"


class ConfigError(ValueError):
    """A configuration variable is missing or malformed."""


def env_str(name: str, default: str, minimum: None = None) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    return _env_number(name, default, minimum, int, "an integer")


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    return _env_number(name, default, minimum, float, "a number")


def _env_number(name, default, minimum, parse, kind):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool, minimum: None = None) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


_READERS: dict[type, Callable[..., Any]] = {str: env_str, int: env_int, float: env_float, bool: env_bool}


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str
    default: Any  # or a function of the values read before it
    read: Callable[[str, Any, Any], Any]  # read(name, default, minimum)
    minimum: float | None = None
    also: tuple[str, ...] = ()  # further variables `read` takes into account


def env(name: str, default: Any, *, minimum: float | None = None, read: Callable[..., Any] | None = None,
        also: tuple[str, ...] = ()) -> Any:
    """A field read from the environment variable `name`. `default` may be a function of the
    fields read before it (the field then has no default of its own); `read` defaults to the
    reader for the default's type."""
    var = EnvVar(name, default, read or _READERS[type(default)], minimum, also)
    if callable(default):
        return dataclasses.field(metadata={_ENV: var})
    return dataclasses.field(default=default, metadata={_ENV: var})


def nested(cls: type) -> Any:
    """A field that is a settings class of its own, read with it."""
    return dataclasses.field(default_factory=cls, metadata={_NESTED: cls})


def load(cls: type) -> Any:
    """An instance of the settings class cls, every declared field read from the environment."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if _NESTED in field.metadata:
            values[field.name] = load(field.metadata[_NESTED])
        elif _ENV in field.metadata:
            var: EnvVar = field.metadata[_ENV]
            default = var.default(values) if callable(var.default) else var.default
            values[field.name] = var.read(var.name, default, var.minimum)
    return cls(**values)


def declared_env(*classes: type) -> dict[str, Any]:
    """{NAME: default} for every environment variable the settings classes read (a default that
    depends on other fields, and a variable read alongside another, as None)."""
    found: dict[str, Any] = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            if _NESTED in field.metadata:
                found.update(declared_env(field.metadata[_NESTED]))
            elif _ENV in field.metadata:
                var: EnvVar = field.metadata[_ENV]
                found[var.name] = None if callable(var.default) else var.default
                found.update(dict.fromkeys(var.also))
    return found
