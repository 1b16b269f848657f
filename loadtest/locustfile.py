"""Locust load test for the jobs API: submit jobs of mixed types, poll each until final.

Each simulated user submits a job (POST /jobs), polls GET /jobs/<id> until the job is
`succeeded` or `failed`, and reports the submit -> final time as its own Locust entry
(type JOB, one per job type), next to the HTTP entries.

Environment (all optional except the token):
  LOADTEST_TOKEN / TOKEN     bearer token; else LOADTEST_TOKEN_FILE (first line, e.g. a
                             mounted Secret); else DEV_API_TOKEN from .run/dev.env (make run)
  LOADTEST_PROFILE           smoke | step | soak (default smoke): the load shape below
  LOADTEST_STAGE_SECONDS     length of one stage (default 60; smoke: 30)
  LOADTEST_STEP_USERS        users of the step profile's rising stages (default 5,10,20,40)
  LOADTEST_SMOKE_USERS       (default 2)
  LOADTEST_SOAK_USERS        (default 10)      LOADTEST_SOAK_SECONDS (default 1800)
  LOADTEST_COOLDOWN_STAGES   idle stages at the end of `step` (default 2): shows scale-in
  LOADTEST_JOB_WEIGHTS       mix, e.g. "echo=4,sleep=3,cpu=2,flaky=1,fail=0"
  LOADTEST_SLEEP_SECONDS     `seconds` of sleep jobs (default 2.0; uniform 0.5x..1.5x)
  LOADTEST_CPU_MS            `ms` of cpu jobs (default 50)
  LOADTEST_POLL_SECONDS      poll interval (default 0.5)
  LOADTEST_JOB_TIMEOUT       seconds until a job that is not final counts as failed (default 300)
  LOADTEST_WAIT_MIN/MAX      think time between jobs per user, seconds (default 0.5 / 1.5)
Thresholds, checked when Locust quits (exit code 1 when exceeded):
  LOADTEST_MAX_ERROR_RATIO   failed / all HTTP requests and jobs (default 0.01)
  LOADTEST_MAX_P95_MS        p95 of the HTTP requests, ms (default 500)
  LOADTEST_MAX_E2E_P95_MS    p95 of submit -> final over all jobs, ms (default: not checked)
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

import gevent
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.stats import StatsEntry

log = logging.getLogger("loadtest")

FINAL = {"succeeded", "failed"}
# Responses by "METHOD status" (e.g. "POST 202": jobs accepted), printed as one JSON line when
# Locust quits, so that a run can be accounted for (make test-cluster-scaling).
STATUS_COUNTS: Counter[str] = Counter()
DEFAULT_WEIGHTS = "echo=4,sleep=3,cpu=2,flaky=1,fail=0"


def count_response(method: str, resp) -> None:
    STATUS_COUNTS[f"{method} {resp.status_code}"] += 1
    if resp.status_code == 0 or resp.status_code >= 500:  # when and why, for the run's accounting
        detail = getattr(resp, "error", None) or (resp.text or "")[:200]
        log.warning("%s -> %s at %.3f: %r", method, resp.status_code, time.time(), detail)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def resolve_token() -> str:
    for name in ("LOADTEST_TOKEN", "TOKEN"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    path = os.environ.get("LOADTEST_TOKEN_FILE", "").strip()
    if path:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[0]
    dev_env = Path(__file__).resolve().parent.parent / ".run" / "dev.env"
    if dev_env.exists():
        for line in dev_env.read_text().splitlines():
            if line.startswith("DEV_API_TOKEN="):
                return line.split("=", 1)[1].strip()
    raise SystemExit("no API token: set LOADTEST_TOKEN (or TOKEN, or LOADTEST_TOKEN_FILE), or start `make run`")


def parse_weights(spec: str) -> dict[str, float]:
    weights = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, weight = part.partition("=")
        weights[name.strip()] = float(weight or 1)
    if not any(w > 0 for w in weights.values()):
        raise SystemExit(f"LOADTEST_JOB_WEIGHTS {spec!r}: no job type with a positive weight")
    return weights


def payload_for(job_type: str) -> dict:
    if job_type == "echo":
        return {"hello": "locust", "n": random.randint(0, 1_000_000)}
    if job_type == "sleep":
        base = _env_float("LOADTEST_SLEEP_SECONDS", 2.0)
        return {"seconds": round(random.uniform(0.5 * base, 1.5 * base), 3)}
    if job_type == "cpu":
        return {"ms": _env_int("LOADTEST_CPU_MS", 50)}
    if job_type == "flaky":
        return {"fail_times": 1}
    if job_type == "fail":
        return {"message": "failing on purpose (load test)"}
    raise SystemExit(f"unknown job type {job_type!r} in LOADTEST_JOB_WEIGHTS")


WEIGHTS = parse_weights(os.environ.get("LOADTEST_JOB_WEIGHTS", DEFAULT_WEIGHTS))
JOB_TYPES = [t for t, w in WEIGHTS.items() if w > 0]
JOB_WEIGHTS = [WEIGHTS[t] for t in JOB_TYPES]


class JobsUser(FastHttpUser):
    wait_time = between(_env_float("LOADTEST_WAIT_MIN", 0.5), _env_float("LOADTEST_WAIT_MAX", 1.5))
    # Polls of slow jobs must not be cut short; the API itself answers in milliseconds.
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {resolve_token()}"}
        self.poll = _env_float("LOADTEST_POLL_SECONDS", 0.5)
        self.job_timeout = _env_float("LOADTEST_JOB_TIMEOUT", 300.0)

    @task
    def submit_and_wait(self) -> None:
        job_type = random.choices(JOB_TYPES, JOB_WEIGHTS)[0]
        started = time.perf_counter()
        with self.client.post("/jobs", json={"type": job_type, "payload": payload_for(job_type)},
                              headers=self.headers, name="POST /jobs", catch_response=True) as resp:
            count_response("POST", resp)
            if resp.status_code != 202:
                resp.failure(f"POST /jobs -> {resp.status_code}: {(resp.text or '')[:200]}")
                return
            job_id = resp.json()["id"]
        status, error = None, None
        while True:
            with self.client.get(f"/jobs/{job_id}", headers=self.headers, name="GET /jobs/[id]",
                                 catch_response=True) as resp:
                count_response("GET", resp)
                if resp.status_code == 200:
                    status = resp.json().get("status")
                else:
                    resp.failure(f"GET /jobs/[id] -> {resp.status_code}")
            if status in FINAL:
                break
            if time.perf_counter() - started > self.job_timeout:
                error = TimeoutError(f"job not final after {self.job_timeout:.0f}s (last status {status})")
                break
            gevent.sleep(self.poll)
        if error is None and status == "failed" and job_type != "fail":
            error = RuntimeError(f"{job_type} job ended failed")
        if error is None and status == "succeeded" and job_type == "fail":
            error = RuntimeError("fail job ended succeeded")
        events.request.fire(request_type="JOB", name=f"{job_type} submit->final",
                            response_time=(time.perf_counter() - started) * 1000, response_length=0,
                            exception=error, context={})


@events.test_start.add_listener
def wait_until_reachable(environment, **_kwargs) -> None:
    """Start the load once the API answers: in a cluster, a new pod's first connections can fail
    until the NetworkPolicy enforcer has programmed its rules (seen on the sandbox: ~0.3 s)."""
    import urllib.request

    host = (environment.host or "").rstrip("/")
    deadline = time.monotonic() + _env_float("LOADTEST_REACHABLE_TIMEOUT", 60)
    while host:
        try:
            with urllib.request.urlopen(f"{host}/healthz", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                log.warning("%s/healthz still unreachable; starting the load anyway", host)
                return
            gevent.sleep(0.2)


# ------------------------------------------------------------------------- load shapes
def stages_for(profile: str) -> list[tuple[float, int]]:
    """[(duration seconds, users)] of a profile."""
    if profile == "smoke":
        return [(_env_float("LOADTEST_STAGE_SECONDS", 30), _env_int("LOADTEST_SMOKE_USERS", 2))]
    stage = _env_float("LOADTEST_STAGE_SECONDS", 60)
    if profile == "step":
        users = [int(u) for u in os.environ.get("LOADTEST_STEP_USERS", "5,10,20,40").split(",") if u.strip()]
        cooldown = _env_int("LOADTEST_COOLDOWN_STAGES", 2)
        return [(stage, u) for u in users] + [(stage * cooldown, 0)] * (1 if cooldown else 0)
    if profile == "soak":
        return [(_env_float("LOADTEST_SOAK_SECONDS", 1800), _env_int("LOADTEST_SOAK_USERS", 10))]
    raise SystemExit(f"LOADTEST_PROFILE {profile!r}: use smoke, step or soak")


class ProfileShape(LoadTestShape):
    """LOADTEST_PROFILE's stages, one after the other; the run ends after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.profile = os.environ.get("LOADTEST_PROFILE", "smoke")
        self.stages = stages_for(self.profile)
        # a stage is a step, not a ramp: start and stop users at once
        self.rate = max([1] + [users for _, users in self.stages])

    def tick(self):
        elapsed = self.get_run_time()
        end = 0.0
        for duration, users in self.stages:
            end += duration
            if elapsed < end:
                return users, self.rate
        return None


# ------------------------------------------------------------------------- thresholds
def http_aggregate(stats) -> StatsEntry:
    agg = StatsEntry(stats, "HTTP", "", use_response_times_cache=False)
    for entry in stats.entries.values():
        if entry.method != "JOB":
            agg.extend(entry)
    return agg


def jobs_aggregate(stats) -> StatsEntry:
    agg = StatsEntry(stats, "JOBS", "", use_response_times_cache=False)
    for entry in stats.entries.values():
        if entry.method == "JOB":
            agg.extend(entry)
    return agg


def threshold_failures(stats) -> list[str]:
    problems = []
    total = stats.total
    max_ratio = _env_float("LOADTEST_MAX_ERROR_RATIO", 0.01)
    if total.num_requests == 0:
        problems.append("no request was made")
    elif total.fail_ratio > max_ratio:
        problems.append(f"error ratio {total.fail_ratio:.4f} > {max_ratio}")
    http = http_aggregate(stats)
    max_p95 = _env_float("LOADTEST_MAX_P95_MS", 500)
    if http.num_requests and http.get_response_time_percentile(0.95) > max_p95:
        problems.append(f"HTTP p95 {http.get_response_time_percentile(0.95):.0f} ms > {max_p95:.0f} ms")
    e2e_limit = os.environ.get("LOADTEST_MAX_E2E_P95_MS", "").strip()
    jobs = jobs_aggregate(stats)
    if e2e_limit and jobs.num_requests and jobs.get_response_time_percentile(0.95) > float(e2e_limit):
        problems.append(f"job submit->final p95 {jobs.get_response_time_percentile(0.95):.0f} ms > {e2e_limit} ms")
    return problems


@events.quitting.add_listener
def check_thresholds(environment, **_kwargs) -> None:
    problems = threshold_failures(environment.stats)
    http = http_aggregate(environment.stats)
    jobs = jobs_aggregate(environment.stats)
    print(f"loadtest summary: {http.num_requests} HTTP requests, p95 {http.get_response_time_percentile(0.95):.0f} ms; "
          f"{jobs.num_requests} jobs final, submit->final p95 {jobs.get_response_time_percentile(0.95):.0f} ms; "
          f"error ratio {environment.stats.total.fail_ratio:.4f}", flush=True)
    print(f"loadtest responses: {json.dumps(dict(sorted(STATUS_COUNTS.items())))}", flush=True)
    if problems:
        for problem in problems:
            print(f"loadtest THRESHOLD FAILED: {problem}", flush=True)
        environment.process_exit_code = 1
    else:
        print("loadtest thresholds passed", flush=True)
