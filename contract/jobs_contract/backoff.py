"""The one backoff formula: job retries, reconnects to RabbitMQ."""

import random


def compute_backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try number `attempt` + 1: exponential from `base`, at most `cap`,
    with "equal jitter" (half fixed, half random) so that many waiters do not retry in step."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 64))  # the exponent bound keeps it a float
    return delay / 2 + random.uniform(0, delay / 2)


def reconnect_delay(failures: int, connected_before: bool = True) -> float:
    """Before reconnecting after `failures` failed connections in a row: 0.25 s doubling to 10 s.
    A process that has never connected waits at most 1 s: the broker is most likely still
    starting (deployed or booted together with the apps), and the process should be publishing
    or consuming within a second of it being up, not up to 10 s later."""
    return compute_backoff(failures + 1, base=0.25, cap=10.0 if connected_before else 1.0)
