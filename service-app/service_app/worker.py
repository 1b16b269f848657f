"""The consumer: takes jobs from RabbitMQ, runs them on a thread pool, records the outcome in
Redis, and only then acks, retries or dead-letters the message.

Threads: the main thread owns the consume connection and does all its I/O, so heartbeats
keep flowing however long a job runs. Jobs run on a pool of WORKER_CONCURRENCY threads
(runner.py decides each outcome); their settlements are handed back to the main thread
(settlement.py keeps that bookkeeping). A job thread that records a success while other
messages wait takes the oldest one itself, recording its `running` in the same store
script. Retry copies are published by the job thread on a second connection
(retry_publisher.py), so a broker that blocks publishers (resource alarm) or refuses a
retry copy holds up that one message only.
"""

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import pika
import pika.exceptions
import redis

from jobs_contract import DeadLetterReason, JobMessage, JobStore, PoisonMessage, topology
from jobs_contract.backoff import reconnect_delay
from jobs_contract.catalog import RequestValidator, ValidationFailed
from jobs_contract.metrics import child
from service_app import metrics
from service_app.config import Settings
from service_app.jobs import HANDLERS
from service_app.retry_publisher import RetryPublisher
from service_app.runner import Abandoned, JobRunner, Next
from service_app.settlement import Ledger, SettleAction, Settlement

log = logging.getLogger(__name__)


class ConsumerLost(pika.exceptions.AMQPError):
    """The broker closed the consume channel or cancelled the consumer: reconnect."""


class Worker:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store
        self.validator = RequestValidator(settings.limits)
        self.executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="job")
        # Messages handed to the job pool, oldest first: one pool task per message takes the
        # oldest, and a job thread that finishes a job takes the next one itself (_handle).
        self._waiting: collections.deque[tuple] = collections.deque()
        self.stopping = threading.Event()
        self.abandon = threading.Event()
        self.connected = threading.Event()
        self._ever_connected = False
        self._store_checked_at = 0.0
        self._connection: pika.BlockingConnection | None = None
        self.retries = RetryPublisher(settings.rabbitmq_url)
        self.runner = JobRunner(settings, store, self.retries, self.abandon)
        self.ledger = Ledger(self.connected, settings.prefetch)
        self.beat = lambda: None
        metrics.initialise(HANDLERS)
        metrics.CONCURRENCY.set(settings.concurrency)
        metrics.BUSY_RATIO.set(0)

    def ready(self) -> bool:
        store_ok = self.runner.store_ok
        if time.monotonic() - self._store_checked_at > 1.0:  # an idle worker would not notice otherwise
            self._store_checked_at = time.monotonic()
            try:
                self.store.ping()
                store_ok.set()
            except redis.RedisError:
                store_ok.clear()
        return self.connected.is_set() and store_ok.is_set() and not self.stopping.is_set()

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
                delay = reconnect_delay(failures, connected_before=self._ever_connected)
                log.warning("RabbitMQ connection lost (%s); reconnecting in %.1fs", exc or type(exc).__name__, delay)
                self._close_quietly()
                self._wait(delay)
                metrics.BROKER_RECONNECTS.inc()
        self._drain()

    def _consume(self) -> None:
        """One connection: consume and settle until stop() or the connection is lost (raises)."""
        self._connection = pika.BlockingConnection(pika.URLParameters(self.settings.rabbitmq_url))
        channel = self._connection.channel()
        if self.settings.declare_topology:
            topology.declare(channel)
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        generation = self.ledger.open(channel)
        self.ledger.settle_finished()
        cancelled = threading.Event()
        channel.add_on_cancel_callback(lambda _frame: cancelled.set())
        channel.basic_consume(topology.QUEUE, on_message_callback=partial(self._on_message, generation))
        self.connected.set()
        self._ever_connected = True
        log.info("consuming from %r (concurrency %d, prefetch %d)", topology.QUEUE, self.settings.concurrency,
                 self.settings.prefetch)
        while not self.stopping.is_set():
            self.beat()
            self._connection.process_data_events(time_limit=self.ledger.before_wait(idle_wait=0.5))
            self.retries.keep_alive()
            # The connection's event loop does not raise when only a channel dies (e.g.
            # consumer_timeout) or the broker cancels the consumer (queue deleted): check.
            if channel.is_closed:
                raise ConsumerLost("the broker closed the channel")
            if cancelled.is_set():
                raise ConsumerLost("the broker cancelled the consumer")

    def _drain(self) -> None:
        """Stop taking messages, let running jobs finish within the grace period, then close.
        Whatever is not settled by then is requeued by the broker when the connection closes."""
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        connection = self._connection
        try:
            channel = self.ledger.channel
            if channel is not None and channel.is_open:
                channel.stop_consuming()
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("broker connection lost while draining: %s; still waiting for the jobs running", exc)
            connection = None
        while time.monotonic() < deadline and self.ledger.in_hand() > 0:
            self.beat()
            if connection is not None and connection.is_open:
                try:
                    connection.process_data_events(time_limit=self.ledger.before_wait(idle_wait=0.1))
                except (pika.exceptions.AMQPError, OSError) as exc:
                    log.warning("broker connection lost while draining: %s; still waiting for the jobs running", exc)
                    connection = None
            else:
                # The connection is gone: what finished has nothing left to settle (the broker
                # requeued it); only jobs still running are waited for, so that none is cut off.
                # Not connected: a job failing now gives its message back instead of publishing a
                # retry copy beside the one the broker requeued.
                self.connected.clear()
                self.ledger.settle_finished()
                time.sleep(0.1)
        left = self.ledger.in_hand()
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
            if not isinstance(exc, PoisonMessage) or exc.reason == DeadLetterReason.UNKNOWN_TYPE:
                # A job main-app accepted (its limits or types differ from ours, e.g. during a
                # rolling deploy): record why it failed, off this thread, then dead-letter it.
                detail = f"invalid payload at {exc.field}: {exc.message}" if isinstance(exc, ValidationFailed) \
                    else f"unknown job type {job.type!r}"
                self._dispatch(generation, method.delivery_tag, job, unrunnable=(reason, detail))
                return
            log.error("poison message %s dead-lettered (%s)", properties.message_id, reason)
            child(metrics.DEAD_LETTERED, reason).inc()
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        self._dispatch(generation, method.delivery_tag, job)

    def _dispatch(self, generation: int, delivery_tag: int, job: JobMessage,
                  unrunnable: tuple[DeadLetterReason, str] | None = None) -> None:
        self.ledger.taken(generation, delivery_tag)
        self._waiting.append((generation, delivery_tag, job, unrunnable))
        self.executor.submit(self._take)

    def _close_quietly(self) -> None:
        self.connected.clear()
        connection, self._connection = self._connection, None
        self.ledger.close()
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

    def _take(self) -> None:
        """One pool task per message: handle the oldest waiting one, then each one this thread
        takes after it. (None left: another job thread took this task's message as its next.)"""
        try:
            item = self._waiting.popleft()
        except IndexError:
            return
        previous = None
        while item is not None:
            item, previous = self._handle(*item, previous=previous)

    def _handle(self, generation: int, delivery_tag: int, job: JobMessage,
                unrunnable: tuple[DeadLetterReason, str] | None = None, previous: str | None = None):
        """A message taken from the queue: run its job (runner.py), then hand its settlement back.
        previous: its attempt is recorded already (begin's answer). Returns the next message this
        thread handles, if it took one when recording this job's success, and begin's answer for it
        if its attempt was recorded in that same round trip: (message, previous) or (None, None)."""
        taken: list = []

        def take_next() -> Next | None:
            if self.stopping.is_set():
                return None
            try:
                item = self._waiting.popleft()
            except IndexError:
                return None
            following = Next(item[2]) if item[3] is None and self.ledger.is_live(item[0]) else None
            taken.extend((item, following))
            return following

        settlement = None
        try:
            if previous is not None:
                # Begun with the outcome of the job before it: run it, as if it had just been begun.
                settlement = self.runner.perform(job, previous, take_next)
            elif not self.ledger.is_live(generation):
                pass  # its connection is gone: the broker requeued it, maybe to a worker running it already
            elif unrunnable is not None:
                settlement = self.runner.fail_unrunnable(job, *unrunnable)
            elif not self.stopping.is_set():  # prefetched but not started: leave it for the next worker
                settlement = self.runner.perform(job, take_next=take_next)
            if settlement is not None and settlement.action is SettleAction.RETRY:
                # The original is acked only once its retry copy is confirmed.
                published = self.runner.publish_retry(job, settlement.delay_seconds,
                                                      lambda: self.ledger.is_live(generation))
                settlement = Settlement(SettleAction.ACK) if published else None
        except Abandoned:
            pass
        except Exception as exc:
            # A bug, not the job's failure: requeue; MAX_REDELIVERIES ends a loop of it.
            log.error("job %s: unexpected worker error (%s); requeued", job.id, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            settlement = Settlement(SettleAction.REQUEUE)
        self.ledger.hand_back(generation, delivery_tag, settlement, self._connection)
        if not taken:
            return None, None
        item, following = taken
        return item, following.previous if following is not None else None
