"""A flood of bad requests does not slow good ones beyond a documented bound
(docs/guarantees.md, "Abuse"): against gunicorn main-app with 2 workers and its default
threads on this 2-core machine, with the flood in a separate process.

Bound: while CONNECTIONS connections send bad requests (wrong token, malformed
JSON, over-limit bodies, deep nesting, schema violations, traversal ids) as fast as
they can, every good submission is still answered 202, and the good submissions' p95
latency stays under max(P95_FLOOR_S, P95_FACTOR x the unflooded p95).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import requests
from abuselib import ROOT

CONNECTIONS = 4
SECONDS = 12.0
P95_FACTOR = 10
P95_FLOOR_S = 0.5


def good_latencies(api, seconds: float, rate: float = 20.0) -> tuple[list[float], list[int]]:
    session = requests.Session()
    latencies, statuses = [], []
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        n += 1
        t0 = time.perf_counter()
        response = session.post(f"{api.url}/jobs", json={"type": "echo", "payload": {"n": n}}, headers=api.auth(),
                                timeout=30)
        latencies.append(time.perf_counter() - t0)
        statuses.append(response.status_code)
    return latencies, statuses


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_flood_of_bad_requests_does_not_starve_good_ones(api):
    good_latencies(api, 1.0)  # warm up
    baseline, base_status = good_latencies(api, 5.0)
    flood = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flood.py")), api.url, api.token,
                              str(SECONDS), str(CONNECTIONS)], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let it ramp up
    flooded, flood_status = good_latencies(api, SECONDS - 2.0)
    out, _ = flood.communicate(timeout=60)
    report = json.loads(out)
    result = {
        "flood_connections": CONNECTIONS, "flood_requests": report["sent"],
        "flood_rate_per_s": round(report["sent"] / SECONDS), "flood_status": report["status"],
        "good_requests": len(flooded),
        "baseline_p50_ms": round(pct(baseline, 0.5) * 1000, 1), "baseline_p95_ms": round(pct(baseline, 0.95) * 1000, 1),
        "flooded_p50_ms": round(pct(flooded, 0.5) * 1000, 1), "flooded_p95_ms": round(pct(flooded, 0.95) * 1000, 1),
        "flooded_max_ms": round(max(flooded) * 1000, 1),
        "bound_ms": round(max(P95_FLOOR_S, P95_FACTOR * pct(baseline, 0.95)) * 1000, 1),
    }
    out_dir = ROOT / "reports" / "abuse"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flood.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    assert set(base_status) == {202} and set(flood_status) == {202}, (base_status, flood_status)
    assert not any(k.startswith("5") for k in report["status"]), report
    assert report["sent"] > 500, f"the flood was too weak to prove anything: {report}"
    assert pct(flooded, 0.95) < max(P95_FLOOR_S, P95_FACTOR * pct(baseline, 0.95)), result
    assert api.alive()
