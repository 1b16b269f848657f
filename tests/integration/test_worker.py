"""service-app against real RabbitMQ and Redis: outcomes, retries, dead letters, poison, shutdown, outages."""

import signal
import time

import pika
import pytest
import requests

from conftest import queue_depth
from jobs_contract import JobMessage, JobStore, topology
from jobs_contract.message import HEADER_SCHEMA_VERSION


def publish(channel, job: JobMessage) -> None:
    body, properties = job.encode()
    channel.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties)


def new_job(store: JobStore, job_type: str, payload: dict, job_id: str | None = None) -> JobMessage:
    import uuid

    job = JobMessage(id=job_id or str(uuid.uuid4()), type=job_type, payload=payload, client="c-test",
                     created_at="2026-01-01T00:00:00.000Z")
    assert store.create(job.id, job.client, job.type, job.created_at) is None
    return job


def wait_status(store: JobStore, job_id: str, statuses: set[str], timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job and job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def store(redis_node, redis_client):
    return JobStore.from_url(redis_node.url)


def test_every_job_type_reaches_its_final_state(rabbit, redis_node, store, amqp, start_worker):
    worker = start_worker(rabbit.url, redis_node.url, MAX_ATTEMPTS="3")
    fresh = requests.get(f"{worker.url}/metrics", timeout=5).text
    assert 'jobs_worker_jobs_processed_total{outcome="failed",type="fail"} 0.0' in fresh
    assert 'jobs_worker_dead_lettered_total{reason="max_attempts"} 0.0' in fresh
    jobs = {
        "echo": new_job(store, "echo", {"hello": ["world"]}),
        "sleep": new_job(store, "sleep", {"seconds": 0.3}),
        "cpu": new_job(store, "cpu", {"ms": 50}),
        "fail": new_job(store, "fail", {"message": "boom"}),
        "flaky": new_job(store, "flaky", {"fail_times": 2}),
    }
    for job in jobs.values():
        publish(amqp, job)
    results = {name: wait_status(store, job.id, {"succeeded", "failed"}) for name, job in jobs.items()}

    assert results["echo"]["result"] == {"hello": ["world"]} and results["echo"]["attempts"] == 1
    assert results["sleep"]["result"] == {"slept_seconds": 0.3}
    assert results["cpu"]["status"] == "succeeded" and results["cpu"]["result"]["iterations"] > 0
    assert results["fail"]["status"] == "failed" and results["fail"]["attempts"] == 3
    assert "JobFailed: boom" in results["fail"]["error"]
    assert results["flaky"]["status"] == "succeeded" and results["flaky"]["attempts"] == 3
    assert results["flaky"]["result"] == {"succeeded_on_attempt": 3}
    for job in results.values():
        assert job["started_at"] and job["finished_at"]

    # The failed job is dead-lettered; nothing else is left anywhere.
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.DEAD_LETTER_QUEUE) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    method, properties, body = amqp.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
    assert JobMessage.decode(body, properties).id == jobs["fail"].id
    assert queue_depth(amqp, topology.DEAD_LETTER_QUEUE) == 0
    assert queue_depth(amqp, topology.QUEUE) == 0

    assert metric(worker.url, "jobs_worker_jobs_processed_total") >= 5
    assert metric(worker.url, "jobs_worker_retries_total") == 4  # fail: 2 retries, flaky: 2 retries
    assert metric(worker.url, "jobs_worker_dead_lettered_total") == 1
    assert metric(worker.url, "jobs_worker_job_latency_seconds_count") == 5
    assert metric(worker.url, "jobs_worker_concurrency") == 4


def test_retries_back_off_exponentially(rabbit, redis_node, store, amqp, start_worker):
    start_worker(rabbit.url, redis_node.url, MAX_ATTEMPTS="4", RETRY_BACKOFF_BASE_SECONDS="0.4",
                 RETRY_BACKOFF_MAX_SECONDS="10")
    job = new_job(store, "fail", {})
    publish(amqp, job)
    starts, last = [], None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = store.get(job.id)
        if record["started_at"] != last and record["status"] in {"running", "retrying", "failed"}:
            last = record["started_at"]
            starts.append(time.monotonic())
        if record["status"] == "failed":
            break
        time.sleep(0.01)
    assert store.get(job.id)["attempts"] == 4
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 3, starts
    # Equal jitter: the n-th delay is in [base*2^(n-1)/2, base*2^(n-1)], plus a little for delivery.
    for n, gap in enumerate(gaps, start=1):
        full = 0.4 * 2 ** (n - 1)
        assert full / 2 - 0.05 <= gap <= full + 0.5, (n, gap, gaps)


def test_poison_messages_are_dead_lettered_and_good_jobs_keep_flowing(rabbit, redis_node, store, amqp,
                                                                        start_worker):
    worker = start_worker(rabbit.url, redis_node.url)
    good_before = new_job(store, "echo", {"n": 1})
    publish(amqp, good_before)
    poison = [
        (b"not json at all", {HEADER_SCHEMA_VERSION: 1}),
        (b'{"v":1,"id":"p1","type":"no-such-type","payload":{},"client":"c","created_at":"t"}',
         {HEADER_SCHEMA_VERSION: 1}),
        (b'{"v":1,"id":"p2","type":"sleep","payload":{"seconds":"long"},"client":"c","created_at":"t"}',
         {HEADER_SCHEMA_VERSION: 1}),
        (b'{"v":1,"id":"p3","type":"echo","payload":{},"client":"c","created_at":"t"}', {HEADER_SCHEMA_VERSION: 99}),
    ]
    for body, headers in poison:
        amqp.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body,
                           pika.BasicProperties(headers=headers, delivery_mode=2))
    good_after = new_job(store, "echo", {"n": 2})
    publish(amqp, good_after)
    assert wait_status(store, good_before.id, {"succeeded"})
    assert wait_status(store, good_after.id, {"succeeded"})
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.DEAD_LETTER_QUEUE) < len(poison) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_depth(amqp, topology.DEAD_LETTER_QUEUE) == len(poison)
    assert metric(worker.url, "jobs_worker_dead_lettered_total") == len(poison)
    assert requests.get(f"{worker.url}/readyz", timeout=5).status_code == 200


def test_redelivered_final_job_is_acked_without_running_again(rabbit, redis_node, store, amqp, start_worker):
    worker = start_worker(rabbit.url, redis_node.url)
    job = new_job(store, "echo", {"n": 1})
    publish(amqp, job)
    first = wait_status(store, job.id, {"succeeded"})
    publish(amqp, job)  # the same message again, as a redelivery after a lost ack would be
    deadline = time.monotonic() + 10
    while metric(worker.url, "jobs_worker_jobs_processed_total") < 2:
        assert time.monotonic() < deadline, "the second copy was never handled"
        time.sleep(0.05)
    text = requests.get(f"{worker.url}/metrics", timeout=5).text
    assert 'jobs_worker_jobs_processed_total{outcome="skipped",type="echo"} 1.0' in text
    assert 'jobs_worker_jobs_processed_total{outcome="succeeded",type="echo"} 1.0' in text  # it ran once
    assert store.get(job.id) == first
    assert queue_depth(amqp, topology.QUEUE) == 0


def test_missing_record_is_rebuilt_from_the_message(rabbit, redis_node, store, amqp, start_worker, redis_client):
    start_worker(rabbit.url, redis_node.url)
    job = new_job(store, "echo", {"n": 1})
    redis_client.delete(store.job_key(job.id))  # e.g. Redis lost it
    publish(amqp, job)
    record = wait_status(store, job.id, {"succeeded"})
    assert record["client"] == job.client and record["type"] == "echo"


def test_job_timeout_fails_the_attempt(rabbit, redis_node, store, amqp, start_worker):
    start_worker(rabbit.url, redis_node.url, JOB_TIMEOUT_SECONDS="0.5", MAX_ATTEMPTS="2")
    job = new_job(store, "sleep", {"seconds": 5})
    cpu = new_job(store, "cpu", {"ms": 5000})
    publish(amqp, job)
    publish(amqp, cpu)
    started = time.monotonic()
    for j in (job, cpu):
        record = wait_status(store, j.id, {"failed"}, timeout=15)
        assert record["attempts"] == 2
        assert "timed out after 0.5s" in record["error"]
    assert time.monotonic() - started < 8


def test_long_jobs_keep_the_connection_alive(rabbit, redis_node, store, amqp, start_worker):
    """A job longer than several heartbeat intervals must not cost the connection (or the ack)."""
    worker = start_worker(f"{rabbit.url}?heartbeat=1", redis_node.url, WORKER_CONCURRENCY="1")
    job = new_job(store, "cpu", {"ms": 4000})
    publish(amqp, job)
    record = wait_status(store, job.id, {"succeeded", "failed"}, timeout=30)
    assert record["status"] == "succeeded" and record["attempts"] == 1
    assert metric(worker.url, "jobs_worker_broker_reconnects_total") == 0
    assert queue_depth(amqp, topology.QUEUE) == 0


def test_sigterm_drains_in_flight_jobs_and_exits_0(rabbit, redis_node, store, amqp, start_worker):
    worker = start_worker(rabbit.url, redis_node.url, WORKER_CONCURRENCY="2", WORKER_PREFETCH="10",
                          SHUTDOWN_GRACE_SECONDS="10")
    jobs = [new_job(store, "sleep", {"seconds": 1.5}) for _ in range(6)]
    for job in jobs:
        publish(amqp, job)
    deadline = time.monotonic() + 30
    while sum(store.get(j.id)["status"] == "running" for j in jobs) < 2:  # both job threads busy
        assert time.monotonic() < deadline, [store.get(j.id)["status"] for j in jobs]
        time.sleep(0.05)
    worker.proc.signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0
    records = [store.get(j.id) for j in jobs]
    finished = [r for r in records if r["status"] == "succeeded"]
    waiting = [r for r in records if r["status"] == "queued"]
    assert len(finished) == 2, records  # the two running jobs were finished, not abandoned
    assert len(finished) + len(waiting) == 6
    deadline = time.monotonic() + 10  # the broker requeues once it has processed the close
    while queue_depth(amqp, topology.QUEUE) != len(waiting) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_depth(amqp, topology.QUEUE) == len(waiting)  # the rest went back to the queue
    assert "draining" in worker.proc.output()


def test_sigterm_then_the_broker_gone_still_lets_the_running_job_finish(private_rabbit, redis_node, store,
                                                                         start_worker):
    """As on Ctrl-C under `make run`, or a node draining: the broker stops too while the worker
    drains. The running job is not cut off (and run again): it finishes and its outcome is recorded."""
    worker = start_worker(private_rabbit.url, redis_node.url, WORKER_CONCURRENCY="1", SHUTDOWN_GRACE_SECONDS="15")
    connection = pika.BlockingConnection(pika.URLParameters(private_rabbit.url))
    job = new_job(store, "sleep", {"seconds": 4})
    publish(connection.channel(), job)
    connection.close()
    wait_status(store, job.id, {"running"})
    worker.proc.signal(signal.SIGTERM)
    time.sleep(0.3)  # draining
    private_rabbit.stop()  # a clean shutdown: the broker closes the worker's connection (CONNECTION_FORCED)
    assert worker.proc.wait(15) == 0
    record = store.get(job.id)
    assert record["status"] == "succeeded" and record["attempts"] == 1, record
    output = worker.proc.output()
    assert "broker connection lost while draining" in output and "unsettled" not in output, output[-2000:]


def test_sigterm_past_the_grace_period_requeues_the_job(rabbit, redis_node, store, amqp, start_worker):
    worker = start_worker(rabbit.url, redis_node.url, WORKER_CONCURRENCY="1", SHUTDOWN_GRACE_SECONDS="0.5")
    job = new_job(store, "sleep", {"seconds": 20})
    publish(amqp, job)
    wait_status(store, job.id, {"running"})
    started = time.monotonic()
    worker.proc.signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.QUEUE) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_depth(amqp, topology.QUEUE) == 1, "the unfinished job did not go back to the queue"
    amqp.queue_purge(topology.QUEUE)  # the next test's worker must not get it


def test_crash_loop_job_is_failed_after_max_redeliveries(rabbit, redis_node, store, amqp, start_worker):
    start_worker(rabbit.url, redis_node.url, MAX_REDELIVERIES="3")
    job = new_job(store, "echo", {})
    body, properties = job.encode()
    properties.headers["x-delivery-count"] = 3  # as if three workers had died holding it
    amqp.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties)
    record = wait_status(store, job.id, {"failed"})
    assert "delivered 3 times" in record["error"]
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.DEAD_LETTER_QUEUE) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_depth(amqp, topology.DEAD_LETTER_QUEUE) == 1


def test_refuses_bad_configuration(rabbit, redis_node, start_worker):
    worker = start_worker(rabbit.url, redis_node.url, wait_ready=False, WORKER_CONCURRENCY="zero")
    assert worker.proc.wait(15) == 2
    assert "WORKER_CONCURRENCY must be an integer" in worker.proc.output()


def test_worker_recovers_when_the_broker_cancels_its_consumer(rabbit, redis_node, store, amqp, start_worker):
    """Deleting the queue cancels the consumer (basic.cancel): the worker must notice,
    reconnect and consume again, not sit there reporting ready."""
    worker = start_worker(rabbit.url, redis_node.url)
    amqp.queue_delete(topology.QUEUE)
    # (Declaring it again at once can swallow the broker's cancel notification; the
    # worker declares it itself when it reconnects.)
    deadline = time.monotonic() + 20
    while metric(worker.url, "jobs_worker_broker_reconnects_total") < 1:
        assert time.monotonic() < deadline, "the worker did not notice its consumer was cancelled"
        time.sleep(0.1)
    while requests.get(f"{worker.url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the worker did not consume again"
        time.sleep(0.1)
    job = new_job(store, "echo", {"n": 1})
    publish(amqp, job)
    assert wait_status(store, job.id, {"succeeded"}, timeout=20)


def test_poison_for_an_accepted_job_records_failed(rabbit, redis_node, store, amqp, start_worker):
    """A job main-app accepted but this worker cannot run (its limits are lower, or it does not
    know the type yet) is dead-lettered AND gets a final status, so its client is not left waiting."""
    start_worker(rabbit.url, redis_node.url, JOB_MAX_SLEEP_SECONDS="1")
    too_long = new_job(store, "sleep", {"seconds": 2})
    unknown = new_job(store, "echo", {})
    publish(amqp, too_long)
    body, properties = unknown.encode()
    amqp.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY,
                       body.replace(b'"type":"echo"', b'"type":"from-the-future"'), properties)
    record = wait_status(store, too_long.id, {"failed"})
    assert "invalid payload" in record["error"] and "/payload/seconds" in record["error"]
    assert "unknown job type" in wait_status(store, unknown.id, {"failed"})["error"]
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.DEAD_LETTER_QUEUE) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_depth(amqp, topology.DEAD_LETTER_QUEUE) == 2


def test_a_result_that_is_not_json_fails_the_attempt(rabbit, redis_node, store, monkeypatch):
    from service_app import jobs
    from service_app.config import Settings
    from service_app.worker import Worker

    monkeypatch.setenv("MAX_ATTEMPTS", "1")
    monkeypatch.setitem(jobs.HANDLERS, "echo", lambda payload, ctx: {1, 2})
    worker = Worker(Settings.from_env(), store)
    job = new_job(store, "echo", {})
    settle = worker.runner.perform(job)
    assert settle.action == "dead"
    record = store.get(job.id)
    assert record["status"] == "failed" and "not JSON serializable" in record["error"]


def test_a_job_that_exits_fails_its_attempt_and_its_message_is_settled(rabbit, redis_node, store, monkeypatch):
    """sys.exit() in a handler raises SystemExit, a BaseException: it is the job's failure, not the
    end of the job thread with its message held until the connection closes."""
    from service_app import jobs
    from service_app.config import Settings
    from service_app.worker import Worker

    def exits(payload, ctx):
        raise SystemExit(3)

    monkeypatch.setenv("MAX_ATTEMPTS", "2")
    monkeypatch.setitem(jobs.HANDLERS, "echo", exits)
    worker = Worker(Settings.from_env(), store)
    job = new_job(store, "echo", {})
    assert worker.runner.perform(job).action == "retry"
    assert store.get(job.id)["status"] == "retrying"
    settle = worker.runner.perform(job.next_attempt())
    assert settle.action == "dead"
    record = store.get(job.id)
    assert record["status"] == "failed" and record["error"] == "SystemExit: 3"


def test_an_outcome_for_a_vanished_record_rebuilds_it(store, redis_client):
    job = new_job(store, "echo", {})
    redis_client.delete(store.job_key(job.id))  # e.g. a Redis failover between begin and finish
    store.succeed(job.id, b'{"ok":true}', identity=store.identity(job.id, job.client, job.type, job.created_at))
    record = store.get(job.id)
    assert record["status"] == "succeeded" and record["client"] == job.client and record["type"] == "echo"
    redis_client.delete(store.job_key(job.id))
    assert store.fail(job.id, "x") == "missing"  # without its identity nothing half-made is written
    assert store.get(job.id) is None


def test_a_second_copy_of_a_running_jobs_message_does_not_run(rabbit, redis_node, store, amqp, start_worker):
    """Two messages of one job (main-app published it again for an idempotent retry): the copy
    delivered while the job runs is acked without running; a redelivery would still run."""
    worker = start_worker(rabbit.url, redis_node.url)
    job = new_job(store, "sleep", {"seconds": 3})
    publish(amqp, job)
    wait_status(store, job.id, {"running"})
    publish(amqp, job)  # the second copy, delivered while the first runs
    record = wait_status(store, job.id, {"succeeded"})
    assert record["attempts"] == 1
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.QUEUE) or metric(worker.url, "jobs_worker_jobs_processed_total") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert 'outcome="skipped",type="sleep"} 1.0' in requests.get(f"{worker.url}/metrics", timeout=5).text


def test_past_the_redelivery_limit_a_job_that_already_succeeded_is_not_counted_failed(
        rabbit, redis_node, store, amqp, start_worker):
    """A message redelivered MAX_REDELIVERIES times whose job has an outcome already (its worker died
    after recording it, before the ack) is acked as skipped: not failed, not dead-lettered."""
    worker = start_worker(rabbit.url, redis_node.url, MAX_REDELIVERIES="3")
    job = new_job(store, "echo", {})
    store.succeed(job.id, b'{"done":true}')
    body, properties = job.encode()
    properties.headers["x-delivery-count"] = 3
    amqp.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body, properties)
    deadline = time.monotonic() + 10
    while metric(worker.url, "jobs_worker_jobs_processed_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = requests.get(f"{worker.url}/metrics", timeout=5).text
    assert 'jobs_worker_jobs_processed_total{outcome="skipped",type="echo"} 1.0' in text
    assert 'jobs_worker_jobs_processed_total{outcome="failed",type="echo"} 0.0' in text
    assert metric(worker.url, "jobs_worker_dead_lettered_total") == 0
    assert store.get(job.id)["status"] == "succeeded"
    while queue_depth(amqp, topology.QUEUE):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert queue_depth(amqp, topology.DEAD_LETTER_QUEUE) == 0


def test_an_outcome_and_the_next_jobs_start_in_one_round_trip(store, redis_client):
    """succeed_and_begin answers as succeed() then begin() would, in that order."""
    first, second = new_job(store, "echo", {}), new_job(store, "echo", {})
    store.begin(first.id, first.client, first.type, first.created_at)
    nxt = (second.id, second.client, second.type, second.created_at, False)
    assert store.succeed_and_begin(first.id, b'{"n":1}', None, nxt) == ("succeeded", "queued")
    record = store.get(first.id)
    assert record["status"] == "succeeded" and record["result"] == {"n": 1} and record["finished_at"]
    record = store.get(second.id)
    assert record["status"] == "running" and record["attempts"] == 1 and record["started_at"]
    # A first delivery of a running job is a second copy of its message: not begun again.
    again = new_job(store, "echo", {})
    assert store.succeed_and_begin(again.id, b"{}", None, nxt) == ("succeeded", "duplicate")
    assert store.get(second.id)["attempts"] == 1
    # The outcome goes first: a second copy of the job just finished finds it final.
    assert store.succeed_and_begin(second.id, b"{}", None, nxt) == ("succeeded", "succeeded")
    # A final outcome is never overwritten; vanished records are rebuilt from what the messages say.
    redis_client.delete(store.job_key(first.id))
    gone = JobMessage(id="gone", type="echo", payload={}, client="c-x", created_at="2026-01-01T00:00:00.000Z")
    assert store.succeed_and_begin(second.id, b'{"n":2}', None, (gone.id, gone.client, gone.type, gone.created_at,
                                                                   True)) == ("succeeded", "missing")
    assert store.get(second.id)["result"] == {}
    assert store.get("gone")["status"] == "running" and store.get("gone")["client"] == "c-x"
    identity = store.identity(first.id, first.client, first.type, first.created_at)
    assert store.succeed_and_begin(first.id, b'{"n":3}', identity, nxt)[0] == "succeeded"
    assert store.get(first.id)["result"] == {"n": 3} and store.get(first.id)["client"] == first.client


def test_a_start_sent_again_after_its_answer_was_lost_finds_itself_not_a_second_copy(store):
    """begin() sent again with the same start id (its first answer lost) answers 'running' and
    counts no second attempt; another start of a first delivery is still a second copy."""
    first, second = new_job(store, "echo", {}), new_job(store, "echo", {})
    assert store.begin(first.id, first.client, first.type, first.created_at, False, "start-1") == "queued"
    assert store.begin(first.id, first.client, first.type, first.created_at, False, "start-1") == "running"
    assert store.begin(first.id, first.client, first.type, first.created_at, False, "start-2") == "duplicate"
    assert store.get(first.id)["attempts"] == 1
    nxt = (second.id, second.client, second.type, second.created_at, False, "start-3")
    assert store.succeed_and_begin(first.id, b"{}", None, nxt) == ("succeeded", "queued")
    assert store.succeed_and_begin(first.id, b"{}", None, nxt) == ("succeeded", "running")
    assert store.get(second.id)["attempts"] == 1
    assert "start_id" not in store.get(second.id)  # not part of the job's record as the API shows it


def test_a_job_whose_start_was_recorded_but_its_answer_lost_still_runs(store, monkeypatch):
    """The worker sends begin() again when Redis does not answer (a timeout after the script ran):
    the job must run and reach its outcome, not be acked as a second copy of itself and stay
    'running' forever."""
    import redis

    from service_app.config import Settings
    from service_app.settlement import SettleAction
    from service_app.worker import Worker

    worker = Worker(Settings.from_env(), store)
    real_begin = store.begin
    answers = []

    def begin_whose_first_answer_is_lost(*args):
        answers.append(real_begin(*args))
        if len(answers) == 1:
            raise redis.TimeoutError("Timeout reading from socket")
        return answers[-1]

    monkeypatch.setattr(store, "begin", begin_whose_first_answer_is_lost)
    job = new_job(store, "echo", {"n": 7})
    settle = worker.runner.perform(job)
    assert answers == ["queued", "running"]
    assert settle.action == SettleAction.ACK
    record = store.get(job.id)
    assert record["status"] == "succeeded" and record["result"] == {"n": 7} and record["attempts"] == 1
