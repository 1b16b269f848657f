"""The bench harness's own logic, without services: wrk output parsing, statistics, the peers'
summary, the `bench:` line and the peer workers' settings.
Run by `make test` (pytest.ini's testpaths) and again by `make bench-smoke`."""

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
