"""A steady submit load that accounts for every request (standard library only).

The client side of `make test-cluster-scaling`'s prod fault run, run in the cluster as a
Job (any image with Python 3: the fault run uses main-app's). Threads submit jobs at a
fixed total rate, each with an Idempotency-Key, and retry a submission that got no answer
or a 5xx (with the same key, as a careful client would), until the stop file appears or
LEDGER_MAX_SECONDS pass. Then it polls every accepted job until it is final and prints one
line `ledger: {json}`: submissions, accepted, by_status (HTTP answers, "0" = no answer),
final {succeeded, failed}, lost (accepted and never final: not found, or not final after
LEDGER_FINAL_TIMEOUT), ran_more_than_once (jobs whose record shows more attempts than their
type needs: the duplicates an at-least-once system may produce), and for accounting per time
window: requests [[t, status]] and jobs [[submitted t, type, outcome, attempts]] (Unix times).

Environment: LEDGER_URL (http://main-app:8000), LEDGER_TOKEN_FILE (first line is the
bearer token), LEDGER_RATE (jobs/s, 10), LEDGER_THREADS (8), LEDGER_SLEEP_SECONDS (0.5: the
`sleep` jobs keep workers busy while pods stop), LEDGER_STOP_FILE (/tmp/ledger-stop),
LEDGER_MAX_SECONDS (1800), LEDGER_FINAL_TIMEOUT (300).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

URL = os.environ.get("LEDGER_URL", "http://main-app:8000").rstrip("/")
RATE = float(os.environ.get("LEDGER_RATE", "10"))
THREADS = int(os.environ.get("LEDGER_THREADS", "8"))
SLEEP_SECONDS = float(os.environ.get("LEDGER_SLEEP_SECONDS", "0.5"))
STOP_FILE = os.environ.get("LEDGER_STOP_FILE", "/tmp/ledger-stop")
MAX_SECONDS = float(os.environ.get("LEDGER_MAX_SECONDS", "1800"))
FINAL_TIMEOUT = float(os.environ.get("LEDGER_FINAL_TIMEOUT", "300"))
RETRIES = 30
EXPECTED_ATTEMPTS = {"echo": 1, "sleep": 1}


def token() -> str:
    path = os.environ.get("LEDGER_TOKEN_FILE", "/var/run/secrets/jobs/api-tokens/tokens")
    with open(path, encoding="utf-8") as fh:
        return next(t for t in (line.strip() for line in fh) if t and not t.startswith("#"))


def call(method: str, path: str, headers: dict[str, str], body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method, headers=headers)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.by_status: Counter[str] = Counter()
        self.requests: list[tuple[float, int]] = []  # (time, HTTP status; 0 = no answer)
        self.accepted: dict[str, tuple[str, float]] = {}  # job id -> (type, submitted at)
        self.submissions = 0
        self.given_up = 0

    def answer(self, status: int) -> None:
        with self.lock:
            self.by_status[str(status)] += 1
            self.requests.append((round(time.time(), 2), status))

    def submit(self, headers: dict[str, str], n: int) -> None:
        job_type = "sleep" if n % 2 else "echo"
        body = {"type": job_type, "payload": {"seconds": SLEEP_SECONDS} if job_type == "sleep" else {"n": n}}
        key = {"Idempotency-Key": uuid.uuid4().hex}
        submitted = time.time()
        with self.lock:
            self.submissions += 1
        for attempt in range(RETRIES):
            status, job = call("POST", "/jobs", {**headers, **key}, body)
            self.answer(status)
            if status in (200, 202) and job.get("id"):
                with self.lock:
                    self.accepted[job["id"]] = (job_type, submitted)
                return
            if 0 < status < 500:
                return  # refused: the client knows, nothing to account for
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
        with self.lock:
            self.given_up += 1


def wait_reachable(timeout: float = 60) -> float:
    """Seconds until GET /healthz answers. A new pod's first connections can fail while the
    cluster's NetworkPolicy enforcer has not yet programmed its rules (seen on the sandbox:
    ~0.3 s); the load starts once the API is reachable, so those are not counted as answers."""
    started = time.monotonic()
    while call("GET", "/healthz", {})[0] != 200:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{URL}/healthz not reachable within {timeout:.0f}s")
        time.sleep(0.2)
    return round(time.monotonic() - started, 2)


def run() -> dict:
    headers = {"Authorization": "Bearer " + token()}
    reachable_after = wait_reachable()
    ledger = Ledger()
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    interval = THREADS / RATE
    deadline = ledger.started + MAX_SECONDS

    def worker(offset: float) -> None:
        next_at = time.monotonic() + offset
        while not os.path.exists(STOP_FILE) and time.time() < deadline:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            with counter_lock:
                n = next(counter)
            ledger.submit(headers, n)

    threads = [threading.Thread(target=worker, args=(i * interval / THREADS,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitting_seconds = time.time() - ledger.started

    pending = dict(ledger.accepted)
    final: Counter[str] = Counter()
    ran_more_than_once: Counter[str] = Counter()
    outcomes: dict[str, tuple[float, str, str, int]] = {}  # job id -> (submitted, type, outcome, attempts)
    not_found = 0
    final_deadline = time.time() + FINAL_TIMEOUT
    while pending and time.time() < final_deadline:
        for job_id, (job_type, submitted) in list(pending.items()):
            status, job = call("GET", f"/jobs/{job_id}", headers)
            if status == 404:
                not_found += 1
                outcomes[job_id] = (round(submitted, 2), job_type, "not_found", 0)
                del pending[job_id]
            elif status == 200 and job.get("status") in ("succeeded", "failed"):
                final[job["status"]] += 1
                attempts = int(job.get("attempts") or 0)
                if attempts > EXPECTED_ATTEMPTS[job_type]:
                    ran_more_than_once[job_type] += 1
                outcomes[job_id] = (round(submitted, 2), job_type, job["status"], attempts)
                del pending[job_id]
        if pending:
            time.sleep(1)
    for job_id, (job_type, submitted) in pending.items():
        outcomes[job_id] = (round(submitted, 2), job_type, "not_final", 0)
    return {
        "reachable_after_s": reachable_after, "started": round(ledger.started, 2),
        "seconds": round(submitting_seconds, 1), "submissions": ledger.submissions,
        "accepted": len(ledger.accepted), "given_up": ledger.given_up,
        "by_status": dict(sorted(ledger.by_status.items())),
        "final": dict(final), "lost": not_found + len(pending), "lost_not_found": not_found,
        "lost_not_final": len(pending), "ran_more_than_once": dict(ran_more_than_once),
        "requests": ledger.requests, "jobs": sorted(outcomes.values()),
    }


if __name__ == "__main__":
    print("ledger: " + json.dumps(run()), flush=True)
