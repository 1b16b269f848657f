"""RFC 9457 problem details: every error main-app returns has this shape, and every reason
a job submission is refused for is one RejectReason."""

from enum import StrEnum
from typing import Any

import orjson

PROBLEM_JSON = "application/problem+json"


class RejectReason(StrEnum):
    """Why a submission was refused: the `reason` label of jobs_api_jobs_rejected_total.

    Other HTTP errors of the submit route (a client gone mid-body: 400) count as `http_<status>`."""

    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    MALFORMED_JSON = "malformed_json"
    INVALID = "invalid"  # schema, unknown type, too deep to encode
    BAD_IDEMPOTENCY_KEY = "bad_idempotency_key"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"  # the key was used with another body
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress"
    IDEMPOTENCY_EXPIRED = "idempotency_expired"
    STORE_UNAVAILABLE = "store_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    HTTP_413 = "http_413"  # body over MAX_BODY_BYTES
    INTERNAL = "internal"


class Problem(Exception):
    """An error answer. `reason` labels the rejected-submissions metric (None: not a submission's)."""

    def __init__(self, status: int, title: str, detail: str, *, reason: str | None,
                 headers: dict[str, str] | None = None, errors: list[dict[str, str]] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.reason = reason
        self.headers = headers or {}
        self.errors = errors

    def body(self, instance: str | None = None) -> bytes:
        document: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status,
                                    "detail": self.detail}
        if instance:
            document["instance"] = instance
        if self.errors:
            document["errors"] = self.errors
        return orjson.dumps(document)


def unavailable(detail: str, reason: RejectReason) -> Problem:
    return Problem(503, "Service Unavailable", detail, reason=reason, headers={"Retry-After": "1"})

