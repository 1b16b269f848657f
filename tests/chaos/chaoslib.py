"""Load, fault and accounting helpers for the chaos suite (tests/chaos).

Every scenario drives jobs through the real HTTP API (gunicorn main-app), injects a
fault, waits for quiescence and then accounts for every request it sent:

- sent: HTTP requests made; accepted: answered 202; refused: answered 503 (the
  documented "not accepted, retry" answer); other: any other answer or a transport
  error (the scenario decides whether that is allowed).
- final: accepted jobs whose record reached succeeded/failed; lost = accepted - final.
- re-executions: attempts started beyond what the job needs (the store's `attempts`
  counter minus the expected count): at-least-once redeliveries after a crash.
- duplicate completions: a job whose outcome was recorded as final more than once.
  Measured exactly by watching Redis (MONITOR) for the store's "finish" script with a
  final status, from any worker process, including processes killed afterwards.
  The store never overwrites a final status; the suite also checks that every job's
  stored status is the first final status recorded for it.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import requests

from jobs_devtools.stack import wait_http

ROOT = Path(__file__).resolve().parents[2]
REPORT_DIR = ROOT / "reports" / "chaos"
FINAL = {"succeeded", "failed"}

# ---------------------------------------------------------------------------------------------
# The results table


@dataclass
class Row:
    scenario: str
    sent: int = 0
    accepted: int = 0
    refused_503: int = 0
    other: int = 0
    final: int = 0
    lost: int = 0
    duplicate_completions: int = 0
    re_executions: int = 0
    recover_seconds: float | None = None
    notes: str = ""
    measurement: str = ""  # remarks on the measurement itself, added by account()
    passed: bool | None = None

    def all_notes(self) -> str:
        return "; ".join(part for part in (self.notes, self.measurement) if part)


RESULTS: list[Row] = []

COLUMNS = [
    ("scenario", "scenario"),
    ("sent", "requests sent"),
    ("accepted", "202s"),
    ("final", "reached final state"),
    ("lost", "lost"),
    ("duplicate_completions", "duplicate completions"),
    ("re_executions", "re-executions"),
    ("refused_503", "503s"),
    ("other", "other"),
    ("recover_seconds", "time to recover (s)"),
]


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_markdown(rows: Iterable[Row]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if key == "scenario" else "---:" for key, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    notes = [f"- **{row.scenario}**: {row.all_notes()}" for row in rows if row.all_notes()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def render_text(rows: Iterable[Row]) -> str:
    rows = list(rows)
    table = [[title for _, title in COLUMNS]] + [[_cell(r, k) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                             enumerate(zip(line, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_reports(rows: list[Row], meta: dict) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "chaos.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    header = f"Chaos suite, {meta['finished']} on {meta['machine']}\n\n"
    (REPORT_DIR / "chaos.md").write_text(header + render_markdown(rows))


# ---------------------------------------------------------------------------------------------
# Load through the HTTP API


@dataclass
class Outcome:
    n: int  # which request of the load (its body is body(n))
    status: int | None  # None: transport error
    job_id: str | None
    sent_at: float
    error: str = ""


class Load:
    """Submit jobs from a few threads, at a steady rate (or as fast as possible), until
    stop() or until `total` requests were sent. Every request and its answer is kept."""

    def __init__(self, url: str, token: str, body: Callable[[int], dict], *, rate: float | None = None,
                 total: int | None = None, threads: int = 4, timeout: float = 15.0):
        self.url = f"{url}/jobs"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.body = body
        self.rate = rate
        self.total = total
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"load-{n}") for n in range(threads)]
        self.started = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        return self.join()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float = 600) -> Load:
        for thread in self._threads:
            thread.join(timeout)
        return self

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            n = next(self._counter)
            if self.total is not None and n >= self.total:
                return
            if self.rate:
                delay = self.started + n / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            sent_at = time.monotonic()
            try:
                response = session.post(self.url, json=self.body(n), headers=self.headers, timeout=self.timeout)
            except requests.RequestException as exc:
                outcome = Outcome(n, None, None, sent_at, type(exc).__name__)
                session = requests.Session()
            else:
                job_id = response.json().get("id") if response.status_code == 202 else None
                outcome = Outcome(n, response.status_code, job_id, sent_at)
            with self._lock:
                self.outcomes.append(outcome)

    # views

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def accepted_ids(self) -> list[str]:
        return [o.job_id for o in self.snapshot() if o.status == 202 and o.job_id]

    def statuses(self) -> Counter:
        return Counter(o.status if o.status is not None else o.error for o in self.snapshot())

    def wait_for(self, predicate: Callable[[Outcome], bool], timeout: float, after: float = 0.0) -> Outcome:
        """Wait until an answer to a request sent after `after` (monotonic) satisfies predicate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for outcome in reversed(self.snapshot()):
                if outcome.sent_at < after:
                    break
                if predicate(outcome):
                    return outcome
            time.sleep(0.05)
        raise AssertionError(f"no matching answer within {timeout}s; answers so far: {self.statuses()}")


# ---------------------------------------------------------------------------------------------
# Redis: job records and the finish-script watcher


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_CLIENT = re.compile(r"\[\d+ ([^\]]+)\]")


class FinishWatcher:
    """Records every final outcome any worker writes, through Redis MONITOR (a plain socket,
    reconnecting while Redis is down). completions[job_id] = [(time, client, status), ...]."""

    def __init__(self, port: int):
        self.port = port
        self.completions: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-monitor")
        self._sock: socket.socket | None = None
        self.disconnects = 0  # while Redis is down the watcher is blind: see blind_seconds
        self.blind_seconds = 0.0

    def start(self) -> FinishWatcher:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("Redis MONITOR did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def _run(self) -> None:
        lost_at = None
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"MONITOR\r\n")
                    sock.settimeout(None)  # a timed-out buffered reader cannot be read again
                    self._sock = sock
                    reader = sock.makefile("rb")
                    if not reader.readline().startswith(b"+OK"):
                        raise OSError("MONITOR refused")
                    if lost_at is not None:
                        self.blind_seconds += time.monotonic() - lost_at
                    self._ready.set()
                    while not self._stop.is_set():
                        line = reader.readline()
                        if not line:
                            raise OSError("closed")
                        self._parse(line.decode("utf-8", "replace"))
            except OSError:
                self._sock = None
                if self._stop.is_set():
                    return
                if lost_at is None or self._ready.is_set():
                    lost_at = time.monotonic()
                    self.disconnects += 1
                self._ready.clear()
                self._stop.wait(0.02)

    def _parse(self, line: str) -> None:
        # Any script call whose first key is a job's and whose first argument is a final status
        # records that job's outcome: the store's "finish" script, or "finish, then begin the
        # next job" (two keys; begin's first argument is a timestamp, create's a TTL). Matched
        # by shape, not by the script's SHA, so a worker running a newer store.py is still watched.
        if "evalsha" not in line[:200].lower() or '"job:' not in line:
            return
        args = _QUOTED.findall(line)  # evalsha sha numkeys key... args...
        keys = int(args[2]) if len(args) > 2 and args[2].isdigit() else 0
        if keys < 1 or len(args) < 4 + keys or not args[3].startswith("job:") or args[3 + keys] not in FINAL:
            return
        client = _CLIENT.search(line)
        try:
            stamp = float(line[1:].split(" ", 1)[0])
        except ValueError:
            return
        with self._lock:
            self.completions[args[3].removeprefix("job:")].append(
                (stamp, client.group(1) if client else "?", args[3 + keys]))

    def duplicate_completions(self) -> dict[str, int]:
        """Jobs recorded final more than once: extra completions per job. A call retried on
        the same connection within 1 s (redis-py's NOSCRIPT reload after a Redis restart)
        is the same completion, not a second one."""
        duplicates = {}
        with self._lock:
            for job_id, calls in self.completions.items():
                distinct: list[tuple[float, str]] = []
                for stamp, client, _ in sorted(calls):
                    if any(client == c and stamp - s < 1.0 for s, c in distinct):
                        continue
                    distinct.append((stamp, client))
                if len(distinct) > 1:
                    duplicates[job_id] = len(distinct) - 1
        return duplicates

    def first_final(self, job_id: str) -> str | None:
        with self._lock:
            calls = sorted(self.completions.get(job_id, []))
        return calls[0][2] if calls else None


def records(client: redis.Redis, ids: list[str], chunk: int = 2000) -> dict[str, tuple[str | None, int]]:
    """{job_id: (status, attempts)} read straight from Redis, pipelined."""
    out = {}
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        pipe = client.pipeline(transaction=False)
        for job_id in part:
            pipe.hmget(f"job:{job_id}", "status", "attempts")
        for job_id, (status, attempts) in zip(part, pipe.execute(), strict=True):
            out[job_id] = (status.decode() if status else None, int(attempts or 0))
    return out


def wait_final(redis_url: str, ids: list[str], timeout: float) -> tuple[dict[str, tuple[str | None, int]], float]:
    """Poll until every job is final (or timeout); return the records and when that happened."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    deadline = time.monotonic() + timeout
    pending = list(dict.fromkeys(ids))
    done: dict[str, tuple[str | None, int]] = {}
    while True:
        try:
            current = records(client, pending)
        except redis.RedisError:
            current = {}
        for job_id, record in current.items():
            if record[0] in FINAL:
                done[job_id] = record
        pending = [i for i in pending if i not in done]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    finished_at = time.monotonic()
    try:
        done.update(records(client, pending))
    except redis.RedisError:
        done.update({i: (None, 0) for i in pending})
    client.close()
    return done, finished_at


# ---------------------------------------------------------------------------------------------
# Workers as a Deployment would run them


def metric_values(url: str, name: str) -> dict[str, float]:
    """{labels-string: value} for one metric family from a Prometheus text endpoint."""
    values = {}
    for line in requests.get(url, timeout=5).text.splitlines():
        if line.startswith(name):
            head, _, value = line.rpartition(" ")
            values[head[len(name):]] = float(value)
    return values


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Fleet:
    """service-app processes started with the core fixture `start_worker`; kill -9 and SIGTERM
    them, and start replacements, as Kubernetes would."""

    def __init__(self, start_worker, rabbit_url: str, redis_url: str, **env: str):
        self.start_worker = start_worker
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self.env = env
        self.live: list = []
        self.exited: list = []

    def start(self, count: int = 1, wait_ready: bool = True) -> list:
        new = [self.start_worker(self.rabbit_url, self.redis_url, wait_ready=False, **self.env) for _ in range(count)]
        if wait_ready:
            for worker in new:
                wait_http(f"{worker.url}/readyz", 30)
        self.live += new
        return new

    def kill9(self, worker) -> None:
        worker.proc.kill9()
        self.live.remove(worker)
        self.exited.append(worker)

    def terminate(self, worker, timeout: float) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds to exit)."""
        started = time.monotonic()
        worker.proc.signal(signal.SIGTERM)
        code = worker.proc.wait(timeout)
        self.live.remove(worker)
        self.exited.append(worker)
        return code, time.monotonic() - started

    def idle(self) -> bool:
        """No live worker is running a job (jobs_worker_jobs_in_progress is 0 everywhere)."""
        try:
            return all(metric_values(f"{w.url}/metrics", "jobs_worker_jobs_in_progress").get("", 0) == 0
                       for w in self.live)
        except requests.RequestException:
            return False

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.live]


def api_ready(start_api, rabbit_url: str, redis_url: str, **env: str):
    """start_api, then wait for a run of ready answers on fresh connections: readiness is per
    gunicorn worker (each has its own broker connection) and the fixture waits for one only."""
    api = start_api(rabbit_url, redis_url, **env)
    wait_http(f"{api.url}/readyz", 30, streak=20, interval=0.05)
    return api


@dataclass
class Accounting:
    """Accepted jobs against their final records; fills a Row."""

    row: Row
    records: dict[str, tuple[str | None, int]] = field(default_factory=dict)

    def lost_ids(self) -> list[str]:
        return [i for i, (status, _) in self.records.items() if status not in FINAL]


def account(row: Row, load_outcomes: list[Outcome], redis_url: str, *, timeout: float,
            watcher: FinishWatcher | None = None, expected_attempts: Callable[[str], int] | None = None,
            fault_cleared_at: float | None = None, idle: Callable[[], bool] | None = None) -> Accounting:
    """Wait for quiescence, then fill in the row: every 202 must reach a final state."""
    ids = [o.job_id for o in load_outcomes if o.status == 202 and o.job_id]
    statuses = Counter(o.status for o in load_outcomes)
    row.sent = len(load_outcomes)
    row.accepted = len(ids)
    row.refused_503 = statuses.get(503, 0)
    row.other = row.sent - row.accepted - row.refused_503
    found, finished_at = wait_final(redis_url, ids, timeout)
    row.final = sum(1 for status, _ in found.values() if status in FINAL)
    row.lost = row.accepted - row.final
    expected = expected_attempts or (lambda _id: 1)
    row.re_executions = sum(max(0, attempts - expected(i)) for i, (_, attempts) in found.items())
    if idle is not None:  # quiescence: nothing still running (a second run of a job may be)
        deadline = time.monotonic() + timeout
        while not idle() and time.monotonic() < deadline:
            time.sleep(0.25)
    if watcher is not None:
        time.sleep(0.3)  # the last MONITOR lines
        # A job completes twice only if it also ran twice: a final write repeated without a
        # second run is the same completion retried (its reply was lost as Redis went down).
        raw = watcher.duplicate_completions()
        runs = {i: attempts - expected(i) + 1 for i, (_, attempts) in found.items()}
        row.duplicate_completions = sum(min(extra, max(0, runs.get(i, 1) - 1)) for i, extra in raw.items())
        retried = sum(raw.values()) - row.duplicate_completions
        if retried:
            row.measurement = (f"{retried} final write(s) repeated without a second run (the reply was lost "
                               "with Redis; the store kept the first), not counted as duplicates")
    if fault_cleared_at is not None:
        row.recover_seconds = round(finished_at - fault_cleared_at, 1)
    return Accounting(row, found)


def check_final_never_changed(accounting: Accounting, watcher: FinishWatcher) -> list[str]:
    """Jobs whose stored status is not the first final status recorded for them."""
    bad = []
    for job_id, (status, _) in accounting.records.items():
        first = watcher.first_final(job_id)
        if first is not None and status != first:
            bad.append(f"{job_id}: first recorded {first}, stored {status}")
    return bad
