"""Submitting a job, without Flask: validate → record → publish → compensate → confirm idempotency.

Refusals are raised as Problem (problems.py); the web layer (views.py) turns them and an
Accepted into HTTP answers. Store and broker calls are timed into main-app's metrics.
"""

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import redis

from jobs_contract import JobMessage, JobStore, topology
from jobs_contract.catalog import RequestValidator, ValidationFailed
from jobs_contract.store import IdempotencyRecord, NewJob, utcnow
from main_app import metrics
from main_app.broker import BrokerUnavailable, Publisher, RecordTimeout
from main_app.problems import Problem, RejectReason, unavailable

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# orjson reads an integer beyond 64 bits as a float, which would change the client's number; an
# integer literal that may be one has at least 19 digits (-9223372036854775809 is the first).
MAYBE_BEYOND_64_BITS = re.compile(rb"\d{19}")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The answer to a submission: the job's id, type, status and created_at."""

    job: dict[str, Any]
    replayed: bool = False  # an earlier request's job, for the same Idempotency-Key


@dataclasses.dataclass(frozen=True)
class _Idempotency:
    key: str
    body_hash: str


class _ThrottledWarning:
    """A warning logged at most once per `period`, for failures that repeat with every request
    while a dependency is down; the ones in between are counted into the next."""

    def __init__(self, period: float = 10.0):
        self.period = period
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._suppressed = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_at:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._next_at = self._suppressed, 0, now + self.period
        if suppressed:
            message, args = message + " (and %d more like it since the last such warning)", (*args, suppressed)
        log.warning(message, *args)


_warn_store_failed = _ThrottledWarning()
_warn_broker_refused = _ThrottledWarning()


# What a 503 for a job store failure says: of a submission, nothing of this request was accepted
# (a job an earlier request had a 202 for stays accepted); of a read, nothing is implied.
STORE_REFUSED_SUBMISSION = "the job store is unavailable; this request was not accepted"
STORE_REFUSED_READ = "the job store is unavailable; retry"


def timed_store(operation: str, call: Callable[..., T], *args: Any,
                unavailable_detail: str = STORE_REFUSED_SUBMISSION, **kwargs: Any) -> T:
    """A job store call, timed; Redis errors become a 503 saying `unavailable_detail`."""
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    except redis.RedisError as exc:
        raise _store_unavailable(operation, exc, unavailable_detail) from None
    finally:
        metrics.child(metrics.STORE_LATENCY, operation).observe(time.perf_counter() - started)


def _store_unavailable(operation: str, exc: Exception, detail: str = STORE_REFUSED_SUBMISSION) -> Problem:
    _warn_store_failed("job store %s failed: %s", operation, exc)
    return unavailable(detail, RejectReason.STORE_UNAVAILABLE)


class Submissions:
    def __init__(self, store: JobStore, publisher: Publisher, validator: RequestValidator,
                 publish_timeout_seconds: float):
        self.store = store
        self.publisher = publisher
        self.validator = validator
        self.publish_timeout_seconds = publish_timeout_seconds
        # How long a request may hold its idempotency key "pending": publishing, its confirm and
        # the store writes around it are over by then (a pending key older than this is stale).
        self.pending_ttl = int(publish_timeout_seconds * 2) + 5

    def submit(self, client: str, body: bytes, idempotency_key: str | None) -> Accepted:
        """Accept the job in `body` (JSON) for `client`: recorded in the store and confirmed by the
        broker, or a Problem and nothing left behind (but a key that a retry must resolve)."""
        job_type, payload = self._validate(body)
        idempotency = self._idempotency(idempotency_key, job_type, payload)
        message = JobMessage(id=str(uuid.uuid4()), type=job_type, payload=payload, client=client,
                             created_at=utcnow())
        # Encoded before anything is written: a job whose message cannot be built leaves no record.
        encoded = self._encode(message)
        # Recorded, then published, by the publisher's loop (one store round trip per batch).
        existing = self._publish(message, encoded, idempotency,
                                 record=NewJob(message.id, client, job_type, message.created_at,
                                               idempotency and (idempotency.key, idempotency.body_hash),
                                               self.pending_ttl,
                                               time.time() + self.pending_ttl if idempotency else None))
        republish = existing is not None
        if republish:
            resumed = self._resume(existing, client, idempotency, job_type)
            if isinstance(resumed, Accepted):
                return resumed
            # The key's request is over and nobody confirmed it: its job may or may not be queued.
            # Publish that job (same id) again: at worst a duplicate message of one job.
            created_at, recreated = resumed
            message = dataclasses.replace(message, id=existing.job_id, created_at=created_at)
            self._publish(message, message.encode(), idempotency, undo_record=recreated)
        if idempotency is not None and not self._confirm(client, idempotency, message.id):
            log.warning("job %s accepted, but its Idempotency-Key could not be confirmed", message.id)
        if not republish:
            metrics.child(metrics.JOBS_ACCEPTED, job_type).inc()
        return Accepted({"id": message.id, "type": job_type, "status": "queued", "created_at": message.created_at},
                        replayed=republish)

    def _validate(self, body: bytes) -> tuple[str, dict[str, Any]]:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "Bad Request", f"malformed JSON: {exc}", reason=RejectReason.MALFORMED_JSON) from None
        try:
            job_type, payload = self.validator.validate(document)
        except ValidationFailed as exc:
            raise Problem(422, "Unprocessable Content", exc.message, reason=RejectReason.INVALID,
                          errors=[{"pointer": exc.field, "detail": exc.message}]) from None
        if MAYBE_BEYOND_64_BITS.search(body):
            _refuse_integers_beyond_64_bits(body)
        return job_type, payload

    @staticmethod
    def _idempotency(key: str | None, job_type: str, payload: dict[str, Any]) -> _Idempotency | None:
        if key is None:
            return None
        if not IDEMPOTENCY_KEY.fullmatch(key):
            raise Problem(400, "Bad Request", "Idempotency-Key must be 1-255 visible ASCII characters",
                          reason=RejectReason.BAD_IDEMPOTENCY_KEY)
        body_hash = hashlib.sha256(orjson.dumps([job_type, payload], option=orjson.OPT_SORT_KEYS)).hexdigest()
        return _Idempotency(key, body_hash)

    @staticmethod
    def _encode(message: JobMessage) -> tuple[bytes, Any]:
        try:
            return message.encode()
        except orjson.JSONEncodeError as exc:
            raise Problem(422, "Unprocessable Content", f"the job cannot be encoded: {exc}",
                          reason=RejectReason.INVALID, errors=[{"pointer": "/payload", "detail": str(exc)}]) from None

    def _publish(self, message: JobMessage, encoded: tuple[bytes, Any], idempotency: _Idempotency | None,
                 record: NewJob | None = None, undo_record: bool = False) -> IdempotencyRecord | None:
        """Publish and wait for the confirm, after writing `record` if given: then the record
        already under its Idempotency-Key, if any, is returned instead (nothing published). If
        the broker does not confirm, remove the record this request wrote (`record`, or one its
        claim of a stale key recreated: `undo_record`), and refuse."""
        body, properties = encoded
        started = time.perf_counter()
        try:
            return self.publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties,
                                          timeout=self.publish_timeout_seconds, record=record)
        except (redis.RedisError, RecordTimeout) as exc:  # not recorded in time: nothing was published
            raise _store_unavailable("create", exc) from None
        except BrokerUnavailable as exc:
            if record is None and not undo_record:
                # Publishing again the job of an earlier request, which may have been answered 202:
                # its record is not this request's to undo, and its key stays for a retry to resolve.
                log.warning("job %s of an earlier request could not be published again: %s", message.id, exc)
            elif record is not None and exc.before_handover:  # neither recorded nor published: nothing to undo
                _warn_broker_refused("job %s not accepted: %s", message.id, exc)
            else:
                log.warning("job %s not accepted: %s", message.id, exc)
                try:  # the key stays while the job may be queued: a retry must get that job, not a new one
                    self.store.discard(message.id, message.client, idempotency and idempotency.key,
                                       keep_key=exc.maybe_published or record is None)
                except redis.RedisError:
                    log.warning("could not remove the record of unaccepted job %s", message.id)
            raise unavailable("the message broker is unavailable; this request was not accepted",
                              RejectReason.BROKER_UNAVAILABLE) from None
        finally:
            metrics.PUBLISH_LATENCY.observe(time.perf_counter() - started)

    def _confirm(self, client: str, idempotency: _Idempotency, job_id: str) -> bool:
        try:
            self.store.confirm_idempotency(client, idempotency.key, job_id, idempotency.body_hash)
        except redis.RedisError:
            return False
        return True

    def _resume(self, existing: IdempotencyRecord, client: str, idempotency: _Idempotency,
                job_type: str) -> Accepted | tuple[str, bool]:
        """A request whose Idempotency-Key is taken: the key's job (replayed), 409 while the request
        that took it may still be in flight, 422 for another body; or, for a key its request left
        pending, the created_at of its job, which the caller then publishes again, and whether its
        record was missing (recreated by the claim)."""
        if existing.body_hash != idempotency.body_hash:
            raise Problem(422, "Unprocessable Content",
                          "this Idempotency-Key was already used with a different request body",
                          reason=RejectReason.IDEMPOTENCY_MISMATCH)
        job = timed_store("get", self.store.get, existing.job_id)
        if existing.confirmed:
            if job is None:
                raise Problem(409, "Conflict", "the job for this Idempotency-Key has expired",
                              reason=RejectReason.IDEMPOTENCY_EXPIRED)
            return _replay(job)
        if job is not None and job["status"] != "queued":  # a worker has it, so it was published
            self._confirm(client, idempotency, existing.job_id)  # if not, the next retry resolves it alike
            return _replay(job)
        in_progress = Problem(409, "Conflict", "a request with this Idempotency-Key is still being processed",
                              reason=RejectReason.IDEMPOTENCY_IN_PROGRESS, headers={"Retry-After": "1"})
        if not existing.stale():
            raise in_progress
        outcome = timed_store("claim", self.store.claim_stale, client, idempotency.key, existing, job_type,
                              job["created_at"] if job else utcnow(), self.pending_ttl)
        if outcome == "changed":  # another retry claimed it first
            raise in_progress
        if outcome == "started":
            return self._resume(dataclasses.replace(existing, confirmed=True), client, idempotency, job_type)
        return outcome, job is None


def _refuse_integers_beyond_64_bits(body: bytes) -> None:
    """A 422 for an integer outside -2**63 … 2**64 - 1 in `body` (a valid JSON document): read once
    more, with the standard library, which keeps integers exact."""

    def check(literal: str) -> int:
        value = int(literal)
        if not -2**63 <= value < 2**64:
            detail = f"integers must lie within -2^63 and 2^64 - 1 (64 bits); got {literal[:40]}"
            raise Problem(422, "Unprocessable Content", detail, reason=RejectReason.INVALID,
                          errors=[{"pointer": "/payload", "detail": detail}])
        return value

    try:
        json.loads(body, parse_int=check)
    except RecursionError:  # nested too deep for the standard library: _encode refuses such a job
        pass


class StoreRecorder:
    """The publisher's recorder: a batch of new jobs written to the store in one round trip, timed;
    and the records of jobs whose requests gave up before they were published, removed."""

    def __init__(self, store: JobStore):
        self.store = store

    def record(self, jobs: list[NewJob]) -> list[Any]:
        started = time.perf_counter()
        try:
            return self.store.create_many(jobs)
        finally:
            elapsed = time.perf_counter() - started
            latency = metrics.child(metrics.STORE_LATENCY, "create")
            for _ in jobs:
                latency.observe(elapsed)

    def discard(self, jobs: list[NewJob]) -> None:
        for job in jobs:  # never published: the key goes too (unless a retry took it over meanwhile)
            _warn_broker_refused("job %s not accepted: %s", job.job_id,
                                 "its request gave up while it was being recorded")
            self.store.withdraw(job)


def _replay(job: dict[str, Any]) -> Accepted:
    return Accepted({name: job[name] for name in ("id", "type", "status", "created_at")}, replayed=True)
