"""Running one job and deciding what becomes of its message (job threads).

perform() runs the job's handler under its time limit and records the outcome before
anything is settled: success (ack), a failure with attempts left (record `retrying`,
then the retry copy is published to the delay queue of its backoff before the original
is acked), the last failure (record `failed`, dead-letter). Every store write is
retried while Redis is unavailable, so no message is settled without its outcome.
(RQ's perform_job, handle_job_success, handle_job_retry and handle_job_failure.)
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import redis

from jobs_contract import FINAL_STATUSES, DeadLetterReason, JobMessage, JobStore, topology
from jobs_contract.backoff import compute_backoff
from jobs_contract.metrics import child
from jobs_contract.store import new_start_id
from service_app import metrics
from service_app.config import Settings
from service_app.jobs import HANDLERS, JobContext
from service_app.metrics import Outcome
from service_app.retry_publisher import RetryNotPublished, RetryPublisher
from service_app.settlement import SettleAction, Settlement
from service_app.time_limit import call_with_time_limit

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """Shutdown ran out of grace before the outcome could be recorded; the message is requeued."""


@dataclass
class Next:
    """The job a thread runs next: on success, its `running` is recorded in the same store round
    trip as this job's outcome (one round trip per job instead of two under load)."""

    job: JobMessage
    previous: str | None = None  # begin's answer once recorded; None: not begun


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, retries: RetryPublisher, abandon: threading.Event):
        self.settings = settings
        self.store = store
        self.retries = retries
        self.abandon = abandon  # set when shutdown gives up on running jobs
        self.store_ok = threading.Event()  # the last store call succeeded
        self.store_ok.set()
        self._lock = threading.Lock()
        self._running = 0  # jobs executing now

    def perform(self, job: JobMessage, previous: str | None = None,
                take_next: Callable[[], Next | None] | None = None) -> Settlement:
        """Run the job unless it has an outcome already; record the outcome; say how to settle.
        previous: begin's answer when the job's attempt was recorded already (with the outcome of
        the job before it). take_next: on success, the job to begin with this one's outcome."""
        if previous is None:
            if job.delivery_count >= self.settings.max_redeliveries:
                return self._handle_crash_loop(job)
            # One start id for every try: a try whose answer was lost recorded this start already.
            previous = self._call_store(self.store.begin, job.id, job.client, job.type, job.created_at,
                                        job.redelivered, new_start_id())
        if previous in FINAL_STATUSES or previous == "duplicate":
            child(metrics.JOBS_PROCESSED, job.type, Outcome.SKIPPED).inc()
            return Settlement(SettleAction.ACK)
        encoded, error = self._execute(job)
        if error is None:
            return self._handle_success(job, encoded, take_next)
        if job.attempt < self.settings.max_attempts:
            return self._handle_retry(job, error)
        return self._handle_failure(job, error)

    def fail_unrunnable(self, job: JobMessage, reason: DeadLetterReason, detail: str) -> Settlement:
        """A job main-app accepted that this worker cannot run (unknown type, payload over our limits)."""
        log.error("job %s cannot run here (%s); failed and dead-lettered", job.id, reason)
        self._call_store(self.store.fail, job.id, detail[:2000], identity=_identity(job))
        child(metrics.JOBS_PROCESSED, job.type if job.type in HANDLERS else "unknown", Outcome.FAILED).inc()
        return Settlement(SettleAction.DEAD, reason=reason)

    def publish_retry(self, job: JobMessage, delay_seconds: float, still_settleable: Callable[[], bool]) -> bool:
        """Publish the next attempt to the delay queue of its backoff. While the broker will not
        take it (alarm, unroutable, nack, connection trouble), keep trying with backoff: only this
        message waits, unacked. False: give the original back to the broker instead (its
        connection is gone, so it is requeued; or shutdown ran out of grace)."""
        body, properties = job.next_attempt().encode()
        properties.expiration = str(max(1, int(delay_seconds * 1000)))
        tier = str(topology.delay_tier_ms(delay_seconds))
        refused = 0
        while still_settleable():
            try:
                self.retries.publish(topology.DELAY_EXCHANGE, tier, body, properties)
                return True
            except RetryNotPublished as exc:
                metrics.RETRY_PUBLISH_ERRORS.inc()
                refused += 1
                pause = compute_backoff(refused, base=0.1, cap=5.0)
                log.warning("job %s: retry not published (%s); trying again in %.1fs", job.id, exc, pause)
                if self.abandon.wait(pause):
                    return False
        return False

    def _execute(self, job: JobMessage) -> tuple[bytes | None, str | None]:
        """Run the handler: (its JSON result, None) or (None, the error)."""
        ctx = JobContext(job_id=job.id, attempt=job.attempt, max_attempts=self.settings.max_attempts)
        started = time.perf_counter()
        self._running_delta(+1)
        try:
            result = call_with_time_limit(HANDLERS[job.type], job.payload, ctx, self.settings.job_timeout_seconds)
            return orjson.dumps(result), None  # a result that cannot be stored fails the attempt, like any error
        except BaseException as exc:
            # BaseException too: a job calling sys.exit() fails its attempt. Let through, its
            # SystemExit would end the job thread's task and hold the message until the
            # connection closed. (Signals reach only the main thread, never a job's.)
            return None, f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            self._running_delta(-1)
            child(metrics.JOB_DURATION, job.type).observe(time.perf_counter() - started)

    def _handle_success(self, job: JobMessage, encoded: bytes,
                        take_next: Callable[[], Next | None] | None) -> Settlement:
        following = take_next() if take_next is not None else None
        if following is not None and following.job.delivery_count < self.settings.max_redeliveries:
            nxt = following.job
            _, following.previous = self._call_store(
                self.store.succeed_and_begin, job.id, encoded, _identity(job),
                (nxt.id, nxt.client, nxt.type, nxt.created_at, nxt.redelivered, new_start_id()))
        else:
            self._call_store(self.store.succeed, job.id, encoded, identity=_identity(job))
        self._observe_final(job, Outcome.SUCCEEDED)
        return Settlement(SettleAction.ACK)

    # The error text goes to the job record (its client reads it), never to the logs:
    # it may quote the payload.

    def _handle_retry(self, job: JobMessage, error: str) -> Settlement:
        delay = compute_backoff(job.attempt, self.settings.retry_backoff_base_seconds,
                                self.settings.retry_backoff_max_seconds)
        log.info("job %s attempt %d failed (%s); retrying in %.2fs", job.id, job.attempt, _error_type(error), delay)
        self._call_store(self.store.retrying, job.id, error, identity=_identity(job))
        child(metrics.JOBS_PROCESSED, job.type, Outcome.RETRIED).inc()
        child(metrics.RETRIES, job.type).inc()
        return Settlement(SettleAction.RETRY, delay_seconds=delay)

    def _handle_failure(self, job: JobMessage, error: str) -> Settlement:
        log.warning("job %s failed after %d attempts (%s)", job.id, job.attempt, _error_type(error))
        self._call_store(self.store.fail, job.id, error, identity=_identity(job))
        self._observe_final(job, Outcome.FAILED)
        return Settlement(SettleAction.DEAD, reason=DeadLetterReason.MAX_ATTEMPTS)

    def _handle_crash_loop(self, job: JobMessage) -> Settlement:
        """Delivered MAX_REDELIVERIES times: its workers keep dying. Fail it, unless it has an outcome."""
        recorded = self._call_store(self.store.get, job.id)
        if recorded is not None and recorded["status"] in FINAL_STATUSES:  # its worker died after recording it
            child(metrics.JOBS_PROCESSED, job.type, Outcome.SKIPPED).inc()
            return Settlement(SettleAction.ACK)
        error = (f"delivered {job.delivery_count} times without an outcome (a worker crashed or was killed "
                 f"each time); giving up")
        self._call_store(self.store.fail, job.id, error, identity=_identity(job))
        self._observe_final(job, Outcome.FAILED)
        return Settlement(SettleAction.DEAD, reason=DeadLetterReason.REDELIVERY_LIMIT)

    def _call_store(self, operation, *args, **kwargs):
        """Run a store operation, retrying while Redis is unavailable: no message is settled
        before its outcome is recorded. Gives up only when shutdown abandons the job."""
        delay = 0.1
        while True:
            try:
                result = operation(*args, **kwargs)
                self.store_ok.set()
                return result
            except redis.RedisError as exc:
                self.store_ok.clear()
                metrics.STORE_ERRORS.inc()
                log.warning("job store unavailable (%s); retrying in %.1fs", exc, delay)
            if self.abandon.wait(delay):
                raise Abandoned()
            delay = min(delay * 2, 5.0)

    def _running_delta(self, delta: int) -> None:
        with self._lock:
            self._running += delta
            running = self._running
        metrics.JOBS_IN_PROGRESS.set(running)
        metrics.BUSY_RATIO.set(running / self.settings.concurrency)

    @staticmethod
    def _observe_final(job: JobMessage, outcome: Outcome) -> None:
        child(metrics.JOBS_PROCESSED, job.type, outcome).inc()
        child(metrics.JOB_LATENCY, job.type).observe(max(0.0, time.time() - job.enqueued_at))


def _identity(job: JobMessage) -> dict:
    return JobStore.identity(job.id, job.client, job.type, job.created_at, attempts=job.attempt)


def _error_type(error: str) -> str:
    return error.split(":", 1)[0]
