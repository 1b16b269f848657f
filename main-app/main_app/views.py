"""The routes: `jobs` (submit a job, read its status) and `probes` (health, readiness, OpenAPI).

Views only speak HTTP; submitting is submission.py's. What they use is in
`current_app.extensions["jobs_api"]` (an ApiContext, set by create_app).
"""

import re
from dataclasses import dataclass

import orjson
import redis
from flask import Blueprint, Request, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from jobs_contract import JobStore
from main_app.auth import TokenAuthenticator
from main_app.broker import Publisher
from main_app.problems import Problem, RejectReason
from main_app.submission import STORE_REFUSED_READ, Accepted, Submissions, timed_store

JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

jobs = Blueprint("jobs", __name__)
probes = Blueprint("probes", __name__)


@dataclass(frozen=True)
class ApiContext:
    authenticator: TokenAuthenticator
    submissions: Submissions
    store: JobStore
    publisher: Publisher
    openapi: bytes  # the OpenAPI document, encoded once


def _context() -> ApiContext:
    return current_app.extensions["jobs_api"]


def _client() -> str:
    client = _context().authenticator.client_for(request.headers.get("Authorization"))
    if client is None:
        raise Problem(401, "Unauthorized", "missing or invalid bearer token", reason=RejectReason.UNAUTHORIZED,
                      headers={"WWW-Authenticate": 'Bearer realm="jobs"'})
    return client


@jobs.post("/jobs", endpoint="submit")
@jobs.post("/user-request-job", endpoint="submit")
def submit() -> Response:
    client = _client()
    this_request = request._get_current_object()  # one look-up through the proxy, not three
    if not _is_json(this_request.mimetype):
        raise Problem(415, "Unsupported Media Type", "send the job as application/json",
                      reason=RejectReason.UNSUPPORTED_MEDIA_TYPE)
    accepted = _context().submissions.submit(client, _body(this_request), this_request.headers.get("Idempotency-Key"))
    return _AcceptedResponse(accepted)


def _body(this_request: Request) -> bytes:
    """The request's body, or a 413 when it is larger than MAX_CONTENT_LENGTH. A body with a
    Content-Length over the limit is refused by werkzeug before it is read; a chunked one (no
    Content-Length) werkzeug reads only up to the limit and then stops without a word, so the
    rest of it is looked for here: a job cut to its first bytes must not be accepted."""
    body = this_request.get_data(cache=False)
    if (len(body) == this_request.max_content_length and this_request.content_length is None
            and this_request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    return body


@jobs.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response:
    client = _client()
    job = (timed_store("get", _context().store.get, job_id, unavailable_detail=STORE_REFUSED_READ)
           if JOB_ID.fullmatch(job_id) else None)
    if job is None or job["client"] != client:
        raise Problem(404, "Not Found", f"no job {job_id!r}", reason=None)
    del job["client"]
    return Response(orjson.dumps(job), mimetype="application/json")


@probes.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', mimetype="application/json")


@probes.get("/readyz")
def readyz() -> Response:
    context = _context()
    checks = {"broker": context.publisher.ready, "store": _store_reachable(context.store)}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return Response(orjson.dumps(body), status=200 if ready else 503, mimetype="application/json")


@probes.get("/openapi.json")
def openapi_json() -> Response:
    return Response(_context().openapi, mimetype="application/json")


class _AcceptedResponse(Response):
    """A 202 whose Location is added after werkzeug's header fix-ups: it is an ASCII path, and
    their IRI-to-URI conversion (urlsplit and quoting, ~20 µs a submission here) would not change it."""

    def __init__(self, accepted: Accepted):
        super().__init__(orjson.dumps(accepted.job), status=202, mimetype="application/json",
                         headers={"Idempotent-Replayed": "true"} if accepted.replayed else None)
        self.location_path = f"/jobs/{accepted.job['id']}"

    def get_wsgi_headers(self, environ):
        headers = super().get_wsgi_headers(environ)
        headers["Location"] = self.location_path
        return headers


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _store_reachable(store: JobStore) -> bool:
    try:
        return store.ping()
    except redis.RedisError:
        return False
