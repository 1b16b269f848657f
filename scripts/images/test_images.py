#!/usr/bin/env python3
"""Prove the main-app and service-app images with a real Docker engine.

Run by `make test-images` after the images are built (production targets as
MAIN/SERVICE image, dev targets as <image>-dev). Standard library only.

What it does, against a PRIVATE RabbitMQ node and a PRIVATE Redis started here
(own ports and data dirs under a temp dir; the machine's system RabbitMQ/Redis
are never touched):
  * image metadata: non-root numeric user 10001:10001, tini exec-form
    entrypoint, OCI labels; size and layer count of each runtime image;
  * both containers on the host network with --read-only, only the documented
    tmpfs (/tmp) writable, all capabilities dropped, no-new-privileges;
  * every process in both containers runs as UID/GID 10001;
  * the root filesystem really is read-only and /tmp (with main-app's
    PROMETHEUS_MULTIPROC_DIR) is writable;
  * one job of every type through the API reaches its expected final state
    (fail -> failed after MAX_ATTEMPTS attempts, flaky -> succeeded after retry);
  * `docker stop` of a worker with jobs in flight: it drains them, exits 0
    within the grace period, and the jobs it had prefetched but not started
    are redelivered to the next worker: nothing is lost (queue empty at the end);
  * `docker stop` of main-app exits 0 (gunicorn graceful shutdown via tini);
  * the dev targets: sources under /app owned by the runtime user, importable
    from there, and a change made as that user is picked up (gunicorn --reload
    for main-app, dev-reload restarting the worker for service-app).

Prints one line per check and a closing "N passed, N failed" line; exit 1 on
any failure. Container and broker logs go to --report-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

UID = 10001
LABEL = "jobs-images-test"
TOKEN = "images-test-token-0123456789abcdef"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
SYSTEM_PORTS = {5672, 6379, 15672, 15692, 25672, 4369}
MAX_ATTEMPTS = 3
SHUTDOWN_GRACE_SECONDS = 25
STOP_TIMEOUT = 40  # like terminationGracePeriodSeconds in k8s


def log(msg: str) -> None:
    print(f"[test-images] {msg}", flush=True)


# --------------------------------------------------------------------------- checks
@dataclass
class Results:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        line = f"{name}" + (f" -- {detail}" if detail else "")
        if ok:
            self.passed.append(line)
            print(f"PASS {line}", flush=True)
        else:
            self.failed.append(line)
            print(f"FAIL {line}", flush=True)
        return ok


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in SYSTEM_PORTS:
            return port


def run(cmd: list[str], check: bool = True, timeout: float = 120, env: dict | None = None,
        capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, text=True, timeout=timeout, env=env,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return proc


def wait_for(what: str, probe, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - probing
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def http(method: str, url: str, body: dict | None = None, token: str | None = TOKEN,
         timeout: float = 5) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


# --------------------------------------------------------------------------- services
class PrivateRedis:
    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.pidfile = self.dir / "redis.pid"
        self.logfile = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.dir),
             "--pidfile", str(self.pidfile), "--logfile", str(self.logfile)])
        wait_for("private redis", lambda: run(["redis-cli", "-p", str(self.port), "ping"],
                                              check=False).stdout.strip() == "PONG", 20)
        log(f"private redis on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text().strip() or 0)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                wait_for("redis exit", lambda: not _alive(pid), 15)
            except ProcessLookupError:
                pass


class PrivateRabbit:
    """A private RabbitMQ node: own node name, ports, config, data and log dirs."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "rabbitmq"
        self.dir.mkdir(parents=True)
        self.node = f"images-test-{os.getpid()}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.prometheus_port = free_port()
        self.pidfile = self.dir / "rabbit.pid"
        self.started = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.pidfile),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
                   timeout=timeout, check=check)

    def start(self) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise RuntimeError("RabbitMQ is not installed (Debian package rabbitmq-server)")
        cookie = Path.home() / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(20).hex().upper())
            cookie.chmod(0o400)
        (self.dir / "mnesia").mkdir()
        (self.dir / "log").mkdir()
        (self.dir / "rabbitmq-env.conf").write_text("# private node: settings come from the environment\n")
        (self.dir / "enabled_plugins").write_text("[rabbitmq_prometheus].\n")
        (self.dir / "rabbitmq.conf").write_text(textwrap.dedent(f"""\
            listeners.tcp.1 = 127.0.0.1:{self.amqp_port}
            prometheus.tcp.port = {self.prometheus_port}
            prometheus.tcp.ip = 127.0.0.1
            log.file.level = info
            """))
        run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env(), timeout=60)
        self.started = True
        self.ctl("wait", str(self.pidfile), "--timeout", "90", timeout=120)
        log(f"private rabbitmq {self.node} on 127.0.0.1:{self.amqp_port} (dist {self.dist_port})")

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        out = self.ctl("list_queues", "-q", "--formatter", "json", "name", "messages_ready",
                       "messages_unacknowledged").stdout
        rows = json.loads(out[out.index("["):]) if "[" in out else []
        return {r["name"]: (int(r["messages_ready"]), int(r["messages_unacknowledged"])) for r in rows}

    def stop(self) -> None:
        if not self.started:
            return
        pid = int(self.pidfile.read_text().strip()) if self.pidfile.exists() else 0
        proc = self.ctl("stop", str(self.pidfile), timeout=90, check=False)
        if proc.returncode != 0 and pid and _alive(pid):
            log(f"rabbitmqctl stop failed ({proc.returncode}); killing node pid {pid}")
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- docker
class Docker:
    def __init__(self, binary: str, run_id: str, report_dir: Path):
        self.bin = binary
        self.run_id = run_id
        self.report_dir = report_dir
        self.containers: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([self.bin, *args], check=check, timeout=timeout)

    def inspect(self, ref: str, kind: str = "container") -> dict:
        return json.loads(self(kind, "inspect", ref).stdout)[0]

    def cleanup_stale(self) -> None:
        ids = self("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
        if ids:
            log(f"removing {len(ids)} container(s) left by an earlier run")
            self("rm", "-f", *ids, check=False)

    def start(self, name: str, image: str, env: dict[str, str], *, read_only: bool = True,
              command: list[str] | None = None, stop_timeout: int = STOP_TIMEOUT) -> str:
        cname = f"{LABEL}-{self.run_id}-{name}"
        args = ["run", "-d", "--name", cname, "--label", LABEL, "--network", "host",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--stop-timeout", str(stop_timeout)]
        if read_only:
            # The documented writable paths: /tmp only (PROMETHEUS_MULTIPROC_DIR lives in it).
            args += ["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        args.append(image)
        args += command or []
        self(*args)
        self.containers.append(cname)
        return cname

    def logs(self, cname: str) -> str:
        return self("logs", cname, check=False).stdout

    def save_logs_and_remove(self) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        for cname in self.containers:
            (self.report_dir / f"{cname}.log").write_text(self.logs(cname))
            self("rm", "-f", cname, check=False)


# --------------------------------------------------------------------------- test
class ImageTest:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.r = Results()
        self.run_id = f"{os.getpid()}"
        self.report_dir = Path(args.report_dir)
        self.workdir = Path(tempfile.mkdtemp(prefix="images-test."))
        self.docker = Docker(args.docker, self.run_id, self.report_dir)
        self.redis = PrivateRedis(self.workdir)
        self.rabbit = PrivateRabbit(self.workdir)
        self.ports: dict[str, int] = {}

    # -- helpers
    def port(self, name: str) -> int:
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    def common_env(self) -> dict[str, str]:
        return {
            "RABBITMQ_URL": self.rabbit.url,
            "REDIS_URL": self.redis.url,
            "LOG_LEVEL": "INFO",
            "JOB_MAX_SLEEP_SECONDS": "30",
        }

    def api_env(self, http_port: int, metrics_port: int) -> dict[str, str]:
        return {**self.common_env(), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(http_port),
                "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port),
                "API_TOKENS": TOKEN, "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4",
                "PROMETHEUS_MULTIPROC_DIR": "/tmp/main-app-metrics"}

    def worker_env(self, metrics_port: int, concurrency: int = 2) -> dict[str, str]:
        return {**self.common_env(), "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port),
                "WORKER_CONCURRENCY": str(concurrency), "WORKER_PREFETCH": str(concurrency * 2),
                "MAX_ATTEMPTS": str(MAX_ATTEMPTS), "RETRY_BACKOFF_BASE_SECONDS": "1",
                "RETRY_BACKOFF_MAX_SECONDS": "2", "SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_SECONDS)}

    def wait_ready(self, what: str, url: str, cname: str, timeout: float = 60) -> bool:
        def probe():
            state = self.docker.inspect(cname)["State"]
            if not state["Running"]:
                raise RuntimeError(f"{cname} exited with {state['ExitCode']}")
            return http("GET", url, token=None, timeout=2)[0] == 200
        try:
            wait_for(f"{what} ready", probe, timeout)
            return self.r.check(f"{what}: /readyz 200", True)
        except Exception as exc:  # noqa: BLE001
            tail = "\n".join(self.docker.logs(cname).splitlines()[-30:])
            return self.r.check(f"{what}: /readyz 200", False, f"{exc}\n{tail}")

    def submit(self, api: str, job_type: str, payload: dict) -> str | None:
        status, body = http("POST", f"{api}/jobs", {"type": job_type, "payload": payload})
        ok = status == 202 and isinstance(body, dict) and "id" in body
        self.r.check(f"POST /jobs {job_type} -> 202", ok, "" if ok else f"{status} {body}")
        return body["id"] if ok else None

    def job(self, api: str, job_id: str) -> dict:
        status, body = http("GET", f"{api}/jobs/{job_id}")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"GET /jobs/{job_id}: {status} {body}")
        return body

    def wait_final(self, api: str, job_id: str, timeout: float) -> dict:
        return wait_for(f"job {job_id} final", lambda: (lambda j: j if j["status"] in ("succeeded", "failed")
                                                        else None)(self.job(api, job_id)), timeout)

    # -- phases
    def check_image_metadata(self) -> None:
        log("image metadata")
        rows = []
        for image in (self.args.main_image, self.args.service_image):
            info = self.docker.inspect(image, "image")
            cfg = info["Config"]
            labels = cfg.get("Labels") or {}
            self.r.check(f"{image}: USER is 10001:10001", cfg.get("User") == f"{UID}:{UID}", cfg.get("User"))
            self.r.check(f"{image}: exec-form ENTRYPOINT tini", cfg.get("Entrypoint") == ["/usr/bin/tini", "--"],
                         str(cfg.get("Entrypoint")))
            missing = [k for k in ("source", "revision", "version")
                       if not labels.get(f"org.opencontainers.image.{k}")]
            self.r.check(f"{image}: OCI labels source/revision/version", not missing,
                         ", ".join(f"{k}={labels.get('org.opencontainers.image.' + k)}"
                                   for k in ("source", "revision", "version")))
            size_mb = info["Size"] / 1e6
            layers = len(info["RootFS"]["Layers"])
            rows.append((image, size_mb, layers))
        print("\nRuntime images (size as reported by the engine, uncompressed):")
        for image, size_mb, layers in rows:
            print(f"  {image:<32} {size_mb:7.1f} MB  {layers:2d} layers")
        print()
        self.sizes = rows

    def start_stack(self) -> None:
        self.redis.start()
        self.rabbit.start()
        self.api = f"http://127.0.0.1:{self.port('api')}"
        self.api_c = self.docker.start("api", self.args.main_image,
                                       self.api_env(self.port("api"), self.port("api-metrics")))
        self.worker1 = self.docker.start("worker1", self.args.service_image,
                                         self.worker_env(self.port("worker1-metrics")))
        self.stack_ok = all([
            self.wait_ready("main-app", f"{self.api}/readyz", self.api_c),
            self.wait_ready("service-app", f"http://127.0.0.1:{self.port('worker1-metrics')}/readyz", self.worker1),
        ])

    def check_processes(self, cname: str, what: str, min_procs: int) -> None:
        out = self.docker("top", cname, "-eo", "uid,gid,pid,args").stdout.strip().splitlines()
        procs = [line.split(None, 3) for line in out[1:]]
        bad = [p for p in procs if p[0] != str(UID) or p[1] != str(UID)]
        self.r.check(f"{what}: all {len(procs)} processes run as uid/gid {UID}", not bad and len(procs) >= min_procs,
                     "; ".join(" ".join(p) for p in procs))
        pid1 = self.docker("exec", cname, "cat", "/proc/1/cmdline").stdout.replace("\0", " ").strip()
        self.r.check(f"{what}: PID 1 is tini", pid1.startswith("/usr/bin/tini"), pid1)

    def check_read_only(self, cname: str, what: str) -> None:
        host = self.docker.inspect(cname)["HostConfig"]
        self.r.check(f"{what}: started with --read-only and tmpfs /tmp",
                     host.get("ReadonlyRootfs") is True and "/tmp" in (host.get("Tmpfs") or {}))
        probe = ("import errno, os\n"
                 "for p in ('/opt/venv/probe', '/probe', '/etc/probe'):\n"
                 "    try:\n        open(p, 'w').close(); print('WROTE', p)\n"
                 "    except OSError as e:\n        print('DENIED', p, errno.errorcode[e.errno])\n"
                 "open('/tmp/probe', 'w').close(); os.remove('/tmp/probe'); print('TMP-OK')\n")
        for user in (str(UID), "0"):
            out = self.docker("exec", "-u", user, cname, "python3", "-c", probe, check=False).stdout
            denied = out.count("DENIED")
            self.r.check(f"{what}: root filesystem read-only (EROFS) even for uid {user}, /tmp writable",
                         "WROTE" not in out and denied == 3 and out.count("EROFS") == 3 and "TMP-OK" in out,
                         out.strip().replace("\n", "; "))

    def check_jobs(self) -> None:
        log("one job of every type")
        cases = [
            ("echo", {"hello": "images"}, "succeeded", None),
            ("sleep", {"seconds": 1}, "succeeded", None),
            ("cpu", {"ms": 200}, "succeeded", None),
            ("fail", {"message": "boom"}, "failed", MAX_ATTEMPTS),
            ("flaky", {"fail_times": 1}, "succeeded", 2),
        ]
        ids = [(t, self.submit(self.api, t, p), want, attempts) for t, p, want, attempts in cases]
        for job_type, job_id, want, attempts in ids:
            if job_id is None:
                continue
            try:
                job = self.wait_final(self.api, job_id, 60)
            except Exception as exc:  # noqa: BLE001
                self.r.check(f"job {job_type} -> {want}", False, str(exc))
                continue
            detail = f"status={job['status']} attempts={job.get('attempts')}"
            ok = job["status"] == want and (attempts is None or str(job.get("attempts")) == str(attempts))
            self.r.check(f"job {job_type} -> {want}" + (f" after {attempts} attempts" if attempts else ""), ok, detail)

    def check_metrics(self) -> None:
        status, body = http("GET", f"http://127.0.0.1:{self.port('api-metrics')}/metrics", token=None)
        self.r.check("main-app metrics port serves jobs_api_* (multiprocess dir on tmpfs)",
                     status == 200 and "jobs_api_jobs_accepted_total" in str(body), f"HTTP {status}")
        files = self.docker("exec", self.api_c, "ls", "/tmp/main-app-metrics", check=False).stdout.split()
        self.r.check("main-app PROMETHEUS_MULTIPROC_DIR=/tmp/main-app-metrics holds .db files",
                     any(f.endswith(".db") for f in files), " ".join(files[:6]))
        status, body = http("GET", f"http://127.0.0.1:{self.port('worker1-metrics')}/metrics", token=None)
        self.r.check("service-app metrics port serves jobs_worker_*",
                     status == 200 and "jobs_worker_jobs_processed_total" in str(body), f"HTTP {status}")

    def check_drain(self) -> None:
        log("docker stop of a worker with jobs in flight")
        # worker1 runs 2 jobs at a time: two long sleeps occupy it, two short ones wait.
        long_ids = [self.submit(self.api, "sleep", {"seconds": 5}) for _ in range(2)]
        try:
            wait_for("both long jobs running",
                     lambda: all(self.job(self.api, i)["status"] == "running" for i in long_ids if i), 20)
        except Exception as exc:  # noqa: BLE001
            self.r.check("drain: long jobs started", False, str(exc))
            return
        short_ids = [self.submit(self.api, "sleep", {"seconds": 0.2}) for _ in range(2)]
        time.sleep(0.5)  # let the broker deliver (prefetch) them to the busy worker
        started = time.monotonic()
        stop = self.docker("stop", "-t", str(STOP_TIMEOUT), self.worker1, check=False, timeout=STOP_TIMEOUT + 30)
        elapsed = time.monotonic() - started
        state = self.docker.inspect(self.worker1)["State"]
        self.r.check("drain: worker exited 0 after docker stop",
                     stop.returncode == 0 and state["ExitCode"] == 0 and not state.get("OOMKilled"),
                     f"exit={state['ExitCode']}")
        self.r.check(f"drain: within the grace period (stop took {elapsed:.1f}s < {STOP_TIMEOUT}s, "
                     f"after finishing the in-flight work)", 2.0 < elapsed < STOP_TIMEOUT, f"{elapsed:.1f}s")
        longs = [self.job(self.api, i) for i in long_ids if i]
        self.r.check("drain: in-flight jobs finished by the stopping worker",
                     all(j["status"] == "succeeded" for j in longs),
                     ", ".join(f"{j['id'][:8]}={j['status']}" for j in longs))
        shorts = [self.job(self.api, i)["status"] for i in short_ids if i]
        # A job the worker had not started is either drained too (succeeded) or
        # handed back to the broker (still queued); never running/failed/lost.
        self.r.check("drain: jobs not yet started were finished or handed back to the broker",
                     all(s in ("queued", "succeeded") for s in shorts), ", ".join(shorts))
        waiting = shorts.count("queued")
        try:  # queue statistics lag a few seconds behind
            depths = wait_for("queue stats to settle", lambda: (lambda d: d if d.get("jobs") == (waiting, 0)
                                                                else None)(self.rabbit.queue_depths()), 20, interval=1)
        except TimeoutError:
            depths = self.rabbit.queue_depths()
        self.r.check(f"drain: broker holds the {waiting} handed-back job(s), none unacked",
                     depths.get("jobs", (0, 0)) == (waiting, 0), f"jobs ready/unacked={depths.get('jobs')}")
        # A new worker (as after a rollout) picks them up.
        self.worker2 = self.docker.start("worker2", self.args.service_image,
                                         self.worker_env(self.port("worker2-metrics")))
        self.wait_ready("service-app (second worker)",
                        f"http://127.0.0.1:{self.port('worker2-metrics')}/readyz", self.worker2)
        finals = []
        for job_id in short_ids:
            if job_id:
                try:
                    finals.append(self.wait_final(self.api, job_id, 30)["status"])
                except Exception as exc:  # noqa: BLE001
                    finals.append(str(exc))
        self.r.check("drain: the next worker ran them: nothing lost", all(s == "succeeded" for s in finals),
                     ", ".join(finals))
        # Queue statistics lag a few seconds behind (emitted periodically).
        try:
            depths = wait_for("queue stats to settle", lambda: (lambda d: d if d.get("jobs") == (0, 0) else None)(
                self.rabbit.queue_depths()), 20, interval=1)
        except TimeoutError:
            depths = self.rabbit.queue_depths()
        self.r.check("broker: work queue empty at the end, the failed job dead-lettered",
                     depths.get("jobs") == (0, 0) and depths.get("jobs.dead", (0, 0))[0] == 1,
                     f"jobs={depths.get('jobs')} jobs.dead={depths.get('jobs.dead')}")

    def check_api_stop(self) -> None:
        started = time.monotonic()
        self.docker("stop", "-t", "30", self.api_c, check=False, timeout=60)
        elapsed = time.monotonic() - started
        code = self.docker.inspect(self.api_c)["State"]["ExitCode"]
        self.r.check("main-app: docker stop -> graceful exit 0", code == 0 and elapsed < 30,
                     f"exit={code} in {elapsed:.1f}s")

    def check_dev_images(self) -> None:
        log("dev targets")
        main_dev, svc_dev = f"{self.args.main_image}-dev", f"{self.args.service_image}-dev"
        probe = ("import os, importlib\n"
                 "for mod, path in (('{app}', '/app/{dir}/{app}'), ('jobs_contract', '/app/contract/jobs_contract')):\n"
                 "    m = importlib.import_module(mod)\n"
                 "    st = os.stat(path)\n"
                 "    print(mod, os.path.dirname(m.__file__), st.st_uid, st.st_gid, os.access(path, os.W_OK))\n")
        for image, app, directory in ((main_dev, "main_app", "main-app"), (svc_dev, "service_app", "service-app")):
            out = self.docker("run", "--rm", "--entrypoint", "python3", image, "-c",
                              probe.format(app=app, dir=directory), check=False).stdout
            lines = [ln.split() for ln in out.strip().splitlines()]
            ok = (len(lines) == 2 and all(len(ln) == 5 and ln[2] == str(UID) and ln[3] == str(UID)
                                          and ln[4] == "True" for ln in lines)
                  and lines[0][1] == f"/app/{directory}/{app}" and lines[1][1] == "/app/contract/jobs_contract")
            self.r.check(f"{image}: code imported from /app, owned and writable by {UID}", ok,
                         out.strip().replace("\n", "; "))
        env = self.docker.inspect(main_dev, "image")["Config"]["Env"]
        self.r.check(f"{main_dev}: GUNICORN_RELOAD=true", "GUNICORN_RELOAD=true" in env)

        # main-app dev: gunicorn --reload picks up a file changed by the runtime user.
        api_dev = self.docker.start("api-dev", main_dev, self.api_env(self.port("api-dev"),
                                                                      self.port("api-dev-metrics")),
                                    read_only=False)
        if self.wait_ready("main-app dev", f"http://127.0.0.1:{self.port('api-dev')}/readyz", api_dev):
            self.docker("exec", api_dev, "sh", "-c",
                        "echo '# touched by test-images' >> /app/main-app/main_app/api.py")
            try:
                wait_for("gunicorn reload", lambda: "reloading" in self.docker.logs(api_dev).lower(), 30)
                self.wait_ready("main-app dev after reload", f"http://127.0.0.1:{self.port('api-dev')}/readyz",
                                api_dev)
                self.r.check("main-app dev: gunicorn reloaded after a file change (as uid 10001)", True)
            except Exception as exc:  # noqa: BLE001
                self.r.check("main-app dev: gunicorn reloaded after a file change (as uid 10001)", False, str(exc))

        # service-app dev: dev-reload restarts the worker on a change.
        worker_dev = self.docker.start("worker-dev", svc_dev, self.worker_env(self.port("worker-dev-metrics")),
                                       read_only=False)
        url = f"http://127.0.0.1:{self.port('worker-dev-metrics')}/readyz"
        if self.wait_ready("service-app dev", url, worker_dev):
            self.docker("exec", worker_dev, "sh", "-c",
                        "echo '# touched by test-images' >> /app/service-app/service_app/__init__.py")
            try:
                wait_for("dev-reload restart", lambda: "change detected" in self.docker.logs(worker_dev), 30)
                wait_for("worker restarted", lambda: self.docker.logs(worker_dev).count("[dev-reload] started") >= 2,
                         40)
                self.wait_ready("service-app dev after restart", url, worker_dev)
                self.r.check("service-app dev: worker restarted after a file change (as uid 10001)", True)
            except Exception as exc:  # noqa: BLE001
                self.r.check("service-app dev: worker restarted after a file change (as uid 10001)", False,
                             f"{exc}\n" + "\n".join(self.docker.logs(worker_dev).splitlines()[-20:]))
        self.docker("stop", "-t", str(STOP_TIMEOUT), worker_dev, check=False, timeout=STOP_TIMEOUT + 30)
        code = self.docker.inspect(worker_dev)["State"]["ExitCode"]
        self.r.check("service-app dev: docker stop -> exit 0 through dev-reload", code == 0, f"exit={code}")

    # -- driver
    def run(self) -> int:
        t0 = time.monotonic()
        try:
            self.docker.cleanup_stale()
            self.check_image_metadata()
            self.start_stack()
            if self.stack_ok:
                self.check_processes(self.api_c, "main-app", min_procs=4)  # tini, master, 2 workers
                self.check_processes(self.worker1, "service-app", min_procs=2)  # tini, worker
                self.check_read_only(self.api_c, "main-app")
                self.check_read_only(self.worker1, "service-app")
                self.check_jobs()
                self.check_metrics()
                self.check_drain()
                self.check_api_stop()
            if not self.args.skip_dev:
                self.check_dev_images()
        except Exception:  # noqa: BLE001
            self.r.check("test driver ran to the end", False, traceback.format_exc())
        finally:
            self.docker.save_logs_and_remove()
            self.rabbit.stop()
            self.redis.stop()
            rabbit_logs = self.rabbit.dir / "log"
            if rabbit_logs.exists():
                shutil.copytree(rabbit_logs, self.report_dir / "rabbitmq-log", dirs_exist_ok=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
        summary = self.report_dir / "summary.txt"
        lines = [f"PASS {p}" for p in self.r.passed] + [f"FAIL {f}" for f in self.r.failed]
        lines += [f"image {i} {s:.1f} MB {n} layers" for i, s, n in getattr(self, "sizes", [])]
        summary.write_text("\n".join(lines) + "\n")
        print(f"\n(logs and summary in {self.report_dir}/; {time.monotonic() - t0:.0f}s)")
        for line in self.r.failed:
            print(f"FAILED: {line.splitlines()[0]}")
        print(f"test-images: {len(self.r.passed)} passed, {len(self.r.failed)} failed")
        return 1 if self.r.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main-image", default="main-app:local")
    parser.add_argument("--service-image", default="service-app:local")
    parser.add_argument("--docker", default="docker")
    parser.add_argument("--report-dir", default="reports/images")
    parser.add_argument("--skip-dev", action="store_true", help="skip the dev-target checks")
    args = parser.parse_args()
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in report_dir.glob(f"{LABEL}-*.log"):  # logs of earlier runs
        old.unlink()
    shutil.rmtree(report_dir / "rabbitmq-log", ignore_errors=True)
    # A CI timeout or Ctrl-C still removes the containers and stops the private
    # RabbitMQ/Redis (the `finally` in ImageTest.run).
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    return ImageTest(args).run()


if __name__ == "__main__":
    sys.exit(main())
