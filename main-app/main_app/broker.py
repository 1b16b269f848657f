"""Publishing jobs to RabbitMQ with publisher confirms, many in flight at once.

One connection per process, owned by one background thread running pika's
SelectConnection. Request threads hand it messages and wait only for the
broker's confirm of their own message (matched by delivery tag), so the
process is not capped at one confirm round trip at a time.

A message may come with a record to write first (publish(record=...)): the loop writes
the records of everything it takes from the outbox with one call of the `recorder`
(main-app's: JobStore.create_many, one Redis round trip for the batch) and publishes
only what was recorded, so a submission costs its request thread one hand-off and one
wait, not a store round trip of its own besides. A request that gives up waiting before
its message is published (a slow record) is never published: the loop removes the
record it wrote for it (the recorder's `discard`), so its 503 means not accepted.

A request thread wakes the loop of the connection it saw; the wake-up is tied to
that connection, so one lost with a dead connection cannot silence the next, and
the loop also drains the outbox on a timer as a backstop. A publisher whose loop
leaves a message waiting, or whose broker leaves one unconfirmed, for longer than
stall_seconds since its request handed it over is stalled: not ready (`ready`),
whatever its connection says, and it refuses new messages at once rather than hold
a request thread for the whole timeout each.
"""

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import pika
from pika.adapters.select_connection import SelectConnection
from pika.spec import Basic

from jobs_contract import topology
from jobs_contract.backoff import reconnect_delay
from jobs_contract.handoff import Handoff, Reply
from main_app.amqp_writes import coalesce_frame_writes, sent_at_once

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The message was not confirmed by RabbitMQ: treat it as not published.

    maybe_published: it was written to the broker before the failure (lost connection, no
    confirm in time), so it may be queued after all; otherwise it certainly is not.
    before_handover: refused before the publisher's loop took the message to record and
    publish it, so its record (if one came with it) was not written either."""

    def __init__(self, reason: str, maybe_published: bool = False, before_handover: bool = False):
        super().__init__(reason)
        self.maybe_published = maybe_published
        self.before_handover = before_handover


class RecordTimeout(Exception):
    """The message's record was not written in time: the message is never published, and the
    publisher's loop removes the record if it is written after all."""


# The loop drains the outbox this often even if no wake-up reached it.
BACKSTOP_DRAIN_SECONDS = 0.2


class _Outgoing(NamedTuple):
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    future: Reply
    queued_at: float  # time.monotonic() when a request thread handed it over
    record: Any = None  # written by the recorder before publishing, when given


class Recorder(Protocol):
    def record(self, records: list[Any]) -> Sequence[Any]:
        """Write the records of a batch; for each: None (written: publish the message), an
        exception (fails that message, unpublished), or any other value (its answer,
        unpublished). Raising fails the whole batch, unpublished."""

    def discard(self, records: list[Any]) -> None:
        """Undo `record` for messages that will never be published (their requests gave up
        waiting while they were written), whatever `record` answered for them: a record that
        was not written, or that another request has taken over since, must stay as it is."""


class Publisher:
    def __init__(self, url: str, declare_topology: bool = True, stall_seconds: float = 5.0,
                 recorder: Recorder | None = None):
        coalesce_frame_writes()  # a batch of messages leaves in one socket write
        self._recorder = recorder
        self._parameters = pika.URLParameters(url)
        # During a resource alarm the broker stops reading: stop publishing at once (see
        # _on_blocked) and give the connection up if the alarm outlasts this.
        if self._parameters.blocked_connection_timeout is None:
            self._parameters.blocked_connection_timeout = 60
        self._declare_topology = declare_topology
        self._connection: SelectConnection | None = None
        self._channel = None
        # Published, awaiting the broker's confirm: delivery tag -> (reply, message id, handed over at).
        self._pending: dict[int, tuple[Reply, str | None, float]] = {}
        # When the oldest message still awaiting its confirm was handed over (None: none awaits):
        # _pending's first entry, kept apart because request threads read it (`stalled`) while
        # the loop thread changes the dict.
        self._unconfirmed_since: float | None = None
        self._returned: set[str] = set()
        self._delivery_tag = 0
        # Messages handed over by request threads, published by the loop thread; under load
        # one wake-up (a write to pika's interrupt socket) carries many messages.
        self._outbox: Handoff[_Outgoing] = Handoff()
        # A message waiting longer than this for the loop, or for its confirm, means the
        # publisher is not publishing.
        self._stall_seconds = stall_seconds
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._connected_once = False  # during the current connection's life
        self._ever_connected = False
        self._thread = threading.Thread(target=self._run, name="rabbitmq-publisher", daemon=True)

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        """Connected, not blocked, and publishing what it is handed."""
        return self._ready.is_set() and not self.stalled

    @property
    def stalled(self) -> bool:
        """A handed-over message has waited longer than stall_seconds for the loop, or for the
        broker's confirm."""
        now = time.monotonic()
        oldest = self._outbox.oldest()
        if oldest is not None and now - oldest.queued_at > self._stall_seconds:
            return True
        unconfirmed_since = self._unconfirmed_since
        return unconfirmed_since is not None and now - unconfirmed_since > self._stall_seconds

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties,
                timeout: float, record: Any = None) -> Any:
        """Publish and wait for the broker's confirm; raise BrokerUnavailable otherwise. With a
        record, the recorder writes it first: its error is raised (nothing published), and an
        answer other than None is returned instead of publishing; None means published. A record
        not written within the timeout (and a second up to one more timeout) raises RecordTimeout:
        nothing is published, and nothing of it is left for the caller to remove."""
        if record is not None and self._recorder is None:
            raise ValueError("a record to write, but this publisher has no recorder")
        connection = self._connection
        if connection is None or not self._ready.is_set():
            raise BrokerUnavailable("not connected to RabbitMQ", before_handover=True)
        if self.stalled:  # it would only wait out its timeout behind the others
            raise BrokerUnavailable(f"a message has waited over {self._stall_seconds:g}s to be published or confirmed",
                                    before_handover=True)
        future: Reply = Reply()
        # The wake-up is tied to this connection: one sent to a connection that died meanwhile
        # does not count for its successor (which drains the outbox when it opens, and on a timer).
        self._outbox.put(_Outgoing(exchange, routing_key, body, properties, future, time.monotonic(), record),
                         connection,
                         lambda: connection.ioloop.add_callback_threadsafe(self._publish_outbox))
        try:
            return future.result(timeout)
        except TimeoutError:
            # Not handed to the broker yet: make sure it never is (the caller answers 503).
            if future.cancel():
                raise BrokerUnavailable(f"RabbitMQ took no message within {timeout:g}s", before_handover=True) \
                    from None
            # Being recorded or already on the wire: its record's answer or its confirm may be just arriving.
            try:
                return future.result(min(1.0, timeout))
            except TimeoutError:
                # Its record still being written: never published, and the loop removes the record.
                if record is not None and future.withdraw():
                    raise RecordTimeout(f"not recorded within {timeout + min(1.0, timeout):g}s") from None
                if future.done():  # answered just now
                    return future.result(0)
                raise BrokerUnavailable(f"no confirm from RabbitMQ within {timeout:g}s", maybe_published=True) \
                    from None

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        connection = self._connection
        if connection is not None:
            try:
                connection.ioloop.add_callback_threadsafe(self._close_on_loop)
            except Exception:  # loop already gone
                pass
        self._thread.join(timeout)

    # Everything below runs on the publisher thread.

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._declare_topology:
                    self._declare()
                connection = SelectConnection(
                    self._parameters,
                    on_open_callback=self._on_connection_open,
                    on_open_error_callback=self._on_connection_open_error,
                    on_close_callback=self._on_connection_closed,
                )
                self._connection = connection
                try:
                    connection.ioloop.start()
                finally:
                    connection.ioloop.close()  # its poller and interrupt sockets; late wake-ups are dropped
            except Exception as exc:  # broker down, DNS, auth: all retried
                log.warning("RabbitMQ connection failed: %s", exc)
            self._ready.clear()
            self._fail_pending("connection to RabbitMQ lost")
            if self._connected_once:
                failures = 0
                self._connected_once = False
            failures += 1
            self._stopping.wait(reconnect_delay(failures, connected_before=self._ever_connected))

    def _declare(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        try:
            topology.declare(connection.channel())
        finally:
            connection.close()

    def _on_connection_open(self, connection: SelectConnection) -> None:
        if self._stopping.is_set():  # stop() came while connecting
            connection.close()
            return
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_blocked(self, _connection, frame) -> None:
        # The broker has raised a memory or disk alarm and stopped reading from
        # publishers: answer 503 at once instead of queueing requests in memory.
        self._ready.clear()
        log.warning("RabbitMQ blocked publishing (%s); answering 503 until it is lifted",
                    getattr(frame.method, "reason", "resource alarm"))

    def _on_unblocked(self, _connection, _frame) -> None:
        if self._channel is not None and self._channel.is_open:
            self._ready.set()
            log.info("RabbitMQ unblocked publishing")

    def _on_connection_open_error(self, connection: SelectConnection, error: Exception) -> None:
        log.warning("cannot connect to RabbitMQ: %s", error)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: SelectConnection, reason: Exception) -> None:
        self._channel = None
        self._ready.clear()
        if not self._stopping.is_set():
            log.warning("RabbitMQ connection closed: %s", reason)
        connection.ioloop.stop()

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self._delivery_tag = 0
        self._connected_once = True
        self._ever_connected = True
        self._publish_outbox()
        self._drain_periodically(self._connection)
        self._ready.set()
        log.info("connected to RabbitMQ, publishing with confirms")

    def _on_channel_closed(self, channel, reason: Exception) -> None:
        self._ready.clear()
        self._fail_pending(f"RabbitMQ channel closed: {reason}")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _close_on_loop(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        elif self._connection is not None:
            self._connection.ioloop.stop()

    def _drain_periodically(self, connection: SelectConnection) -> None:
        """Backstop: whatever a wake-up failed to announce is published within one period."""
        if connection is not self._connection or not connection.is_open:
            return
        if self._outbox:
            self._publish_outbox()
        connection.ioloop.call_later(BACKSTOP_DRAIN_SECONDS, lambda: self._drain_periodically(connection))

    def _publish_outbox(self) -> None:
        # A message whose request gave up waiting (and answered 503) is never published: not taken
        # if it gave up first, and its record removed if it gave up while that was being written.
        batch = [item for item in self._outbox.take() if item.future.set_running_or_notify_cancel()]
        to_record = [item for item in batch if item.record is not None]
        if to_record:
            self._record(to_record)
        given_up = []  # records of requests that withdrew while they were written (answered 503)
        with sent_at_once(self._connection):
            for item in batch:
                if item.future.commit():  # not answered by its record, nor withdrawn
                    self._publish_on_loop(item)
                elif item.future.cancelled():
                    given_up.append(item.record)
        if given_up:
            self._discard(given_up)

    def _record(self, items: list[_Outgoing]) -> None:
        try:
            answers = self._recorder.record([item.record for item in items])
        except Exception as exc:  # noqa: BLE001 - the store's failure is each request's answer
            answers = [exc] * len(items)
        for item, answer in zip(items, answers, strict=True):
            if isinstance(answer, BaseException):
                item.future.set_exception(answer)
            elif answer is not None:
                item.future.set_result(answer)

    def _discard(self, records: list[Any]) -> None:
        try:
            self._recorder.discard(records)
        except Exception as exc:  # noqa: BLE001 - never kill the loop; the records expire with their TTL
            log.warning("could not remove the records of %d unpublished jobs: %s", len(records), exc)

    def _publish_on_loop(self, item: _Outgoing) -> None:
        exchange, routing_key, body, properties, future = item[:5]
        if self._channel is None or not self._channel.is_open:
            future.set_exception(BrokerUnavailable("not connected to RabbitMQ"))
            return
        try:
            self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except Exception as exc:
            future.set_exception(BrokerUnavailable(f"publish failed: {exc}"))
            return
        self._delivery_tag += 1
        self._pending[self._delivery_tag] = (future, properties.message_id, item.queued_at)
        if self._unconfirmed_since is None:
            self._unconfirmed_since = item.queued_at

    def _on_return(self, _channel, _method, properties, _body) -> None:
        # A returned (unroutable) message is still acked afterwards; remember it to fail that ack.
        if properties.message_id:
            self._returned.add(properties.message_id)

    def _on_confirm(self, frame) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        if method.multiple:
            tags = []
            for tag in self._pending:  # insertion order is ascending delivery-tag order
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            future, message_id, _ = entry
            returned = message_id in self._returned
            self._returned.discard(message_id)  # forgotten whatever the confirm says
            if not acked:
                future.set_exception(BrokerUnavailable("RabbitMQ refused the message (nack)"))
            elif returned:
                future.set_exception(BrokerUnavailable("RabbitMQ could not route the message to a queue"))
            else:
                future.set_result(None)
        oldest = next(iter(self._pending.values()), None)
        self._unconfirmed_since = oldest[2] if oldest is not None else None

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        self._unconfirmed_since = None
        self._returned.clear()
        for future, _, _ in pending.values():  # written, never confirmed
            if not future.done():
                future.set_exception(BrokerUnavailable(reason, maybe_published=True))
        for item in self._outbox.take():  # handed over, neither recorded nor published: fail them now
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BrokerUnavailable(reason, before_handover=True))
