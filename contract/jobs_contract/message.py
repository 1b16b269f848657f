"""The job message on the wire: a JSON body plus AMQP properties and headers."""

import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson
import pika

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"

HEADER_SCHEMA_VERSION = "x-schema-version"
HEADER_ATTEMPT = "x-job-attempt"
HEADER_ENQUEUED_AT = "x-enqueued-at"
# Set by RabbitMQ on quorum queues each time a message is redelivered.
HEADER_DELIVERY_COUNT = "x-delivery-count"


class DeadLetterReason(StrEnum):
    """Why a message went to the dead-letter queue (the label of jobs_worker_dead_lettered_total)."""

    MAX_ATTEMPTS = "max_attempts"  # the job failed its last attempt
    REDELIVERY_LIMIT = "redelivery_limit"  # delivered too often without an outcome (a crash loop)
    UNPARSEABLE = "unparseable"  # the body is not a JSON object
    MALFORMED = "malformed"  # a field is missing or of the wrong type
    SCHEMA_VERSION = "schema_version"  # written by a newer contract
    UNKNOWN_TYPE = "unknown_type"  # no handler for the job type
    INVALID_PAYLOAD = "invalid_payload"  # the payload fails the type's schema


class PoisonMessage(ValueError):
    """A message that can never be processed: it goes straight to the dead-letter queue."""

    def __init__(self, reason: DeadLetterReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class JobMessage:
    id: str
    type: str
    payload: dict[str, Any]
    client: str
    created_at: str
    attempt: int = 1
    # When the job first entered the queue (epoch seconds); kept across retries
    # so end-to-end latency covers the whole life of the job.
    enqueued_at: float = field(default_factory=time.time)
    delivery_count: int = 0
    # Whether the broker delivered this message before (AMQP's redelivered flag); set by the
    # consumer, not part of the encoded message.
    redelivered: bool = False

    def encode(self) -> tuple[bytes, pika.BasicProperties]:
        body = orjson.dumps(
            {
                "v": SCHEMA_VERSION,
                "id": self.id,
                "type": self.type,
                "payload": self.payload,
                "client": self.client,
                "created_at": self.created_at,
            }
        )
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=self.id,
            type=self.type,
            timestamp=int(self.enqueued_at),
            headers={
                HEADER_SCHEMA_VERSION: SCHEMA_VERSION,
                HEADER_ATTEMPT: self.attempt,
                HEADER_ENQUEUED_AT: repr(self.enqueued_at),
            },
        )
        return body, properties

    def next_attempt(self) -> "JobMessage":
        return replace(self, attempt=self.attempt + 1, delivery_count=0, redelivered=False)

    @classmethod
    def decode(cls, body: bytes, properties: pika.BasicProperties) -> "JobMessage":
        """Parse a delivered message; raise PoisonMessage if it can never be processed."""
        headers = properties.headers or {}
        version = headers.get(HEADER_SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PoisonMessage(DeadLetterReason.SCHEMA_VERSION, f"unsupported schema version {version!r}")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise PoisonMessage(DeadLetterReason.UNPARSEABLE, str(exc)) from None
        if not isinstance(document, dict):
            raise PoisonMessage(DeadLetterReason.UNPARSEABLE, "body is not a JSON object")
        try:
            job = cls(
                id=_str(document, "id"),
                type=_str(document, "type"),
                payload=document["payload"],
                client=_str(document, "client"),
                created_at=_str(document, "created_at"),
                attempt=int(headers.get(HEADER_ATTEMPT, 1)),
                enqueued_at=float(headers.get(HEADER_ENQUEUED_AT, properties.timestamp or time.time())),
                delivery_count=int(headers.get(HEADER_DELIVERY_COUNT, 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PoisonMessage(DeadLetterReason.MALFORMED, f"bad or missing field: {exc}") from None
        if not isinstance(job.payload, dict):
            raise PoisonMessage(DeadLetterReason.MALFORMED, "payload is not a JSON object")
        if document.get("v") != SCHEMA_VERSION:
            raise PoisonMessage(DeadLetterReason.SCHEMA_VERSION, f"unsupported body version {document.get('v')!r}")
        return job


def _str(document: dict[str, Any], key: str) -> str:
    value = document[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value
