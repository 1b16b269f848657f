"""Prove the main-app and service-app images with a real Docker engine.

Run by `make test-images` (pytest, the app venv) after the images are built
(production targets as --main-image/--service-image, dev targets as <image>-dev).

What it does, against a PRIVATE RabbitMQ node and a PRIVATE Redis
(jobs_devtools.stack.PrivateStack: own ports and data dirs; the machine's system
RabbitMQ/Redis are never touched):
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

Prints one PASS/FAIL line per check; a test fails with every failed check of its
own. Container and broker logs and summary.txt go to --report-dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageslib import LABEL, Checks
from jobs_devtools.stack import PrivateStack, free_port

UID = 10001
TOKEN = "images-test-token-0123456789abcdef"
MAX_ATTEMPTS = 3
SHUTDOWN_GRACE_SECONDS = 25
STOP_TIMEOUT = 40  # like terminationGracePeriodSeconds in k8s

pytestmark = pytest.mark.timeout(600)


def log(msg: str) -> None:
    print(f"[test-images] {msg}", flush=True)


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


# --------------------------------------------------------------------------- the suite
class Images:
    """The engine, the private nodes, the images under test and the containers started."""

    def __init__(self, config: pytest.Config, docker: Docker, stack: PrivateStack, check: Checks):
        self.main_image = config.getoption("--main-image")
        self.service_image = config.getoption("--service-image")
        self.docker = docker
        self.stack = stack
        self.check = check
        self.ports: dict[str, int] = {}
        self.stack_ok = False

    def depths(self) -> dict[str, tuple[int, int]]:
        return {queue: self.stack.rabbit.queue_counts(queue) for queue in ("jobs", "jobs.dead")}

    def port(self, name: str) -> int:
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    def common_env(self) -> dict[str, str]:
        return {
            "RABBITMQ_URL": self.stack.rabbit.url,
            "REDIS_URL": self.stack.redis.url,
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
            return self.check(f"{what}: /readyz 200", True)
        except Exception as exc:  # noqa: BLE001
            tail = "\n".join(self.docker.logs(cname).splitlines()[-30:])
            return self.check(f"{what}: /readyz 200", False, f"{exc}\n{tail}")

    def submit(self, api: str, job_type: str, payload: dict) -> str | None:
        status, body = http("POST", f"{api}/jobs", {"type": job_type, "payload": payload})
        ok = status == 202 and isinstance(body, dict) and "id" in body
        self.check(f"POST /jobs {job_type} -> 202", ok, "" if ok else f"{status} {body}")
        return body["id"] if ok else None

    def job(self, api: str, job_id: str) -> dict:
        status, body = http("GET", f"{api}/jobs/{job_id}")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"GET /jobs/{job_id}: {status} {body}")
        return body

    def wait_final(self, api: str, job_id: str, timeout: float) -> dict:
        return wait_for(f"job {job_id} final", lambda: (lambda j: j if j["status"] in ("succeeded", "failed")
                                                        else None)(self.job(api, job_id)), timeout)

    def start_stack(self) -> None:
        self.api = f"http://127.0.0.1:{self.port('api')}"
        self.api_c = self.docker.start("api", self.main_image,
                                       self.api_env(self.port("api"), self.port("api-metrics")))
        self.worker1 = self.docker.start("worker1", self.service_image,
                                         self.worker_env(self.port("worker1-metrics")))
        self.stack_ok = all([
            self.wait_ready("main-app", f"{self.api}/readyz", self.api_c),
            self.wait_ready("service-app", f"http://127.0.0.1:{self.port('worker1-metrics')}/readyz", self.worker1),
        ])

    def check_processes(self, cname: str, what: str, min_procs: int) -> None:
        out = self.docker("top", cname, "-eo", "uid,gid,pid,args").stdout.strip().splitlines()
        procs = [line.split(None, 3) for line in out[1:]]
        bad = [p for p in procs if p[0] != str(UID) or p[1] != str(UID)]
        self.check(f"{what}: all {len(procs)} processes run as uid/gid {UID}", not bad and len(procs) >= min_procs,
                     "; ".join(" ".join(p) for p in procs))
        pid1 = self.docker("exec", cname, "cat", "/proc/1/cmdline").stdout.replace("\0", " ").strip()
        self.check(f"{what}: PID 1 is tini", pid1.startswith("/usr/bin/tini"), pid1)

    def check_read_only(self, cname: str, what: str) -> None:
        host = self.docker.inspect(cname)["HostConfig"]
        self.check(f"{what}: started with --read-only and tmpfs /tmp",
                     host.get("ReadonlyRootfs") is True and "/tmp" in (host.get("Tmpfs") or {}))
        probe = ("import errno, os\n"
                 "for p in ('/opt/venv/probe', '/probe', '/etc/probe'):\n"
                 "    try:\n        open(p, 'w').close(); print('WROTE', p)\n"
                 "    except OSError as e:\n        print('DENIED', p, errno.errorcode[e.errno])\n"
                 "open('/tmp/probe', 'w').close(); os.remove('/tmp/probe'); print('TMP-OK')\n")
        for user in (str(UID), "0"):
            out = self.docker("exec", "-u", user, cname, "python3", "-c", probe, check=False).stdout
            denied = out.count("DENIED")
            self.check(f"{what}: root filesystem read-only (EROFS) even for uid {user}, /tmp writable",
                         "WROTE" not in out and denied == 3 and out.count("EROFS") == 3 and "TMP-OK" in out,
                         out.strip().replace("\n", "; "))


@pytest.fixture(scope="module")
def images(request, report_dir, stack, checks) -> Iterator[Images]:
    docker = Docker(request.config.getoption("--docker"), str(os.getpid()), report_dir)
    docker.cleanup_stale()
    try:
        yield Images(request.config, docker, stack, checks)
    finally:
        docker.save_logs_and_remove()


def need_stack(images: Images) -> None:
    if not images.stack_ok:
        pytest.skip("main-app and service-app containers did not become ready")


def test_image_metadata(images: Images, check: Checks) -> None:
    log("image metadata")
    rows = []
    for image in (images.main_image, images.service_image):
        info = images.docker.inspect(image, "image")
        cfg = info["Config"]
        labels = cfg.get("Labels") or {}
        images.check(f"{image}: USER is 10001:10001", cfg.get("User") == f"{UID}:{UID}", cfg.get("User"))
        images.check(f"{image}: exec-form ENTRYPOINT tini", cfg.get("Entrypoint") == ["/usr/bin/tini", "--"],
                     str(cfg.get("Entrypoint")))
        missing = [k for k in ("source", "revision", "version")
                   if not labels.get(f"org.opencontainers.image.{k}")]
        images.check(f"{image}: OCI labels source/revision/version", not missing,
                     ", ".join(f"{k}={labels.get('org.opencontainers.image.' + k)}"
                               for k in ("source", "revision", "version")))
        size_mb = info["Size"] / 1e6
        layers = len(info["RootFS"]["Layers"])
        rows.append((image, size_mb, layers))
    print("\nRuntime images (size as reported by the engine, uncompressed):")
    for image, size_mb, layers in rows:
        print(f"  {image:<32} {size_mb:7.1f} MB  {layers:2d} layers")
    print()
    images.check.sizes = rows
    check.verify()


def test_containers_become_ready(images: Images, check: Checks) -> None:
    images.start_stack()
    check.verify()


@pytest.mark.parametrize("container, what, min_procs", [("api_c", "main-app", 4), ("worker1", "service-app", 2)])
def test_processes_run_as_the_image_user_under_tini(images: Images, check: Checks, container, what, min_procs):
    need_stack(images)  # main-app: tini, master, 2 workers; service-app: tini, worker
    images.check_processes(getattr(images, container), what, min_procs)
    check.verify()


@pytest.mark.parametrize("container, what", [("api_c", "main-app"), ("worker1", "service-app")])
def test_root_filesystem_read_only(images: Images, check: Checks, container, what):
    need_stack(images)
    images.check_read_only(getattr(images, container), what)
    check.verify()


def test_one_job_of_every_type(images: Images, check: Checks) -> None:
    need_stack(images)
    log("one job of every type")
    cases = [
        ("echo", {"hello": "images"}, "succeeded", None),
        ("sleep", {"seconds": 1}, "succeeded", None),
        ("cpu", {"ms": 200}, "succeeded", None),
        ("fail", {"message": "boom"}, "failed", MAX_ATTEMPTS),
        ("flaky", {"fail_times": 1}, "succeeded", 2),
    ]
    ids = [(t, images.submit(images.api, t, p), want, attempts) for t, p, want, attempts in cases]
    for job_type, job_id, want, attempts in ids:
        if job_id is None:
            continue
        try:
            job = images.wait_final(images.api, job_id, 60)
        except Exception as exc:  # noqa: BLE001
            images.check(f"job {job_type} -> {want}", False, str(exc))
            continue
        detail = f"status={job['status']} attempts={job.get('attempts')}"
        ok = job["status"] == want and (attempts is None or str(job.get("attempts")) == str(attempts))
        images.check(f"job {job_type} -> {want}" + (f" after {attempts} attempts" if attempts else ""), ok, detail)
    check.verify()


def test_metrics(images: Images, check: Checks) -> None:
    need_stack(images)
    status, body = http("GET", f"http://127.0.0.1:{images.port('api-metrics')}/metrics", token=None)
    images.check("main-app metrics port serves jobs_api_* (multiprocess dir on tmpfs)",
                 status == 200 and "jobs_api_jobs_accepted_total" in str(body), f"HTTP {status}")
    files = images.docker("exec", images.api_c, "ls", "/tmp/main-app-metrics", check=False).stdout.split()
    images.check("main-app PROMETHEUS_MULTIPROC_DIR=/tmp/main-app-metrics holds .db files",
                 any(f.endswith(".db") for f in files), " ".join(files[:6]))
    status, body = http("GET", f"http://127.0.0.1:{images.port('worker1-metrics')}/metrics", token=None)
    images.check("service-app metrics port serves jobs_worker_*",
                 status == 200 and "jobs_worker_jobs_processed_total" in str(body), f"HTTP {status}")
    check.verify()


def test_worker_drains_on_docker_stop(images: Images, check: Checks) -> None:
    need_stack(images)
    log("docker stop of a worker with jobs in flight")
    # worker1 runs 2 jobs at a time: two long sleeps occupy it, two short ones wait.
    long_ids = [images.submit(images.api, "sleep", {"seconds": 5}) for _ in range(2)]
    try:
        wait_for("both long jobs running",
                 lambda: all(images.job(images.api, i)["status"] == "running" for i in long_ids if i), 20)
    except Exception as exc:  # noqa: BLE001
        images.check("drain: long jobs started", False, str(exc))
        check.verify()  # fails the test: the drain cannot be checked without them
    short_ids = [images.submit(images.api, "sleep", {"seconds": 0.2}) for _ in range(2)]
    time.sleep(0.5)  # let the broker deliver (prefetch) them to the busy worker
    started = time.monotonic()
    stop = images.docker("stop", "-t", str(STOP_TIMEOUT), images.worker1, check=False, timeout=STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    state = images.docker.inspect(images.worker1)["State"]
    images.check("drain: worker exited 0 after docker stop",
                 stop.returncode == 0 and state["ExitCode"] == 0 and not state.get("OOMKilled"),
                 f"exit={state['ExitCode']}")
    images.check(f"drain: within the grace period (stop took {elapsed:.1f}s < {STOP_TIMEOUT}s, "
                 f"after finishing the in-flight work)", 2.0 < elapsed < STOP_TIMEOUT, f"{elapsed:.1f}s")
    longs = [images.job(images.api, i) for i in long_ids if i]
    images.check("drain: in-flight jobs finished by the stopping worker",
                 all(j["status"] == "succeeded" for j in longs),
                 ", ".join(f"{j['id'][:8]}={j['status']}" for j in longs))
    shorts = [images.job(images.api, i)["status"] for i in short_ids if i]
    # A job the worker had not started is either drained too (succeeded) or
    # handed back to the broker (still queued); never running/failed/lost.
    images.check("drain: jobs not yet started were finished or handed back to the broker",
                 all(s in ("queued", "succeeded") for s in shorts), ", ".join(shorts))
    waiting = shorts.count("queued")
    try:  # queue statistics lag a few seconds behind
        depths = wait_for("queue stats to settle", lambda: (lambda d: d if d.get("jobs") == (waiting, 0)
                                                            else None)(images.depths()), 20, interval=1)
    except TimeoutError:
        depths = images.depths()
    images.check(f"drain: broker holds the {waiting} handed-back job(s), none unacked",
                 depths.get("jobs", (0, 0)) == (waiting, 0), f"jobs ready/unacked={depths.get('jobs')}")
    # A new worker (as after a rollout) picks them up.
    images.worker2 = images.docker.start("worker2", images.service_image,
                                     images.worker_env(images.port("worker2-metrics")))
    images.wait_ready("service-app (second worker)",
                    f"http://127.0.0.1:{images.port('worker2-metrics')}/readyz", images.worker2)
    finals = []
    for job_id in short_ids:
        if job_id:
            try:
                finals.append(images.wait_final(images.api, job_id, 30)["status"])
            except Exception as exc:  # noqa: BLE001
                finals.append(str(exc))
    images.check("drain: the next worker ran them: nothing lost", all(s == "succeeded" for s in finals),
                 ", ".join(finals))
    # Queue statistics lag a few seconds behind (emitted periodically).
    try:
        depths = wait_for("queue stats to settle", lambda: (lambda d: d if d.get("jobs") == (0, 0) else None)(
            images.depths()), 20, interval=1)
    except TimeoutError:
        depths = images.depths()
    images.check("broker: work queue empty at the end, the failed job dead-lettered",
                 depths.get("jobs") == (0, 0) and depths.get("jobs.dead", (0, 0))[0] == 1,
                 f"jobs={depths.get('jobs')} jobs.dead={depths.get('jobs.dead')}")
    check.verify()


def test_api_stops_gracefully(images: Images, check: Checks) -> None:
    need_stack(images)
    started = time.monotonic()
    images.docker("stop", "-t", "30", images.api_c, check=False, timeout=60)
    elapsed = time.monotonic() - started
    code = images.docker.inspect(images.api_c)["State"]["ExitCode"]
    images.check("main-app: docker stop -> graceful exit 0", code == 0 and elapsed < 30,
                 f"exit={code} in {elapsed:.1f}s")
    check.verify()


def test_dev_images(images: Images, check: Checks, pytestconfig: pytest.Config) -> None:
    if pytestconfig.getoption("--skip-dev"):
        pytest.skip("--skip-dev")
    log("dev targets")
    main_dev, svc_dev = f"{images.main_image}-dev", f"{images.service_image}-dev"
    probe = ("import os, importlib\n"
             "for mod, path in (('{app}', '/app/{dir}/{app}'), ('jobs_contract', '/app/contract/jobs_contract')):\n"
             "    m = importlib.import_module(mod)\n"
             "    st = os.stat(path)\n"
             "    print(mod, os.path.dirname(m.__file__), st.st_uid, st.st_gid, os.access(path, os.W_OK))\n")
    for image, app, directory in ((main_dev, "main_app", "main-app"), (svc_dev, "service_app", "service-app")):
        out = images.docker("run", "--rm", "--entrypoint", "python3", image, "-c",
                          probe.format(app=app, dir=directory), check=False).stdout
        lines = [ln.split() for ln in out.strip().splitlines()]
        ok = (len(lines) == 2 and all(len(ln) == 5 and ln[2] == str(UID) and ln[3] == str(UID)
                                      and ln[4] == "True" for ln in lines)
              and lines[0][1] == f"/app/{directory}/{app}" and lines[1][1] == "/app/contract/jobs_contract")
        images.check(f"{image}: code imported from /app, owned and writable by {UID}", ok,
                     out.strip().replace("\n", "; "))
    env = images.docker.inspect(main_dev, "image")["Config"]["Env"]
    images.check(f"{main_dev}: GUNICORN_RELOAD=true", "GUNICORN_RELOAD=true" in env)

    # main-app dev: gunicorn --reload picks up a file changed by the runtime user.
    api_dev = images.docker.start("api-dev", main_dev, images.api_env(images.port("api-dev"),
                                                                  images.port("api-dev-metrics")),
                                read_only=False)
    if images.wait_ready("main-app dev", f"http://127.0.0.1:{images.port('api-dev')}/readyz", api_dev):
        images.docker("exec", api_dev, "sh", "-c",
                    "echo '# touched by test-images' >> /app/main-app/main_app/api.py")
        try:
            wait_for("gunicorn reload", lambda: "reloading" in images.docker.logs(api_dev).lower(), 30)
            images.wait_ready("main-app dev after reload", f"http://127.0.0.1:{images.port('api-dev')}/readyz",
                            api_dev)
            images.check("main-app dev: gunicorn reloaded after a file change (as uid 10001)", True)
        except Exception as exc:  # noqa: BLE001
            images.check("main-app dev: gunicorn reloaded after a file change (as uid 10001)", False, str(exc))

    # service-app dev: dev-reload restarts the worker on a change.
    worker_dev = images.docker.start("worker-dev", svc_dev, images.worker_env(images.port("worker-dev-metrics")),
                                   read_only=False)
    url = f"http://127.0.0.1:{images.port('worker-dev-metrics')}/readyz"
    if images.wait_ready("service-app dev", url, worker_dev):
        images.docker("exec", worker_dev, "sh", "-c",
                    "echo '# touched by test-images' >> /app/service-app/service_app/__init__.py")
        try:
            wait_for("dev-reload restart", lambda: "change detected" in images.docker.logs(worker_dev), 30)
            wait_for("worker restarted", lambda: images.docker.logs(worker_dev).count("[dev-reload] started") >= 2,
                     40)
            images.wait_ready("service-app dev after restart", url, worker_dev)
            images.check("service-app dev: worker restarted after a file change (as uid 10001)", True)
        except Exception as exc:  # noqa: BLE001
            images.check("service-app dev: worker restarted after a file change (as uid 10001)", False,
                         f"{exc}\n" + "\n".join(images.docker.logs(worker_dev).splitlines()[-20:]))
    images.docker("stop", "-t", str(STOP_TIMEOUT), worker_dev, check=False, timeout=STOP_TIMEOUT + 30)
    code = images.docker.inspect(worker_dev)["State"]["ExitCode"]
    images.check("service-app dev: docker stop -> exit 0 through dev-reload", code == 0, f"exit={code}")
    check.verify()


