"""Handing work from other threads to the one thread that owns an I/O loop.

Both apps keep a connection whose I/O only its own thread may do: main-app's publisher
(request threads hand it messages) and service-app's consumer (job threads hand it the
messages to settle). Items go into a deque; the loop is woken with the loop's own
thread-safe callback, but only if no wake-up of that same loop is pending already, so
under load one wake-up carries many items. A wake-up is tied to the loop it was sent
to: one lost with a dead connection does not silence that connection's successor.
"""

import collections
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import InvalidStateError
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        # The loop that was last sent a wake-up it has not acted on yet.
        self._woken: object | None = None

    def put(self, item: T, loop: object, wake: Callable[[], bool | None]) -> None:
        """Queue item for `loop` (any thread). wake() must schedule take() on the loop's thread,
        or return False to leave it to a pass the loop is sure to make soon; it is called unless
        that loop has a wake-up pending. If it raises, the loop is gone: the items wait for the
        next loop (which drains on start and on its own timer)."""
        self._items.append(item)
        with self._lock:
            if self._woken is loop:
                return
            self._woken = loop
        try:
            sent = wake() is not False
        except Exception:
            sent = False
        if not sent:
            # No wake-up is pending after all: the next put must decide again (the loop's pass
            # may already have taken this item before the flag was set).
            with self._lock:
                if self._woken is loop:
                    self._woken = None

    def take(self) -> Iterator[T]:
        """Every item queued so far, oldest first (the loop's thread). A wake-up sent from now on
        is a new one."""
        with self._lock:
            self._woken = None
        items = self._items
        while True:
            try:
                yield items.popleft()
            except IndexError:
                return

    def reset(self) -> None:
        """A new connection: a wake-up sent to the previous one was lost with it."""
        with self._lock:
            self._woken = None

    def oldest(self) -> T | None:
        try:
            return self._items[0]
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._items)


class Reply(Generic[T]):
    """The answer to one handed-over item, awaited by the one thread that handed it over.

    The states and methods of a concurrent.futures.Future that the hand-off uses, at a fraction
    of its cost: one lock for the state, and one held lock that finishing releases, instead of
    a condition variable, a waiter lock per wait and callbacks. One waiter only.

    Beyond a Future's: pending → running (taken) → committed (the consumer is about to act on it
    for good: publish) → finished. cancel() succeeds only while pending, withdraw() also while
    running, until the consumer commits. An answer set after either is dropped: the waiter is
    gone."""

    __slots__ = ("_state", "_value", "_error", "_lock", "_finished")

    _PENDING, _RUNNING, _COMMITTED, _CANCELLED, _FINISHED = range(5)

    def __init__(self) -> None:
        self._state = self._PENDING
        self._value: T | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._finished = threading.Lock()
        self._finished.acquire()  # released when a result or an error is set

    def set_running_or_notify_cancel(self) -> bool:
        """The consumer takes it (True), unless the waiter cancelled it (False)."""
        with self._lock:
            if self._state == self._CANCELLED:
                return False
            self._state = self._RUNNING
            return True

    def cancel(self) -> bool:
        """The waiter gives up: True if the consumer had not taken it yet (it never will)."""
        return self._cancel_from(self._PENDING)

    def withdraw(self) -> bool:
        """The waiter gives up on a taken item too: True unless the consumer has committed to it
        or answered it (then it acts on it, or has)."""
        return self._cancel_from(self._PENDING, self._RUNNING)

    def _cancel_from(self, *states: int) -> bool:
        with self._lock:
            if self._state in states:
                self._state = self._CANCELLED
            return self._state == self._CANCELLED

    def commit(self) -> bool:
        """The consumer is about to act on a taken item for good: True, unless the waiter cancelled
        it or it is answered already (False: leave it)."""
        with self._lock:
            if self._state != self._RUNNING:
                return False
            self._state = self._COMMITTED
            return True

    def cancelled(self) -> bool:
        return self._state == self._CANCELLED

    def done(self) -> bool:
        return self._state in (self._CANCELLED, self._FINISHED)

    def set_result(self, value: T) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: T | None, error: BaseException | None) -> None:
        with self._lock:
            if self._state == self._CANCELLED:
                return  # its waiter gave up: nobody reads this answer
            if self._state == self._FINISHED:
                raise InvalidStateError("already finished")
            self._value, self._error, self._state = value, error, self._FINISHED
        self._finished.release()

    def result(self, timeout: float) -> T:
        """The result (or raise the error) once set; TimeoutError if not within `timeout` seconds."""
        if not self._finished.acquire(timeout=timeout):
            raise TimeoutError
        self._finished.release()  # finished for good: a later result() returns at once
        if self._error is not None:
            raise self._error
        return self._value
