"""The consumer: takes jobs from RabbitMQ, runs them on a thread pool, records
the outcome in Redis, and only then acks, retries or dead-letters the message.

Threads: the main thread owns the consume connection and does all its I/O, so
heartbeats keep flowing however long a job runs. Jobs run on a pool of
WORKER_CONCURRENCY threads; their acks and rejects are handed back to the main
thread with add_callback_threadsafe. Retry copies are published by the job thread
on a second connection (retry_publisher.py), so a broker that blocks publishers
(resource alarm) or refuses a retry copy holds up that one message only.
"""

import ctypes
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial

import orjson
import pika
import pika.exceptions
import redis

from jobs_contract import FINAL_STATUSES, DeadLetterReason, JobMessage, JobStore, PoisonMessage, topology
from jobs_contract.backoff import compute_backoff, reconnect_delay
from jobs_contract.catalog import RequestValidator, ValidationFailed
from jobs_contract.handoff import Handoff
from jobs_contract.metrics import child
from service_app import metrics
from service_app.config import Settings
from service_app.jobs import HANDLERS, JobContext
from service_app.retry_publisher import RetryNotPublished, RetryPublisher

log = logging.getLogger(__name__)


class JobTimeout(Exception):
    pass


class Abandoned(Exception):
    """Shutdown ran out of grace before the outcome could be recorded; the message is requeued."""


class ConsumerLost(pika.exceptions.AMQPError):
    """The broker closed the consume channel or cancelled the consumer: reconnect."""


class SettleAction(StrEnum):
    ACK = "ack"
    RETRY = "retry"  # the job thread publishes the retry copy, then the original is acked
    DEAD = "dead"  # rejected without requeue: the dead-letter exchange takes it
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Settle:
    """What to do with a message once its outcome is recorded."""

    action: SettleAction
    delay_seconds: float = 0.0
    reason: DeadLetterReason | None = None


class Worker:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store
        self.validator = RequestValidator(settings.limits)
        self.executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="job")
        self.stopping = threading.Event()
        self.abandon = threading.Event()
        self.connected = threading.Event()
        self.store_ok = threading.Event()
        self.store_ok.set()
        self._store_checked_at = 0.0
        self._lock = threading.Lock()
        self._running = 0  # jobs executing now
        # Messages handed to the pool and not yet settled, per connection. Those of a
        # lost connection are requeued by the broker, so only the current one counts.
        self._unsettled: dict[int, int] = {}
        self._generation = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self.retries = RetryPublisher(settings.rabbitmq_url)
        # Outcomes handed back by job threads, settled by the main thread in batches: one
        # wake-up of the connection for many, and one `multiple` ack where the tags allow.
        self._settles: Handoff[tuple[int, int, JobMessage, Settle]] = Handoff()
        # Delivery tags of the current channel not yet acked or rejected (main thread only):
        # exactly the broker's unacked set, so a `multiple` ack never covers a message
        # that has no recorded outcome.
        self._outstanding: set[int] = set()
        self.beat = lambda: None
        metrics.initialise(HANDLERS)
        metrics.CONCURRENCY.set(settings.concurrency)
        metrics.BUSY_RATIO.set(0)

    def ready(self) -> bool:
        if time.monotonic() - self._store_checked_at > 1.0:  # an idle worker would not notice otherwise
            self._store_checked_at = time.monotonic()
            try:
                self.store.ping()
                self.store_ok.set()
            except redis.RedisError:
                self.store_ok.clear()
        return self.connected.is_set() and self.store_ok.is_set() and not self.stopping.is_set()

    def stop(self, *_signal) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: no new jobs; draining for up to %ss", self.settings.shutdown_grace_seconds)
        self.stopping.set()

    # main thread

    def run(self) -> None:
        """Consume until stop(); reconnect with backoff whenever the broker goes away."""
        failures = 0
        while not self.stopping.is_set():
            try:
                self._consume()
                failures = 0
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.connected.clear()
                if self.stopping.is_set():
                    break
                failures += 1
                delay = reconnect_delay(failures)
                log.warning("RabbitMQ connection lost (%s); reconnecting in %.1fs", exc or type(exc).__name__, delay)
                self._close_quietly()
                self._wait(delay)
                metrics.BROKER_RECONNECTS.inc()
        self._drain()

    def _consume(self) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(self.settings.rabbitmq_url))
        channel = self._connection.channel()
        if self.settings.declare_topology:
            topology.declare(channel)
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        self._channel = channel
        self._outstanding = set()
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._unsettled = {generation: 0}
        self._settles.reset()  # a wake-up sent to the previous connection was lost with it
        self._settle_all()
        cancelled = threading.Event()
        channel.add_on_cancel_callback(lambda _frame: cancelled.set())
        channel.basic_consume(topology.QUEUE, on_message_callback=partial(self._on_message, generation))
        self.connected.set()
        log.info("consuming from %r (concurrency %d, prefetch %d)", topology.QUEUE, self.settings.concurrency,
                 self.settings.prefetch)
        while not self.stopping.is_set():
            self.beat()
            self._connection.process_data_events(time_limit=0.5)
            self.retries.keep_alive()
            # The connection's event loop does not raise when only a channel dies (e.g.
            # consumer_timeout) or the broker cancels the consumer (queue deleted): check.
            if channel.is_closed:
                raise ConsumerLost("the broker closed the channel")
            if cancelled.is_set():
                raise ConsumerLost("the broker cancelled the consumer")
            if self._settles:  # a wake-up may have been lost with an earlier connection
                self._settle_all()

    def _drain(self) -> None:
        """Stop taking messages, let running jobs finish within the grace period, then close.
        Whatever is not settled by then is requeued by the broker when the connection closes."""
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        connection = self._connection
        try:
            if self._channel is not None and self._channel.is_open:
                self._channel.stop_consuming()
            while time.monotonic() < deadline and self._unsettled_count() > 0:
                self.beat()
                if connection is not None and connection.is_open:
                    connection.process_data_events(time_limit=0.1)
                else:
                    # The connection is gone: what finished has nothing left to settle (the broker
                    # requeued it); only jobs still running are waited for.
                    self._settle_all()
                    time.sleep(0.1)
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("broker connection lost while draining: %s", exc)
        left = self._unsettled_count()
        if left:
            log.warning("grace period over with %d job(s) unsettled; they go back to the queue", left)
        self.abandon.set()
        self._close_quietly()
        self.retries.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def _on_message(self, generation: int, channel, method, properties, body: bytes) -> None:
        try:
            job = replace(JobMessage.decode(body, properties), redelivered=bool(method.redelivered))
            if job.type not in HANDLERS:
                raise PoisonMessage(DeadLetterReason.UNKNOWN_TYPE, f"no handler for job type {job.type!r}")
            self.validator.validate_payload(job.type, job.payload)
        except (PoisonMessage, ValidationFailed) as exc:
            reason = exc.reason if isinstance(exc, PoisonMessage) else DeadLetterReason.INVALID_PAYLOAD
            if not isinstance(exc, PoisonMessage) or exc.reason == "unknown_type":
                # A job main-app accepted (its limits or types differ from ours, e.g. during a
                # rolling deploy): record why it failed, off this thread, then dead-letter it.
                detail = f"invalid payload at {exc.field}: {exc.message}" if isinstance(exc, ValidationFailed) \
                    else f"unknown job type {job.type!r}"
                self._dispatch(generation, method.delivery_tag, job, poison=(reason, detail))
                return
            log.error("poison message %s dead-lettered (%s)", properties.message_id, reason)
            child(metrics.DEAD_LETTERED, reason).inc()
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        self._dispatch(generation, method.delivery_tag, job)

    def _dispatch(self, generation: int, delivery_tag: int, job: JobMessage,
                  poison: tuple[str, str] | None = None) -> None:
        with self._lock:
            self._unsettled[generation] = self._unsettled.get(generation, 0) + 1
        self._outstanding.add(delivery_tag)
        self.executor.submit(self._process, generation, delivery_tag, job, poison)

    def _settle_all(self) -> None:
        """Settle every outcome handed back so far (main thread)."""
        acks: list[int] = []
        try:
            for generation, delivery_tag, job, settle in self._settles.take():
                if self._settle(generation, delivery_tag, job, settle):
                    acks.append(delivery_tag)
        finally:  # whatever goes wrong with one message, the batch's acks are sent
            if acks:
                self._ack(acks)

    def _ack(self, tags: list[int]) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        outstanding = self._outstanding
        outstanding.difference_update(tags)
        # One `multiple` ack covers the tags below every message still unsettled.
        lowest_unsettled = min(outstanding, default=None)
        covered = [t for t in tags if lowest_unsettled is None or t < lowest_unsettled]
        if len(covered) > 1:
            channel.basic_ack(max(covered), multiple=True)
            tags = [t for t in tags if lowest_unsettled is not None and t > lowest_unsettled]
        for tag in tags:
            channel.basic_ack(tag)

    def _settle(self, generation: int, delivery_tag: int, job: JobMessage, settle: Settle) -> bool:
        """Settle one message; True means: ack it (the caller acks the batch)."""
        self._release(generation)
        with self._lock:
            current = generation == self._generation
        if not current or self._channel is None or not self._channel.is_open:
            return False  # that channel is gone: the broker redelivers the message, which sees the recorded outcome
        if settle.action is SettleAction.ACK:
            return True
        self._outstanding.discard(delivery_tag)
        # reject, not nack: a requeueing nack does not raise x-delivery-count (RabbitMQ 4.3)
        if settle.action is SettleAction.REQUEUE:
            self._channel.basic_reject(delivery_tag, requeue=True)
        else:
            child(metrics.DEAD_LETTERED, settle.reason).inc()
            self._channel.basic_reject(delivery_tag, requeue=False)
        return False

    def _on_live_connection(self, generation: int) -> bool:
        """Whether a message delivered on that connection can still be settled on it."""
        with self._lock:
            return generation == self._generation and self.connected.is_set()

    def _unsettled_count(self) -> int:
        with self._lock:
            return self._unsettled.get(self._generation, 0)

    def _release(self, generation: int) -> None:
        with self._lock:
            if generation in self._unsettled:
                self._unsettled[generation] -= 1

    def _close_quietly(self) -> None:
        self.connected.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                pass

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self.beat()
            time.sleep(min(0.1, deadline - time.monotonic()) if deadline > time.monotonic() else 0)

    # job threads

    def _process(self, generation: int, delivery_tag: int, job: JobMessage,
                 poison: tuple[str, str] | None = None) -> None:
        settle = None
        try:
            if not self._on_live_connection(generation):
                pass  # its connection is gone: the broker requeued it, maybe to a worker running it already
            elif poison is not None:
                settle = self._fail_poison(job, *poison)
            elif not self.stopping.is_set():  # prefetched but not started: leave it for the next worker
                settle = self._run(job)
            if settle is not None and settle.action is SettleAction.RETRY:
                # The original is acked only once its retry copy is confirmed.
                published = self._publish_retry(generation, job, settle.delay_seconds)
                settle = Settle(SettleAction.ACK) if published else None
        except Abandoned:
            pass
        except Exception as exc:
            # A bug, not the job's failure: requeue; MAX_REDELIVERIES ends a loop of it.
            log.error("job %s: unexpected worker error (%s); requeued", job.id, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            settle = Settle(SettleAction.REQUEUE)
        connection = self._connection
        if settle is None or connection is None:
            self._release(generation)
            return
        # If that connection is closed, the consume loop settles what is left.
        self._settles.put((generation, delivery_tag, job, settle), connection,
                          lambda: connection.add_callback_threadsafe(self._settle_all))

    def _publish_retry(self, generation: int, job: JobMessage, delay_seconds: float) -> bool:
        """Publish the next attempt to the delay queue of its backoff (job thread). While the broker
        will not take it (alarm, unroutable, nack, connection trouble), keep trying with backoff:
        only this message waits, unacked. False: give the original back to the broker instead
        (its connection is gone, so it is requeued; or shutdown ran out of grace)."""
        body, properties = job.next_attempt().encode()
        properties.expiration = str(max(1, int(delay_seconds * 1000)))
        tier = str(topology.delay_tier_ms(delay_seconds))
        refused = 0
        while self._on_live_connection(generation):
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

    def _run(self, job: JobMessage) -> Settle:
        settings = self.settings
        if job.delivery_count >= settings.max_redeliveries:
            recorded = self._record(self.store.get, job.id)
            if recorded is not None and recorded["status"] in FINAL_STATUSES:  # its worker died after recording it
                child(metrics.JOBS_PROCESSED, job.type, "skipped").inc()
                return Settle(SettleAction.ACK)
            error = (f"delivered {job.delivery_count} times without an outcome (a worker crashed or was killed "
                     f"each time); giving up")
            self._record(self.store.fail, job.id, error, identity=_identity(job))
            self._observe_final(job, "failed")
            return Settle(SettleAction.DEAD, reason=DeadLetterReason.REDELIVERY_LIMIT)

        previous = self._record(self.store.begin, job.id, job.client, job.type, job.created_at, job.redelivered)
        if previous in FINAL_STATUSES or previous == "duplicate":
            child(metrics.JOBS_PROCESSED, job.type, "skipped").inc()
            return Settle(SettleAction.ACK)

        ctx = JobContext(job_id=job.id, attempt=job.attempt, max_attempts=settings.max_attempts)
        started = time.perf_counter()
        self._running_delta(+1)
        try:
            result = run_with_timeout(HANDLERS[job.type], job.payload, ctx, settings.job_timeout_seconds)
            encoded = orjson.dumps(result)  # a result that cannot be stored fails the attempt, like any error
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            outcome = "retried" if job.attempt < settings.max_attempts else "failed"
        else:
            error, outcome = None, "succeeded"
        finally:
            self._running_delta(-1)
            child(metrics.JOB_DURATION, job.type).observe(time.perf_counter() - started)

        identity = _identity(job)
        if outcome == "succeeded":
            self._record(self.store.succeed, job.id, encoded, identity=identity)
            self._observe_final(job, outcome)
            return Settle(SettleAction.ACK)
        # The error text goes to the job record (its client reads it), never to the logs:
        # it may quote the payload.
        error_type = error.split(":", 1)[0]
        if outcome == "retried":
            delay = compute_backoff(job.attempt, settings.retry_backoff_base_seconds,
                                    settings.retry_backoff_max_seconds)
            log.info("job %s attempt %d failed (%s); retrying in %.2fs", job.id, job.attempt, error_type, delay)
            self._record(self.store.retrying, job.id, error, identity=identity)
            child(metrics.JOBS_PROCESSED, job.type, outcome).inc()
            child(metrics.RETRIES, job.type).inc()
            return Settle(SettleAction.RETRY, delay_seconds=delay)
        log.warning("job %s failed after %d attempts (%s)", job.id, job.attempt, error_type)
        self._record(self.store.fail, job.id, error, identity=identity)
        self._observe_final(job, outcome)
        return Settle(SettleAction.DEAD, reason=DeadLetterReason.MAX_ATTEMPTS)

    def _fail_poison(self, job: JobMessage, reason: DeadLetterReason, detail: str) -> Settle:
        log.error("job %s cannot run here (%s); failed and dead-lettered", job.id, reason)
        self._record(self.store.fail, job.id, detail[:2000], identity=_identity(job))
        child(metrics.JOBS_PROCESSED, job.type if job.type in HANDLERS else "unknown", "failed").inc()
        return Settle(SettleAction.DEAD, reason=reason)

    def _record(self, operation, *args, **kwargs):
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
    def _observe_final(job: JobMessage, outcome: str) -> None:
        child(metrics.JOBS_PROCESSED, job.type, outcome).inc()
        child(metrics.JOB_LATENCY, job.type).observe(max(0.0, time.time() - job.enqueued_at))


def _identity(job: JobMessage) -> dict:
    return JobStore.identity(job.id, job.client, job.type, job.created_at, attempts=job.attempt)


class _Watchdog:
    """One thread that raises JobTimeout inside job threads past their deadline.

    A threading.Timer per job would start (and tear down) a thread for every message;
    this keeps one deadline per running job (at most WORKER_CONCURRENCY of them).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}  # job thread id -> monotonic deadline
        self._thread: threading.Thread | None = None

    def arm(self, thread_id: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            earliest = min(self._deadlines.values(), default=None)
            self._deadlines[thread_id] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-timeouts", daemon=True)
                self._thread.start()
            elif earliest is None or deadline < earliest:
                self._cond.notify()

    def disarm(self, thread_id: int) -> None:
        """After this returns, no timeout is raised in that thread for its current job."""
        with self._cond:
            self._deadlines.pop(thread_id, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._deadlines:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                expired = [tid for tid, deadline in self._deadlines.items() if deadline <= now]
                for thread_id in expired:
                    del self._deadlines[thread_id]
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(JobTimeout))
                if not expired:
                    self._cond.wait(min(self._deadlines.values()) - now)


_watchdog = _Watchdog()


def run_with_timeout(handler, payload, ctx: JobContext, timeout: float):
    """Run handler in this thread; past the timeout, raise JobTimeout inside it.

    The exception is delivered between bytecodes (as Dramatiq's time limit does),
    so a handler blocked in one long C call is interrupted when that call returns.
    """
    thread_id = threading.get_ident()
    _watchdog.arm(thread_id, timeout)
    try:
        try:
            return handler(payload, ctx)
        finally:
            _watchdog.disarm(thread_id)
    except JobTimeout:
        raise JobTimeout(f"timed out after {timeout:g}s") from None
