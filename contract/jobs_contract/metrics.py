"""Labelled Prometheus metric children, looked up once.

metric.labels(...) takes a lock and validates its arguments on every call; the label sets
of both apps are few and bounded (routes, methods, statuses, job types, outcomes, reasons),
so each child is made once and remembered. Works with any prometheus_client metric.
"""

from typing import Any

_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """metric.labels(*labels), remembered."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found
