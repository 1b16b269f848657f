"""The RabbitMQ topology, declared identically by both apps.

    publish ──► exchange "jobs" ──(jobs)──► queue "jobs" ──► workers
                                              │ reject / delivery limit
                                              ▼
                exchange "jobs.dlx" ──(dead)──► queue "jobs.dead"   (inspect, replay)

    retry:  worker ──► exchange "jobs.delay" ──(tier)──► queue "jobs.delay.<ms>"
                   (message expires after its backoff) ──► exchange "jobs" ──► queue "jobs"

All queues are durable quorum queues. Dead-lettering uses the at-least-once
strategy, so a message moved to another queue is kept until that queue has it.
Backoff delays are grouped into tiers of doubling length, each a queue of its
own, so a short delay never waits behind a long one in the same queue.
"""

import math
from dataclasses import dataclass, field
from typing import Any

EXCHANGE = "jobs"
QUEUE = "jobs"
ROUTING_KEY = "jobs"

DEAD_LETTER_EXCHANGE = "jobs.dlx"
DEAD_LETTER_QUEUE = "jobs.dead"
DEAD_LETTER_ROUTING_KEY = "dead"

DELAY_EXCHANGE = "jobs.delay"
# 100 ms, 200 ms, ... about 55 minutes.
DELAY_TIERS_MS: tuple[int, ...] = tuple(100 * 2**k for k in range(16))

# The broker's own guard against a message that crashes every worker that takes
# it. Workers fail such a job themselves earlier (MAX_REDELIVERIES), recording why.
BROKER_DELIVERY_LIMIT = 50

_QUORUM = {"x-queue-type": "quorum"}
_AT_LEAST_ONCE_DLX = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str = "direct"


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


def delay_queue_name(tier_ms: int) -> str:
    return f"{DELAY_EXCHANGE}.{tier_ms}"


def delay_tier_ms(delay_seconds: float) -> int:
    """The delay queue for a backoff: the largest tier not longer than the delay."""
    delay_ms = max(delay_seconds * 1000, DELAY_TIERS_MS[0])
    index = min(int(math.log2(delay_ms / DELAY_TIERS_MS[0])), len(DELAY_TIERS_MS) - 1)
    return DELAY_TIERS_MS[index]


EXCHANGES: tuple[Exchange, ...] = (Exchange(EXCHANGE), Exchange(DEAD_LETTER_EXCHANGE), Exchange(DELAY_EXCHANGE))

QUEUES: tuple[Queue, ...] = (
    Queue(
        QUEUE,
        {
            **_QUORUM,
            **_AT_LEAST_ONCE_DLX,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": DEAD_LETTER_ROUTING_KEY,
            "x-delivery-limit": BROKER_DELIVERY_LIMIT,
        },
    ),
    Queue(DEAD_LETTER_QUEUE, dict(_QUORUM)),
    *(
        Queue(
            delay_queue_name(tier),
            {
                **_QUORUM,
                **_AT_LEAST_ONCE_DLX,
                "x-dead-letter-exchange": EXCHANGE,
                "x-dead-letter-routing-key": ROUTING_KEY,
            },
        )
        for tier in DELAY_TIERS_MS
    ),
)

BINDINGS: tuple[Binding, ...] = (
    Binding(EXCHANGE, QUEUE, ROUTING_KEY),
    Binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, DEAD_LETTER_ROUTING_KEY),
    *(Binding(DELAY_EXCHANGE, delay_queue_name(tier), str(tier)) for tier in DELAY_TIERS_MS),
)


def declare(channel) -> None:
    """Declare everything on a pika BlockingChannel (idempotent)."""
    for exchange in EXCHANGES:
        channel.exchange_declare(exchange.name, exchange_type=exchange.type, durable=True)
    for queue in QUEUES:
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    for binding in BINDINGS:
        channel.queue_bind(binding.queue, binding.exchange, routing_key=binding.routing_key)


def definitions(vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (for `load_definitions`)."""
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for e in EXCHANGES
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": q.arguments}
            for q in QUEUES
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": b.queue, "destination_type": "queue",
             "routing_key": b.routing_key, "arguments": {}}
            for b in BINDINGS
        ],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(definitions(), indent=2))
