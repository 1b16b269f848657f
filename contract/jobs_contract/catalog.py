"""Job types and the JSON Schemas of their payloads.

main-app validates requests against these schemas; service-app validates each
message again before running it and implements each type with one decorated
function (see service_app/jobs.py). A new job type is one entry here plus its
handler there; service-app refuses to start if the two disagree.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from jobs_contract.env import env, load


@dataclass(frozen=True)
class Limits:
    """Upper bounds on payload values that would otherwise tie up workers."""

    max_sleep_seconds: int = env("JOB_MAX_SLEEP_SECONDS", 300, minimum=0)
    max_cpu_ms: int = env("JOB_MAX_CPU_MS", 60_000, minimum=0)
    max_fail_times: int = env("JOB_MAX_FAIL_TIMES", 20, minimum=0)

    @classmethod
    def from_env(cls) -> "Limits":
        return load(cls)


def payload_schemas(limits: Limits) -> dict[str, dict[str, Any]]:
    return {
        "echo": {"type": "object", "description": "Succeeds with the payload as its result."},
        "sleep": {
            "type": "object",
            "description": "Sleeps for `seconds`.",
            "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": limits.max_sleep_seconds}},
            "required": ["seconds"],
            "additionalProperties": False,
        },
        "cpu": {
            "type": "object",
            "description": "Burns CPU for about `ms` milliseconds.",
            "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": limits.max_cpu_ms}},
            "required": ["ms"],
            "additionalProperties": False,
        },
        "fail": {
            "type": "object",
            "description": "Always raises; ends `failed` after the last attempt.",
            "properties": {"message": {"type": "string", "maxLength": 1000}},
            "additionalProperties": False,
        },
        "flaky": {
            "type": "object",
            "description": "Fails its first `fail_times` attempts, then succeeds.",
            "properties": {"fail_times": {"type": "integer", "minimum": 0, "maximum": limits.max_fail_times}},
            "required": ["fail_times"],
            "additionalProperties": False,
        },
    }


JOB_TYPES: tuple[str, ...] = tuple(payload_schemas(Limits()))

# orjson reads JSON nested up to 1,024 levels but writes at most 254 (its recursion limit),
# so a deeper request could be read but its job message never written: refuse it here.
MAX_NESTING = 254


def nested_deeper_than(document: Any, limit: int) -> bool:
    """Whether arrays and objects in document nest more than limit levels (document = level 1).
    Iterative: Python's recursion limit is below the 1,024 levels orjson reads."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def request_schema(limits: Limits) -> dict[str, Any]:
    """Schema of the body of POST /jobs (also used in the OpenAPI document)."""
    return {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": list(JOB_TYPES)},
            "payload": {"type": "object", "default": {}},
        },
        "required": ["type"],
        "additionalProperties": False,
        "oneOf": [
            {
                "properties": {"type": {"const": name}, "payload": schema},
                # A payload with required fields cannot be left out (it would default to {}).
                "required": ["type", "payload"] if schema.get("required") else ["type"],
                "title": name,
            }
            for name, schema in payload_schemas(limits).items()
        ],
    }


class ValidationFailed(ValueError):
    """A job request or payload does not match the contract."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestValidator:
    """Validates job requests: the envelope first, then the payload of its type."""

    _ENVELOPE = {
        "type": "object",
        "properties": {"type": {"type": "string"}, "payload": {"type": "object"}},
        "required": ["type"],
        "additionalProperties": False,
    }

    def __init__(self, limits: Limits):
        self.limits = limits
        self._envelope = Draft202012Validator(self._ENVELOPE)
        schemas = payload_schemas(limits)
        self._payloads = {name: Draft202012Validator(s) for name, s in schemas.items()}
        # Fast paths: a plain-Python check per schema that only ever answers "certainly
        # valid" (jsonschema costs ~100 us per request); anything else goes to jsonschema,
        # which decides and writes the error.
        self._envelope_ok = compile_check(self._ENVELOPE)
        self._payload_ok = {name: compile_check(s) for name, s in schemas.items()}

    def validate(self, document: Any) -> tuple[str, dict[str, Any]]:
        """Return (type, payload) or raise ValidationFailed naming the offending field."""
        if not self._envelope_ok(document):
            _raise_first(self._envelope, document, prefix="")
        if isinstance(document.get("payload"), dict) and nested_deeper_than(document, MAX_NESTING):
            raise ValidationFailed("/payload", f"nested deeper than {MAX_NESTING} levels")
        job_type = document["type"]
        validator = self._payloads.get(job_type)
        if validator is None:
            raise ValidationFailed("/type", f"unknown job type {job_type!r}; known types: {', '.join(JOB_TYPES)}")
        payload = document.get("payload", {})
        if not self._payload_ok[job_type](payload):
            _raise_first(validator, payload, prefix="/payload")
        return job_type, payload

    def validate_payload(self, job_type: str, payload: Any) -> None:
        self.validate({"type": job_type, "payload": payload})


_ANNOTATIONS = frozenset({"description", "title", "default", "examples"})


def _never(_instance: Any) -> bool:
    return False


def compile_check(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """A predicate that returns True only for instances the JSON Schema certainly accepts.

    It covers the keywords the catalog uses, with the exact JSON Schema semantics for the
    inputs it says yes to, and says no (meaning: ask jsonschema) to anything else: unknown
    keywords, floats where an integer is required, booleans where a number is.
    """
    checks: list[Callable[[Any], bool]] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "type":
            kind = {"object": dict, "string": str, "integer": int, "number": (int, float)}.get(value)
            if kind is None:
                return _never
            # bool is an int in Python but not a number in JSON Schema; int subclasses never come from JSON.
            checks.append(lambda x, kind=kind: isinstance(x, kind) and x is not True and x is not False)
        elif keyword == "properties":
            sub = {name: compile_check(s) for name, s in value.items()}
            checks.append(lambda x, sub=sub: not isinstance(x, dict) or all(
                check(x[name]) for name, check in sub.items() if name in x))
        elif keyword == "required":
            names = tuple(value)
            checks.append(lambda x, names=names: not isinstance(x, dict) or all(n in x for n in names))
        elif keyword == "additionalProperties" and value is False:
            allowed = frozenset(schema.get("properties", ()))
            checks.append(lambda x, allowed=allowed: not isinstance(x, dict) or allowed.issuperset(x))
        elif keyword in ("minimum", "maximum") and type(value) in (int, float):
            if keyword == "minimum":
                checks.append(lambda x, v=value: type(x) not in (int, float) or x >= v)
            else:
                checks.append(lambda x, v=value: type(x) not in (int, float) or x <= v)
        elif keyword == "maxLength" and type(value) is int:
            checks.append(lambda x, v=value: not isinstance(x, str) or len(x) <= v)
        else:
            return _never
    return lambda instance: all(check(instance) for check in checks)


def _raise_first(validator: Draft202012Validator, instance: Any, prefix: str) -> None:
    error = next(iter(validator.iter_errors(instance)), None)
    if error is None:
        return
    path = "".join(f"/{part}" for part in error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        path = f"{path}/{missing}"
    elif error.validator == "additionalProperties":
        extra = error.message.split("'")[1] if "'" in error.message else ""
        path = f"{path}/{extra}"
    raise ValidationFailed(prefix + path or "/", error.message[:300])
