"""service-app's Worker in this process, against real RabbitMQ and Redis, with interleavings
driven by events: job handlers wait on gates the test opens, the broker closes connections
on command, and the worker's reconnect is held until the test lets it go. No sleeping and
hoping: waits are for observable states (with deadlines)."""

import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager

import pika
import pytest

from jobs_contract import JobMessage, JobStore, topology
from service_app import jobs
from service_app.config import Settings
from service_app.worker import Worker


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Gates:
    """The `echo` handler, controlled by the test. Payload {"gate": name} runs wait until
    open(name) (first attempt only); "fail": n fails the first n attempts; "wait": false runs
    straight through. Every run is recorded as (name, attempt)."""

    def __init__(self):
        self.runs: list[tuple[str, int]] = []
        self.started: dict[str, threading.Event] = defaultdict(threading.Event)
        self._open: dict[str, threading.Event] = defaultdict(threading.Event)

    def open(self, name: str) -> None:
        self._open[name].set()

    def open_all(self) -> None:
        for name in list(self.started) + list(self._open):
            self._open[name].set()

    def handler(self, payload: dict, ctx) -> dict:
        name = payload["gate"]
        self.runs.append((name, ctx.attempt))
        self.started[name].set()
        if payload.get("wait", True) and ctx.attempt == 1:
            assert self._open[name].wait(60), f"gate {name} never opened"
        if ctx.attempt <= payload.get("fail", 0):
            raise RuntimeError(f"planned failure of {name}")
        return {"gate": name}


@pytest.fixture
def gates(monkeypatch):
    g = Gates()
    monkeypatch.setitem(jobs.HANDLERS, "echo", g.handler)
    yield g
    g.open_all()


@contextmanager
def broker_channel(url: str):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass


def submit(url: str, store: JobStore, name: str, **payload) -> JobMessage:
    job = JobMessage(id=str(uuid.uuid4()), type="echo", payload={"gate": name, **payload}, client="c-test",
                     created_at="2026-01-01T00:00:00.000Z")
    store.create(job.id, job.client, job.type, job.created_at)
    body, properties = job.encode()
    with broker_channel(url) as channel:
        channel.confirm_delivery()
        channel.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties, mandatory=True)
    return job


class Running:
    """A Worker on its own thread; its reconnects can be held (hold_reconnect) and counted."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.consumes = 0
        self.may_reconnect = threading.Event()
        self.may_reconnect.set()
        consume = worker._consume

        def counted_consume():
            self.consumes += 1
            if self.consumes > 1:
                assert self.may_reconnect.wait(60)
            return consume()

        worker._consume = counted_consume
        self.thread = threading.Thread(target=worker.run, name="worker-main", daemon=True)

    def hold_reconnect(self) -> None:
        self.may_reconnect.clear()

    def wait_connected(self, consumes: int, timeout: float = 30) -> None:
        wait_until(lambda: self.consumes >= consumes and self.worker.connected.is_set(), timeout,
                   f"the worker did not connect (consume calls: {self.consumes})")

    def pool_idle(self, timeout: float = 30) -> None:
        """Everything handed to the job pool before now has been processed (one job thread)."""
        self.worker.executor.submit(lambda: None).result(timeout)


@pytest.fixture
def run_worker(monkeypatch, redis_node, redis_client):
    started: list[Running] = []

    def start(rabbit_url: str, **env: str) -> Running:
        settings = {"RABBITMQ_URL": rabbit_url, "REDIS_URL": redis_node.url, "RETRY_BACKOFF_BASE_SECONDS": "0.1",
                    "RETRY_BACKOFF_MAX_SECONDS": "0.2", **env}
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        running = Running(Worker(Settings.from_env(), JobStore.from_url(redis_node.url)))
        running.thread.start()
        running.wait_connected(1)
        started.append(running)
        return running

    yield start
    for running in started:
        running.may_reconnect.set()
        running.worker.stop()
        running.thread.join(30)


@pytest.fixture
def store(redis_node, redis_client) -> JobStore:
    return JobStore.from_url(redis_node.url)


@pytest.fixture
def empty_queues(rabbit):
    with broker_channel(rabbit.url) as channel:
        topology.declare(channel)
        for queue in topology.QUEUES:
            channel.queue_purge(queue.name)


def close_connections(rabbit) -> None:
    rabbit.ctl("close_all_connections", "test: connection lost")


def test_jobs_prefetched_on_a_dead_connection_are_not_run(rabbit, store, gates, run_worker, empty_queues):
    """Messages handed to the job pool on a connection that then died are requeued by the broker
    (and may be running elsewhere already): the pool must skip them, not run them again."""
    running = run_worker(rabbit.url, WORKER_CONCURRENCY="1", WORKER_PREFETCH="3")
    first = submit(rabbit.url, store, "first")
    prefetched = [submit(rabbit.url, store, name, wait=False) for name in ("second", "third")]
    assert gates.started["first"].wait(20)
    wait_until(lambda: rabbit.queue_counts(topology.QUEUE) == (0, 3), 20, "not all three were delivered")

    running.hold_reconnect()
    close_connections(rabbit)  # the broker requeues all three
    with broker_channel(rabbit.url) as channel:  # another consumer takes them meanwhile
        taken: list[str] = []
        channel.basic_qos(prefetch_count=10)
        channel.basic_consume(topology.QUEUE, lambda _ch, _m, properties, _b: taken.append(properties.message_id))
        wait_until(lambda: channel.connection.process_data_events(0.1) or len(taken) == 3, 20,
                   "the requeued messages did not reach the other consumer")
        running.may_reconnect.set()
        running.wait_connected(2)
        gates.open("first")  # the pool now gets to the two prefetched on the dead connection
        running.pool_idle()
        assert gates.runs == [("first", 1)], "a message of the dead connection was run"
        assert [store.get(job.id)["status"] for job in prefetched] == ["queued", "queued"]
        assert store.get(first.id)["status"] == "succeeded"  # the running one finished (outcome recorded)


def test_shutdown_after_a_lost_connection_does_not_wait_out_the_grace_period(rabbit, store, gates, run_worker,
                                                                             empty_queues):
    """SIGTERM arrives and the connection is lost before the consume loop sees it: once the
    running job is done, the worker exits at once rather than after SHUTDOWN_GRACE_SECONDS."""
    running = run_worker(rabbit.url, WORKER_CONCURRENCY="1", SHUTDOWN_GRACE_SECONDS="15")
    job = submit(rabbit.url, store, "running")
    assert gates.started["running"].wait(20)
    armed = threading.Event()
    armed.set()

    def stop_and_lose_the_connection() -> None:  # on the worker's main thread, between two loop turns
        if armed.is_set():
            armed.clear()
            running.worker.stop()
            close_connections(rabbit)

    running.worker.beat = stop_and_lose_the_connection
    wait_until(lambda: not armed.is_set() and not running.worker.connected.is_set(), 20,
               "the worker did not lose its connection")
    gates.open("running")
    done = time.monotonic()
    running.thread.join(15)
    assert not running.thread.is_alive()
    assert time.monotonic() - done < 3, "shutdown waited for jobs that were already finished"
    assert store.get(job.id)["status"] == "succeeded"


def test_a_job_failing_after_the_connection_died_during_a_drain_leaves_one_copy(rabbit, store, gates, run_worker,
                                                                                 empty_queues):
    """SIGTERM, then the broker closes the connection while a job runs: the broker requeues its
    message. When the job then fails with attempts left, the worker must not also publish a retry
    copy (two live copies of one job): it gives the message back, and one copy is queued."""
    running = run_worker(rabbit.url, WORKER_CONCURRENCY="1", SHUTDOWN_GRACE_SECONDS="15", MAX_ATTEMPTS="3")
    job = submit(rabbit.url, store, "fails", fail=1)
    assert gates.started["fails"].wait(20)
    running.worker.stop()  # the drain starts on a live connection
    time.sleep(0.5)
    connection = running.worker._connection
    close_connections(rabbit)
    wait_until(lambda: not connection.is_open, 20, "the drain did not see the connection go")
    wait_until(lambda: not running.worker.connected.is_set(), 5, "the drain still counts itself connected")
    gates.open("fails")
    running.thread.join(20)
    assert not running.thread.is_alive()
    copies = []
    with broker_channel(rabbit.url) as channel:
        channel.basic_consume(topology.QUEUE, lambda _ch, _method, properties, _body: copies.append(
            (properties.message_id, properties.headers.get("x-job-attempt"))))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            channel.connection.process_data_events(0.1)
    assert copies == [(job.id, 1)], copies


@pytest.fixture
def retry_publishes(monkeypatch):
    """Set each time anything publishes to the delay exchange (a retry copy), before the broker answers."""
    from pika.adapters.blocking_connection import BlockingChannel

    attempted = threading.Event()
    publish = BlockingChannel.basic_publish

    def spy(self, exchange, *args, **kwargs):
        if exchange == topology.DELAY_EXCHANGE:
            attempted.set()
        return publish(self, exchange, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_publish", spy)
    return attempted


def _alarms(node) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


@pytest.mark.slow
def test_a_retry_during_a_resource_alarm_stalls_neither_acks_nor_the_consume_loop(
        private_rabbit, store, gates, run_worker, retry_publishes):
    """A memory alarm blocks every connection that publishes. A retry copy published then must not
    hold up the consume connection: other jobs' acks still reach the broker and the consume loop
    (the liveness probe's heartbeat) keeps turning; once the alarm is over the retry goes out."""
    running = run_worker(private_rabbit.url, WORKER_CONCURRENCY="2", MAX_ATTEMPTS="3")
    beats: list[float] = []
    running.worker.beat = lambda: beats.append(time.monotonic())
    failing = submit(private_rabbit.url, store, "failing", fail=1)
    other = submit(private_rabbit.url, store, "other")
    assert gates.started["failing"].wait(20) and gates.started["other"].wait(20)

    private_rabbit.ctl("set_vm_memory_high_watermark", "0.0001")
    try:
        wait_until(lambda: "memory" in _alarms(private_rabbit), 30, "no memory alarm")
        gates.open("failing")  # its retry copy is published during the alarm
        assert retry_publishes.wait(20)
        publishing_since = time.monotonic()
        gates.open("other")
        wait_until(lambda: store.get(other.id)["status"] == "succeeded"
                   and private_rabbit.queue_counts(topology.QUEUE) == (0, 1), 30,
                   "a finished job's ack did not reach the broker during the alarm")
        during = [t for t in beats if t >= publishing_since] + [time.monotonic()]
        assert max(b - a for a, b in zip(during, during[1:], strict=False)) < 2.0, "the consume loop stalled"
        assert store.get(failing.id)["status"] == "retrying"
        assert running.consumes == 1, "the consume connection was lost"
    finally:
        private_rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    wait_until(lambda: "memory" not in _alarms(private_rabbit), 30, "the alarm did not clear")
    wait_until(lambda: store.get(failing.id)["status"] == "succeeded", 60, "the retry never ran")
    assert store.get(failing.id)["attempts"] == 2
    assert running.consumes == 1


def test_a_retry_the_broker_will_not_route_costs_neither_the_connection_nor_other_acks(
        rabbit, store, gates, run_worker, retry_publishes, empty_queues):
    """The retry copy is returned unroutable (the delay queues lost their bindings). Only that
    message waits (unacked, retried); the connection stays and the other job's ack is sent."""
    running = run_worker(rabbit.url, WORKER_CONCURRENCY="2", MAX_ATTEMPTS="3")
    bindings = [b for b in topology.BINDINGS if b.exchange == topology.DELAY_EXCHANGE]
    failing = submit(rabbit.url, store, "failing", fail=1)
    other = submit(rabbit.url, store, "other")
    assert gates.started["failing"].wait(20) and gates.started["other"].wait(20)
    with broker_channel(rabbit.url) as channel:
        for binding in bindings:
            channel.queue_unbind(binding.queue, binding.exchange, binding.routing_key)
        try:
            gates.open("failing")
            assert retry_publishes.wait(20)
            gates.open("other")
            wait_until(lambda: store.get(other.id)["status"] == "succeeded"
                       and rabbit.queue_counts(topology.QUEUE) == (0, 1), 30, "the other job's ack was not sent")
            assert running.consumes == 1, "one unroutable retry copy cost the whole consume connection"
            assert store.get(failing.id)["status"] == "retrying"
        finally:
            for binding in bindings:
                channel.queue_bind(binding.queue, binding.exchange, binding.routing_key)
    wait_until(lambda: store.get(failing.id)["status"] == "succeeded", 30, "the retry never ran")
    assert store.get(failing.id)["attempts"] == 2
    assert gates.runs.count(("other", 1)) == 1
    assert running.consumes == 1


def test_a_backlog_costs_one_store_round_trip_per_job_and_each_job_starts_running(
        rabbit, store, gates, run_worker, empty_queues, monkeypatch, redis_client):
    """A job thread that finishes a job while others wait records that job's outcome and the next
    one's `running` in one script: one store call per job, and every job still sees its attempt
    recorded before it runs (its outcome before its ack)."""
    statuses: dict[str, tuple[str, int]] = {}

    def handler(payload: dict, ctx) -> dict:
        record = store.get(ctx.job_id)
        statuses[payload["gate"]] = (record["status"], record["attempts"])
        return gates.handler(payload, ctx)

    monkeypatch.setitem(jobs.HANDLERS, "echo", handler)
    names = [f"j{i}" for i in range(12)]
    submitted = [submit(rabbit.url, store, names[0])] + [submit(rabbit.url, store, n, wait=False) for n in names[1:]]
    redis_client.config_resetstat()
    running = run_worker(rabbit.url, WORKER_CONCURRENCY="1", WORKER_PREFETCH="12")
    assert gates.started[names[0]].wait(20)
    wait_until(lambda: len(running.worker._waiting) == len(names) - 1, 20, "not all the jobs were delivered")
    gates.open(names[0])
    wait_until(lambda: all(store.get(job.id)["status"] == "succeeded" for job in submitted), 20,
               "not every job succeeded")
    wait_until(lambda: rabbit.queue_counts(topology.QUEUE) == (0, 0), 20, "not every job was acked")
    assert [name for name, _attempt in gates.runs] == names
    assert statuses == {name: ("running", 1) for name in names}
    scripts = redis_client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert scripts <= len(names) + 2, f"{scripts} store scripts for {len(names)} jobs"  # (+ NOSCRIPT retries)
