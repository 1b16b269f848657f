"""Retry copies are published on a connection of their own, never the consume connection.

While a memory or disk alarm lasts, RabbitMQ stops reading from every connection that
publishes. A retry published on the consume connection would stall that connection's acks
and heartbeats behind a confirm that does not come (and the liveness probe would kill the
pod). So the job thread that decided a retry publishes it here and waits for the confirm;
the consume loop keeps this connection's heartbeats going while no job thread uses it.
pika's BlockingConnection is not thread-safe: one lock serialises every use of it.
"""

import threading
import time

import pika
import pika.exceptions

# Give a connection up when the broker has blocked it this long (then it is reopened).
BLOCKED_CONNECTION_TIMEOUT_SECONDS = 30
# How often the idle connection's events are processed: often enough for any heartbeat.
KEEP_ALIVE_SECONDS = 1.0


class RetryNotPublished(Exception):
    """The broker did not confirm the retry copy (nack, unroutable, connection lost or blocked too long)."""


class RetryPublisher:
    def __init__(self, url: str):
        self.parameters = pika.URLParameters(url)
        if self.parameters.blocked_connection_timeout is None:
            self.parameters.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_SECONDS
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._kept_alive_at = 0.0

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties) -> None:
        """Publish (mandatory) and wait for the broker's confirm; raise RetryNotPublished if it does
        not come. While the broker blocks publishing this waits, at most the blocked timeout."""
        with self._lock:
            try:
                self._open_channel().basic_publish(exchange, routing_key, body, properties, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise RetryNotPublished(type(exc).__name__) from None  # the channel stays usable
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._close()
                raise RetryNotPublished(f"{type(exc).__name__}: {exc}") from None

    def keep_alive(self) -> None:
        """Heartbeats and blocked/unblocked notices while idle; never waits for a job thread."""
        now = time.monotonic()
        if now - self._kept_alive_at < KEEP_ALIVE_SECONDS or not self._lock.acquire(blocking=False):
            return
        self._kept_alive_at = now
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError):
            self._close()
        finally:
            self._lock.release()

    def close(self, wait_seconds: float = 1.0) -> None:
        """Close the connection, unless a job thread is still publishing on it after wait_seconds
        (it may wait up to the blocked timeout during an alarm): then leave it to the process's
        exit, so that shutdown stays within its grace period."""
        if not self._lock.acquire(timeout=wait_seconds):
            return
        try:
            self._close()
        finally:
            self._lock.release()

    def _open_channel(self):
        if self._channel is None or not self._channel.is_open:
            self._close()
            self._connection = pika.BlockingConnection(self.parameters)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken: nothing to release but the socket, which pika drops
                pass
