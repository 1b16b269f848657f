"""The job types this worker runs: one decorated function each.

To add a job type: declare its payload schema in contract/jobs_contract/catalog.py,
then write its function here with @job("<name>"). It receives the validated
payload and a JobContext and returns a JSON-serialisable result; raising any
exception fails the attempt (retried with backoff, then dead-lettered).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs_contract import JOB_TYPES


@dataclass(frozen=True)
class JobContext:
    job_id: str
    attempt: int
    max_attempts: int


class JobFailed(Exception):
    """A job's own, expected failure."""


class JobTimeout(Exception):
    """The attempt ran past JOB_TIMEOUT_SECONDS (raised inside the handler's thread: re-raise it)."""


Handler = Callable[[dict[str, Any], JobContext], Any]
HANDLERS: dict[str, Handler] = {}


def job(name: str) -> Callable[[Handler], Handler]:
    if name not in JOB_TYPES:
        raise ValueError(f"job type {name!r} has no payload schema in jobs_contract.catalog")

    def register(handler: Handler) -> Handler:
        HANDLERS[name] = handler
        return handler

    return register


def check_catalog() -> None:
    missing = set(JOB_TYPES) - set(HANDLERS)
    if missing:
        raise RuntimeError(f"job types without a handler: {', '.join(sorted(missing))}")


@job("echo")
def echo(payload: dict[str, Any], ctx: JobContext) -> Any:
    return payload


@job("sleep")
def sleep(payload: dict[str, Any], ctx: JobContext) -> Any:
    seconds = float(payload["seconds"])
    deadline = time.monotonic() + seconds
    # Short naps, so a timeout (raised between bytecodes) interrupts promptly.
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, 0.05))
    return {"slept_seconds": seconds}


@job("cpu")
def cpu(payload: dict[str, Any], ctx: JobContext) -> Any:
    deadline = time.perf_counter() + payload["ms"] / 1000
    iterations = 0
    while time.perf_counter() < deadline:
        sum(i * i for i in range(1000))
        iterations += 1
    return {"ms": payload["ms"], "iterations": iterations}


@job("fail")
def fail(payload: dict[str, Any], ctx: JobContext) -> Any:
    raise JobFailed(payload.get("message", "this job always fails"))


@job("flaky")
def flaky(payload: dict[str, Any], ctx: JobContext) -> Any:
    if ctx.attempt <= payload["fail_times"]:
        raise JobFailed(f"failing attempt {ctx.attempt} of the first {payload['fail_times']}")
    return {"succeeded_on_attempt": ctx.attempt}
