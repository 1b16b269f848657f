"""service-app's job time limits: one watchdog thread raises JobTimeout inside a job's thread
once its deadline has passed (service_app.time_limit)."""

import ctypes
import inspect
import sys
import threading
import time

import pytest

from service_app.jobs import JobTimeout
from service_app.time_limit import _Watchdog, call_with_time_limit


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # short sleeps: the exception arrives between bytecodes
        time.sleep(0.01)


def _start(body, outcome: list, done: str) -> threading.Thread:
    """body() in a thread of its own; then `done` goes into outcome, or "timed out" if JobTimeout reached it."""
    def run() -> None:
        try:
            body()
            outcome.append(done)
        except JobTimeout:
            outcome.append("timed out")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _run_job(watchdog: _Watchdog, timeout: float, seconds: float, outcome: list) -> threading.Thread:
    def job() -> None:
        watchdog.arm(threading.get_ident(), timeout)
        try:
            _busy(seconds)
        finally:
            watchdog.disarm(threading.get_ident())

    return _start(job, outcome, "finished")


def _wait_until_blocked_taking_the_lock_in_disarm(thread: threading.Thread) -> None:
    """Until the thread's frame has stayed on disarm()'s `with self...` (the lock) for longer than the
    interpreter's switch interval: it is blocked in the lock's acquire, not just passing by."""
    lines, first = inspect.getsourcelines(_Watchdog.disarm)
    lock_line = first + next(i for i, text in enumerate(lines) if text.strip().startswith("with self."))

    def at_the_lock() -> bool:
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code.co_name != "disarm":  # e.g. inside Condition.__enter__
            frame = frame.f_back
        return frame is not None and frame.f_lineno == lock_line

    deadline = time.monotonic() + 5
    while True:
        if at_the_lock():
            time.sleep(10 * sys.getswitchinterval())
            if at_the_lock():
                return
        assert time.monotonic() < deadline, "the job thread never blocked on the watchdog's lock"
        time.sleep(0.005)


def test_a_job_past_its_deadline_gets_job_timeout_and_one_within_it_does_not():
    with pytest.raises(JobTimeout, match="timed out after 0.2s"):
        call_with_time_limit(lambda payload, ctx: _busy(5), {}, None, 0.2)
    assert call_with_time_limit(lambda payload, ctx: payload, {"n": 1}, None, 5) == {"n": 1}


def test_a_timeout_that_reaches_a_job_thread_waiting_in_disarm_leaves_the_watchdog_working():
    """The job returned just as its deadline passed: the watchdog, holding its lock, raises into
    the job thread, which is waiting for that lock in disarm(). The job thread gets JobTimeout,
    and the lock must not stay held: every later arm() and the watchdog itself need it."""
    watchdog = _Watchdog()
    outcome: list[str] = []

    with watchdog._cond:  # what the watchdog's thread holds while it raises
        # A job that has returned: its thread now waits for the lock in disarm().
        thread = _start(lambda: watchdog.disarm(threading.get_ident()), outcome, "disarmed")
        _wait_until_blocked_taking_the_lock_in_disarm(thread)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(JobTimeout))
    thread.join(5)
    assert outcome == ["timed out"]

    # The watchdog still times out the next job, and lets the one after finish.
    later: list[str] = []
    _run_job(watchdog, 0.2, 5, later).join(5)
    _run_job(watchdog, 5, 0.1, later).join(5)
    assert later == ["timed out", "finished"]
