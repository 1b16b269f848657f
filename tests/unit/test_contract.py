import threading
from concurrent.futures import InvalidStateError

import pika
import pytest

from jobs_contract import JOB_TYPES, JobMessage, Limits, PoisonMessage, ValidationFailed, topology
from jobs_contract.catalog import RequestValidator
from jobs_contract.handoff import Handoff, Reply
from jobs_contract.message import HEADER_ATTEMPT, HEADER_SCHEMA_VERSION

validator = RequestValidator(Limits(max_sleep_seconds=10, max_cpu_ms=1000, max_fail_times=3))


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"type": "echo", "payload": {"a": [1, 2]}}, ("echo", {"a": [1, 2]})),
        ({"type": "echo"}, ("echo", {})),
        ({"type": "sleep", "payload": {"seconds": 0.5}}, ("sleep", {"seconds": 0.5})),
        ({"type": "cpu", "payload": {"ms": 1000}}, ("cpu", {"ms": 1000})),
        ({"type": "fail", "payload": {}}, ("fail", {})),
        ({"type": "flaky", "payload": {"fail_times": 3}}, ("flaky", {"fail_times": 3})),
    ],
)
def test_valid_requests(document, expected):
    assert validator.validate(document) == expected


@pytest.mark.parametrize(
    ("document", "pointer"),
    [
        ([], "/"),
        ({"payload": {}}, "/type"),
        ({"type": 3}, "/type"),
        ({"type": "nope"}, "/type"),
        ({"type": "echo", "extra": 1}, "/extra"),
        ({"type": "echo", "payload": []}, "/payload"),
        ({"type": "sleep", "payload": {}}, "/payload/seconds"),
        ({"type": "sleep", "payload": {"seconds": -1}}, "/payload/seconds"),
        ({"type": "sleep", "payload": {"seconds": 11}}, "/payload/seconds"),
        ({"type": "sleep", "payload": {"seconds": "1"}}, "/payload/seconds"),
        ({"type": "cpu", "payload": {"ms": 1.5}}, "/payload/ms"),
        ({"type": "cpu", "payload": {"ms": 10**30}}, "/payload/ms"),
        ({"type": "flaky", "payload": {"fail_times": 4}}, "/payload/fail_times"),
        ({"type": "flaky", "payload": {"fail_times": 1, "x": 1}}, "/payload/x"),
    ],
)
def test_invalid_requests_name_the_field(document, pointer):
    with pytest.raises(ValidationFailed) as info:
        validator.validate(document)
    assert info.value.field == pointer


def test_unknown_type_lists_known_types():
    with pytest.raises(ValidationFailed, match="known types: echo, sleep, cpu, fail, flaky"):
        validator.validate({"type": "mine"})


def test_limits_from_env(monkeypatch):
    monkeypatch.setenv("JOB_MAX_SLEEP_SECONDS", "7")
    assert Limits.from_env().max_sleep_seconds == 7
    monkeypatch.setenv("JOB_MAX_SLEEP_SECONDS", "seven")
    with pytest.raises(ValueError, match="JOB_MAX_SLEEP_SECONDS must be an integer"):
        Limits.from_env()


def test_message_round_trip():
    job = JobMessage(id="j1", type="echo", payload={"x": 1}, client="c", created_at="2026-01-01T00:00:00Z")
    body, properties = job.encode()
    assert properties.delivery_mode == 2 and properties.message_id == "j1"
    decoded = JobMessage.decode(body, properties)
    assert decoded == job
    retry = decoded.next_attempt()
    assert retry.attempt == 2 and retry.enqueued_at == job.enqueued_at


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"{not json", {HEADER_SCHEMA_VERSION: 1}, "unparseable"),
        (b"[1]", {HEADER_SCHEMA_VERSION: 1}, "unparseable"),
        (b'{"v":1,"id":"x"}', {HEADER_SCHEMA_VERSION: 1}, "malformed"),
        (b'{"v":1,"id":"x","type":"echo","payload":[],"client":"c","created_at":"t"}', {HEADER_SCHEMA_VERSION: 1},
         "malformed"),
        (b'{"v":1,"id":"x","type":"echo","payload":{},"client":"c","created_at":"t"}', {}, "schema_version"),
        (b'{"v":2,"id":"x","type":"echo","payload":{},"client":"c","created_at":"t"}', {HEADER_SCHEMA_VERSION: 1},
         "schema_version"),
        (b'{"v":1,"id":"x","type":"echo","payload":{},"client":"c","created_at":"t"}',
         {HEADER_SCHEMA_VERSION: 1, HEADER_ATTEMPT: "many"}, "malformed"),
    ],
)
def test_poison_messages(body, headers, reason):
    with pytest.raises(PoisonMessage) as info:
        JobMessage.decode(body, pika.BasicProperties(headers=headers))
    assert info.value.reason == reason


def test_every_job_type_has_a_schema_and_a_handler():
    from service_app.jobs import HANDLERS, check_catalog

    check_catalog()
    assert set(HANDLERS) == set(JOB_TYPES)


def test_handler_for_unknown_type_is_refused():
    from service_app.jobs import job

    with pytest.raises(ValueError, match="no payload schema"):
        job("not-in-the-catalog")


@pytest.mark.parametrize(
    ("delay", "tier"), [(0, 100), (0.05, 100), (0.1, 100), (0.19, 100), (0.2, 200), (1.0, 800), (300, 204800),
                        (10**6, topology.DELAY_TIERS_MS[-1])]
)
def test_delay_tier_never_longer_than_the_delay(delay, tier):
    assert topology.delay_tier_ms(delay) == tier


def test_topology_is_quorum_with_dead_lettering():
    queues = {q.name: q.arguments for q in topology.QUEUES}
    assert all(args["x-queue-type"] == "quorum" for args in queues.values())
    assert queues["jobs"]["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE
    assert queues["jobs"]["x-delivery-limit"] == topology.BROKER_DELIVERY_LIMIT
    for tier in topology.DELAY_TIERS_MS:
        args = queues[topology.delay_queue_name(tier)]
        assert args["x-dead-letter-exchange"] == topology.EXCHANGE
        assert args["x-dead-letter-routing-key"] == topology.ROUTING_KEY
    bound = {(b.exchange, b.queue) for b in topology.BINDINGS}
    assert all((e, q) in bound for e, q in [("jobs", "jobs"), ("jobs.dlx", "jobs.dead")])
    definitions = topology.definitions()
    assert len(definitions["queues"]) == len(topology.QUEUES)


def test_published_request_schema_agrees_with_the_validator():
    """What the OpenAPI document calls valid, the API accepts, and the other way round."""
    from jsonschema import Draft202012Validator

    from jobs_contract.catalog import request_schema

    limits = Limits(max_sleep_seconds=10, max_cpu_ms=1000, max_fail_times=3)
    schema = Draft202012Validator(request_schema(limits))
    documents = [
        {"type": "echo"}, {"type": "sleep"}, {"type": "cpu"}, {"type": "flaky"}, {"type": "fail"},
        {"type": "sleep", "payload": {"seconds": 1}}, {"type": "sleep", "payload": {"seconds": 11}},
        {"type": "cpu", "payload": {"ms": 5}}, {"type": "fail", "payload": {"message": "x"}},
        {"type": "flaky", "payload": {"fail_times": 4}}, {"type": "nope"}, {"type": "echo", "x": 1},
    ]
    for document in documents:
        try:
            validator.__class__(limits).validate(document)
            accepted = True
        except ValidationFailed:
            accepted = False
        assert schema.is_valid(document) == accepted, document


def test_max_nesting_is_what_orjson_can_write():
    import orjson

    from jobs_contract.catalog import MAX_NESTING

    def nested(depth: int):
        value: list = []
        for _ in range(depth - 1):
            value = [value]
        return value

    orjson.dumps(nested(MAX_NESTING))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(nested(MAX_NESTING + 1))


def test_nesting_deeper_than_orjson_writes_is_invalid():
    from jobs_contract.catalog import MAX_NESTING

    deep: dict = {}
    for _ in range(MAX_NESTING - 2):  # the document is the payload plus one level
        deep = {"a": deep}
    assert validator.validate({"type": "echo", "payload": deep})[0] == "echo"
    with pytest.raises(ValidationFailed) as info:
        validator.validate({"type": "echo", "payload": {"b": deep}})
    assert info.value.field == "/payload" and f"deeper than {MAX_NESTING}" in info.value.message
    with pytest.raises(ValidationFailed):  # the worker checks messages the same way
        validator.validate_payload("echo", {"b": deep})


def test_reply_hands_a_result_or_an_error_to_the_waiting_thread():
    reply = Reply()
    with pytest.raises(TimeoutError):
        reply.result(0.01)
    assert reply.set_running_or_notify_cancel()
    assert not reply.cancel()  # taken: too late to cancel
    assert reply.commit() and not reply.withdraw()  # committed to: too late to withdraw
    setter = threading.Timer(0.05, reply.set_result, args=("confirmed",))
    setter.start()
    assert reply.result(5) == "confirmed"
    assert reply.result(0) == "confirmed" and reply.done()
    with pytest.raises(InvalidStateError):
        reply.set_exception(RuntimeError("twice"))
    failed = Reply()
    assert failed.set_running_or_notify_cancel()
    failed.set_exception(RuntimeError("nack"))
    with pytest.raises(RuntimeError, match="nack"):
        failed.result(0)


def test_a_cancelled_reply_is_never_taken():
    reply = Reply()
    assert reply.cancel() and reply.cancel() and reply.done()
    assert not reply.set_running_or_notify_cancel()
    reply.set_result("late")  # dropped: nobody waits for it
    with pytest.raises(TimeoutError):
        reply.result(0)


def test_a_taken_reply_can_be_withdrawn_until_the_consumer_commits_to_it():
    """The publisher's loop takes a message, writes its record, then commits to publishing it: a
    request that gives up while the record is written withdraws it, and it is never published."""
    given_up = Reply()
    assert given_up.set_running_or_notify_cancel()
    assert given_up.withdraw() and given_up.cancelled()
    assert not given_up.commit()  # the loop leaves it
    given_up.set_exception(RuntimeError("late"))  # dropped
    with pytest.raises(TimeoutError):
        given_up.result(0)
    answered = Reply()  # answered by its record (an existing idempotency key): nothing to commit to
    assert answered.set_running_or_notify_cancel()
    answered.set_result("the key's job")
    assert not answered.commit() and not answered.withdraw()
    assert answered.result(0) == "the key's job"
    with pytest.raises(InvalidStateError):
        answered.set_result("twice")


def test_one_wake_up_carries_many_items_until_the_loop_takes_them():
    handoff, loop, wakes = Handoff(), object(), []
    for item in (1, 2, 3):
        handoff.put(item, loop, lambda: wakes.append(True))
    assert len(wakes) == 1
    assert list(handoff.take()) == [1, 2, 3]
    handoff.put(4, loop, lambda: wakes.append(True))
    assert len(wakes) == 2


def test_a_wake_up_left_to_the_loop_is_not_pending():
    """A wake() that returns False sent nothing: the next put must decide again (the loop's pass
    may have taken the first item already, and may now wait long)."""
    handoff, loop, wakes = Handoff(), object(), []
    handoff.put(1, loop, lambda: False)
    handoff.put(2, loop, lambda: wakes.append(True))
    assert wakes == [True]
    assert list(handoff.take()) == [1, 2]


def test_a_wake_up_that_fails_is_not_pending_and_the_items_wait():
    handoff, loop, wakes = Handoff(), object(), []

    def loop_gone():
        raise RuntimeError("connection closed")

    handoff.put(1, loop, loop_gone)
    handoff.put(2, loop, lambda: wakes.append(True))
    assert wakes == [True] and len(handoff) == 2


def test_utcnow_is_isoformat_to_the_millisecond(monkeypatch):
    """Job timestamps: the same text as datetime's isoformat (milliseconds, truncated, 'Z'), also
    when consecutive calls fall in one second (its date and time are reused) or in the next."""
    import time
    from datetime import UTC, datetime

    from jobs_contract import store

    for now in (1_798_761_599.9996, 1_798_761_600.0, 1_798_761_600.0415, 1_798_761_600.5, 1_798_761_601.25):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert store.utcnow() == expected
