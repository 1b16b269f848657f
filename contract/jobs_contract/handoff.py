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
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        # The loop that was last sent a wake-up it has not acted on yet.
        self._woken: object | None = None

    def put(self, item: T, loop: object, wake: Callable[[], None]) -> None:
        """Queue item for `loop` (any thread). wake() must schedule take() on the loop's thread;
        it is called unless that loop has a wake-up pending. If it raises, the loop is gone: the
        items wait for the next loop (which drains on start and on its own timer)."""
        self._items.append(item)
        with self._lock:
            if self._woken is loop:
                return
            self._woken = loop
        try:
            wake()
        except Exception:
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
