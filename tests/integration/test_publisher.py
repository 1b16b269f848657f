"""main-app's publisher against a real RabbitMQ: reconnects, wake-ups, readiness, resources.

Thread interleavings are driven with events, never by sleeping: the request thread is
held at a chosen point while the test replaces the connection under it.
"""

import os
import signal
import threading
import time
from concurrent.futures import Future

import pika
import pika.frame
import pytest
import redis
from pika.spec import Basic
from test_api import AUTH, make_settings

from conftest import queue_depth
from jobs_contract import JobStore, topology
from jobs_contract.handoff import Reply
from jobs_contract.store import IdempotencyRecord, NewJob
from main_app import broker
from main_app.api import create_app
from main_app.broker import BrokerUnavailable, Publisher, RecordTimeout


def publish(publisher: Publisher, timeout: float = 3.0) -> None:
    properties = pika.BasicProperties(delivery_mode=2, message_id="m")
    publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties, timeout=timeout)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def reconnect(rabbit, publisher: Publisher):
    """Have the broker close every connection; return once the publisher is ready on a new one."""
    old = publisher._connection
    rabbit.ctl("close_all_connections", "test: connection replaced")
    wait_until(lambda: publisher._connection is not old and publisher._ready.is_set(), 30,
               "the publisher did not reconnect")
    return old


class HoldingEvent(threading.Event):
    """Stands in for the publisher's readiness flag: the first is_set() made by the thread
    named `holds` waits there until released, as if that thread were descheduled."""

    def __init__(self, holds: str):
        super().__init__()
        self.holds = holds
        self.held = threading.Event()
        self.release = threading.Event()

    def is_set(self) -> bool:
        if threading.current_thread().name == self.holds and not self.held.is_set():
            self.held.set()
            assert self.release.wait(30)
        return super().is_set()


@pytest.fixture
def publisher(rabbit):
    started = Publisher(rabbit.url).start()
    assert started.wait_ready(15)
    yield started
    started.stop()


@pytest.mark.parametrize("rescue", ["backstop drain", "next request"])
def test_a_wake_up_sent_to_a_dead_connection_does_not_stop_publishing(rabbit, publisher, monkeypatch, rescue):
    """A request thread reads the connection, is descheduled while that connection dies and the
    next one connects, then wakes the dead connection's loop. Publishing must go on: its own
    message is published on the new connection by the loop's periodic drain, or by the next
    request's wake-up (which must not be suppressed by the lost one), and so is every later one."""
    if rescue == "next request":  # only the wake-up tied to its connection can help
        monkeypatch.setattr(broker, "BACKSTOP_DRAIN_SECONDS", 3600, raising=False)
    holding = HoldingEvent(holds="request")
    holding.set()
    publisher._ready = holding
    outcome: Future = Future()

    def request() -> None:
        try:
            publish(publisher, timeout=3.0)
            outcome.set_result("published")
        except BrokerUnavailable as exc:
            outcome.set_result(f"503: {exc}")

    thread = threading.Thread(target=request, name="request")
    thread.start()
    assert holding.held.wait(10), "the request thread never reached the readiness check"
    old = reconnect(rabbit, publisher)  # the request thread still holds the old connection
    woke_old_loop = threading.Event()
    wake = old.ioloop.add_callback_threadsafe

    def spy(callback):
        try:
            return wake(callback)
        finally:
            woke_old_loop.set()

    old.ioloop.add_callback_threadsafe = spy
    holding.release.set()
    assert woke_old_loop.wait(10), "the request thread did not wake the dead connection's loop"
    if rescue == "backstop drain":
        thread.join(10)  # nothing else wakes the new loop meanwhile
        assert outcome.result(0) == "published"
    for _ in range(3):
        started = time.monotonic()
        publish(publisher, timeout=2.0)
        assert time.monotonic() - started < 1.0
    thread.join(10)
    assert outcome.result(0) == "published"


def test_readiness_fails_while_the_publisher_is_not_publishing(rabbit, redis_node, redis_client, amqp):
    """Messages waiting in the outbox that the I/O loop does not take within the publish
    timeout make /readyz fail, whatever the connection state says."""
    app = create_app(make_settings(rabbit.url, redis_node.url, publish_timeout_seconds=0.5))
    publisher = app.extensions["publisher"]
    client = app.test_client()
    loop_free = threading.Event()
    try:
        assert publisher.wait_ready(15)
        assert client.get("/readyz").status_code == 200
        publisher._connection.ioloop.add_callback_threadsafe(lambda: loop_free.wait(30))  # the loop hangs
        answers: list[int] = []
        submit = threading.Thread(target=lambda: answers.append(
            app.test_client().post("/jobs", json={"type": "echo"}, headers=AUTH).status_code))
        submit.start()
        wait_until(lambda: client.get("/readyz").status_code == 503, 10,
                   "/readyz stayed ready while nothing was published")
        assert client.get("/readyz").get_json()["checks"]["broker"] is False
        submit.join(10)
        assert answers == [503]
        loop_free.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, 10, "/readyz did not recover")
        assert client.post("/jobs", json={"type": "echo"}, headers=AUTH).status_code == 202
    finally:
        loop_free.set()
        publisher.stop()


def test_a_broker_that_stops_confirming_fails_submissions_at_once(rabbit, redis_node):
    """RabbitMQ stops answering while its connections stay open (its node frozen with SIGSTOP):
    once a message has waited PUBLISH_TIMEOUT_SECONDS for its confirm (counted from when its
    request handed it over), main-app is not ready and answers new
    submissions 503 at once, instead of holding a request thread for the whole timeout each
    (which, under load, queued every request, /healthz included, behind the stall). The broker's
    confirms coming back end it."""
    app = create_app(make_settings(rabbit.url, redis_node.url, publish_timeout_seconds=1.0))
    publisher = app.extensions["publisher"]
    client = app.test_client()
    broker_pid = rabbit.os_pid()
    assert broker_pid
    try:
        assert publisher.wait_ready(15)
        assert client.post("/jobs", json={"type": "echo"}, headers=AUTH).status_code == 202
        os.kill(broker_pid, signal.SIGSTOP)
        # Written to the socket, never confirmed: 503 after the timeout (and up to 1 s more for a
        # confirm that may be just arriving).
        assert client.post("/jobs", json={"type": "echo"}, headers=AUTH).status_code == 503
        started = time.monotonic()
        answer = client.post("/jobs", json={"type": "echo"}, headers=AUTH)
        assert answer.status_code == 503 and "broker is unavailable" in answer.get_json()["detail"]
        assert answer.headers["Retry-After"]
        assert time.monotonic() - started < 0.5, "the request waited for the stalled broker"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["broker"] is False
        assert client.get("/healthz").status_code == 200
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    try:
        wait_until(lambda: client.get("/readyz").status_code == 200, 15, "/readyz did not recover")
        assert client.post("/jobs", json={"type": "echo"}, headers=AUTH).status_code == 202
    finally:
        publisher.stop()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_connection_loop_is_closed(rabbit, publisher):
    """Every reconnect makes a new pika I/O loop (a poller and a socket pair); the old one is
    closed, not left to the garbage collector."""
    old_connections = [reconnect(rabbit, publisher)]  # kept referenced: only an explicit close frees them
    before = _open_fds()
    for _ in range(3):
        old_connections.append(reconnect(rabbit, publisher))
    publish(publisher)
    assert _open_fds() <= before, f"{_open_fds() - before} descriptors more after 3 reconnects"


def test_a_returned_then_nacked_message_is_forgotten(rabbit):
    publisher = Publisher(rabbit.url)  # not started: its loop-thread methods are driven directly
    future: Future = Future()
    future.set_running_or_notify_cancel()
    publisher._pending[1] = (future, "m-1", time.monotonic())
    publisher._on_return(None, None, pika.BasicProperties(message_id="m-1"), b"")
    publisher._on_confirm(pika.frame.Method(1, Basic.Nack(delivery_tag=1)))
    with pytest.raises(BrokerUnavailable, match="nack"):
        future.result(0)
    assert publisher._returned == set()



class OpenChannel:
    is_open = True

    def basic_publish(self, *args, **kwargs) -> None:
        pass


def test_a_confirm_overdue_stalls_the_publisher_until_every_older_message_is_answered():
    """Which message's confirm is overdue follows the broker's answers one by one: an ack, a
    nack, a returned message's ack and a `multiple` ack each end the wait of the messages they
    answer, and the oldest message still waiting decides. Driven on the loop's methods directly."""
    publisher = Publisher("amqp://guest:guest@127.0.0.1:1/%2F", stall_seconds=5.0)  # never started
    publisher._channel = OpenChannel()
    now = time.monotonic()
    replies = []
    for tag, waited in enumerate((30.0, 10.0, 6.0, 1.0), start=1):
        reply = Reply()
        reply.set_running_or_notify_cancel()
        replies.append(reply)
        properties = pika.BasicProperties(message_id=f"m-{tag}")
        publisher._publish_on_loop(broker._Outgoing("jobs", "jobs", b"{}", properties, reply, now - waited))

    def confirm(method) -> None:
        publisher._on_confirm(pika.frame.Method(1, method))

    assert publisher.stalled  # m-1, handed over 30 s ago, has no confirm
    confirm(Basic.Ack(delivery_tag=1))
    assert publisher.stalled  # m-2: 10 s
    confirm(Basic.Nack(delivery_tag=2))
    assert publisher.stalled and publisher._unconfirmed_since == now - 6.0  # m-3: 6 s
    publisher._on_return(None, None, pika.BasicProperties(message_id="m-3"), b"")
    confirm(Basic.Ack(delivery_tag=3))
    assert not publisher.stalled and publisher._unconfirmed_since == now - 1.0  # m-4: 1 s, within bounds
    publisher._publish_on_loop(broker._Outgoing("jobs", "jobs", b"{}", pika.BasicProperties(message_id="m-5"),
                                                Reply(), now - 20.0))
    assert not publisher.stalled  # the first message published and still waiting decides (m-4)
    confirm(Basic.Ack(delivery_tag=5, multiple=True))
    assert publisher._unconfirmed_since is None and not publisher.stalled
    assert [r.done() for r in replies] == [True, True, True, True]
    with pytest.raises(BrokerUnavailable, match="nack"):
        replies[1].result(0)
    with pytest.raises(BrokerUnavailable, match="route"):
        replies[2].result(0)

    publisher._publish_on_loop(broker._Outgoing("jobs", "jobs", b"{}", pika.BasicProperties(message_id="m-6"),
                                                Reply(), now - 30.0))
    assert publisher.stalled
    publisher._fail_pending("connection to RabbitMQ lost")  # a lost connection ends it too
    assert publisher._unconfirmed_since is None and not publisher.stalled

class SpyRecorder:
    """The store's recorder, counting its calls (each one Redis round trip) and their sizes, and
    the records it is asked to remove."""

    def __init__(self, store: JobStore, refuse: set[str] = frozenset()):
        self.store = store
        self.refuse = refuse  # job ids answered with a store error instead of being written
        self.batches: list[list[str]] = []
        self.discarded: list[str] = []
        self.written = threading.Event()  # set after each batch is written
        self.answer = threading.Event()  # a batch's answer waits for it (a slow store)
        self.answer.set()

    def record(self, jobs: list[NewJob]) -> list:
        self.batches.append([job.job_id for job in jobs])
        written = self.store.create_many([job for job in jobs if job.job_id not in self.refuse])
        self.written.set()
        self.answer.wait(30)
        answers = iter(written)
        return [redis.ResponseError("refused") if job.job_id in self.refuse else next(answers) for job in jobs]

    def discard(self, jobs: list[NewJob]) -> None:
        for job in jobs:
            self.discarded.append(job.job_id)
            self.store.withdraw(job)


def hold_loop(publisher: Publisher) -> threading.Event:
    """Keep the publisher's I/O loop busy until the returned event is set."""
    release = threading.Event()
    publisher._connection.ioloop.add_callback_threadsafe(lambda: release.wait(30))
    return release


def publish_recorded(publisher: Publisher, job_id: str, outcomes: dict, timeout: float = 5.0) -> threading.Thread:
    def run() -> None:
        properties = pika.BasicProperties(delivery_mode=2, message_id=job_id)
        try:
            outcomes[job_id] = publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties,
                                                 timeout=timeout, record=NewJob(job_id, "c", "echo", "t"))
        except (BrokerUnavailable, RecordTimeout, redis.RedisError) as exc:
            outcomes[job_id] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def recording_publisher(rabbit, redis_node, redis_client, amqp):
    recorder = SpyRecorder(JobStore.from_url(redis_node.url), refuse={"job-refused"})
    started = Publisher(rabbit.url, recorder=recorder).start()
    assert started.wait_ready(15)
    yield started, recorder
    started.stop()


def test_records_of_a_batch_are_written_in_one_round_trip_before_their_messages(recording_publisher, redis_client,
                                                                               amqp):
    """Messages handed over while the loop is busy are recorded together (one recorder call),
    each before it is published; a record the store refuses fails its request, unpublished."""
    publisher, recorder = recording_publisher
    release = hold_loop(publisher)
    outcomes: dict = {}
    ids = [f"job-{n}" for n in range(8)] + ["job-refused"]
    threads = [publish_recorded(publisher, job_id, outcomes) for job_id in ids]
    wait_until(lambda: len(publisher._outbox) == len(ids), 10, "the requests did not all hand over")
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == sorted(ids)  # one batch, one round trip
    assert isinstance(outcomes.pop("job-refused"), redis.ResponseError)
    assert outcomes == {job_id: None for job_id in ids[:-1]}  # None: recorded and confirmed
    assert sorted(key.decode() for key in redis_client.keys("job:*")) == sorted(f"job:{i}" for i in ids[:-1])
    assert queue_depth(amqp, topology.QUEUE) == len(ids) - 1


def test_an_existing_idempotency_record_is_returned_and_nothing_published(recording_publisher, redis_client, amqp):
    publisher, recorder = recording_publisher
    recorder.store.create("job-first", "c", "echo", "t", ("key-1", "hash"))
    properties = pika.BasicProperties(delivery_mode=2, message_id="job-second")
    answer = publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties, timeout=5,
                               record=NewJob("job-second", "c", "echo", "t", ("key-1", "hash")))
    assert answer.job_id == "job-first"
    assert redis_client.exists("job:job-second") == 0
    assert queue_depth(amqp, topology.QUEUE) == 0


def test_a_request_that_gave_up_before_the_loop_took_it_is_neither_recorded_nor_published(
        recording_publisher, redis_client, amqp):
    publisher, recorder = recording_publisher
    release = hold_loop(publisher)
    outcomes: dict = {}
    publish_recorded(publisher, "job-late", outcomes, timeout=0.3).join(10)
    assert isinstance(outcomes["job-late"], BrokerUnavailable) and not outcomes["job-late"].maybe_published
    release.set()
    publish(publisher)  # the loop has run its outbox since
    assert recorder.batches == []
    assert redis_client.exists("job:job-late") == 0
    assert queue_depth(amqp, topology.QUEUE) == 1  # only the later, unrecorded message


def test_a_request_that_gave_up_while_its_record_was_written_is_never_published(
        recording_publisher, redis_client, amqp):
    """The record is written, but its answer comes after the request stopped waiting (a slow
    store): the request is refused (RecordTimeout: never published), and the loop removes the
    record (and the idempotency key) instead of publishing the message."""
    publisher, recorder = recording_publisher
    recorder.answer.clear()
    outcomes: dict = {}
    thread = publish_recorded(publisher, "job-slow", outcomes, timeout=0.3)
    assert recorder.written.wait(10)
    thread.join(10)
    assert isinstance(outcomes["job-slow"], RecordTimeout)
    assert redis_client.exists("job:job-slow") == 1  # written, not yet answered
    recorder.answer.set()
    publish(publisher)  # the loop has finished that pass since
    assert recorder.discarded == ["job-slow"]
    assert redis_client.exists("job:job-slow") == 0
    assert queue_depth(amqp, topology.QUEUE) == 1  # only the later, unrecorded message


def test_a_late_withdrawal_leaves_a_key_a_retry_took_over_and_its_record(recording_publisher, rabbit, redis_node,
                                                                         redis_client, amqp):
    """Another main-app process takes the key over once it is stale, publishes the job again and
    answers 202 (its key confirmed) before this loop gets its slow answer: the loop's withdrawal
    must then leave the key and the record alone."""
    publisher, recorder = recording_publisher
    store = JobStore.from_url(redis_node.url)
    recorder.answer.clear()
    outcome: dict = {}
    job = NewJob("job-a", "c", "echo", "t", ("K", "h"), 1, time.time() + 1)

    def request() -> None:
        properties = pika.BasicProperties(delivery_mode=2, message_id="job-a")
        try:
            outcome["a"] = publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties,
                                             timeout=0.3, record=job)
        except (BrokerUnavailable, RecordTimeout) as exc:
            outcome["a"] = exc

    thread = threading.Thread(target=request)
    thread.start()
    assert recorder.written.wait(10)
    thread.join(10)
    assert isinstance(outcome["a"], RecordTimeout)
    time.sleep(1.2)  # the key is stale: the other process's retry claims it
    existing = store.create_many([NewJob("job-b", "c", "echo", "t2", ("K", "h"), 1)])[0]
    assert existing.job_id == "job-a" and existing.stale()
    assert store.claim_stale("c", "K", existing, "echo", "t", 1) == "t"
    other = Publisher(rabbit.url).start()
    try:
        assert other.wait_ready(15)
        properties = pika.BasicProperties(delivery_mode=2, message_id="job-a")
        assert other.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties, timeout=3) is None
    finally:
        other.stop()
    assert store.confirm_idempotency("c", "K", "job-a", "h")  # its 202
    recorder.answer.set()
    wait_until(lambda: recorder.discarded == ["job-a"], 10, "the loop did not withdraw the job")
    publish(publisher)  # the loop's pass is over
    assert store.get("job-a")["status"] == "queued"
    assert IdempotencyRecord.decode(redis_client.get(store.idempotency_key("c", "K"))).confirmed
    assert queue_depth(amqp, topology.QUEUE) == 2  # the republished job, and the later message


def test_a_message_without_a_record_is_not_withdrawn_while_others_are_recorded(recording_publisher):
    """A republish (no record of its own) waiting behind a slow batch of records is not answered
    as a record timeout: it is published once the batch's records are written."""
    publisher, recorder = recording_publisher
    release = hold_loop(publisher)
    recorder.answer.clear()
    outcomes: dict = {}
    recorded = publish_recorded(publisher, "job-x", outcomes, timeout=0.3)
    wait_until(lambda: len(publisher._outbox) == 1, 10, "no hand-over")

    def republish() -> None:
        properties = pika.BasicProperties(delivery_mode=2, message_id="job-old")
        try:
            outcomes["job-old"] = publisher.publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", properties,
                                                    timeout=0.3)
        except (BrokerUnavailable, RecordTimeout) as exc:
            outcomes["job-old"] = exc

    plain = threading.Thread(target=republish)
    plain.start()
    wait_until(lambda: len(publisher._outbox) == 2, 10, "no hand-over")
    release.set()
    assert recorder.written.wait(10)
    plain.join(10)
    recorded.join(10)
    recorder.answer.set()
    assert isinstance(outcomes["job-x"], RecordTimeout)
    refused = outcomes["job-old"]  # written after its wait, or not: either way not a record timeout
    assert isinstance(refused, BrokerUnavailable) and refused.maybe_published


def test_a_batch_of_messages_leaves_in_one_socket_write(recording_publisher, amqp, monkeypatch):
    """pika writes each frame with its own send(), on the loop's next pass once the poller finds
    the socket writable; the publisher's batch (3 frames per message) goes out in one send, in the
    pass that published it (no writability watch turned on), and RabbitMQ takes every message of
    it intact."""
    from pika.adapters.utils import io_services_utils, selector_ioloop_adapter

    publisher, _ = recording_publisher
    sends: list[int] = []
    watches: list[int] = []
    pika_send = io_services_utils._AsyncTransportBase._sigint_safe_send
    pika_set_writer = selector_ioloop_adapter.SelectorIOServicesAdapter.set_writer

    def counting_send(sock, data):
        if threading.current_thread().name == "rabbitmq-publisher":
            sends.append(len(data))
        return pika_send(sock, data)

    def counting_set_writer(self, fd, on_writable):
        if threading.current_thread().name == "rabbitmq-publisher":
            watches.append(fd)
        return pika_set_writer(self, fd, on_writable)

    monkeypatch.setattr(io_services_utils._AsyncTransportBase, "_sigint_safe_send", staticmethod(counting_send))
    monkeypatch.setattr(selector_ioloop_adapter.SelectorIOServicesAdapter, "set_writer", counting_set_writer)
    release = hold_loop(publisher)
    outcomes: dict = {}
    ids = [f"job-{n}" for n in range(8)]
    threads = [publish_recorded(publisher, job_id, outcomes) for job_id in ids]
    wait_until(lambda: len(publisher._outbox) == len(ids), 10, "the requests did not all hand over")
    release.set()
    for thread in threads:
        thread.join(10)
    assert outcomes == {job_id: None for job_id in ids}
    assert len(sends) == 1, sends  # 24 frames, one write
    assert publisher._connection._transport._sock.fileno() not in watches
    received = [amqp.basic_get(topology.QUEUE, auto_ack=True) for _ in ids]
    assert sorted(props.message_id for _, props, _ in received) == sorted(ids)
    assert all(body == b"{}" for _, _, body in received)
