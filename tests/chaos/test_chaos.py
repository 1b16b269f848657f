"""Fault scenarios with lost-job accounting (`make test-chaos`; docs/guarantees.md).

Each scenario runs the real processes (private RabbitMQ and Redis nodes, gunicorn
main-app, several `python -m service_app` workers), drives jobs through the HTTP API,
injects one fault, waits for quiescence and accounts for every request. A scenario
fails if any accepted (202) job never reaches a final state.
"""

import os
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime

import pika
import pytest
import redis
import requests
from chaoslib import (
    FINAL,
    FinishWatcher,
    Fleet,
    Load,
    Outcome,
    Row,
    account,
    api_ready,
    check_final_never_changed,
    metric_values,
    rss_kib,
    wait_final,
)

from jobs_contract import JobStore, topology
from jobs_devtools.stack import wait_http

pytestmark = pytest.mark.slow
BACKLOG = int(os.environ.get("CHAOS_BACKLOG_JOBS", "20000"))
LONG_JOB_SECONDS = 25.0


def sleep_job(seconds: float):
    return lambda n: {"type": "sleep", "payload": {"seconds": seconds}}


def broker_unacked(prometheus_port: int, queue: str) -> int:
    text = requests.get(f"http://127.0.0.1:{prometheus_port}/metrics/detailed?family=queue_coarse_metrics",
                        timeout=5).text
    for line in text.splitlines():
        if line.startswith("rabbitmq_detailed_queue_messages_unacked{") and f'queue="{queue}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def ghost_jobs(redis_url: str, accepted: set[str]) -> int:
    """Jobs in the store that the API did not answer 202 for (a publish confirmed after its
    timeout: the client got 503 and may retry, so the job can run twice)."""
    client = redis.Redis.from_url(redis_url)
    ids = {key.decode().removeprefix("job:") for key in client.scan_iter("job:*", count=1000)}
    client.close()
    return len(ids - accepted)


def assert_accounted(row, accounting, watcher, allowed_other: int = 0):
    lost = accounting.lost_ids()
    assert row.lost == 0 and not lost, f"{row.lost} accepted job(s) never reached a final state: {lost[:10]}"
    assert row.other <= allowed_other, f"unexpected answers: {row.other} neither 202 nor 503"
    unseen = [i for i, (status, _) in accounting.records.items() if status in FINAL and i not in watcher.completions]
    if watcher.disconnects == 0:
        assert not unseen, f"the Redis watcher missed {len(unseen)} completion(s): duplicate counts would be wrong"
    elif unseen:  # Redis itself was down: completions written as it came back may precede the watcher
        row.notes += (f"; the Redis watcher was blind {watcher.blind_seconds:.1f}s around the restart and did not "
                      f"see {len(unseen)} completion(s), so duplicates are counted for the others")
    changed = check_final_never_changed(accounting, watcher)
    assert not changed, f"a duplicate completion changed a final status: {changed[:5]}"


# ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("1 worker crash (kill -9 x6)")
@pytest.mark.timeout(240)
def test_worker_crash(row, rabbit, redis_node, redis_client, amqp, start_api, start_worker):
    api = api_ready(start_api, rabbit.url, redis_node.url)
    watcher = FinishWatcher(redis_node.port).start()
    fleet = Fleet(start_worker, rabbit.url, redis_node.url, WORKER_CONCURRENCY="4")
    fleet.start(3)
    load = Load(api.url, api.token, sleep_job(0.3), rate=30, total=450, threads=4).start()
    load.wait_for(lambda o: o.status == 202, 10)
    kills = 0
    for round_ in range(6):
        time.sleep(1.5)
        victim = fleet.live[round_ % len(fleet.live)]
        fleet.kill9(victim)  # mid-batch: it holds running and prefetched jobs
        kills += 1
        time.sleep(0.3)
        fleet.start(1, wait_ready=False)  # the Deployment's replacement pod
    cleared = time.monotonic()
    load.join()
    accounting = account(row, load.snapshot(), redis_node.url, timeout=120, watcher=watcher, idle=fleet.idle,
                         fault_cleared_at=cleared)
    watcher.stop()
    statuses = Counter(status for status, _ in accounting.records.values())
    row.notes = (f"{kills} kill -9 of 3 workers (concurrency 4, default prefetch 16), each replaced; "
                 f"final statuses {dict(statuses)}")
    assert_accounted(row, accounting, watcher)
    assert row.accepted == row.sent
    assert statuses == {"succeeded": row.accepted}


@pytest.mark.scenario("2 broker crash (kill -9 RabbitMQ)")
@pytest.mark.timeout(240)
def test_broker_crash(row, private_rabbit, redis_node, redis_client, start_api, start_worker):
    api = api_ready(start_api, private_rabbit.url, redis_node.url, PUBLISH_TIMEOUT_SECONDS="2")
    watcher = FinishWatcher(redis_node.port).start()
    fleet = Fleet(start_worker, private_rabbit.url, redis_node.url)
    workers = fleet.start(2)
    load = Load(api.url, api.token, sleep_job(0.05), rate=25, threads=6).start()
    load.wait_for(lambda o: o.status == 202, 10)
    time.sleep(2)
    # Jobs longer than the outage: still running on their worker when the broker comes back
    # and redelivers them (the connection they came on is gone), so they run twice.
    long_jobs = [api.submit("sleep", {"seconds": LONG_JOB_SECONDS}) for _ in range(2)]
    assert all(r.status_code == 202 for r in long_jobs)
    time.sleep(0.5)

    killed = time.monotonic()
    private_rabbit.kill()
    first_503 = load.wait_for(lambda o: o.status == 503, 15, after=killed)
    time.sleep(2)
    assert requests.get(f"{api.url}/readyz", timeout=5).status_code == 503
    private_rabbit.start()
    restarted = time.monotonic()
    first_ok = load.wait_for(lambda o: o.status == 202, 60, after=restarted)
    for worker in workers:  # the same processes reconnect: nobody restarts them
        wait_http(f"{worker.url}/readyz", 60)
    time.sleep(2)
    load.stop()

    # Recovery is timed on the steady load; the long jobs take their 25 s by design.
    _, load_final_at = wait_final(redis_node.url, load.accepted_ids(), timeout=90)
    long_outcomes = [Outcome(-1, 202, r.json()["id"], killed) for r in long_jobs]
    accounting = account(row, load.snapshot() + long_outcomes, redis_node.url, timeout=90, watcher=watcher,
                         idle=fleet.idle)
    row.recover_seconds = round(load_final_at - restarted, 1)
    watcher.stop()
    accepted = {i for i in accounting.records}
    long_attempts = [accounting.records[o.job_id][1] for o in long_outcomes]
    ghosts = ghost_jobs(redis_node.url, accepted)
    reconnects = sum(sum(metric_values(f"{w.url}/metrics", "jobs_worker_broker_reconnects_total").values())
                     for w in workers)
    row.notes = (f"503s from {first_503.sent_at - killed:.1f}s after the kill; 202s again "
                 f"{first_ok.sent_at - restarted:.1f}s after the restart began; workers reconnected "
                 f"({reconnects:.0f} reconnects) without restarts; {ghosts} job(s) answered 503 ran anyway "
                 f"(confirm after the publish timeout); 2 {LONG_JOB_SECONDS:g}s jobs running across the outage "
                 f"were started {long_attempts} times")
    assert_accounted(row, accounting, watcher)
    assert row.refused_503 > 0
    assert api.proc.alive() and all(w.proc.alive() for w in workers)
    assert all(status == "succeeded" for status, _ in accounting.records.values())


@pytest.mark.scenario("3 store outage (stop/start Redis)")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_store_outage(row, how, rabbit, private_redis, amqp, start_api, start_worker):
    """stop: SIGTERM (Redis writes its append-only file and exits), as a pod stop would;
    kill: kill -9 of the process (acknowledged writes are in the OS page cache already)."""
    if how == "kill":
        row.scenario = "3b store crash (kill -9 Redis)"
    api = api_ready(start_api, rabbit.url, private_redis.url)
    watcher = FinishWatcher(private_redis.port).start()
    fleet = Fleet(start_worker, rabbit.url, private_redis.url)
    workers = fleet.start(2)
    load = Load(api.url, api.token, sleep_job(0.1), rate=25, threads=6).start()
    load.wait_for(lambda o: o.status == 202, 10)
    time.sleep(2)

    stopped = time.monotonic()
    private_redis.stop() if how == "stop" else private_redis.kill()
    first_503 = load.wait_for(lambda o: o.status == 503, 15, after=stopped)
    time.sleep(3)  # running jobs finish meanwhile and wait to record their outcome
    assert requests.get(f"{api.url}/readyz", timeout=5).status_code == 503
    not_ready = sum(requests.get(f"{w.url}/readyz", timeout=5).status_code == 503 for w in workers)
    private_redis.start()
    restarted = time.monotonic()
    first_ok = load.wait_for(lambda o: o.status == 202, 60, after=restarted)
    for worker in workers:
        wait_http(f"{worker.url}/readyz", 60)
    time.sleep(2)
    load.stop()

    accounting = account(row, load.snapshot(), private_redis.url, timeout=90, watcher=watcher, idle=fleet.idle,
                         fault_cleared_at=restarted)
    watcher.stop()
    row.notes = (f"503s from {first_503.sent_at - stopped:.1f}s after the stop; {not_ready}/2 workers "
                 f"reported not ready during it; 202s again {first_ok.sent_at - restarted:.1f}s after the restart")
    assert_accounted(row, accounting, watcher)
    assert row.refused_503 > 0
    assert api.proc.alive() and all(w.proc.alive() for w in workers)
    assert all(status == "succeeded" for status, _ in accounting.records.values())


@pytest.mark.scenario("4 rolling restart (SIGTERM each worker)")
@pytest.mark.timeout(240)
def test_rolling_restart(row, rabbit, redis_node, redis_client, amqp, start_api, start_worker):
    grace = 15
    api = api_ready(start_api, rabbit.url, redis_node.url)
    watcher = FinishWatcher(redis_node.port).start()
    fleet = Fleet(start_worker, rabbit.url, redis_node.url, SHUTDOWN_GRACE_SECONDS=str(grace))
    original = fleet.start(3)
    load = Load(api.url, api.token, sleep_job(1.0), rate=8, threads=4).start()
    load.wait_for(lambda o: o.status == 202, 10)
    time.sleep(3)
    exits = []
    for worker in original:  # one at a time, like a rollout with maxUnavailable 1
        busy = metric_values(f"{worker.url}/metrics", "jobs_worker_jobs_in_progress").get("", 0)
        code, seconds = fleet.terminate(worker, timeout=grace + 15)
        exits.append((code, seconds, busy))
        fleet.start(1)
    cleared = time.monotonic()
    time.sleep(2)
    load.stop()
    accounting = account(row, load.snapshot(), redis_node.url, timeout=90, watcher=watcher, idle=fleet.idle,
                         fault_cleared_at=cleared)
    watcher.stop()
    row.notes = ("exits (code, seconds, jobs running at SIGTERM): "
                 + ", ".join(f"({c}, {s:.1f}s, {b:.0f})" for c, s, b in exits) + f"; grace {grace}s")
    assert_accounted(row, accounting, watcher)
    assert all(code == 0 and seconds < grace for code, seconds, _ in exits), exits
    assert any(busy > 0 for _, _, busy in exits), "no worker had a job in flight when it was stopped"
    for worker in original:
        assert "grace period over" not in worker.proc.output()
    assert row.re_executions == 0, "a job in flight at SIGTERM was run again: it did not finish in the grace period"
    assert all(status == "succeeded" for status, _ in accounting.records.values())


POISON = [
    (b"not json at all", {"x-schema-version": 1}),
    (b"[1, 2, 3]", {"x-schema-version": 1}),
    (b'{"v":1,"type":"echo","payload":{},"client":"c","created_at":"t"}', {"x-schema-version": 1}),  # no id
    (b'{"v":1,"id":"p-{n}","type":"no-such-type","payload":{},"client":"c","created_at":"t"}',
     {"x-schema-version": 1}),
    (b'{"v":1,"id":"p-{n}","type":"echo","payload":{},"client":"c","created_at":"t"}', {"x-schema-version": 99}),
    (b'{"v":1,"id":"p-{n}","type":"echo","payload":{},"client":"c","created_at":"t"}', None),
    (b'{"v":1,"id":"p-{n}","type":"sleep","payload":{"seconds":-5},"client":"c","created_at":"t"}',
     {"x-schema-version": 1}),
    (b'{"v":1,"id":"p-{n}","type":"echo","payload":"text","client":"c","created_at":"t"}', {"x-schema-version": 1}),
    (b"\xff\xfe invalid utf-8", {"x-schema-version": 1}),
]


@pytest.mark.scenario("5 poison messages in the queue")
@pytest.mark.timeout(180)
def test_poison(row, rabbit, redis_node, redis_client, amqp, start_api, start_worker):
    api = api_ready(start_api, rabbit.url, redis_node.url)
    watcher = FinishWatcher(redis_node.port).start()
    fleet = Fleet(start_worker, rabbit.url, redis_node.url)
    workers = fleet.start(2)
    load = Load(api.url, api.token, lambda n: {"type": "echo", "payload": {"n": n}}, rate=40, total=400,
                threads=4).start()
    published = 0
    while load.running() or published == 0:
        body, headers = POISON[published % len(POISON)]
        amqp.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, body.replace(b"{n}", str(published).encode()),
                           pika.BasicProperties(headers=headers, delivery_mode=2, content_type="application/json"))
        published += 1
        time.sleep(0.1)
    load.join()
    cleared = time.monotonic()
    accounting = account(row, load.snapshot(), redis_node.url, timeout=60, watcher=watcher, idle=fleet.idle,
                         fault_cleared_at=cleared)
    watcher.stop()
    deadline = time.monotonic() + 20
    dead = 0
    while time.monotonic() < deadline:
        dead = amqp.queue_declare(topology.DEAD_LETTER_QUEUE, passive=True).method.message_count
        if dead >= published:
            break
        time.sleep(0.2)
    reasons = Counter()
    for worker in workers:
        for labels, value in metric_values(f"{worker.url}/metrics", "jobs_worker_dead_lettered_total").items():
            if value:
                reasons[labels.strip("{}").removeprefix('reason="').rstrip('"')] += int(value)
    row.notes = (f"{published} malformed/unknown-type messages published straight into the queue among the "
                 f"jobs; {dead} in jobs.dead; reasons {dict(reasons)}")
    assert_accounted(row, accounting, watcher)
    assert dead == published
    assert sum(reasons.values()) == published
    assert all(status == "succeeded" for status, _ in accounting.records.values())
    assert all(requests.get(f"{w.url}/readyz", timeout=5).status_code == 200 for w in workers)


@pytest.mark.scenario(f"6 backlog ({BACKLOG} jobs, then workers)")
@pytest.mark.timeout(600)
def test_backlog(row, rabbit, redis_node, redis_client, amqp, start_api, start_worker):
    api = api_ready(start_api, rabbit.url, redis_node.url)
    watcher = FinishWatcher(redis_node.port).start()
    submit_started = time.monotonic()
    load = Load(api.url, api.token, lambda n: {"type": "echo", "payload": {"n": n}}, total=BACKLOG,
                threads=8).start().join()
    submit_seconds = time.monotonic() - submit_started
    queued = amqp.queue_declare(topology.QUEUE, passive=True).method.message_count

    prefetch = 8
    fleet = Fleet(start_worker, rabbit.url, redis_node.url, WORKER_CONCURRENCY="4", WORKER_PREFETCH=str(prefetch))
    workers = fleet.start(2, wait_ready=False)
    started = time.monotonic()
    rss: dict[int, list[int]] = defaultdict(list)
    unacked = []  # the broker's own count of delivered, unacknowledged messages (lags a few s)
    while time.monotonic() - started < 400:
        for worker in workers:
            rss[worker.proc.pid].append(rss_kib(worker.proc.pid))
        depth = amqp.queue_declare(topology.QUEUE, passive=True).method.message_count
        if len(rss[workers[0].proc.pid]) % 4 == 1:
            unacked.append(broker_unacked(rabbit.prometheus_port, topology.QUEUE))
        if depth == 0:
            break
        time.sleep(0.5)
    accounting = account(row, load.snapshot(), redis_node.url, timeout=120, watcher=watcher, idle=fleet.idle,
                         fault_cleared_at=started)
    watcher.stop()
    drain_seconds = row.recover_seconds or 0
    peaks = {pid: max(samples) // 1024 for pid, samples in rss.items()}
    firsts = {pid: samples[min(4, len(samples) - 1)] // 1024 for pid, samples in rss.items()}
    row.notes = (f"submitted in {submit_seconds:.0f}s ({row.sent / submit_seconds:.0f}/s), {queued} queued with no "
                 f"worker; 2 workers (concurrency 4, prefetch {prefetch}) drained it in {drain_seconds:.0f}s "
                 f"({row.final / max(drain_seconds, 0.1):.0f}/s); worker RSS MiB early->peak "
                 + ", ".join(f"{firsts[p]}->{peaks[p]}" for p in peaks)
                 + f"; unacked at the broker at most {max(unacked, default=0)} (2 x prefetch = {2 * prefetch})")
    assert_accounted(row, accounting, watcher)
    assert max(unacked, default=0) <= 2 * prefetch, f"more in flight than the prefetch allows: {unacked}"
    assert row.accepted == BACKLOG
    assert queued >= BACKLOG * 0.99, "the backlog was not in the queue before the workers started"
    for pid in peaks:  # bounded by prefetch, not by the backlog
        assert peaks[pid] < 150, f"worker {pid} peaked at {peaks[pid]} MiB"
        assert peaks[pid] - firsts[pid] < 30, f"worker {pid} grew from {firsts[pid]} to {peaks[pid]} MiB"


_RETRY_LOG = re.compile(r"^(\S+ \S+) INFO .*job (\S+) attempt (\d+) failed .*; retrying in ([\d.]+)s$")
_FAILED_LOG = re.compile(r"^(\S+ \S+) WARNING .*job (\S+) failed after (\d+) attempts")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.scenario("7 retry exhaustion (fail, flaky)")
@pytest.mark.timeout(180)
def test_retry_exhaustion(row, rabbit, redis_node, redis_client, amqp, start_api, start_worker):
    max_attempts, base, cap = 4, 0.25, 1.0
    api = api_ready(start_api, rabbit.url, redis_node.url)
    watcher = FinishWatcher(redis_node.port).start()
    fleet = Fleet(start_worker, rabbit.url, redis_node.url, MAX_ATTEMPTS=str(max_attempts),
                  RETRY_BACKOFF_BASE_SECONDS=str(base), RETRY_BACKOFF_MAX_SECONDS=str(cap))
    workers = fleet.start(2)
    kinds = [("fail", {"message": "boom"})] * 4 + [("flaky", {"fail_times": k}) for k in range(6)]
    total = len(kinds) * 4

    def body(n):
        job_type, payload = kinds[n % len(kinds)]
        return {"type": job_type, "payload": payload}

    def expected(n) -> tuple[str, int]:
        job_type, payload = kinds[n % len(kinds)]
        if job_type == "fail" or payload["fail_times"] >= max_attempts:
            return "failed", max_attempts
        return "succeeded", payload["fail_times"] + 1

    load = Load(api.url, api.token, body, total=total, threads=4).start().join()
    cleared = time.monotonic()
    by_id = {o.job_id: o.n for o in load.snapshot() if o.job_id}
    accounting = account(row, load.snapshot(), redis_node.url, timeout=90, watcher=watcher, idle=fleet.idle,
                         expected_attempts=lambda i: expected(by_id[i])[1], fault_cleared_at=cleared)
    watcher.stop()
    wrong = {i: (rec, expected(by_id[i])) for i, rec in accounting.records.items() if rec != expected(by_id[i])}

    # Backoff spacing, from the workers' own log lines: attempt n failed at t_n, "retrying in d_n".
    failures: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for worker in workers:
        for line in worker.proc.output().splitlines():
            if m := _RETRY_LOG.match(line):
                failures[m.group(2)][int(m.group(3))] = (_stamp(m.group(1)), float(m.group(4)))
            elif m := _FAILED_LOG.match(line):
                failures[m.group(2)][int(m.group(3))] = (_stamp(m.group(1)), 0.0)
    gaps, bad_gaps = [], []
    for job_id, attempts in failures.items():
        for n in sorted(attempts):
            if n + 1 not in attempts:
                continue
            (t0, announced), (t1, _) = attempts[n], attempts[n + 1]
            full = min(cap, base * 2 ** (n - 1))
            gap = t1 - t0
            gaps.append(gap)
            if not (full / 2 - 0.01 <= announced <= full + 0.01 and announced - 0.02 <= gap <= announced + 1.5):
                bad_gaps.append((job_id, n, announced, round(gap, 3)))
    row.notes = (f"MAX_ATTEMPTS {max_attempts}, backoff base {base}s cap {cap}s (equal jitter); "
                 f"{len(gaps)} retry gaps measured from worker logs, {min(gaps, default=0):.2f}-"
                 f"{max(gaps, default=0):.2f}s; every job's status and attempt count as expected: {not wrong}")
    assert_accounted(row, accounting, watcher)
    assert not wrong, f"status/attempts not as expected (got, want): {list(wrong.items())[:5]}"
    assert gaps, "no retry log lines found: has service_app's log format changed?"
    assert not bad_gaps, f"backoff spacing out of bounds (job, attempt, announced, measured): {bad_gaps[:5]}"
    statuses = Counter(status for status, _ in accounting.records.values())
    assert set(statuses) <= FINAL


def test_load_threads_stop():
    """The load helper stops on demand (guards the suite against hanging)."""
    load = Load("http://127.0.0.1:9", "x" * 16, lambda n: {}, rate=50, threads=2, timeout=0.2).start()
    time.sleep(0.2)
    load.stop()
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("load-"))


def test_duplicate_completion_detector(redis_node, redis_client):
    """The instrument itself: two runs that both finish are one duplicate; a final write
    repeated without a second run is not; the stored status stays the first one."""
    watcher = FinishWatcher(redis_node.port).start()
    first, second = JobStore.from_url(redis_node.url), JobStore.from_url(redis_node.url)
    twice, retried = str(uuid.uuid4()), str(uuid.uuid4())
    for job_id in (twice, retried):
        first.create(job_id, "c", "echo", "t")
    first.begin(twice, "c", "echo", "t")
    second.begin(twice, "c", "echo", "t")  # a redelivery while the first run still runs
    first.succeed(twice, b"1")
    second.fail(twice, "late")  # must not change the outcome
    first.begin(retried, "c", "echo", "t")
    first.succeed(retried, b"1")
    second.succeed(retried, b"1")  # the same run's write again, on another connection
    row = Row("detector")
    outcomes = [Outcome(0, 202, twice, 0.0), Outcome(1, 202, retried, 0.0)]
    accounting = account(row, outcomes, redis_node.url, timeout=5, watcher=watcher)
    watcher.stop()
    assert row.lost == 0 and row.final == 2
    assert row.duplicate_completions == 1 and row.re_executions == 1
    assert "1 final write(s) repeated" in row.measurement
    assert accounting.records[twice][0] == "succeeded" and not check_final_never_changed(accounting, watcher)
    first.redis.close()
    second.redis.close()
