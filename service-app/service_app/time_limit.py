"""Per-job time limits: past its deadline, JobTimeout is raised inside the job's own thread."""

import ctypes
import threading
import time

from service_app.jobs import Handler, JobContext, JobTimeout


class _Watchdog:
    """One thread that raises JobTimeout inside job threads past their deadline.

    A threading.Timer per job would start (and tear down) a thread for every message;
    this keeps one deadline per running job (at most WORKER_CONCURRENCY of them).
    """

    def __init__(self) -> None:
        # Job threads take the lock itself (a C lock), never through the Condition: the watchdog
        # raises into a job thread while holding it, and a job thread blocked in disarm() gets
        # that exception as soon as it holds the lock. `with` on a C lock can only take it inside
        # its block, where leaving releases it; Condition.__enter__ is Python code, and the
        # exception raised there, after the lock was taken, would leave it held for good (every
        # later arm() and the watchdog itself would then wait forever).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._deadlines: dict[int, float] = {}  # job thread id -> monotonic deadline
        self._thread: threading.Thread | None = None

    def arm(self, thread_id: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            earliest = min(self._deadlines.values(), default=None)
            self._deadlines[thread_id] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-timeouts", daemon=True)
                self._thread.start()
            elif earliest is None or deadline < earliest:
                self._cond.notify()

    def disarm(self, thread_id: int) -> None:
        """After this returns, no timeout is raised in that thread for its current job (one the
        watchdog raised meanwhile is raised in here instead)."""
        with self._lock:
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


def call_with_time_limit(handler: Handler, payload: dict, ctx: JobContext, timeout: float):
    """handler(payload, ctx) in this thread; past the timeout, JobTimeout is raised inside it.

    The exception is delivered between bytecodes (as Dramatiq's time limit does),
    so a handler blocked in one long C call is interrupted when that call returns.
    """
    thread_id = threading.get_ident()
    try:
        _watchdog.arm(thread_id, timeout)  # in the try: a very short timeout can expire as arm() returns
        try:
            return handler(payload, ctx)
        finally:
            _watchdog.disarm(thread_id)
    except JobTimeout:
        raise JobTimeout(f"timed out after {timeout:g}s") from None
