"""The bench harness's own logic, without services: wrk output parsing, statistics, the peers'
summary, the `bench:` line and the peer workers' settings.
Run by `make test` (pytest.ini's testpaths) and again by `make bench-smoke`."""

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from jobs_devtools.bench import bench

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.10ms    3.20ms  80.00ms   90.00%
    Req/Sec     4.12k   200.00     4.50k    70.00%
  Latency Distribution
     50%   11.50ms
     75%   13.00ms
     90%   15.00ms
     99%  850.00us
  41234 requests in 10.00s, 8.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   4123.40
Transfer/sec:      0.80MB
"""


def test_parse_wrk():
    result = bench.parse_wrk(WRK_OUTPUT)
    assert result["rps"] == 4123.40
    assert result["p50_ms"] == 11.5
    assert result["p99_ms"] == 0.85
    assert result["requests"] == 41234
    assert result["non_2xx"] == 7
    assert result["socket_errors"] == 3


def test_parse_wrk_seconds_unit():
    assert bench.parse_wrk(WRK_OUTPUT.replace("99%  850.00us", "99%    1.20s"))["p99_ms"] == 1200.0


def test_summary_and_percentile():
    s = bench.summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile([], 99) is None


def _runs(ingest, worker, producers, workers):
    runs = {"ingest": [{"rps": ingest}], "worker": [{"jobs_per_s": worker}]}
    for name, rps in producers.items():
        run = {"rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0, "socket_errors": 0, "cpu_us_per_req": 9.0}
        runs[name] = [run]
        runs[f"{name}_c16"] = [dict(run, rps=rps if name == "peer_naive" else rps / 4)]
    runs["ingest_c16"] = [{"rps": ingest / 2}]
    for name, rate in workers.items():
        runs[name] = [{"jobs_per_s": rate, "cpu_us_per_job": 5.0}]
    return runs


def test_peer_summary_picks_the_fastest_peer_at_the_same_durability():
    producers = {"peer_celery": 100.0, "peer_dramatiq": 400.0, "peer_naive": 200.0}
    workers = {"peer_celery_worker": 50.0, "peer_dramatiq_worker": 25.0}
    out = bench.peer_summary(_runs(200.0, 100.0, producers, workers))
    assert set(producers) == set(bench.PEER_PRODUCERS) and set(workers) == set(bench.PEER_WORKERS)
    assert out["best_peer_ingest"] == "peer_dramatiq"
    assert out["best_peer_worker"] == "peer_celery_worker"
    assert out["ingest_vs_best_peer"] == 0.5
    assert out["worker_vs_best_peer"] == 2.0
    # at -c16 the naive endpoint is the fastest peer (200 against Dramatiq's 100 and Celery's 25)
    assert out["best_peer_ingest_c16"] == "peer_naive"
    assert out["ingest_c16_vs_best_peer"] == 0.5
    for name in producers:
        assert {f"{name}_rps", f"{name}_p50_ms", f"{name}_p99_ms", f"{name}_c16_rps", f"{name}_non_2xx"} <= set(out)
    for name in workers:
        assert {f"{name}_jobs_s", f"{name}_cpu_us_per_job"} <= set(out)


def test_peer_summary_without_peers_is_empty():
    assert bench.peer_summary({"ingest": [{"rps": 1.0}], "worker": [{"jobs_per_s": 1.0}]}) == {}


def _result(**extra):
    return {"ingest_vs_noop": 0.4, "worker_jobs_s": bench.summary([1315.0]), "worker_vs_raw_consume": 0.32,
            "e2e_p99_ms": bench.summary([86.6]), **extra}


def test_bench_line_keeps_its_format_and_gains_the_peer_ratios():
    assert bench.bench_line(_result()) == (
        "bench: ingest_vs_noop=0.40 worker_jobs_per_s=1315 worker_vs_raw_consume=0.32 e2e_p99_ms=86.6")
    line = bench.bench_line(_result(ingest_vs_best_peer=0.8, worker_vs_best_peer=1.25, ingest_c16_vs_best_peer=0.9))
    assert line.endswith(" e2e_p99_ms=86.6 ingest_vs_best_peer=0.80 worker_vs_best_peer=1.25"
                         " ingest_c16_vs_best_peer=0.90")
    assert bench.bench_line(_result(ingest_vs_best_peer=None, worker_vs_best_peer=None)).endswith(
        "ingest_vs_best_peer=n/a worker_vs_best_peer=n/a ingest_c16_vs_best_peer=n/a")


def test_peer_workers_get_service_apps_concurrency_and_prefetch():
    defaults = bench.worker_settings()
    assert (defaults.concurrency, defaults.prefetch) == (4, 16)  # service-app's defaults
    celery = bench.peer_worker_command("celery", defaults)
    assert celery[celery.index("--concurrency") + 1] == "4"
    assert celery[celery.index("--prefetch-multiplier") + 1] == "4"
    tuned = bench.worker_settings({"WORKER_CONCURRENCY": "6", "WORKER_PREFETCH": "12"})
    dramatiq = bench.peer_worker_command("dramatiq", tuned)
    assert dramatiq[dramatiq.index("--threads") + 1] == "6"
    celery = bench.peer_worker_command("celery", tuned)
    assert celery[celery.index("--prefetch-multiplier") + 1] == "2"
    with pytest.raises(ValueError, match="multiple"):
        bench.peer_worker_command("celery", bench.worker_settings({"WORKER_CONCURRENCY": "4", "WORKER_PREFETCH": "6"}))


def _open_loop_against(handle, **load) -> list[tuple]:
    """bench.open_loop(**load) against a local server whose connections `handle(reader, writer)` serves."""
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            return await bench.open_loop("127.0.0.1", server.sockets[0].getsockname()[1], **load)

    return asyncio.run(main())


def _answer(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_open_loop_sends_at_the_rate_and_times_each_request_from_when_it_was_due():
    seen = []

    async def handle(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closes when it is done
            await serve(reader, writer)

    async def serve(reader, writer):
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            body = await reader.readexactly(length)
            seen.append((time.monotonic(), json.loads(body)["type"]))
            n = len(seen)
            if n % 5 == 0:  # a refusal counts as an answer, without a job id
                writer.write(_answer(429, b'{"title":"slow down"}'))
            else:
                writer.write(_answer(202, json.dumps({"id": f"job-{n}"}).encode()))
            await writer.drain()

    results = _open_loop_against(handle, rate=200, seconds=0.5, connections=4)
    assert len(results) == len(seen) == 100
    assert {kind for _, kind in seen} == {"echo"}
    statuses = [status for _, status, _, _ in results]
    assert statuses.count(429) == 20 and statuses.count(202) == 80
    assert all(job_id.startswith("job-") for _, status, job_id, _ in results if status == 202)
    assert all(job_id is None for _, status, job_id, _ in results if status != 202)
    due = sorted(due for due, *_ in results)
    # On the wall clock as it stood at each send (the clocks drift apart by microseconds)
    assert due[-1] - due[0] == pytest.approx(99 / 200, abs=0.001)
    assert all(latency >= 0 for *_, latency in results)
    sent = [at for at, _ in seen]
    assert sent[-1] - sent[0] > 0.35  # spread over the half second, not sent in a burst


def test_open_loop_gives_due_times_on_the_wall_clock_of_the_moment_even_when_it_is_stepped(monkeypatch):
    # The records' timestamps are wall-clock time. A VM's wall clock can be stepped while a run
    # goes on (one here gained 0.5 ms every 100 ms, against the monotonic clock): a due time taken
    # as the run's start on the wall clock plus the schedule would drift from the records', and
    # every job's measured latency would grow with its place in the run. Here the wall clock gains
    # 50 ms a second; the server notes, on that clock, when each request arrived.
    real_time, started = time.time, time.monotonic()
    monkeypatch.setattr(time, "time", lambda: real_time() + 0.05 * (time.monotonic() - started))
    arrived = {}

    async def handle(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
                job_id = f"job-{len(arrived)}"
                arrived[job_id] = time.time()
                writer.write(_answer(202, json.dumps({"id": job_id}).encode()))
                await writer.drain()

    results = _open_loop_against(handle, rate=100, seconds=0.6, connections=4)
    assert len(results) == len(arrived) == 60
    for due, _, job_id, latency in results:
        # Arrival on the wall clock, less the due time, is the monotonic latency up to the clock's
        # gain during the request itself (5 %), not up to its 30 ms gain over the whole run.
        assert -0.002 <= arrived[job_id] - due <= latency * 1.06 + 0.002


def test_open_loop_counts_the_wait_for_a_free_connection_as_latency():
    # One connection and a server that takes 30 ms per answer, asked for one every 10 ms: the
    # requests queue in the client, and each is timed from when it was due, not when it went out.
    async def handle(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
                await asyncio.sleep(0.03)
                writer.write(_answer(202, b'{"id":"j"}'))
                await writer.drain()

    results = sorted(_open_loop_against(handle, rate=100, seconds=0.3, connections=1))
    assert len(results) == 30
    latencies = [latency for *_, latency in results]
    assert latencies[0] >= 0.03
    assert latencies[-1] >= 30 * 0.03 - 0.29  # served last, after 29 others; due 0.29 s after the first
    assert latencies[-1] > latencies[0] + 0.4


def test_open_loop_carries_on_when_an_idle_connection_closes_while_another_is_busy():
    # The first connection answers once and closes 70 ms later, while the second is busy with a
    # slow answer: its requests wait for the second connection, and the run still ends whole.
    accepted = []

    async def handle(reader, writer):
        accepted.append(writer)
        first = len(accepted) == 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
                if not first:
                    await asyncio.sleep(0.1)
                writer.write(_answer(202, b'{"id":"j"}'))
                await writer.drain()
                if first:
                    await asyncio.sleep(0.07)
                    writer.close()
                    return

    results = _open_loop_against(handle, rate=20, seconds=0.2, connections=2)
    assert [status for _, status, _, _ in results] == [202] * 4


def test_an_answer_split_into_single_bytes_is_read_once():
    answers = []
    conn = bench.OpenLoopConnection(lambda c, status, payload: answers.append((status, payload)),
                                    lambda c, exc: answers.append(("lost", exc)))
    for byte in _answer(202, b'{"id":"job-1"}'):
        conn.data_received(bytes([byte]))
    assert answers == [(202, b'{"id":"job-1"}')]
    assert conn.buffer == b""


def test_open_loop_fails_loudly_on_an_answer_it_cannot_read():
    async def handle(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n\r\n{}")
            await writer.drain()
            await reader.read()

    with pytest.raises(ConnectionError, match="could not be read"):
        _open_loop_against(handle, rate=20, seconds=0.1, connections=1)


def test_open_loop_fails_loudly_when_the_server_drops_a_request():
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # no answer

    with pytest.raises(ConnectionError, match="mid-request"):
        _open_loop_against(handle, rate=50, seconds=0.2, connections=2)


def test_kernel_settings_record_autogroup_clock_source_and_idle_driver(tmp_path):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/devices/system/clocksource/clocksource0").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/cpuidle").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/sched_autogroup_enabled").write_text("0\n")
    (tmp_path / "sys/devices/system/clocksource/clocksource0/current_clocksource").write_text("kvm-clock\n")
    (tmp_path / "sys/devices/system/cpu/cpuidle/current_driver").write_text("none\n")
    settings = bench.kernel_settings(tmp_path)
    assert settings == {"sched_autogroup": False, "clocksource": "kvm-clock", "cpuidle_driver": "none",
                        "guest_halt_poll_ns": None}
    assert bench.describe_kernel_settings(settings) == (
        "scheduler autogroup off, clock source kvm-clock, cpuidle none")
    (tmp_path / "proc/sys/kernel/sched_autogroup_enabled").write_text("1\n")
    assert bench.kernel_settings(tmp_path)["sched_autogroup"] is True


def test_kernel_settings_record_how_long_haltpoll_polls(tmp_path):
    (tmp_path / "sys/devices/system/cpu/cpuidle").mkdir(parents=True)
    (tmp_path / "sys/module/haltpoll/parameters").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/cpuidle/current_driver").write_text("haltpoll\n")
    (tmp_path / "sys/module/haltpoll/parameters/guest_halt_poll_ns").write_text("0\n")
    settings = bench.kernel_settings(tmp_path)
    assert (settings["cpuidle_driver"], settings["guest_halt_poll_ns"]) == ("haltpoll", 0)
    assert bench.describe_kernel_settings(settings).endswith("cpuidle haltpoll (polls up to 0 µs)")
    (tmp_path / "sys/module/haltpoll/parameters/guest_halt_poll_ns").write_text("200000\n")
    settings = bench.kernel_settings(tmp_path)
    assert bench.describe_kernel_settings(settings).endswith("cpuidle haltpoll (polls up to 200 µs)")


def test_kernel_settings_are_unknown_where_the_kernel_does_not_have_them(tmp_path):
    settings = bench.kernel_settings(tmp_path)
    assert settings == {"sched_autogroup": None, "clocksource": None, "cpuidle_driver": None,
                        "guest_halt_poll_ns": None}
    unknown = "scheduler autogroup unknown, clock source unknown, cpuidle unknown"
    assert bench.describe_kernel_settings(settings) == unknown
    assert bench.describe_kernel_settings({}) == unknown


def test_machine_busy_counts_idle_and_iowait_as_not_busy():
    before = [100, 0, 50, 1000, 10, 0, 0, 5]
    after = [160, 0, 80, 1090, 20, 0, 0, 15]  # user+60 system+30 idle+90 iowait+10 steal+10
    busy, steal = bench.machine_busy(before, after)
    assert busy == pytest.approx(1 - 100 / 200)
    assert steal == pytest.approx(10 / 200)


def test_reference_loop_is_a_cpu_time():
    assert 1 < bench.reference_loop_ms() < 10_000


def test_the_table_shows_where_the_end_to_end_cores_went_and_the_vms_speed(tmp_path):
    http = {"rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0, "socket_errors": 0, "cpu_us_per_req": 900.0}
    drain = {"jobs_per_s": 50.0, "cpu_us_per_job": 400.0, "rss_mb_start": 40.0, "rss_mb_end": 41.0,
             "rss_mb_max": 42.0}
    e2e = {"rate": 50, "e2e_p50_ms": 3.0, "e2e_p99_ms": 9.0, "submit_p99_ms": 4.0, "not_succeeded": 0,
           "api_cpu_us_per_req": 1300.0, "worker_cpu_us_per_req": 600.0, "rabbitmq_cpu_us_per_req": 400.0,
           "redis_cpu_us_per_req": 140.0, "client_cpu_us_per_req": 160.0, "machine_busy": 0.7,
           "machine_steal": 0.01, "api_wakeups_per_req": 12.5, "worker_wakeups_per_req": 9.0,
           "rabbitmq_wakeups_per_req": 20.0, "redis_wakeups_per_req": 3.0, "client_wakeups_per_req": 1.5,
           "api_connections_per_worker": [40, 24], "api_cpu_us_per_req_per_worker": [800.0, 500.0]}
    run = bench.Bench(bench.QUICK, tmp_path, peers=False)
    run.runs = {"noop": [http], "ingest": [http], "worker": [drain], "worker_tuned": [drain], "e2e": [e2e],
                "raw_publish": [900.0], "raw_publish_sync": [300.0], "raw_consume": [800.0],
                "raw_publish_rabbitmq_cpu_us": [80.0], "wakeup_trickle_cpu_us": [250.0, 270.0, 290.0],
                "wakeup_back_to_back_cpu_us": [35.0, 36.0, 40.0]}
    run.results = {"drain": drain, "gunicorn_worker_rss_mb": [60.0, 61.0], "service_app_rss_mb": 41.0,
                   "reference_loop_ms": [("noop", 40.0), ("ingest", 44.0), ("e2e", 61.0)]}
    result = run.summarise(bench.worker_settings(), bench.worker_settings())
    assert result["e2e_total_cpu_us_per_req"]["median"] == 2600.0
    rows = {line.split(" | ")[0].strip("| "): line for line in bench.table(result).splitlines()}
    cores = rows["end to end, where the cores go (CPU µs per job)"]
    assert "2,600 µs" in cores and "api 1,300" in cores and "client 160" in cores and "0.70 busy" in cores
    split = rows["end to end, the client's connections per API worker, each run (and each worker's CPU per request)"]
    assert "| 40/24 (800/500 µs) |" in split
    load = rows["end to end, its CPU per job against the cores' time per ingest request"]
    assert f"| {result['e2e_cpu_vs_ingest']:.2f} |" in load and f"{result['e2e_floor_cpu_vs_ingest']:.2f} if" in load
    woken = rows["end to end, thread wake-ups per job"]
    assert "| 46 (the runs' totals)" in woken and "api 12.5" in woken and "rabbitmq 20.0" in woken
    speed = rows["the VM's speed: a fixed Python loop's CPU time"]
    assert "40 ms after the first run" in speed and "61 ms in the end-to-end phase" in speed
    wakeup = rows["the VM's cost of a wake-up: CPU per round trip between two threads"]
    assert "270 (250–290) µs at 50/s" in wakeup and "36 (35–40) µs back to back" in wakeup


def test_wakeups_counts_each_time_a_thread_of_the_process_slept():
    slept, done = threading.Event(), threading.Event()

    def sleep_20_times() -> None:
        for _ in range(20):
            time.sleep(0.002)
        slept.set()
        done.wait(5)  # counted while it lives: an exited thread's count goes with it

    before = bench.wakeups([os.getpid()])
    sleeper = threading.Thread(target=sleep_20_times)
    sleeper.start()
    slept.wait(5)
    try:
        assert bench.wakeups([os.getpid()]) - before >= 20
    finally:
        done.set()
        sleeper.join()
    assert bench.wakeups([2 ** 22 + 1]) == 0  # no such process: nothing, not an error


def test_the_wakeup_probe_runs_at_its_rate_and_reports_cpu_per_round_trip():
    per_round_trip, count = bench.wakeup_cost_us(50, 0.4)
    assert 15 <= count <= 21  # 0.4 s at 50/s
    assert 0 < per_round_trip < 1e6 * 0.4 / count  # some CPU, and less than the wall time between them
    back_to_back, many = bench.wakeup_cost_us(None, 0.1)
    assert many > count and back_to_back > 0


def test_established_connections_counts_each_process_own_accepted_sockets():
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            # the clients' own ends have another local port: only the 3 accepted sockets count
            assert bench.established_connections([os.getpid(), other.pid], port) == [3, 0]
            accepted[0].close()
            clients[0].close()
            assert bench.established_connections([os.getpid()], port) == [2]
        finally:
            other.kill()
            other.wait()
            for s in clients + accepted:
                s.close()


def test_the_table_shows_how_wrk_split_its_c16_connections_over_the_workers():
    producers = {"peer_celery": 100.0, "peer_dramatiq": 400.0, "peer_naive": 200.0}
    runs = _runs(200.0, 100.0, producers, {"peer_celery_worker": 50.0, "peer_dramatiq_worker": 25.0})
    runs["ingest_c16"] = [{"rps": 100.0, "connections_per_worker": [11, 5],
                           "cpu_us_per_req_per_worker": [612.4, 388.0]}, {"rps": 100.0}]
    runs["peer_naive_c16"][0].update(connections_per_worker=[8, 8], cpu_us_per_req_per_worker=[500.0, 499.0])
    result = {"runs": runs, "concurrency": 4, "prefetch": 16, **bench.peer_summary(runs)}
    rows = {a: (b, c) for a, b, c in bench.peer_rows(result)}
    ours, peers = rows["-c16: wrk's connections per gunicorn worker, each run (and each worker's CPU per request)"]
    assert ours == "ours 11/5 (612/388 µs), n/a"
    assert "naive 8/8 (500/499 µs)" in peers and "Celery n/a" in peers


def test_redis_runs_in_a_session_of_its_own(private_redis):
    """With the kernel's autogroup on, each session is one scheduling group: Redis must not share
    the caller's (in `make bench`, the load generator's), as no pod shares a client's cgroup."""
    pid = private_redis.process.pid
    assert os.getsid(pid) == pid
    assert os.getsid(pid) != os.getsid(0)


def test_e2e_load_is_the_end_to_end_cpu_per_job_over_the_cores_time_per_ingest_request():
    def median(value):
        return {"median": value}

    run = {"machine": {"cpus": 2}, "ingest_rps": median(1_000.0), "e2e_total_cpu_us_per_req": median(3_000.0),
           "worker_cpu_us_per_job": median(400.0), "worker_cpu_us_per_job_rabbitmq": median(100.0),
           "worker_cpu_us_per_job_redis": median(None)}
    load = bench.e2e_load(run)
    # 2 cores at 1,000 req/s: 2,000 µs of the cores per ingest request
    assert load["e2e_cpu_vs_ingest"] == pytest.approx(1.5)  # 3,000 / 2,000: 75 % busy at half the rate
    assert load["e2e_floor_cpu_vs_ingest"] == pytest.approx(1.25)  # (2,000 + 400 + 100) / 2,000
    assert bench.e2e_load({**run, "ingest_rps": median(None)}) == {"e2e_cpu_vs_ingest": None,
                                                                   "e2e_floor_cpu_vs_ingest": None}


def test_a_profile_py_spy_could_not_record_stops_the_run_with_its_reason():
    from jobs_devtools.bench import pyspy_profile

    def fake_py_spy(exit_with: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", exit_with], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    pyspy_profile.require_recorded(fake_py_spy("pass"), "service-app", 30)
    with pytest.raises(SystemExit, match=r"no profile of service-app \(exit code 1\): Error: Failed to find python"):
        pyspy_profile.require_recorded(fake_py_spy("import sys; sys.exit('Error: Failed to find python version')"),
                                       "service-app", 30)
