"""The consumer's bookkeeping: which connection a message came on, which messages are still in
hand, the channel's unacked delivery tags, and the settlements job threads hand back, applied
by the main thread in batches (one wake-up of the connection for many, one `multiple` ack where
the tags allow).

At a steady rate a settlement is not worth a wake-up of its own: while messages are in hand
and deliveries come often, the main thread waits for I/O at most SETTLE_DELAY and settles
whatever finished on every pass, which the next delivery usually brings sooner. So the acks of
several jobs go in one `multiple` ack, on passes the main thread makes anyway, and the quorum
queue writes fewer settlements. Job threads still wake it when its wait is longer (no delivery
lately: a quiet queue, long jobs) or when half the prefetch window is in hand (the broker would
soon stop sending), so it polls at most 1/SETTLE_DELAY times a second, and only for BUSY_SPELL
after each delivery.

A connection is a generation: a settlement for a message of an earlier connection is dropped
(the broker requeued that message when the connection went; its redelivery finds the outcome
already recorded).
"""

import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from jobs_contract import DeadLetterReason
from jobs_contract.handoff import Handoff
from jobs_contract.metrics import child
from service_app import metrics


class SettleAction(StrEnum):
    ACK = "ack"
    RETRY = "retry"  # the job thread publishes the retry copy, then the original is acked
    DEAD = "dead"  # rejected without requeue: the dead-letter exchange takes it
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Settlement:
    """What to do with a message once its job's outcome is recorded."""

    action: SettleAction
    delay_seconds: float = 0.0  # RETRY: the backoff before the next attempt
    reason: DeadLetterReason | None = None  # DEAD: why


# How long a settlement may wait for the main thread's next pass, and how long after a delivery
# the main thread keeps waking that often while messages are in hand.
SETTLE_DELAY = 0.005
BUSY_SPELL = 0.02


class Ledger:
    def __init__(self, connected: threading.Event, prefetch: int):
        self._connected = connected
        self._wake_at_in_hand = max(1, prefetch // 2)
        self._lock = threading.Lock()
        self._generation = 0
        # Messages handed to the job pool and not settled yet, per connection. Those of a lost
        # connection are requeued by the broker, so only the current one's count.
        self._in_hand: dict[int, int] = {}
        # Delivery tags of the current channel not acked or rejected yet (main thread only):
        # exactly the broker's unacked set, so a `multiple` ack never covers a message that
        # has no recorded outcome.
        self._unacked: set[int] = set()
        self._finished: Handoff[tuple[int, int, Settlement]] = Handoff()
        self._delivered_at = 0.0  # main thread: the last delivery
        # When the main thread's current wait for I/O ends at the latest (read by job threads).
        self._next_pass_by = 0.0
        self.channel = None

    # main thread

    def open(self, channel) -> int:
        """A new consume channel; returns its generation."""
        self.channel = channel
        self._unacked = set()
        with self._lock:
            self._generation += 1
            self._in_hand = {self._generation: 0}
        self._finished.reset()  # a wake-up sent to the previous connection was lost with it
        return self._generation

    def close(self) -> None:
        self.channel = None

    def taken(self, generation: int, delivery_tag: int) -> None:
        """A message of this generation's channel goes to the job pool."""
        with self._lock:
            self._in_hand[generation] = self._in_hand.get(generation, 0) + 1
        self._unacked.add(delivery_tag)
        self._delivered_at = time.monotonic()

    def before_wait(self, idle_wait: float) -> float:
        """Before the main thread waits for I/O: settle what finished and return how long it may
        wait: SETTLE_DELAY while messages are in hand and a delivery came lately, else idle_wait
        (a job thread then wakes it to settle)."""
        now = time.monotonic()
        wait = SETTLE_DELAY if self.in_hand() and now - self._delivered_at < BUSY_SPELL else idle_wait
        # Published before looking for settlements: one handed back after this sees the new
        # time; one handed back before it is taken just below.
        self._next_pass_by = now + wait
        if self.has_finished():
            self.settle_finished()
        return wait

    def has_finished(self) -> bool:
        return len(self._finished) > 0

    def settle_finished(self) -> None:
        """Apply every settlement handed back so far."""
        acks: list[int] = []
        try:
            for generation, delivery_tag, settlement in self._finished.take():
                if self._apply(generation, delivery_tag, settlement):
                    acks.append(delivery_tag)
        finally:  # whatever goes wrong with one message, the batch's acks are sent
            if acks:
                self._ack(acks)

    def _apply(self, generation: int, delivery_tag: int, settlement: Settlement) -> bool:
        """Settle one message; True means: ack it (the caller acks the batch)."""
        self.release(generation)
        with self._lock:
            current = generation == self._generation
        channel = self.channel
        if not current or channel is None or not channel.is_open:
            return False  # that channel is gone: the broker redelivers the message, which sees the recorded outcome
        if settlement.action is SettleAction.ACK:
            return True
        self._unacked.discard(delivery_tag)
        # reject, not nack: a requeueing nack does not raise x-delivery-count (RabbitMQ 4.3)
        if settlement.action is SettleAction.REQUEUE:
            channel.basic_reject(delivery_tag, requeue=True)
        else:
            child(metrics.DEAD_LETTERED, settlement.reason).inc()
            channel.basic_reject(delivery_tag, requeue=False)
        return False

    def _ack(self, tags: list[int]) -> None:
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        unacked = self._unacked
        unacked.difference_update(tags)
        # One `multiple` ack covers the tags below every message still unacked.
        lowest_unacked = min(unacked, default=None)
        covered = [t for t in tags if lowest_unacked is None or t < lowest_unacked]
        if len(covered) > 1:
            tags = [t for t in tags if lowest_unacked is not None and t > lowest_unacked]
            tags.insert(0, max(covered))
        # BlockingChannel.basic_ack sends at once (a poll and a send each): queue all but the
        # last on the underlying channel, and let the last one send them all together.
        multiple = len(covered) > 1
        queue = getattr(channel, "_impl", channel)
        for tag in tags[:-1]:
            queue.basic_ack(tag, multiple=multiple)
            multiple = False
        channel.basic_ack(tags[-1], multiple=multiple)

    # any thread

    def is_live(self, generation: int) -> bool:
        """Whether a message delivered on that connection can still be settled on it."""
        with self._lock:
            return generation == self._generation and self._connected.is_set()

    def in_hand(self) -> int:
        """Messages of the current connection not settled yet."""
        with self._lock:
            return self._in_hand.get(self._generation, 0)

    def release(self, generation: int) -> None:
        """A message of that generation needs no settling (or is being settled)."""
        with self._lock:
            if generation in self._in_hand:
                self._in_hand[generation] -= 1

    # job threads

    def hand_back(self, generation: int, delivery_tag: int, settlement: Settlement | None, connection) -> None:
        """A job thread is done with a message: settle it on the main thread (None: nothing to settle)."""
        if settlement is None or connection is None:
            self.release(generation)
            return
        # If that connection is closed, the consume loop settles what is left.
        self._finished.put((generation, delivery_tag, settlement), connection, lambda: self._wake(connection))

    def _wake(self, connection) -> bool:
        """Have the main thread settle now, unless its next pass comes soon enough anyway (False)."""
        if self._next_pass_by - time.monotonic() > SETTLE_DELAY or self.in_hand() >= self._wake_at_in_hand:
            connection.add_callback_threadsafe(self.settle_finished)
            return True
        return False
