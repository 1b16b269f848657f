"""`make bench`: the system's throughput and latency against the machine's own ceilings.

One run, one machine, private RabbitMQ and Redis nodes (scripts/stack.py), the apps
as real processes with their production settings:

1. no-op HTTP ceiling: gunicorn with main_app.gunicorn_conf serving noop_app.py
   (POST /jobs -> 202, no I/O), loaded by wrk;
2. raw broker ceilings with pika: confirmed persistent publishing (many confirms in
   flight, and one at a time for reference), consuming with manual acks at the
   worker's prefetch, both on the real `jobs` quorum queue;
3. main-app ingest: POST /jobs at saturation (wrk), p50/p99;
4. service-app: echo jobs per second for one worker process from a pre-filled queue
   (status writes and acks included);
5. end to end: submit -> `succeeded` recorded (what GET /jobs/<id> reads), p50/p99,
   open-loop at 50% of the measured maximum ingest;
6. memory: RSS of the gunicorn workers and of a service-app process, sampled while a
   100k-job backlog drains.

Variants are interleaved (noop, ingest, noop, ...; raw consume, worker, ...) and
repeated; the table shows medians with min-max. Results go to reports/bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pika
import redis
from pika.adapters.select_connection import SelectConnection

from jobs_contract import JobMessage, topology
from jobs_contract import env as contract_env
from jobs_contract.store import utcnow
from jobs_devtools.stack import ROOT, App, PrivateStack, Proc, app_env
from service_app.config import Settings as WorkerSettings

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token-" + secrets.token_hex(8)
# Peers (scripts/bench/peers.py) run from their own venv: `make bench-peers`.
PEERS_VENV = Path(os.environ.get("BENCH_PEERS") or ROOT / ".tools" / "bench-peers")
# Producers: all answer 202 only after the broker confirmed the message (same durability).
PEER_PRODUCERS = {"peer_celery": "peers:celery_api", "peer_dramatiq": "peers:dramatiq_api",
                  "peer_naive": "peers:naive_api"}
# Workers: both store every result in Redis (same durability as ours: outcome recorded, then ack).
PEER_WORKERS = {"peer_celery_worker": "celery", "peer_dramatiq_worker": "dramatiq"}
# Where the end-to-end phase's CPU goes: each process's CPU per job, the load generator's included.
E2E_PROCESSES = ("api", "worker", "rabbitmq", "redis", "client")
WAKEUP_PROBE_RATE = 50.0  # round trips per second: each thread sleeps between them
PEER_QUEUES = {"celery": "peer-celery", "dramatiq": "peer-dramatiq"}
PEER_RESULTS_DB = {"celery": 1, "dramatiq": 2}
PEER_LABELS = {
    "peer_celery": "peer: Celery producer (confirm_publish, quorum queue)",
    "peer_dramatiq": "peer: Dramatiq producer (confirm_delivery=True)",
    "peer_naive": "peer: naive endpoint (BlockingConnection per thread, 1 confirm/request)",
    "peer_celery_worker": "peer: Celery worker (acks_late, track_started, Redis results)",
    "peer_dramatiq_worker": "peer: Dramatiq worker (Redis results backend)",
}
PEER_SHORT_NAMES = {"peer_celery": "Celery", "peer_dramatiq": "Dramatiq", "peer_naive": "naive"}


@dataclass
class Profile:
    repeats: int = 3
    http_seconds: float = 10.0
    http_warmup: float = 2.0
    connections: int = 50
    publish_seconds: float = 5.0
    consume_messages: int = 20_000
    drain_messages: int = 100_000
    e2e_seconds: float = 15.0


QUICK = Profile(repeats=1, http_seconds=3.0, http_warmup=1.0, publish_seconds=2.0, consume_messages=5_000,
                drain_messages=10_000, e2e_seconds=4.0)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))  # nearest rank
    return ordered[index]


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and error counts from `wrk --latency` output."""
    result: dict[str, Any] = {"rps": None, "p50_ms": None, "p99_ms": None, "non_2xx": 0, "socket_errors": 0,
                              "requests": None}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result["rps"] = float(match.group(1))
    if match := re.search(r"(\d+) requests in", output):
        result["requests"] = int(match.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if match := re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE):
            result[key] = float(match.group(1)) * _UNITS[match.group(2)]
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        result["non_2xx"] = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        result["socket_errors"] = sum(int(g) for g in match.groups())
    return result


def run_wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    # One wrk thread: it drives far more than this machine serves and leaves a core to the system.
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
               "-s", str(HERE / "post.lua"), url]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BENCH_TOKEN": TOKEN},
                         timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr}")
    return parse_wrk(out.stdout)


# ---------------------------------------------------------------- processes


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def stat_seconds(stat: Path) -> tuple[float, float]:
    """User and kernel CPU seconds from a /proc/<pid>/stat (the whole process, all its threads) or
    /proc/<pid>/task/<tid>/stat (one thread) file; (0, 0) when it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime


def user_kernel_seconds(pids: list[int]) -> tuple[float, float]:
    """User and kernel CPU seconds used so far by these processes (all their threads)."""
    times = [stat_seconds(Path(f"/proc/{pid}/stat")) for pid in pids]
    return sum(user for user, _ in times), sum(kernel for _, kernel in times)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes (all their threads)."""
    return sum(user_kernel_seconds(pids))


def node_pids(stack: PrivateStack) -> dict[str, int]:
    """The OS pids of the stack's RabbitMQ and Redis nodes, by name."""
    return {"rabbitmq": stack.rabbit.os_pid() or 0, "redis": stack.redis.process.pid}


def wait_until_quiet(pids: dict[str, int], busy_share: float = 0.1, window: float = 0.5, timeout: float = 30) -> None:
    """Wait until these processes (RabbitMQ, Redis) use under `busy_share` of a core over `window`
    seconds, so that one run's aftermath (a quorum queue compacting its log after a purge) is not
    measured as the next run's cost; after `timeout`, measure anyway."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        before = cpu_seconds(list(pids.values()))
        time.sleep(window)
        if cpu_seconds(list(pids.values())) - before < busy_share * window:
            return


@contextmanager
def bench_stack(work: Path, name: str) -> Iterator[tuple[PrivateStack, redis.Redis]]:
    """Private RabbitMQ and Redis nodes with the topology declared, and a client of the store."""
    with PrivateStack(work, name) as stack:
        connection = pika.BlockingConnection(pika.URLParameters(stack.rabbit.url))
        topology.declare(connection.channel())
        connection.close()
        yield stack, redis.Redis.from_url(stack.redis.url)


def bench_env(stack: PrivateStack, **extra: str) -> dict[str, str]:
    return app_env(stack.rabbit.url, stack.redis.url, API_TOKENS=TOKEN, **extra)


def start_server(stack: PrivateStack, name: str, *args: str, env: dict[str, str] | None = None,
                 bin_dir: Path | None = None) -> App:
    """main-app (or, with args, the no-op app or a peer) under gunicorn with main_app.gunicorn_conf, ready."""
    app = stack.api(env or bench_env(stack), name=name, args=args, bin_dir=bin_dir)
    return app.wait_ready("/healthz" if args else "/readyz", 60)


def server_pids(app: App) -> list[int]:
    return [app.proc.pid, *app.proc.children()]


def established_connections(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections to local `port` each of these processes holds: how
    the kernel split a client's connections over gunicorn's workers."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 01: ESTABLISHED
                inodes.add(fields[9])
    counts = []
    for pid in pids:
        count = 0
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    count += 1
        except OSError:
            pass
        counts.append(count)
    return counts


@contextmanager
def counting_split(workers: list[int], port: int, after: float) -> Iterator[list[int]]:
    """Count, once, `after` seconds in, how many of a client's connections to `port` each gunicorn
    worker holds; the list is filled in then (empty if the block ended first)."""
    split: list[int] = []
    timer = threading.Timer(after, lambda: split.extend(established_connections(workers, port)))
    timer.start()
    try:
        yield split
    finally:
        timer.cancel()
        timer.join()


def per_worker(split: list[int], cpu_us: list[float | None]) -> dict[str, list]:
    """`connections_per_worker` and `cpu_us_per_req_per_worker`, in the same order, the busiest worker first."""
    if not split or len(split) != len(cpu_us):
        return {}
    order = sorted(range(len(split)), key=lambda i: (split[i], cpu_us[i] or 0), reverse=True)
    return {"connections_per_worker": [split[i] for i in order],
            "cpu_us_per_req_per_worker": [cpu_us[i] for i in order]}


def load(app: App, seconds: float, connections: int, others: dict[str, int] | None = None) -> dict[str, Any]:
    """wrk against POST /jobs, plus the CPU time the server's processes (and `others`:
    RabbitMQ, Redis) spent per request, how many times their threads were woken per request,
    and how wrk's connections were split over the gunicorn workers (`per_worker`)."""
    wait_until_quiet(others or {})
    workers = app.proc.children()
    groups = {"app": server_pids(app), **{name: [pid] for name, pid in (others or {}).items()}}
    before, before_workers = usage(groups), [cpu_seconds([pid]) for pid in workers]
    with counting_split(workers, app.port or 0, seconds / 2) as split:
        result = run_wrk(app.url, seconds, connections)
    if result["requests"]:
        for name, (cpu, woken) in usage_since(before, groups).items():
            suffix = "" if name == "app" else f"_{name}"
            result[f"cpu_us_per_req{suffix}"] = per_million(cpu, result["requests"])
            result[f"wakeups_per_req{suffix}"] = woken / result["requests"]
        result.update(per_worker(split, [per_million(cpu_seconds([pid]) - cpu, result["requests"])
                                         for pid, cpu in zip(workers, before_workers, strict=True)]))
    return result


def split_text(result: dict[str, Any], prefix: str = "") -> str:
    """A client's connections over the gunicorn workers, with each worker's CPU per request of
    all: `11/5 (620/410 µs)`."""
    split = result.get(f"{prefix}connections_per_worker")
    if not split:
        return "n/a"
    cpu = "/".join(f"{us or 0:.0f}" for us in result[f"{prefix}cpu_us_per_req_per_worker"])
    return "/".join(str(n) for n in split) + f" ({cpu} µs)"


def worker_rss(app: App) -> list[float]:
    return [r for r in (rss_mb(p) for p in app.proc.children()) if r is not None]


# ---------------------------------------------------------------- broker helpers


class PipelinedPublisher:
    """Confirmed persistent publishing with up to `window` confirms in flight (the raw ceiling,
    and the fast way to pre-fill a queue)."""

    def __init__(self, url: str, window: int = 1000):
        self.url = url
        self.window = window

    def run(self, make_message: Callable[[int], tuple[bytes, pika.BasicProperties]], count: int | None = None,
            seconds: float | None = None, exchange: str = topology.EXCHANGE,
            routing_key: str = topology.ROUTING_KEY) -> tuple[int, float]:
        """Publish `count` messages or for `seconds`; return (confirmed, elapsed)."""
        state = {"sent": 0, "confirmed": 0, "nacked": 0, "started": 0.0, "ended": 0.0}
        channel_box: list[Any] = []

        def done() -> bool:
            if count is not None:
                return state["sent"] >= count
            return time.perf_counter() - state["started"] >= seconds

        def pump() -> None:
            channel = channel_box[0]
            while state["sent"] - state["confirmed"] - state["nacked"] < self.window and not done():
                body, properties = make_message(state["sent"])
                channel.basic_publish(exchange, routing_key, body, properties)
                state["sent"] += 1

        def on_confirm(frame) -> None:
            method = frame.method
            acked = isinstance(method, pika.spec.Basic.Ack)
            settled = state["confirmed"] + state["nacked"]
            n = method.delivery_tag - settled if method.multiple else 1
            state["confirmed" if acked else "nacked"] += n
            if done() and state["confirmed"] + state["nacked"] >= state["sent"]:
                state["ended"] = time.perf_counter()
                connection.close()
                return
            pump()

        def on_confirm_mode(_frame) -> None:
            state["started"] = time.perf_counter()
            pump()

        def on_channel(channel) -> None:
            channel_box.append(channel)
            channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirm_mode)

        connection = SelectConnection(pika.URLParameters(self.url),
                                      on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
                                      on_close_callback=lambda c, r: c.ioloop.stop())
        connection.ioloop.start()
        if state["nacked"]:
            raise RuntimeError(f"{state['nacked']} messages nacked")
        return state["confirmed"], state["ended"] - state["started"]


def publish_one_at_a_time(url: str, seconds: float) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        channel.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, b'{"raw":true}', properties)
        count += 1
    elapsed = time.perf_counter() - started
    connection.close()
    return count / elapsed


def raw_message(_i: int) -> tuple[bytes, pika.BasicProperties]:
    return b'{"v":1,"raw":true,"payload":{"n":1,"text":"hello"}}', pika.BasicProperties(delivery_mode=2)


def raw_consume(url: str, count: int, prefetch: int) -> float:
    """Consume `count` messages with a manual ack each, at `prefetch`; messages/s."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    state = {"n": 0, "started": 0.0}

    def on_message(ch, method, _properties, _body) -> None:
        if state["n"] == 0:
            state["started"] = time.perf_counter()
        ch.basic_ack(method.delivery_tag)
        state["n"] += 1
        if state["n"] >= count:
            ch.stop_consuming()

    channel.basic_consume(topology.QUEUE, on_message_callback=on_message)
    channel.start_consuming()
    elapsed = time.perf_counter() - state["started"]
    connection.close()
    return (count - 1) / elapsed


def purge(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in topology.QUEUES:
        channel.queue_purge(queue.name)
    connection.close()


def prefill_jobs(url: str, store: redis.Redis, count: int) -> None:
    """`count` echo jobs as main-app would leave them: a queued record in Redis and a message."""
    client = "c-bench"
    created_at = utcnow()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    pipe = store.pipeline(transaction=False)
    for n, job_id in enumerate(ids, 1):
        pipe.hset(f"job:{job_id}", mapping={"id": job_id, "client": client, "type": "echo", "status": "queued",
                                            "attempts": 0, "created_at": created_at})
        pipe.expire(f"job:{job_id}", 3600)
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()

    def make(i: int) -> tuple[bytes, pika.BasicProperties]:
        return JobMessage(id=ids[i], type="echo", payload={"n": i, "text": "hello"}, client=client,
                          created_at=created_at).encode()

    confirmed, _ = PipelinedPublisher(url).run(make, count=count)
    assert confirmed == count, (confirmed, count)


# ---------------------------------------------------------------- service-app


def jobs_succeeded(worker: App) -> int:
    """How many jobs this service-app process has run to `succeeded`, from its own metrics."""
    with urllib.request.urlopen(worker.metrics_url, timeout=5) as response:
        return int(metric_value(response.read().decode(), "jobs_worker_jobs_processed_total", 'outcome="succeeded"'))


def metric_value(text: str, name: str, labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def worker_drain(stack: PrivateStack, count: int, tag: str, env: dict[str, str],
                 on_start: Callable[[App], None] | None = None) -> dict[str, Any]:
    """Start one service-app process on a pre-filled queue of `count` echo jobs; measure jobs/s
    between 10% and 90% done, and its RSS all along."""
    wait_until_quiet(node_pids(stack))
    worker = stack.worker(bench_env(stack, **env), name=f"worker-{tag}")
    proc, rabbit, store_node = worker.proc, stack.rabbit, stack.redis
    if on_start:
        on_start(worker)
    # (t, processed, rss, cpu of the worker, of RabbitMQ, of Redis)
    samples: list[tuple[float, float, float | None, float, float, float]] = []
    deadline = time.monotonic() + max(120, count / 200)
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"service-app exited: {proc.output()[-2000:]}")
            try:
                done = jobs_succeeded(worker)
            except OSError:
                time.sleep(0.1)
                continue
            samples.append((time.perf_counter(), done, rss_mb(proc.pid), cpu_seconds([proc.pid]),
                            cpu_seconds([rabbit.os_pid() or 0]), cpu_seconds([store_node.process.pid])))
            if done >= count:
                break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"drain of {count} jobs did not finish; last sample {samples[-1:]}")
    finally:
        code = proc.stop()
    if code not in (0, None):
        raise RuntimeError(f"service-app exited {code}")

    rate = rate_10_90(samples, count)
    rss = [r for _, c, r, *_ in samples if r is not None and c > 0.05 * count]
    busy = [(c, *cpu) for _, c, _, *cpu in samples if 0.1 * count <= c <= 0.9 * count]

    def per_job(i: int) -> float | None:
        return (busy[-1][i] - busy[0][i]) / (busy[-1][0] - busy[0][0]) * 1e6 if len(busy) > 1 else None

    return {"jobs_per_s": rate, "cpu_us_per_job": per_job(1), "cpu_us_per_job_rabbitmq": per_job(2),
            "cpu_us_per_job_redis": per_job(3),
            "rss_mb_start": rss[0] if rss else None, "rss_mb_max": max(rss, default=None),
            "rss_mb_end": rss[-1] if rss else None, "rss_samples": len(rss)}


def rate_10_90(samples: list[tuple], count: int) -> float:
    """Jobs/s between 10% and 90% done, from (time, done, ...) samples (linear in between)."""

    def time_at(fraction: float) -> float:
        target = fraction * count
        for (t0, c0, *_), (t1, c1, *_) in zip(samples, samples[1:], strict=False):
            if c0 <= target <= c1 and c1 > c0:
                return t0 + (t1 - t0) * (target - c0) / (c1 - c0)
        raise RuntimeError("not enough samples")

    return 0.8 * count / (time_at(0.9) - time_at(0.1))


# ---------------------------------------------------------------- peers (scripts/bench/peers.py)


def purge_queues(url: str, names: list[str]) -> None:
    """Purge these queues; a queue not declared yet is skipped."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for name in names:
            channel = connection.channel()
            try:
                channel.queue_purge(name)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
    finally:
        connection.close()


def peer_env(stack: PrivateStack, **extra: str) -> dict[str, str]:
    return bench_env(stack, PYTHONPATH=str(HERE), **extra)


def peer_prefill(stack: PrivateStack, peer: str, count: int) -> None:
    """`count` echo tasks on a peer's queue, through the peer's own client (not measured)."""
    out = subprocess.run([str(PEERS_VENV / "bin" / "python"), str(HERE / "peers.py"), "prefill", peer, str(count)],
                         env=peer_env(stack, BENCH_PEER_PREFILL="1"), capture_output=True, text=True,
                         timeout=max(300, count / 50))
    if out.returncode != 0:
        raise RuntimeError(f"{peer} pre-fill failed: {out.stderr[-2000:]}")


def peer_results_done(client: redis.Redis, peer: str) -> int:
    """Results stored so far in the peer's results database (Celery: SUCCESS records only,
    since task_track_started writes a STARTED record first)."""
    if peer == "dramatiq":
        return client.dbsize()
    done = 0
    keys = list(client.scan_iter("celery-task-meta-*", count=5000))
    for start in range(0, len(keys), 5000):
        done += sum(1 for v in client.mget(keys[start:start + 5000]) if v and b'"SUCCESS"' in v)
    return done


def worker_settings(env: dict[str, str] | None = None) -> WorkerSettings:
    """service-app's settings as a worker started with `env` (over this process's) reads them."""
    with mock.patch.dict(os.environ, env or {}):
        return contract_env.load(WorkerSettings)


def peer_worker_command(peer: str, settings: WorkerSettings) -> list[str]:
    """Comparable to one service-app process with `settings`: as many job threads, the same prefetch."""
    bin_dir = PEERS_VENV / "bin"
    if peer == "celery":
        if settings.prefetch % settings.concurrency:
            raise ValueError("Celery's prefetch is a multiple of its concurrency")
        return [str(bin_dir / "celery"), "-A", "peers:celery_app", "worker", "--pool", "threads",
                "--concurrency", str(settings.concurrency),
                "--prefetch-multiplier", str(settings.prefetch // settings.concurrency), "--without-gossip",
                "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING", "-Q", PEER_QUEUES[peer]]
    return [str(bin_dir / "dramatiq"), "peers", "--processes", "1", "--threads", str(settings.concurrency),
            "--queues", PEER_QUEUES[peer]]


def peer_worker_drain(stack: PrivateStack, peer: str, count: int, tag: str,
                      settings: WorkerSettings | None = None) -> dict[str, Any]:
    """One peer worker process on a pre-filled queue of `count` echo tasks, with service-app's
    concurrency and prefetch (its defaults unless `settings`): jobs/s between 10% and 90%
    delivered (with late acks, delivery runs at the completion rate), then wait until every
    result is stored."""
    settings = settings or worker_settings()
    wait_until_quiet(node_pids(stack))
    results = redis.Redis.from_url(stack.redis.url.rsplit("/", 1)[0] + f"/{PEER_RESULTS_DB[peer]}")
    proc = Proc(peer_worker_command(peer, settings), peer_env(stack, dramatiq_queue_prefetch=str(settings.prefetch)),
                stack.work / f"{tag}.log", tag).start()
    connection = pika.BlockingConnection(pika.URLParameters(stack.rabbit.url))
    channel = connection.channel()
    rabbit, store_node = stack.rabbit, stack.redis
    samples: list[tuple[float, int, float, float, float]] = []
    stored = 0
    deadline = time.monotonic() + max(180, count / 50)
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{peer} worker exited: {proc.output()[-2000:]}")
            ready = channel.queue_declare(PEER_QUEUES[peer], passive=True).method.message_count
            samples.append((time.perf_counter(), count - ready, cpu_seconds([proc.pid, *proc.children()]),
                            cpu_seconds([rabbit.os_pid() or 0]), cpu_seconds([store_node.process.pid])))
            if ready == 0 and (stored := peer_results_done(results, peer)) >= count:
                break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"{peer} drain of {count} did not finish: {stored} results; last {samples[-1:]}")
    finally:
        connection.close()
        proc.stop(group=True)
    busy = [s[1:] for s in samples if 0.1 * count <= s[1] <= 0.9 * count]

    def per_job(i: int) -> float | None:
        return (busy[-1][i] - busy[0][i]) / (busy[-1][0] - busy[0][0]) * 1e6 if len(busy) > 1 else None

    return {"jobs_per_s": rate_10_90(samples, count), "cpu_us_per_job": per_job(1),
            "cpu_us_per_job_rabbitmq": per_job(2), "cpu_us_per_job_redis": per_job(3), "results_stored": stored}


# ---------------------------------------------------------------- end to end


async def open_loop(host: str, port: int, rate: float, seconds: float, connections: int = 64) -> list[tuple]:
    """POST /jobs at a fixed rate (open loop: each request is timed from when it was due, so a slow
    server cannot slow the clock down); returns (due_wall_time, status, job_id, latency_s).

    Lean on purpose: the client shares the machine's 2 cores with what it measures, so it is one
    timer per request and one callback per response (no streams, no coroutine per request). Idle
    connections are used in turn, each at least about once a second, so that none sits idle long
    enough for the server's keep-alive timeout to close it. A lost request, an answer that cannot
    be read, or a run that does not end within a minute of its schedule fails the run."""
    body = b'{"type":"echo","payload":{"n":1,"text":"hello"}}'
    request = (f"POST /jobs HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    total = int(rate * seconds)
    results: list[tuple] = []
    loop = asyncio.get_running_loop()
    idle: collections.deque[OpenLoopConnection] = collections.deque()  # oldest-used first
    overdue: collections.deque[int] = collections.deque()  # due, but every connection was busy
    finished = loop.create_future()
    start_mono = 0.0

    def fail(error: Exception) -> None:
        if not finished.done():
            finished.set_exception(error)

    def send(conn: OpenLoopConnection, i: int) -> None:
        conn.due_index = i
        # The records' timestamps are wall-clock time, the schedule is monotonic: convert a due time
        # with the offset between the two clocks as it is now, not as it was when the run began. A
        # VM's wall clock can be stepped while it runs (this one was seen gaining 0.5 ms every
        # 100 ms), which would add up to tens of milliseconds to every job of a 15-second run.
        conn.wall_offset = time.time() - loop.time()
        conn.transport.write(request)

    def on_response(conn: OpenLoopConnection, status: int, payload: bytes) -> None:
        done = loop.time()
        job_id = json.loads(payload).get("id") if status == 202 else None
        i, conn.due_index = conn.due_index, -1
        due_at = start_mono + i / rate
        results.append((due_at + conn.wall_offset, status, job_id, done - due_at))
        if overdue:
            send(conn, overdue.popleft())
        else:
            idle.append(conn)
        if len(results) == total and not finished.done():
            finished.set_result(None)

    def on_lost(conn: OpenLoopConnection, exc: Exception | None) -> None:
        if conn.due_index >= 0:  # a request was in flight: the run cannot be timed honestly
            fail(ConnectionError(f"the server closed a connection mid-request, or its answer could not be "
                                 f"read: {exc!r}"))
        elif conn in idle:
            idle.remove(conn)
            if all(transport.is_closing() for transport in transports) and len(results) < total:
                fail(ConnectionError("the server closed every connection"))

    def due(i: int) -> None:
        if i + 1 < total:
            loop.call_at(start_mono + (i + 1) / rate, due, i + 1)
        if idle:
            send(idle.popleft(), i)
        else:
            overdue.append(i)

    transports = []
    try:
        for _ in range(max(1, min(connections, int(rate)))):
            transport, conn = await loop.create_connection(lambda: OpenLoopConnection(on_response, on_lost),
                                                           host, port)
            transports.append(transport)
            idle.append(conn)
        start_mono = loop.time() + 0.2
        if total:
            loop.call_at(start_mono, due, 0)
            try:
                await asyncio.wait_for(finished, seconds + 60)
            except TimeoutError:
                raise TimeoutError(f"{total - len(results)} of {total} requests unanswered "
                                   f"a minute after the schedule ended") from None
    finally:
        for transport in transports:
            transport.close()
    return results


class OpenLoopConnection(asyncio.Protocol):
    """One kept-alive connection with at most one request in flight."""

    def __init__(self, on_response: Callable[[OpenLoopConnection, int, bytes], None],
                 on_lost: Callable[[OpenLoopConnection, Exception | None], None]):
        self.on_response = on_response
        self.on_lost = on_lost
        self.buffer = b""
        self.due_index = -1  # the request in flight, if any
        self.wall_offset = 0.0  # time.time() - loop.time() when that request was sent
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end]
        try:
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            if len(self.buffer) < end + 4 + length:
                return
            payload, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
            self.on_response(self, int(head[9:12]), payload)
        except (AttributeError, ValueError) as exc:  # no Content-Length, or a body that is not JSON
            self.on_lost(self, exc)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.on_lost(self, exc)


def parse_time(value: bytes | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.decode().replace("Z", "+00:00")).timestamp()


def reference_loop_ms() -> float:
    """CPU time of a fixed pure-Python loop: the VM's speed for Python at this moment, so that runs
    of different hours (and the phases of one run) can be compared."""
    started = time.process_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return (time.process_time() - started) * 1000


def wakeup_cost_us(rate: float | None, seconds: float) -> tuple[float, int]:
    """CPU µs per round trip between two threads of this process over a socket pair, and how many
    ran: one every 1/rate seconds (three wake-ups from sleep each: the timer, the echo, the answer;
    a job at a trickle pays its wake-ups like this), or back to back (rate None: the vCPU never goes
    idle between them). What the VM charges for waking a thread, measured beside the run."""
    ours, echoing = socket.socketpair()

    def echo() -> None:
        while data := echoing.recv(64):
            echoing.sendall(data)

    thread = threading.Thread(target=echo, name="wakeup-echo", daemon=True)
    thread.start()
    count, started_cpu = 0, time.process_time()
    started = due = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            if rate:
                due += 1 / rate
                time.sleep(max(0.0, due - time.monotonic()))
            ours.sendall(b"x")
            ours.recv(64)
            count += 1
        used = time.process_time() - started_cpu
    finally:
        ours.close()
        thread.join(5)
        echoing.close()
    return used / count * 1e6, count


def wakeups(pids: list[int]) -> int:
    """How many times these processes' threads slept and were woken so far (voluntary context
    switches, summed over every thread alive: a thread that has exited takes its count along)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += int(status.split("voluntary_ctxt_switches:", 1)[1].split(None, 1)[0])
    return total


def usage(groups: dict[str, list[int]]) -> dict[str, tuple[float, int]]:
    """Each group of processes' CPU seconds and thread wake-ups so far."""
    return {name: (cpu_seconds(pids), wakeups(pids)) for name, pids in groups.items()}


def usage_since(before: dict[str, tuple[float, int]], groups: dict[str, list[int]]) -> dict[str, tuple[float, int]]:
    """Each group's CPU seconds and thread wake-ups since `before` (usage(groups) then)."""
    return {name: (cpu - before[name][0], woken - before[name][1]) for name, (cpu, woken) in usage(groups).items()}


def machine_ticks() -> list[int]:
    """The machine's CPU time so far, from /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as stat:
        return [int(ticks) for ticks in stat.readline().split()[1:9]]


def machine_busy(before: list[int], after: list[int]) -> tuple[float, float]:
    """The share of the machine busy between two readings (idle and I/O wait are not busy), and
    the share the hypervisor took (steal: the VM wanted to run and was not let)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    return 1 - (delta[3] + delta[4]) / total, delta[7] / total


def _own_wakeups() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def per_million(seconds: float, count: int) -> float | None:
    """CPU seconds spent on `count` requests or jobs, in µs each."""
    return seconds / count * 1e6 if count else None


def e2e_others(stack: PrivateStack, worker: App) -> dict[str, list[int]]:
    """The processes besides the API whose CPU an end-to-end run accounts for."""
    return {"worker": [worker.proc.pid], **{name: [pid] for name, pid in node_pids(stack).items()}}


def end_to_end(api: App, store: redis.Redis, rate: float, seconds: float,
               others: dict[str, list[int]] | None = None,
               on_sent: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Open-loop submissions at `rate`, then when each job was recorded `succeeded`; with the CPU
    per request of the API, of `others` (the worker, RabbitMQ, Redis) and of this load generator,
    and how busy the machine was: where the cores went, in every run. on_sent(requests): called
    once the last answer is in, before the records are read back (what the CPU figures cover)."""
    groups = {"api": server_pids(api), **(others or {})}
    workers = api.proc.children()
    before, before_workers = usage(groups), [cpu_seconds([pid]) for pid in workers]
    client_cpu, client_woken, machine = time.process_time(), _own_wakeups(), machine_ticks()
    with counting_split(workers, api.port or 0, seconds / 2) as split:
        results = asyncio.run(open_loop("127.0.0.1", api.port, rate, seconds))
    api_split = per_worker(split, [per_million(cpu_seconds([pid]) - cpu, len(results))
                                   for pid, cpu in zip(workers, before_workers, strict=True)])
    client_cpu, client_woken = time.process_time() - client_cpu, _own_wakeups() - client_woken
    busy, steal = machine_busy(machine, machine_ticks())
    used = usage_since(before, groups)
    if on_sent is not None:
        on_sent(len(results))
    api_cpu, api_woken = used.pop("api")
    accepted = [r for r in results if r[1] == 202]
    # Give the last jobs time to finish, then read when each was recorded `succeeded`:
    # GET /jobs/<id> answers from this very record, so that is when success became visible.
    deadline = time.monotonic() + 30
    while True:
        pipe = store.pipeline(transaction=False)
        for r in accepted:
            pipe.hmget(f"job:{r[2]}", "status", "created_at", "started_at", "finished_at")
        records = pipe.execute()
        pending = sum(1 for status, *_ in records if status != b"succeeded")
        if pending == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Where the time goes, per succeeded job: due -> created_at (the client's send, gunicorn, the
    # request up to building the message), created_at -> started_at (record, publish, confirm,
    # delivery, waiting for a job thread), started_at -> finished_at (the job and its outcome).
    segments: dict[str, list[float]] = {"e2e": [], "to_created": [], "to_started": [], "to_finished": []}
    for r, (status, created, started, finished) in zip(accepted, records, strict=True):
        if status != b"succeeded":
            continue
        times = [r[0], *(parse_time(value) for value in (created, started, finished))]
        segments["e2e"].append((times[3] - times[0]) * 1000)
        for name, begin, end in (("to_created", 0, 1), ("to_started", 1, 2), ("to_finished", 2, 3)):
            segments[name].append((times[end] - times[begin]) * 1000)
    e2e = segments["e2e"]
    submit = [r[3] * 1000 for r in accepted]
    return {"rate": rate, "sent": len(results), "accepted": len(accepted), "not_succeeded": pending,
            # The API and the client per request sent; the rest per job accepted (each ran once).
            "api_cpu_us_per_req": per_million(api_cpu, len(results)),
            "client_cpu_us_per_req": per_million(client_cpu, len(results)),
            **{f"{name}_cpu_us_per_req": per_million(cpu, len(accepted)) for name, (cpu, _) in used.items()},
            "api_wakeups_per_req": api_woken / len(results) if results else None,
            "client_wakeups_per_req": client_woken / len(results) if results else None,
            **{f"{name}_wakeups_per_req": woken / len(accepted) if accepted else None
               for name, (_, woken) in used.items()},
            "machine_busy": busy, "machine_steal": steal,
            # How the client's connections were split over the API's gunicorn workers.
            **{f"api_{key}": value for key, value in api_split.items()},
            "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99), "e2e_max_ms": max(e2e, default=None),
            "submit_p50_ms": percentile(submit, 50), "submit_p99_ms": percentile(submit, 99),
            **{f"{name}_p{q}_ms": percentile(segments[name], q) for name in ("to_created", "to_started", "to_finished")
               for q in (50, 99)}}


# ---------------------------------------------------------------- the run


@dataclass
class Bench:
    profile: Profile
    work: Path
    peers: bool = True
    results: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, list] = field(default_factory=dict)

    def record(self, key: str, value: Any) -> None:
        self.runs.setdefault(key, []).append(value)
        # Other work on the machine skews every number: keep the load next to each run, and how
        # fast the VM ran Python then (its speed changes by 2x and more from hour to hour).
        self.results.setdefault("loadavg_1m", []).append((key, os.getloadavg()[0]))
        self.results.setdefault("reference_loop_ms", []).append((key, reference_loop_ms()))

    def reset(self, url: str, store: redis.Redis) -> None:
        """Empty every queue (ours and the peers') and every Redis database between runs."""
        purge(url)
        if self.peers:
            purge_queues(url, list(PEER_QUEUES.values()))
        store.flushall()

    def run(self) -> dict[str, Any]:
        p = self.profile
        started = time.time()
        log("starting private RabbitMQ and Redis nodes")
        with bench_stack(self.work, f"jobs-bench-{os.getpid()}") as (stack, store):
            rabbit = stack.rabbit
            settings = worker_settings()
            prefetch = settings.prefetch

            # 1 + 3: no-op ceiling and ingest, interleaved (with the peers' producers).
            noop = start_server(stack, "noop", "--pythonpath", str(HERE), "noop_app:app")
            api = start_server(stack, "api")
            servers = [("noop", noop), ("ingest", api)]
            if self.peers:
                servers += [(name, start_server(stack, name, "--pythonpath", str(HERE), target, env=peer_env(stack),
                                                bin_dir=PEERS_VENV / "bin"))
                            for name, target in PEER_PRODUCERS.items()]
            for _, server in servers:
                run_wrk(server.url, p.http_warmup, p.connections)
            self.reset(rabbit.url, store)
            others = node_pids(stack)
            for i in range(p.repeats):
                for name, server in servers if i % 2 == 0 else servers[::-1]:
                    result = load(server, p.http_seconds, p.connections, others)
                    result["worker_rss_mb"] = worker_rss(server)
                    log(f"{name}: {result['rps']:.0f} req/s p50 {result['p50_ms']:.2f} ms "
                        f"p99 {result['p99_ms']:.2f} ms non-2xx {result['non_2xx']} "
                        f"CPU us/req: app {result.get('cpu_us_per_req', 0):.0f}, "
                        f"RabbitMQ {result.get('cpu_us_per_req_rabbitmq', 0):.0f}, "
                        f"Redis {result.get('cpu_us_per_req_redis', 0):.0f}; "
                        f"connections per worker {split_text(result)}")
                    self.record(name, result)
                    if name != "noop":
                        self.reset(rabbit.url, store)
            # The same at -c16 (fewer requests in flight than threads), ours and the peers only.
            if self.peers:
                for i in range(p.repeats):
                    for name, server in servers[1:] if i % 2 == 0 else servers[:0:-1]:
                        result = load(server, p.http_seconds, 16, others)
                        log(f"{name} -c16: {result['rps']:.0f} req/s p50 {result['p50_ms']:.2f} ms "
                            f"p99 {result['p99_ms']:.2f} ms non-2xx {result['non_2xx']} "
                            f"CPU us/req: app {result.get('cpu_us_per_req', 0):.0f}, "
                            f"RabbitMQ {result.get('cpu_us_per_req_rabbitmq', 0):.0f}, "
                            f"Redis {result.get('cpu_us_per_req_redis', 0):.0f}; "
                            f"connections per worker {split_text(result)}")
                        self.record(f"{name}_c16", result)
                        self.reset(rabbit.url, store)
            for name, server in servers:
                if name != "ingest":
                    server.stop()

            # 2: raw publish ceilings.
            for _ in range(p.repeats):
                wait_until_quiet(others)
                before = cpu_seconds([rabbit.os_pid() or 0])
                confirmed, elapsed = PipelinedPublisher(rabbit.url).run(raw_message, seconds=p.publish_seconds)
                rabbit_us = (cpu_seconds([rabbit.os_pid() or 0]) - before) / confirmed * 1e6
                self.record("raw_publish", confirmed / elapsed)
                self.record("raw_publish_rabbitmq_cpu_us", rabbit_us)
                log(f"raw publish (confirms in flight): {confirmed / elapsed:.0f} msg/s, "
                    f"RabbitMQ CPU {rabbit_us:.0f} us/msg")
                purge(rabbit.url)
            wait_until_quiet(others)
            rate = publish_one_at_a_time(rabbit.url, min(3.0, p.publish_seconds))
            self.record("raw_publish_sync", rate)
            log(f"raw publish (one confirm at a time): {rate:.0f} msg/s")
            purge(rabbit.url)

            # 2 + 4: raw consume and the worker, interleaved.
            tuned = {"WORKER_CONCURRENCY": "16"}  # the lever: more jobs in flight per process
            for i in range(p.repeats):
                names = ("raw_consume", "worker", "worker_tuned", *(PEER_WORKERS if self.peers else ()))
                for name in names if i % 2 == 0 else names[::-1]:
                    if name in PEER_WORKERS:
                        peer = PEER_WORKERS[name]
                        peer_prefill(stack, peer, p.consume_messages)
                        result = peer_worker_drain(stack, peer, p.consume_messages, f"{name}{i}")
                        self.record(name, result)
                        log(f"{name}: {result['jobs_per_s']:.0f} jobs/s, CPU {result['cpu_us_per_job'] or 0:.0f} "
                            f"us/job, {result['results_stored']} results stored")
                        self.reset(rabbit.url, store)
                    elif name == "raw_consume":
                        PipelinedPublisher(rabbit.url).run(raw_message, count=p.consume_messages)
                        wait_until_quiet(others)
                        rate = raw_consume(rabbit.url, p.consume_messages, prefetch)
                        self.record(name, rate)
                        log(f"raw consume (prefetch {prefetch}): {rate:.0f} msg/s")
                    else:
                        prefill_jobs(rabbit.url, store, p.consume_messages)
                        result = worker_drain(stack, p.consume_messages, f"{name}{i}",
                                              tuned if name == "worker_tuned" else {})
                        self.record(name, result)
                        log(f"{name}: {result['jobs_per_s']:.0f} jobs/s, CPU {result['cpu_us_per_job']:.0f} us/job, "
                            f"RSS {result['rss_mb_max']:.1f} MB")
                    purge(rabbit.url)
                    store.flushdb()

            # 6: memory while a large backlog drains.
            log(f"pre-filling {p.drain_messages} jobs for the memory drain")
            prefill_jobs(rabbit.url, store, p.drain_messages)
            drain = worker_drain(stack, p.drain_messages, "drain", {})
            self.results["drain"] = drain
            log(f"drain {p.drain_messages}: {drain['jobs_per_s']:.0f} jobs/s, RSS {drain['rss_mb_start']:.1f} -> "
                f"{drain['rss_mb_end']:.1f} MB (max {drain['rss_mb_max']:.1f})")
            purge(rabbit.url)
            store.flushdb()

            # 5: end to end at half the measured maximum ingest.
            ingest_rps = statistics.median(r["rps"] for r in self.runs["ingest"])
            e2e_rate = round(ingest_rps * 0.5)
            worker = stack.worker(bench_env(stack), name="worker-e2e").wait_ready()
            end_to_end(api, store, e2e_rate, 1.0)  # warm-up
            for _ in range(p.repeats):
                wait_until_quiet(others)
                result = end_to_end(api, store, e2e_rate, p.e2e_seconds, e2e_others(stack, worker))
                self.record("e2e", result)
                # What a wake-up costs on this VM now, one at a time and back to back.
                self.runs.setdefault("wakeup_trickle_cpu_us", []).append(wakeup_cost_us(WAKEUP_PROBE_RATE, 1.0)[0])
                self.runs.setdefault("wakeup_back_to_back_cpu_us", []).append(wakeup_cost_us(None, 0.3)[0])
                log(f"e2e at {e2e_rate}/s: p50 {result['e2e_p50_ms']:.1f} ms p99 {result['e2e_p99_ms']:.1f} ms "
                    f"({result['accepted']} accepted, {result['not_succeeded']} not succeeded); "
                    f"the client's connections per API worker {split_text(result, 'api_')}")
            self.results["service_app_rss_mb"] = rss_mb(worker.proc.pid)
            self.results["gunicorn_worker_rss_mb"] = worker_rss(api)
        self.results["elapsed_s"] = time.time() - started
        return self.summarise(settings, worker_settings(tuned))

    def summarise(self, settings: WorkerSettings, tuned: WorkerSettings) -> dict[str, Any]:
        runs = self.runs
        out = {
            "machine": machine(),
            "profile": self.profile.__dict__,
            "prefetch": settings.prefetch, "concurrency": settings.concurrency,
            "tuned_concurrency": tuned.concurrency, "tuned_prefetch": tuned.prefetch,
            "noop_rps": summary([r["rps"] for r in runs["noop"]]),
            "noop_p50_ms": summary([r["p50_ms"] for r in runs["noop"]]),
            "noop_p99_ms": summary([r["p99_ms"] for r in runs["noop"]]),
            "ingest_rps": summary([r["rps"] for r in runs["ingest"]]),
            "ingest_p50_ms": summary([r["p50_ms"] for r in runs["ingest"]]),
            "ingest_p99_ms": summary([r["p99_ms"] for r in runs["ingest"]]),
            "noop_cpu_us_per_req": summary([r.get("cpu_us_per_req") for r in runs["noop"]]),
            "ingest_cpu_us_per_req": summary([r.get("cpu_us_per_req") for r in runs["ingest"]]),
            "ingest_cpu_us_per_req_rabbitmq": summary([r.get("cpu_us_per_req_rabbitmq") for r in runs["ingest"]]),
            "ingest_cpu_us_per_req_redis": summary([r.get("cpu_us_per_req_redis") for r in runs["ingest"]]),
            "worker_cpu_us_per_job": summary([r.get("cpu_us_per_job") for r in runs["worker"]]),
            "worker_cpu_us_per_job_rabbitmq": summary([r.get("cpu_us_per_job_rabbitmq") for r in runs["worker"]]),
            "worker_cpu_us_per_job_redis": summary([r.get("cpu_us_per_job_redis") for r in runs["worker"]]),
            "raw_publish_rabbitmq_cpu_us": summary(runs["raw_publish_rabbitmq_cpu_us"]),
            "worker_tuned_jobs_s": summary([r["jobs_per_s"] for r in runs["worker_tuned"]]),
            "worker_tuned_cpu_us_per_job": summary([r.get("cpu_us_per_job") for r in runs["worker_tuned"]]),
            "ingest_non_2xx": sum(r["non_2xx"] + r["socket_errors"] for r in runs["ingest"]),
            "raw_publish_msg_s": summary(runs["raw_publish"]),
            "raw_publish_sync_msg_s": summary(runs["raw_publish_sync"]),
            "raw_consume_msg_s": summary(runs["raw_consume"]),
            "worker_jobs_s": summary([r["jobs_per_s"] for r in runs["worker"]]),
            "e2e_rate": runs["e2e"][0]["rate"],
            "e2e_p50_ms": summary([r["e2e_p50_ms"] for r in runs["e2e"]]),
            "e2e_p99_ms": summary([r["e2e_p99_ms"] for r in runs["e2e"]]),
            "e2e_submit_p99_ms": summary([r["submit_p99_ms"] for r in runs["e2e"]]),
            **{f"e2e_{name}_cpu_us_per_req": summary([r.get(f"{name}_cpu_us_per_req") for r in runs["e2e"]])
               for name in E2E_PROCESSES},
            "e2e_total_cpu_us_per_req": summary([sum(r.get(f"{name}_cpu_us_per_req") or 0 for name in E2E_PROCESSES)
                                                 for r in runs["e2e"]]),
            **{f"e2e_{name}_wakeups_per_req": summary([r.get(f"{name}_wakeups_per_req") for r in runs["e2e"]])
               for name in E2E_PROCESSES},
            "e2e_total_wakeups_per_req": summary([sum(r.get(f"{name}_wakeups_per_req") or 0 for name in E2E_PROCESSES)
                                                  for r in runs["e2e"]]),
            "wakeup_trickle_cpu_us": summary(runs.get("wakeup_trickle_cpu_us", [])),
            "wakeup_back_to_back_cpu_us": summary(runs.get("wakeup_back_to_back_cpu_us", [])),
            "e2e_machine_busy": summary([r["machine_busy"] for r in runs["e2e"]]),
            "e2e_machine_steal": summary([r["machine_steal"] for r in runs["e2e"]]),
            **{f"e2e_{name}_p{q}_ms": summary([r.get(f"{name}_p{q}_ms") for r in runs["e2e"]])
               for name in ("to_created", "to_started", "to_finished") for q in (50, 99)},
            "e2e_not_succeeded": sum(r["not_succeeded"] for r in runs["e2e"]),
            "runs": runs,
            **self.results,
        }
        out["ingest_vs_noop"] = out["ingest_rps"]["median"] / out["noop_rps"]["median"]
        out["worker_vs_raw_consume"] = out["worker_jobs_s"]["median"] / out["raw_consume_msg_s"]["median"]
        out.update(e2e_load(out))
        out.update(peer_summary(runs))
        return out


def e2e_load(r: dict[str, Any]) -> dict[str, float | None]:
    """The end-to-end rate is half of the maximum ingest, where the cores were all busy, so an
    end-to-end run keeps them ½ × `e2e_cpu_vs_ingest` busy: its CPU per job (all processes) over
    the cores' time per ingest request. `e2e_floor_cpu_vs_ingest` is that ratio if a job cost at
    a trickle what it costs under load: the ingest request plus the worker's, RabbitMQ's and
    Redis's CPU per job while draining a backlog (docs/performance.md, "End-to-end p99")."""
    ingest_rps, e2e_cpu = r["ingest_rps"]["median"], r["e2e_total_cpu_us_per_req"]["median"]
    if not ingest_rps or not e2e_cpu:
        return {"e2e_cpu_vs_ingest": None, "e2e_floor_cpu_vs_ingest": None}
    cores_us_per_request = r["machine"]["cpus"] * 1e6 / ingest_rps
    execution = sum(r[key]["median"] or 0 for key in (
        "worker_cpu_us_per_job", "worker_cpu_us_per_job_rabbitmq", "worker_cpu_us_per_job_redis"))
    return {"e2e_cpu_vs_ingest": e2e_cpu / cores_us_per_request,
            "e2e_floor_cpu_vs_ingest": (cores_us_per_request + execution) / cores_us_per_request}


def peer_summary(runs: dict[str, list]) -> dict[str, Any]:
    """The peers' medians and the two ratios against the fastest peer at the same durability
    (every producer waits for the broker's confirm; both peer workers store every result)."""
    out: dict[str, Any] = {}
    if not any(name in runs for name in PEER_PRODUCERS):
        return out
    out["ingest_c16_rps"] = summary([r["rps"] for r in runs.get("ingest_c16", [])])
    for name in PEER_PRODUCERS:
        out[f"{name}_rps"] = summary([r["rps"] for r in runs[name]])
        out[f"{name}_p50_ms"] = summary([r["p50_ms"] for r in runs[name]])
        out[f"{name}_p99_ms"] = summary([r["p99_ms"] for r in runs[name]])
        out[f"{name}_cpu_us_per_req"] = summary([r.get("cpu_us_per_req") for r in runs[name]])
        out[f"{name}_c16_rps"] = summary([r["rps"] for r in runs.get(f"{name}_c16", [])])
        out[f"{name}_non_2xx"] = sum(r["non_2xx"] + r["socket_errors"] for r in runs[name])
    for name in PEER_WORKERS:
        out[f"{name}_jobs_s"] = summary([r["jobs_per_s"] for r in runs.get(name, [])])
        out[f"{name}_cpu_us_per_job"] = summary([r.get("cpu_us_per_job") for r in runs.get(name, [])])
    best_ingest = max(PEER_PRODUCERS, key=lambda n: out[f"{n}_rps"]["median"] or 0)
    best_worker = max(PEER_WORKERS, key=lambda n: out[f"{n}_jobs_s"]["median"] or 0)
    out["best_peer_ingest"], out["best_peer_worker"] = best_ingest, best_worker
    ours_ingest, ours_worker = summary([r["rps"] for r in runs["ingest"]]), summary(
        [r["jobs_per_s"] for r in runs["worker"]])
    peer_ingest, peer_worker = out[f"{best_ingest}_rps"]["median"], out[f"{best_worker}_jobs_s"]["median"]
    out["ingest_vs_best_peer"] = ours_ingest["median"] / peer_ingest if peer_ingest else None
    out["worker_vs_best_peer"] = ours_worker["median"] / peer_worker if peer_worker else None
    # The same at -c16, against the fastest peer at -c16 (not necessarily the one at -c50).
    best_c16 = max(PEER_PRODUCERS, key=lambda n: out[f"{n}_c16_rps"]["median"] or 0)
    ours_c16, peer_c16 = out["ingest_c16_rps"]["median"], out[f"{best_c16}_c16_rps"]["median"]
    out["best_peer_ingest_c16"] = best_c16
    out["ingest_c16_vs_best_peer"] = ours_c16 / peer_c16 if ours_c16 and peer_c16 else None
    return out


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rabbit_version = ""
    try:
        rabbit_version = Path("/usr/lib/rabbitmq").resolve().name
        rabbit_version = next(p.name for p in Path("/usr/lib/rabbitmq/lib").iterdir() if p.name.startswith("rabbit"))
    except (OSError, StopIteration):
        pass
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "rabbitmq": rabbit_version, "redis": redis_version.split(" ")[2:3],
            **kernel_settings(), "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def kernel_settings(root: Path = Path("/")) -> dict[str, Any]:
    """The kernel settings that moved this bench's tail in measurements (docs/performance.md, "Two
    findings"), so that runs are compared only with runs made under the same: the scheduler's
    autogroup (each session its own equal-weight group), the clock source, and how an idle vCPU
    waits (the cpuidle driver, and for `haltpoll` how long it polls before halting; a VM's boot
    line can set either). None when unreadable."""

    def read(path: str) -> str | None:
        try:
            return (root / path).read_text().strip()
        except OSError:
            return None

    autogroup = read("proc/sys/kernel/sched_autogroup_enabled")
    halt_poll_ns = read("sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return {"sched_autogroup": None if autogroup is None else autogroup != "0",
            "clocksource": read("sys/devices/system/clocksource/clocksource0/current_clocksource"),
            "cpuidle_driver": read("sys/devices/system/cpu/cpuidle/current_driver"),
            "guest_halt_poll_ns": None if halt_poll_ns is None else int(halt_poll_ns)}


def describe_kernel_settings(machine: dict[str, Any]) -> str:
    autogroup = {True: "on", False: "off"}.get(machine.get("sched_autogroup"), "unknown")
    idle = machine.get("cpuidle_driver") or "unknown"
    if idle == "haltpoll" and machine.get("guest_halt_poll_ns") is not None:
        idle += f" (polls up to {machine['guest_halt_poll_ns'] / 1000:g} µs)"
    return f"scheduler autogroup {autogroup}, clock source {machine.get('clocksource') or 'unknown'}, cpuidle {idle}"


def fmt(s: dict[str, Any], digits: int = 0) -> str:
    if s["median"] is None:
        return "n/a"
    if len(s["runs"]) == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


def table(r: dict[str, Any]) -> str:
    d = r["drain"]
    rows = [
        ("no-op HTTP ceiling (gunicorn gthread, same conf)", f"{fmt(r['noop_rps'])} req/s",
         f"p50 {fmt(r['noop_p50_ms'], 2)} ms, p99 {fmt(r['noop_p99_ms'], 2)} ms"),
        ("main-app ingest POST /jobs (store + confirm)", f"{fmt(r['ingest_rps'])} req/s",
         f"p50 {fmt(r['ingest_p50_ms'], 2)} ms, p99 {fmt(r['ingest_p99_ms'], 2)} ms, "
         f"non-2xx {r['ingest_non_2xx']}"),
        ("CPU per request: gunicorn (no-op / ingest)", f"{fmt(r['noop_cpu_us_per_req'])} / "
         f"{fmt(r['ingest_cpu_us_per_req'])} µs",
         f"ingest also costs RabbitMQ {fmt(r['ingest_cpu_us_per_req_rabbitmq'])} µs "
         f"+ Redis {fmt(r['ingest_cpu_us_per_req_redis'])} µs"),
        ("raw publish, confirms in flight (pika)", f"{fmt(r['raw_publish_msg_s'])} msg/s",
         f"persistent, quorum; RabbitMQ CPU {fmt(r['raw_publish_rabbitmq_cpu_us'])} µs/msg"),
        ("raw publish, one confirm at a time", f"{fmt(r['raw_publish_sync_msg_s'])} msg/s", "reference"),
        (f"raw consume, manual acks, prefetch {r['prefetch']}", f"{fmt(r['raw_consume_msg_s'])} msg/s",
         "quorum `jobs` queue"),
        (f"service-app echo jobs, 1 process (defaults: concurrency {r['concurrency']}, prefetch {r['prefetch']})",
         f"{fmt(r['worker_jobs_s'])} jobs/s",
         f"status writes + acks included; CPU µs/job: worker {fmt(r['worker_cpu_us_per_job'])}, "
         f"RabbitMQ {fmt(r['worker_cpu_us_per_job_rabbitmq'])}, Redis {fmt(r['worker_cpu_us_per_job_redis'])}"),
        (f"service-app echo jobs, WORKER_CONCURRENCY={r['tuned_concurrency']}",
         f"{fmt(r['worker_tuned_jobs_s'])} jobs/s",
         f"prefetch {r['tuned_prefetch']}; CPU {fmt(r['worker_tuned_cpu_us_per_job'])} µs/job"),
        (f"service-app drain of {r['profile']['drain_messages']:,} jobs", f"{d['jobs_per_s']:,.0f} jobs/s",
         f"RSS {d['rss_mb_start']:.1f} → {d['rss_mb_end']:.1f} MB (max {d['rss_mb_max']:.1f})"),
        (f"end to end at {r['e2e_rate']:,}/s (50% of max ingest)", f"p50 {fmt(r['e2e_p50_ms'], 1)} ms",
         f"p99 {fmt(r['e2e_p99_ms'], 1)} ms; submit p99 {fmt(r['e2e_submit_p99_ms'], 1)} ms"),
        ("end to end, where the cores go (CPU µs per job)",
         f"{fmt(r['e2e_total_cpu_us_per_req'])} µs (the runs' totals)",
         ", ".join(f"{name} {fmt(r[f'e2e_{name}_cpu_us_per_req'])}" for name in E2E_PROCESSES)
         + f"; the machine {fmt(r['e2e_machine_busy'], 2)} busy, steal {fmt(r['e2e_machine_steal'], 2)}"),
        ("end to end, its CPU per job against the cores' time per ingest request",
         ratio(r["e2e_cpu_vs_ingest"]),
         f"so ½ × that busy at 50 % of max ingest; {ratio(r['e2e_floor_cpu_vs_ingest'])} if a job cost what it "
         f"costs under load (its ingest + the worker's drain CPU per job, RabbitMQ's and Redis's)"),
        ("end to end, the client's connections per API worker, each run (and each worker's CPU per request)",
         ", ".join(split_text(x, "api_") for x in r["runs"]["e2e"]), "counted mid-run; the busiest worker first"),
        ("end to end, thread wake-ups per job",
         f"{fmt(r['e2e_total_wakeups_per_req'])} (the runs' totals)",
         ", ".join(f"{name} {fmt(r[f'e2e_{name}_wakeups_per_req'], 1)}" for name in E2E_PROCESSES)
         + " (voluntary context switches: a thread slept and was woken)"),
        ("end to end, where the time goes (p50 / p99)",
         f"{fmt(r['e2e_to_created_p50_ms'], 1)} / {fmt(r['e2e_to_created_p99_ms'], 1)} ms to `created_at`",
         f"then {fmt(r['e2e_to_started_p50_ms'], 1)} / {fmt(r['e2e_to_started_p99_ms'], 1)} ms to `started_at` "
         f"(record, publish, confirm, delivery, a free job thread), then {fmt(r['e2e_to_finished_p50_ms'], 1)} / "
         f"{fmt(r['e2e_to_finished_p99_ms'], 1)} ms to `finished_at`"),
        *peer_rows(r),
        *speed_rows(r),
        ("RSS per gunicorn worker / service-app process",
         " / ".join(f"{x:.0f}" for x in r["gunicorn_worker_rss_mb"]) + f" / {r['service_app_rss_mb']:.0f} MB", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"| {'measurement':<{width}} | result | notes |", f"|{'-' * (width + 2)}|---|---|"]
    lines += [f"| {a:<{width}} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def speed_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The VM's speed after the run's first measurement and in its end-to-end phase (it can change
    within a run)."""
    loops = r.get("reference_loop_ms") or []
    if not loops:
        return []
    e2e = summary([ms for key, ms in loops if key == "e2e"])
    rows = [("the VM's speed: a fixed Python loop's CPU time", f"{loops[0][1]:.0f} ms after the first run",
             f"{fmt(e2e)} ms in the end-to-end phase; all phases {min(ms for _, ms in loops):.0f}–"
             f"{max(ms for _, ms in loops):.0f} ms (higher is slower)")]
    trickle = r.get("wakeup_trickle_cpu_us") or {"median": None}
    if trickle["median"] is not None:
        rows.append(("the VM's cost of a wake-up: CPU per round trip between two threads",
                     f"{fmt(trickle)} µs at {WAKEUP_PROBE_RATE:g}/s",
                     f"{fmt(r['wakeup_back_to_back_cpu_us'])} µs back to back; measured after each "
                     f"end-to-end run"))
    return rows


def peer_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "ingest_vs_best_peer" not in r:
        return []
    rows = [("main-app ingest POST /jobs at -c16", f"{fmt(r['ingest_c16_rps'])} req/s", "interleaved with the peers")]
    for name in PEER_PRODUCERS:
        rows.append((PEER_LABELS[name], f"{fmt(r[f'{name}_rps'])} req/s",
                     f"p50 {fmt(r[f'{name}_p50_ms'], 2)} ms, p99 {fmt(r[f'{name}_p99_ms'], 2)} ms, "
                     f"non-2xx {r[f'{name}_non_2xx']}; CPU {fmt(r[f'{name}_cpu_us_per_req'])} µs/req; "
                     f"-c16 {fmt(r[f'{name}_c16_rps'])} req/s"))
    runs = r.get("runs", {})
    if runs.get("ingest_c16"):
        def splits(name: str) -> str:
            return ", ".join(split_text(x) for x in runs.get(name, []))

        rows.append(("-c16: wrk's connections per gunicorn worker, each run (and each worker's CPU per request)",
                     f"ours {splits('ingest_c16')}",
                     "; ".join(f"{PEER_SHORT_NAMES[name]} {splits(f'{name}_c16')}" for name in PEER_PRODUCERS)))
    for name in PEER_WORKERS:
        rows.append((PEER_LABELS[name], f"{fmt(r[f'{name}_jobs_s'])} jobs/s",
                     f"1 process, {r['concurrency']} threads, prefetch {r['prefetch']}; "
                     f"CPU {fmt(r[f'{name}_cpu_us_per_job'])} µs/job"))
    return rows


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def bench_line(r: dict[str, Any]) -> str:
    line = (f"bench: ingest_vs_noop={r['ingest_vs_noop']:.2f} worker_jobs_per_s={r['worker_jobs_s']['median']:.0f} "
            f"worker_vs_raw_consume={r['worker_vs_raw_consume']:.2f} e2e_p99_ms={r['e2e_p99_ms']['median']:.1f}")
    if "ingest_vs_best_peer" in r:
        line += (f" ingest_vs_best_peer={ratio(r['ingest_vs_best_peer'])}"
                 f" worker_vs_best_peer={ratio(r['worker_vs_best_peer'])}"
                 f" ingest_c16_vs_best_peer={ratio(r.get('ingest_c16_vs_best_peer'))}")
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="smoke run: one repeat, short phases (about a minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    parser.add_argument("--no-peers", action="store_true", help="leave out Celery, Dramatiq and the naive endpoint")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("error: wrk not found (Debian: apt-get install wrk; `make bench` installs it)", file=sys.stderr)
        return 2
    if not args.no_peers and not (PEERS_VENV / ".installed").exists():
        print(f"error: the peers' venv {PEERS_VENV} is missing (`make bench-peers`; or --no-peers)", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else Profile()
    if args.repeats:
        profile.repeats = args.repeats
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    try:
        result = Bench(profile, work, peers=not args.no_peers).run()
    except BaseException:
        log(f"failed; logs kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    result["table"] = table(result)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (out_dir / f"bench-{stamp}.json", out_dir / "latest.json"):
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["machine"]
    print(f"\nmachine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['rabbitmq']}, "
          f"Redis {''.join(m['redis'])}; {describe_kernel_settings(m)}; {result['elapsed_s']:.0f} s; "
          f"{'quick' if args.quick else 'full'} profile; "
          f"load average during runs {min(x[1] for x in result['loadavg_1m']):.1f}-"
          f"{max(x[1] for x in result['loadavg_1m']):.1f}\n")
    print(result["table"])
    print(f"\nresults: {out_dir / 'latest.json'}")
    print(bench_line(result))
    # Numbers from a system that failed requests or lost jobs are not results.
    problems = []
    if result["ingest_non_2xx"]:
        problems.append(f"{result['ingest_non_2xx']} ingest requests failed (non-2xx or socket errors)")
    for name in PEER_PRODUCERS:
        if result.get(f"{name}_non_2xx"):
            problems.append(f"{result[f'{name}_non_2xx']} {name} requests failed (non-2xx or socket errors)")
    if result["e2e_not_succeeded"]:
        problems.append(f"{result['e2e_not_succeeded']} accepted jobs did not succeed in the end-to-end phase")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
