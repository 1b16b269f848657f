"""The bench harness's own logic, without services: wrk output parsing and statistics.
Run by `make bench-smoke` (not part of `make test`)."""

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
