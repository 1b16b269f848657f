"""The one backoff formula: job retries, reconnects to RabbitMQ."""

import random


def compute_backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try number `attempt` + 1: exponential from `base`, at most `cap`,
    with "equal jitter" (half fixed, half random) so that many waiters do not retry in step."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 64))  # the exponent bound keeps it a float
    return delay / 2 + random.uniform(0, delay / 2)


def reconnect_delay(failures: int) -> float:
    """Before reconnecting after `failures` failed connections in a row: 0.25 s doubling to 10 s."""
    return compute_backoff(failures + 1, base=0.25, cap=10.0)
