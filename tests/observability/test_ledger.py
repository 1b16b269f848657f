"""loadtest/ledger.py (the accounting client of make test-cluster-scaling's prod fault run)
against a local API and worker: every request recorded, every accepted job followed to its end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TOKEN

ROOT = Path(__file__).resolve().parents[2]
LEDGER = ROOT / "loadtest" / "ledger.py"

pytestmark = pytest.mark.timeout(180)


def run_ledger(api, tmp_path: Path, **env: str) -> subprocess.Popen:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# a comment line\n{TOKEN}\n")
    full_env = {**os.environ, "LEDGER_URL": api.url, "LEDGER_TOKEN_FILE": str(token_file),
                "LEDGER_STOP_FILE": str(tmp_path / "stop"), "LEDGER_SLEEP_SECONDS": "0.1", **env}
    return subprocess.Popen([sys.executable, str(LEDGER)], env=full_env, stdout=subprocess.PIPE, text=True)


def summary(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("ledger: "))
    return json.loads(line.split(": ", 1)[1])


def test_accounts_for_every_request_and_job(rabbit, redis_node, start_api, start_worker, tmp_path):
    start_worker(rabbit.url, redis_node.url)
    api = start_api(rabbit.url, redis_node.url)
    result = summary(run_ledger(api, tmp_path, LEDGER_RATE="20", LEDGER_MAX_SECONDS="3"))
    assert result["reachable_after_s"] < 5
    assert 40 <= result["submissions"] <= 70, result["submissions"]  # ~20/s for 3 s
    assert result["accepted"] == result["submissions"] and result["by_status"] == {"202": result["submissions"]}
    assert result["lost"] == 0 and result["final"] == {"succeeded": result["accepted"]}
    assert len(result["requests"]) == result["submissions"] and len(result["jobs"]) == result["accepted"]
    assert {job_type for _, job_type, _, _ in result["jobs"]} == {"echo", "sleep"}
    assert all(outcome == "succeeded" and attempts == 1 for _, _, outcome, attempts in result["jobs"])


def test_stop_file_ends_the_load_and_unfinished_jobs_count_as_lost(rabbit, redis_node, start_api, tmp_path):
    api = start_api(rabbit.url, redis_node.url)  # no worker: nothing reaches a final state
    proc = run_ledger(api, tmp_path, LEDGER_RATE="10", LEDGER_FINAL_TIMEOUT="2")
    time.sleep(1.5)
    (tmp_path / "stop").touch()
    result = summary(proc)
    assert result["seconds"] < 5 and result["accepted"] > 0
    assert result["lost"] == result["lost_not_final"] == result["accepted"]
    assert {outcome for _, _, outcome, _ in result["jobs"]} == {"not_final"}
