"""service-app's job time limits: one watchdog thread raises JobTimeout inside a job's thread
once its deadline has passed (service_app.time_limit)."""

import ctypes
import threading
import time

import pytest

from service_app.jobs import JobTimeout
from service_app.time_limit import _Watchdog, call_with_time_limit


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # short sleeps: the exception arrives between bytecodes
        time.sleep(0.01)


def _run_job(watchdog: _Watchdog, timeout: float, seconds: float, outcome: list) -> threading.Thread:
    def job() -> None:
        watchdog.arm(threading.get_ident(), timeout)
        try:
            try:
                _busy(seconds)
            finally:
                watchdog.disarm(threading.get_ident())
            outcome.append("finished")
        except JobTimeout:
            outcome.append("timed out")

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    return thread


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

    def returning_job() -> None:
        try:
            watchdog.disarm(threading.get_ident())
            outcome.append("disarmed")
        except JobTimeout:
            outcome.append("timed out")

    thread = threading.Thread(target=returning_job, daemon=True)
    with watchdog._cond:  # what the watchdog's thread holds while it raises
        thread.start()
        time.sleep(0.2)  # the job thread is now waiting for the lock in disarm()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(JobTimeout))
    thread.join(5)
    assert outcome == ["timed out"]

    # The watchdog still times out the next job, and lets the one after finish.
    later: list[str] = []
    _run_job(watchdog, 0.2, 5, later).join(5)
    _run_job(watchdog, 5, 0.1, later).join(5)
    assert later == ["timed out", "finished"]
