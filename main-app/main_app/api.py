"""The HTTP API: submit jobs, read their status, health and the OpenAPI document."""

import dataclasses
import hashlib
import logging
import re
import time
import uuid
from typing import Any

import orjson
import redis
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from jobs_contract import JOB_TYPES, JobMessage, JobStore, topology
from jobs_contract.catalog import RequestValidator, ValidationFailed
from jobs_contract.store import IdempotencyRecord, utcnow
from main_app import metrics
from main_app.auth import TokenAuthenticator
from main_app.broker import BrokerUnavailable, Publisher
from main_app.config import Settings
from main_app.openapi import openapi_document
from main_app.problems import Problem, unavailable

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def create_app(settings: Settings | None = None, store: JobStore | None = None,
               publisher: Publisher | None = None) -> Flask:
    settings = settings or Settings.from_env()
    store = store or JobStore.from_url(settings.redis_url, job_ttl_seconds=settings.job_ttl_seconds,
                                       idempotency_ttl_seconds=settings.idempotency_ttl_seconds)
    publisher = publisher or Publisher(settings.rabbitmq_url, declare_topology=settings.declare_topology,
                                       stall_seconds=settings.publish_timeout_seconds).start()
    authenticator = TokenAuthenticator(settings.api_tokens, disabled=settings.auth_disabled)
    validator = RequestValidator(settings.limits)
    openapi = orjson.dumps(openapi_document(settings))
    # How long a request may hold its idempotency key "pending": publishing, its confirm and
    # the store writes around it are over by then (a pending key older than this is stale).
    pending_ttl = int(settings.publish_timeout_seconds * 2) + 5

    metrics.initialise(JOB_TYPES)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["job_store"] = store
    app.extensions["publisher"] = publisher

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()
        metrics.HTTP_IN_PROGRESS.inc()

    @app.teardown_request
    def record_request(_exc: BaseException | None) -> None:
        if "started" in g:
            metrics.HTTP_IN_PROGRESS.dec()

    @app.after_request
    def observe(response: Response) -> Response:
        # Every label is bounded: anyone can send any method to any path.
        route = request.url_rule.rule if request.url_rule else "unmatched"
        method = metrics.method_label(request.method)
        metrics.child(metrics.HTTP_REQUESTS, route, method, metrics.status_label(response.status_code)).inc()
        if "started" in g:
            metrics.child(metrics.HTTP_LATENCY, route, method).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(Problem)
    def problem(exc: Problem) -> Response:
        if request.url_rule and request.url_rule.endpoint == "submit":
            metrics.child(metrics.JOBS_REJECTED, exc.reason).inc()
        return exc.response(request.path)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = {
            413: f"request body larger than {settings.max_body_bytes} bytes",
            404: "no such resource",
        }.get(status, exc.description or exc.name)
        # Keep the exception's own headers (Allow on a 405), not its HTML content type.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return problem(Problem(status, exc.name, detail, reason=f"http_{status}", headers=headers))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem(Problem(500, "Internal Server Error", "unexpected error", reason="internal"))

    def authenticate() -> str:
        client = authenticator.client_for(request.headers.get("Authorization"))
        if client is None:
            raise Problem(401, "Unauthorized", "missing or invalid bearer token", reason="unauthorized",
                          headers={"WWW-Authenticate": 'Bearer realm="jobs"'})
        return client

    def timed_store(operation: str, call, *args, **kwargs):
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            log.warning("job store %s failed: %s", operation, exc)
            raise unavailable("the job store is unavailable; the job was not accepted", "store_unavailable") \
                from None
        finally:
            metrics.child(metrics.STORE_LATENCY, operation).observe(time.perf_counter() - started)

    @app.post("/jobs", endpoint="submit")
    @app.post("/user-request-job", endpoint="submit")
    def submit() -> Response:
        client = authenticate()
        if not _is_json(request.mimetype):
            raise Problem(415, "Unsupported Media Type", "send the job as application/json",
                          reason="unsupported_media_type")
        try:
            document = orjson.loads(request.get_data(cache=False))
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "Bad Request", f"malformed JSON: {exc}", reason="malformed_json") from None
        try:
            job_type, payload = validator.validate(document)
        except ValidationFailed as exc:
            raise Problem(422, "Unprocessable Content", exc.message, reason="invalid",
                          errors=[{"pointer": exc.field, "detail": exc.message}]) from None

        idempotency = None
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not IDEMPOTENCY_KEY.fullmatch(key):
                raise Problem(400, "Bad Request", "Idempotency-Key must be 1-255 visible ASCII characters",
                              reason="bad_idempotency_key")
            body_hash = hashlib.sha256(orjson.dumps([job_type, payload], option=orjson.OPT_SORT_KEYS)).hexdigest()
            idempotency = (key, body_hash)

        job_id = str(uuid.uuid4())
        created_at = utcnow()
        # Encoded before anything is written: a job whose message cannot be built leaves no record.
        message = JobMessage(id=job_id, type=job_type, payload=payload, client=client, created_at=created_at)
        try:
            body, properties = message.encode()
        except orjson.JSONEncodeError as exc:
            raise Problem(422, "Unprocessable Content", f"the job cannot be encoded: {exc}", reason="invalid",
                          errors=[{"pointer": "/payload", "detail": str(exc)}]) from None
        existing = timed_store("create", store.create, job_id, client, job_type, created_at, idempotency,
                               pending_ttl_seconds=pending_ttl)
        republish = existing is not None
        if republish:
            resumed = resume(existing, client, key, idempotency[1], job_type)
            if isinstance(resumed, Response):
                return resumed
            # The key's request is over and nobody confirmed it: its job may or may not be queued.
            # Publish that job (same id) again: at worst a duplicate message of one job.
            job_id, created_at = existing.job_id, resumed
            message = dataclasses.replace(message, id=job_id, created_at=created_at)
            body, properties = message.encode()

        started = time.perf_counter()
        try:
            publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties,
                              timeout=settings.publish_timeout_seconds)
        except BrokerUnavailable as exc:
            log.warning("job %s not accepted: %s", job_id, exc)
            try:  # the key stays while the job may be queued: a retry must get that job, not a new one
                store.discard(job_id, client, key, keep_key=exc.maybe_published or republish)
            except redis.RedisError:
                log.warning("could not remove the record of unaccepted job %s", job_id)
            raise unavailable("the message broker is unavailable; the job was not accepted",
                              "broker_unavailable") from None
        finally:
            metrics.PUBLISH_LATENCY.observe(time.perf_counter() - started)
        if idempotency is not None:
            try:
                store.confirm_idempotency(client, key, job_id, idempotency[1])
            except redis.RedisError:
                log.warning("job %s accepted, but its Idempotency-Key could not be confirmed", job_id)
        if not republish:
            metrics.child(metrics.JOBS_ACCEPTED, job_type).inc()
        return accepted({"id": job_id, "type": job_type, "status": "queued", "created_at": created_at},
                        replayed=republish)

    def resume(existing: IdempotencyRecord, client: str, key: str, body_hash: str, job_type: str) -> Response | str:
        """A request whose Idempotency-Key is taken: the key's job (replayed), 409 while the request
        that took it may still be in flight, 422 for another body; or, for a key its request left
        pending, the created_at of its job, which the caller then publishes again."""
        if existing.body_hash != body_hash:
            raise Problem(422, "Unprocessable Content",
                          "this Idempotency-Key was already used with a different request body",
                          reason="idempotency_mismatch")
        job = timed_store("get", store.get, existing.job_id)
        if existing.confirmed:
            if job is None:
                raise Problem(409, "Conflict", "the job for this Idempotency-Key has expired",
                              reason="idempotency_expired")
            return replay(job)
        if job is not None and job["status"] != "queued":  # a worker has it, so it was published
            try:
                store.confirm_idempotency(client, key, existing.job_id, body_hash)
            except redis.RedisError:
                pass  # the next retry resolves it the same way
            return replay(job)
        in_progress = Problem(409, "Conflict", "a request with this Idempotency-Key is still being processed",
                              reason="idempotency_in_progress", headers={"Retry-After": "1"})
        if not existing.stale():
            raise in_progress
        outcome = timed_store("claim", store.claim_stale, client, key, existing, job_type,
                              job["created_at"] if job else utcnow(), pending_ttl)
        if outcome == "changed":  # another retry claimed it first
            raise in_progress
        if outcome == "started":
            return resume(dataclasses.replace(existing, confirmed=True), client, key, body_hash, job_type)
        return outcome

    def replay(job: dict[str, Any]) -> Response:
        summary = {name: job[name] for name in ("id", "type", "status", "created_at")}
        return accepted(summary, replayed=True)

    def accepted(summary: dict[str, Any], replayed: bool = False) -> Response:
        headers = {"Location": f"/jobs/{summary['id']}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(orjson.dumps(summary), status=202, mimetype="application/json", headers=headers)

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str) -> Response:
        client = authenticate()
        job = timed_store("get", store.get, job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None or job["client"] != client:
            raise Problem(404, "Not Found", f"no job {job_id!r}", reason="not_found")
        del job["client"]
        return Response(orjson.dumps(job), mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    @app.get("/readyz")
    def readyz() -> Response:
        checks = {"broker": publisher.ready, "store": _store_reachable(store)}
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return Response(orjson.dumps(body), status=200 if ready else 503, mimetype="application/json")

    @app.get("/openapi.json")
    def openapi_json() -> Response:
        return Response(openapi, mimetype="application/json")

    return app


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _store_reachable(store: JobStore) -> bool:
    try:
        return store.ping()
    except redis.RedisError:
        return False
