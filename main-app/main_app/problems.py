"""RFC 9457 problem details: every error main-app returns has this shape."""

from typing import Any

import orjson
from flask import Response

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, *, reason: str, headers: dict[str, str] | None = None,
                 errors: list[dict[str, str]] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.reason = reason
        self.headers = headers or {}
        self.errors = errors

    def response(self, instance: str | None = None) -> Response:
        body: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status,
                                "detail": self.detail}
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return Response(orjson.dumps(body), status=self.status, mimetype=PROBLEM_JSON, headers=self.headers)


def unavailable(detail: str, reason: str) -> Problem:
    return Problem(503, "Service Unavailable", detail, reason=reason, headers={"Retry-After": "1"})
