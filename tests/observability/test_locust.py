"""loadtest/locustfile.py, run headless by Locust (.tools/locust) against a local API and worker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TOKEN

ROOT = Path(__file__).resolve().parents[2]
LOCUST = ROOT / ".tools" / "locust" / "bin" / "locust"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def api(rabbit, redis_node, start_api, start_worker):
    if not LOCUST.exists():
        pytest.skip("Locust not installed: make loadtest-tools")
    start_worker(rabbit.url, redis_node.url, WORKER_CONCURRENCY="8")
    return start_api(rabbit.url, redis_node.url)


def run_locust(api, tmp_path: Path, name: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LOADTEST_", "TOKEN"))},
                "LOADTEST_TOKEN": TOKEN, "LOADTEST_PROFILE": "smoke", "LOADTEST_STAGE_SECONDS": "12",
                "LOADTEST_SMOKE_USERS": "4", "LOADTEST_JOB_WEIGHTS": "echo=3,sleep=1,cpu=1,flaky=1,fail=1",
                "LOADTEST_SLEEP_SECONDS": "0.5", "LOADTEST_POLL_SECONDS": "0.2", "LOADTEST_WAIT_MIN": "0.1",
                "LOADTEST_WAIT_MAX": "0.3", "LOADTEST_JOB_TIMEOUT": "30", **env}
    proc = subprocess.run([str(LOCUST), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--host", api.url,
                           "--json-file", str(out), "--html", f"{out}.html", "--only-summary"],
                          env=full_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, out


def stats_rows(out: Path) -> dict[tuple[str, str], dict]:
    """Locust's final stats by (method, name). Its --csv stats file is a snapshot rewritten once a
    second and not refreshed when Locust quits, so it can miss the last requests; --json-file is
    written after the users have stopped."""
    with open(f"{out}.json") as f:
        return {(r["method"], r["name"]): r for r in json.load(f)}


def test_smoke_profile_passes_and_reports(api, tmp_path):
    proc, out = run_locust(api, tmp_path, "smoke")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "loadtest thresholds passed" in log
    rows = stats_rows(out)
    # one JSON line of responses by method and status: what make test-cluster-scaling accounts from
    responses = json.loads(next(ln for ln in log.splitlines() if ln.startswith("loadtest responses: "))
                           .split(": ", 1)[1])
    assert responses["POST 202"] == int(rows[("POST", "POST /jobs")]["num_requests"])
    assert responses["GET 200"] == int(rows[("GET", "GET /jobs/[id]")]["num_requests"])
    assert int(rows[("POST", "POST /jobs")]["num_requests"]) > 10
    assert int(rows[("GET", "GET /jobs/[id]")]["num_requests"]) > 10
    jobs = {name: r for (kind, name), r in rows.items() if kind == "JOB"}
    # echo and fail jobs were followed to their final status (`fail` ending `failed` is not an error)
    assert {"echo submit->final", "fail submit->final"} <= set(jobs), sorted(jobs)
    assert all(int(r["num_failures"]) == 0 for r in rows.values()), rows
    assert Path(f"{out}.html").stat().st_size > 1000


def test_thresholds_fail_the_run(api, tmp_path):
    proc, _ = run_locust(api, tmp_path, "strict", LOADTEST_STAGE_SECONDS="5", LOADTEST_MAX_P95_MS="0.001")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-4000:]
    assert "THRESHOLD FAILED: HTTP p95" in log


def test_wrong_token_counts_as_errors(api, tmp_path):
    proc, out = run_locust(api, tmp_path, "badtoken", LOADTEST_STAGE_SECONDS="4", LOADTEST_TOKEN="not-a-token")
    assert proc.returncode == 1
    assert int(stats_rows(out)[("POST", "POST /jobs")]["num_failures"]) > 0
