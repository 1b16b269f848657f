"""`make bench-trickle`: why a job costs more CPU end to end, at half the maximum ingest, than
under saturation; per process, split into user and kernel time (docs/performance.md,
"End-to-end p99").

On the private stack of `make bench`:
1. saturation: wrk -c50 against POST /jobs (the API, RabbitMQ and Redis per request), then one
   service-app draining the jobs that left queued (the worker, RabbitMQ and Redis per job); each
   read once RabbitMQ and Redis are quiet again, so that the work a burst leaves them counts;
2. end to end at half that ingest rate, as `make bench` runs it (until the last answer; the
   records' read-back is not counted); the client is this process, and has no counterpart under
   saturation (wrk's CPU is not counted);
3. the same end-to-end run with the vCPUs kept from halting: one busy loop per CPU at the lowest
   priority (SCHED_IDLE, in a nice-19 autogroup of its own), which runs almost only when nothing
   else wants that CPU (the group still gets ~1 % of a contended CPU). What a job costs then is
   what it costs when an idle vCPU is not handed back to the host. The loops still delay
   wake-ups, so that run's latencies are not reported.
Runs 2 and 3 alternate, `--rounds` times each; each cell is the median of its runs, per part
(so "all" is a sum of medians). With `perf` installed, every run is sampled (all CPUs, 997 Hz),
and the symbols whose CPU per job grew the most from saturation to the first end-to-end run are
listed for the API and the worker.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import pika

from jobs_contract import topology
from jobs_devtools.bench import bench

PERF_HZ = 997
PROCESSES = ("api", "worker", "rabbitmq", "redis", "client")
API_ROLES = ("arbiter", "main", "publisher loop", "request threads")

# A busy loop for one CPU that yields it to almost anything else: its own session (so its own
# autogroup, weighted at nice 19 against the others' 0) and the SCHED_IDLE policy within it. It
# dies with the process that started it (PR_SET_PDEATHSIG), however that one ends: a loop left
# spinning would make every later measurement on the machine cheaper.
IDLE_SPIN = ("import ctypes, os, signal\n"
             "parent = os.getppid()\n"
             "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
             "if os.getppid() != parent:\n"
             "    raise SystemExit('its parent is gone')\n"
             "with open('/proc/self/autogroup', 'w') as group:\n"
             "    group.write('19')\n"
             "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
             "while True:\n"
             "    pass\n")


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + kernel) used so far by each live thread of a process."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    return {int(task.name): sum(bench.stat_seconds(task / "stat")) for task in tasks}


def api_thread_roles(before: dict[int, dict[int, float]], after: dict[int, dict[int, float]],
                     arbiter: int) -> dict[str, float]:
    """CPU seconds between two thread_seconds() readings of the gunicorn processes, by role: the
    arbiter (all its threads, the metrics server's included), each worker's main thread (its
    poller), the publisher's loop (in each worker the busiest thread besides the main one: one
    thread runs every publish) and the request threads. A thread that exited in between is in
    none of them."""
    roles = dict.fromkeys(API_ROLES, 0.0)
    for pid, threads in after.items():
        used = {tid: seconds - before.get(pid, {}).get(tid, 0.0) for tid, seconds in threads.items()}
        if pid == arbiter:
            roles["arbiter"] += sum(used.values())
            continue
        roles["main"] += used.pop(pid, 0.0)
        if used:
            loop = max(used, key=used.__getitem__)
            roles["publisher loop"] += used.pop(loop)
            roles["request threads"] += sum(used.values())
    return roles


class Meter:
    """Each process's user and kernel CPU between start() and per_item(count), in µs per item, and
    the API's by thread role. The client is this process (the end-to-end load generator runs in it)."""

    def __init__(self, groups: dict[str, list[int]], arbiter: int | None = None):
        self.groups = groups
        self.arbiter = arbiter  # the API's gunicorn arbiter, when "api" is one of the groups
        self.before: dict[str, tuple[float, float]] = {}
        self.api_before: dict[int, dict[int, float]] = {}

    def _now(self) -> dict[str, tuple[float, float]]:
        times = os.times()
        return {**{name: bench.user_kernel_seconds(pids) for name, pids in self.groups.items()},
                "client": (times.user, times.system)}

    def _api_threads(self) -> dict[int, dict[int, float]]:
        return {pid: thread_seconds(pid) for pid in self.groups.get("api", [])}

    def start(self) -> None:
        self.api_before = self._api_threads()
        self.before = self._now()

    def per_item(self, count: int) -> dict[str, dict[str, float]]:
        after = self._now()
        used = {name: {"user": (after[name][0] - self.before[name][0]) / count * 1e6,
                       "kernel": (after[name][1] - self.before[name][1]) / count * 1e6}
                for name in after}
        if "api" in self.groups:
            roles = api_thread_roles(self.api_before, self._api_threads(), self.arbiter)
            used["api"].update({role: seconds / count * 1e6 for role, seconds in roles.items()})
        return used


@contextmanager
def perf_record(out: Path | None) -> Iterator[None]:
    """perf samples every CPU while the block runs (nothing when out is None). perf starts with its
    events disabled, and the block begins once perf has acknowledged enabling them: it needs a few
    hundred milliseconds to set up, which would otherwise go unsampled."""
    if out is None:
        yield
        return
    control, ack = out.with_suffix(".ctl"), out.with_suffix(".ack")
    os.mkfifo(control)
    os.mkfifo(ack)
    perf = subprocess.Popen(["perf", "record", "-a", "-F", str(PERF_HZ), "-D", "-1",
                             "--control", f"fifo:{control},{ack}", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        enable(perf, control, ack)
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            _, errors = perf.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            perf.kill()
            _, errors = perf.communicate()
    if not out.exists():  # only once the block succeeded: its own error comes first
        raise SystemExit(f"perf recorded nothing (exit code {perf.returncode}): {errors.strip()}")


def enable(perf: subprocess.Popen, control: Path, ack: Path, timeout: float = 30) -> None:
    """Have a `perf record -D -1 --control fifo:control,ack` enable its events; return once it says so."""
    deadline = time.monotonic() + timeout
    while True:  # a FIFO opens for writing only once perf has it open for reading
        try:
            control_fd = os.open(control, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if perf.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perf did not start (exit code {perf.poll()})") from None
            time.sleep(0.01)
    ack_fd = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.write(control_fd, b"enable\n")
        answer = b""
        while b"ack" not in answer:
            if perf.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("perf did not acknowledge enabling its events")
            if select.select([ack_fd], [], [], 0.1)[0]:
                read = os.read(ack_fd, 64)
                answer += read
                if not read:  # perf has not opened its end yet
                    time.sleep(0.01)
    finally:
        os.close(control_fd)
        os.close(ack_fd)


@contextmanager
def vcpus_kept_from_halting() -> Iterator[list[subprocess.Popen]]:
    """A busy loop (IDLE_SPIN) on each CPU while the block runs; checked to be spinning at the
    lowest priority before it starts."""
    spinners: list[subprocess.Popen] = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            spinners.append(subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", IDLE_SPIN],
                                             start_new_session=True))
        deadline = time.monotonic() + 10
        while not all(spinning_at_idle_priority(spinner) for spinner in spinners):
            if time.monotonic() > deadline or any(spinner.poll() is not None for spinner in spinners):
                raise RuntimeError("the busy loops did not start at the idle priority")
            time.sleep(0.05)
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def spinning_at_idle_priority(spinner: subprocess.Popen) -> bool:
    try:
        return (os.sched_getscheduler(spinner.pid) == os.SCHED_IDLE
                and Path(f"/proc/{spinner.pid}/autogroup").read_text().split()[-1] == "19")
    except OSError:
        return False


def samples_by_symbol(perf_script: str, pids: set[int]) -> collections.Counter[str]:
    """Samples per symbol of these processes, from `perf script -F pid,ip,sym,dso` output (one line
    a sample: "  pid  address symbol (dso)"); kernel symbols are marked [k]."""
    counts: collections.Counter[str] = collections.Counter()
    parsed = 0
    for line in perf_script.splitlines():
        match = re.match(r"\s*(\d+)\s+[0-9a-f]+\s+(.*?)\s*\(((?:[^()]|\([^()]*\))*)\)\s*$", line)
        parsed += match is not None
        if match is None or int(match.group(1)) not in pids:
            continue
        symbol, dso = match.group(2), match.group(3)
        if symbol in ("", "[unknown]"):
            symbol = f"[unknown] in {Path(dso).name}"
        counts[symbol + (" [k]" if dso == "[kernel.kallsyms]" or dso.startswith("[") else "")] += 1
    if perf_script.strip() and not parsed:
        raise ValueError(f"no sample in perf script's output could be read: {perf_script[:200]!r}")
    return counts


def read_samples(data: Path, pids: set[int]) -> collections.Counter[str]:
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    return samples_by_symbol(script, pids)


def grown(before: collections.Counter[str], before_items: int, after: collections.Counter[str],
          after_items: int, top: int = 12) -> list[tuple[str, float, float]]:
    """The symbols whose µs per item grew the most: (symbol, before, after)."""
    us = 1e6 / PERF_HZ
    rows = [(symbol, before[symbol] * us / before_items, after[symbol] * us / after_items)
            for symbol in set(before) | set(after)]
    rows.sort(key=lambda row: row[2] - row[1], reverse=True)
    return rows[:top]


def queued(url: str) -> int:
    """Messages ready on the jobs queue, exact now (RabbitNode.queue_counts reads rabbitmqctl's
    statistics, which lag by up to their emission interval: 0 just after an ingest)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(topology.QUEUE, passive=True).method.message_count
    finally:
        connection.close()


def drain(stack: bench.PrivateStack, perf_out: Path | None) -> tuple[dict, int, list[int]]:
    """One service-app draining the jobs queued: CPU per job of it, RabbitMQ and Redis (counted
    from when it is ready until RabbitMQ and Redis are quiet after the last job); how many jobs
    that covers."""
    count = queued(stack.rabbit.url)
    if count == 0:
        raise RuntimeError("nothing queued to drain: the ingest run left no job")
    nodes = bench.node_pids(stack)
    bench.wait_until_quiet(nodes)
    worker = stack.worker(bench.bench_env(stack), name="worker-drain").wait_ready()
    meter = Meter({"worker": [worker.proc.pid], "rabbitmq": [nodes["rabbitmq"]], "redis": [nodes["redis"]]})
    meter.start()
    already = bench.jobs_succeeded(worker)  # it consumes from before it reports ready
    deadline = time.monotonic() + max(120, count / 200)
    try:
        with perf_record(perf_out):
            while (done := bench.jobs_succeeded(worker)) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the drain stopped at {done} of {count} jobs succeeded")
                time.sleep(0.1)
            bench.wait_until_quiet(nodes)
        used = meter.per_item(count - already)
    finally:
        worker.stop()
    used.pop("client")
    return used, count - already, [worker.proc.pid]


def count_until_sent(meter: Meter, into: list[dict], sent: int) -> None:
    """end_to_end's on_sent: the CPU per request up to the last answer (not the read-back)."""
    into.append(meter.per_item(sent))


def total(used: dict[str, dict[str, float]]) -> float:
    return sum(part["user"] + part["kernel"] for part in used.values())


def median_of(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {part: statistics.median(run[name][part] for run in runs) for part in runs[0][name]}
            for name in runs[0]}


def cell(used: dict[str, dict[str, float]] | None, name: str) -> str:
    if not used or name not in used:
        return "–"
    part = used[name]
    return f"{part['user'] + part['kernel']:,.0f} ({part['user']:,.0f} + {part['kernel']:,.0f})"


def table(r: dict[str, Any]) -> str:
    saturation = {**r["ingest"], "worker": r["drain"]["worker"]}
    for node in ("rabbitmq", "redis"):  # its share of the request, then of running the job
        saturation[node] = {part: r["ingest"][node][part] + r["drain"][node][part] for part in ("user", "kernel")}
    columns = (("under saturation (ingest, then a drain)", saturation),
               (f"end to end at {r['rate']}/s", r["e2e"]), ("the same, vCPUs kept from halting", r["e2e_no_halt"]))
    lines = [f"CPU µs per job (user + kernel); end to end at {r['rate']}/s: p99 "
             + ", ".join(f"{p:.1f}" for p in r["e2e_p99_ms"]) + " ms, machine busy "
             + ", ".join(f"{b:.2f}" for b in r["e2e_busy"]), "",
             "| process | " + " | ".join(title for title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in PROCESSES:
        lines.append(f"| {name} | " + " | ".join(cell(used, name) for _, used in columns) + " |")
        if name == "api":
            for role in API_ROLES:
                shares = " | ".join(f"{used['api'][role]:,.0f}" for _, used in columns)
                lines.append(f"| api: {role} | {shares} |")
    lines.append("| all | " + " | ".join(f"{total(used):,.0f}" for _, used in columns) + " |")
    lines.append("| all but the client | " + " | ".join(
        f"{total({k: v for k, v in used.items() if k != 'client'}):,.0f}" for _, used in columns) + " |")
    for name, rows in r.get("grown", {}).items():
        lines += ["", f"{name}: the symbols whose CPU per job grew most, saturation → end to end (µs)"]
        lines += [f"  {before:7.1f} → {after:7.1f}  {symbol}" for symbol, before, after in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(bench.ROOT / "reports" / "bench" / "trickle"))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end runs with and without the busy loops, each")
    parser.add_argument("--no-perf", action="store_true", help="skip perf even where it is installed")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup below runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_perf = not args.no_perf and shutil.which("perf") is not None
    work = Path(tempfile.mkdtemp(prefix="jobs-trickle-"))
    r: dict[str, Any] = {"machine": bench.machine()}
    try:
        with bench.bench_stack(work, "jobs-trickle") as (stack, store):
            nodes = bench.node_pids(stack)
            api = bench.start_server(stack, "api")
            bench.run_wrk(api.url, 3, 100)  # every gunicorn thread warmed
            bench.purge(stack.rabbit.url)
            store.flushdb()
            bench.wait_until_quiet(nodes)
            api_pids = bench.server_pids(api)
            meter = Meter({"api": api_pids, "rabbitmq": [nodes["rabbitmq"]], "redis": [nodes["redis"]]},
                          arbiter=api.proc.pid)
            meter.start()
            with perf_record(work / "ingest.data" if use_perf else None):
                ingest = bench.run_wrk(api.url, args.seconds, 50)
                bench.wait_until_quiet(nodes)
            if ingest["non_2xx"] or ingest["socket_errors"]:
                raise RuntimeError(f"ingest: {ingest['non_2xx']} non-2xx answers, {ingest['socket_errors']} "
                                   f"socket errors")
            r["ingest"] = meter.per_item(ingest["requests"])
            r["ingest"].pop("client")
            r["ingest_rps"] = ingest["rps"]
            bench.log(f"ingest -c50: {ingest['rps']:.0f} req/s")
            r["drain"], drained, worker_pids = drain(stack, work / "drain.data" if use_perf else None)
            bench.log(f"drained {drained} jobs")
            bench.purge(stack.rabbit.url)
            store.flushdb()

            r["rate"] = rate = round(ingest["rps"] * 0.5)
            worker = stack.worker(bench.bench_env(stack), name="worker-e2e").wait_ready()
            try:
                bench.end_to_end(api, store, rate, 1.0)  # warm-up
                groups = {"api": api_pids, "worker": [worker.proc.pid], "rabbitmq": [nodes["rabbitmq"]],
                          "redis": [nodes["redis"]]}
                runs: dict[str, list] = {"e2e": [], "e2e_no_halt": [], "e2e_p99_ms": [], "e2e_busy": []}
                e2e_sent = 0
                for i in range(args.rounds * 2):
                    no_halt = i % 2 == 1
                    bench.wait_until_quiet(nodes)
                    meter = Meter(groups, arbiter=api.proc.pid)
                    counted: list[dict] = []
                    perf_out = work / f"e2e-{i}.data" if use_perf else None  # every run sampled alike
                    with vcpus_kept_from_halting() if no_halt else nullcontext():
                        meter.start()
                        with perf_record(perf_out):
                            result = bench.end_to_end(api, store, rate, args.seconds,
                                                      on_sent=partial(count_until_sent, meter, counted))
                        used = counted[0]
                    store.flushdb()
                    runs["e2e_no_halt" if no_halt else "e2e"].append(used)
                    if not no_halt:
                        runs["e2e_p99_ms"].append(result["e2e_p99_ms"])
                        runs["e2e_busy"].append(result["machine_busy"])
                        e2e_sent = e2e_sent or result["sent"]
                    bench.log(f"end to end at {rate}/s{', vCPUs kept from halting' if no_halt else ''}: "
                              f"{total(used):,.0f} µs of CPU per job"
                              + ("" if no_halt else f", p99 {result['e2e_p99_ms']:.1f} ms"))
            finally:
                worker.stop()
            r["e2e"], r["e2e_no_halt"] = median_of(runs["e2e"]), median_of(runs["e2e_no_halt"])
            r["e2e_p99_ms"], r["e2e_busy"] = runs["e2e_p99_ms"], runs["e2e_busy"]
            if use_perf:
                r["grown"] = {
                    "api": grown(read_samples(work / "ingest.data", set(api_pids)), ingest["requests"],
                                 read_samples(work / "e2e-0.data", set(api_pids)), e2e_sent),
                    "worker": grown(read_samples(work / "drain.data", set(worker_pids)), drained,
                                    read_samples(work / "e2e-0.data", {worker.proc.pid}), e2e_sent)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(r)
    (out / "latest.json").write_text(json.dumps(r, indent=1))
    (out / "latest.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
