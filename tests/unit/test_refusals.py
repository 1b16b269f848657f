"""A refused submission that wrote nothing costs no clean-up in Redis, and a failure that
repeats with every request while a dependency is down is logged once per period, with the count
of those left out, not once per request."""

import logging

import pytest

from jobs_contract import JobMessage
from jobs_contract.store import NewJob
from main_app import submission
from main_app.broker import BrokerUnavailable
from main_app.problems import Problem


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_warning_per_period_and_the_rest_counted_into_the_next(caplog, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(submission.time, "monotonic", clock)
    warn = submission._ThrottledWarning(period=10.0)
    with caplog.at_level(logging.WARNING, logger="main_app.submission"):
        for n in range(50):
            warn("job %s not accepted: %s", f"job-{n}", "not connected")
            clock.now += 0.1  # 50 refusals over 5 s
        clock.now += 5.0  # 10 s after the first
        warn("job %s not accepted: %s", "job-late", "not connected")
        warn("job %s not accepted: %s", "job-later", "not connected")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "job job-0 not accepted: not connected",
        "job job-late not accepted: not connected (and 49 more like it since the last such warning)",
    ]


class _Publisher:
    def __init__(self, error: BrokerUnavailable) -> None:
        self.error = error

    def publish(self, *args, **kwargs):
        raise self.error


class _Store:
    def __init__(self) -> None:
        self.discarded: list[tuple] = []

    def discard(self, job_id, client, idempotency_key=None, keep_key=False) -> None:
        self.discarded.append((job_id, client, idempotency_key, keep_key))


def _refuse(error: BrokerUnavailable, with_record: bool, recreated: bool = True) -> _Store:
    store = _Store()
    submissions = submission.Submissions(store, _Publisher(error), validator=None, publish_timeout_seconds=2.0)
    message = JobMessage(id="job-1", type="echo", payload={}, client="c", created_at="2026-12-02T00:00:00.000000Z")
    record = NewJob("job-1", "c", "echo", message.created_at) if with_record else None
    with pytest.raises(Problem) as refused:
        submissions._publish(message, message.encode(), None, record=record, undo_record=not with_record and recreated)
    assert refused.value.status == 503
    return store


@pytest.mark.parametrize("reason", ["not connected to RabbitMQ", "RabbitMQ took no message within 2s"])
def test_a_refusal_before_the_loop_took_the_message_cleans_up_nothing(reason):
    # The record is written by the publisher's loop, once it takes the message: not here.
    assert _refuse(BrokerUnavailable(reason, before_handover=True), with_record=True).discarded == []


def test_a_refusal_after_the_record_was_written_removes_it():
    store = _refuse(BrokerUnavailable("not connected to RabbitMQ"), with_record=True)
    assert store.discarded == [("job-1", "c", None, False)]
    store = _refuse(BrokerUnavailable("no confirm from RabbitMQ within 2s", maybe_published=True), with_record=True)
    assert store.discarded == [("job-1", "c", None, True)]  # maybe queued: the key would stay


def test_a_republished_job_is_cleaned_up_even_when_refused_before_the_loop():
    # Republishing (an Idempotency-Key left pending) sends no record: when the claim of the key
    # wrote the job's record again, a refusal must remove it whatever stage refused it.
    store = _refuse(BrokerUnavailable("not connected to RabbitMQ", before_handover=True), with_record=False)
    assert store.discarded == [("job-1", "c", None, True)]


@pytest.mark.parametrize("maybe_published", [False, True])
def test_a_refused_republish_keeps_a_record_it_did_not_write(maybe_published):
    # The record of an earlier request's job, which may have been answered 202: not this request's to undo.
    store = _refuse(BrokerUnavailable("no confirm within 2s", maybe_published=maybe_published),
                    with_record=False, recreated=False)
    assert store.discarded == []
