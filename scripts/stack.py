"""The one way to start the system's real processes: ports, HTTP waits, process handles,
private RabbitMQ and Redis nodes, main-app and service-app, and a private stack.

Used by the local stack (`make run`), every test suite (core, chaos, abuse,
observability, images, k8s), the bench and the scaling preview. Standard library
only, so each tool venv can install it (`pip install --no-deps -e scripts`).

Never the machine's own services: each node gets its own name, ports and data
directory, so tests may kill and restart it. RabbitMQ is started by calling the
scripts in /usr/lib/rabbitmq/bin directly (the /usr/sbin wrappers switch user
and Erlang cookie when run as root).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
# The machine's own RabbitMQ/Redis/epmd ports: never handed out, even when free now.
SYSTEM_PORTS = {4369, 5672, 6379, 15672, 15692, 25672}
# main-app's production server: gunicorn with the app's own configuration (the one place it is written).
GUNICORN_CONF = "python:main_app.gunicorn_conf"
API_TARGET = "main_app.wsgi:app"


# ---------------------------------------------------------------- ports and waits


def free_port() -> int:
    """A port free now, from 20000-29999 when that lies below the kernel's ephemeral range. A port of
    that range can become the source port of any outgoing connection (a client's, a node's) before
    the server meant for it binds it, and that server then fails with "address in use": outgoing
    connections never take a port outside it. 30000-32767 is Kubernetes' NodePort range, which a
    sandbox cluster's kube-proxy may route."""
    top = min(30_000, ephemeral_port_range()[0])
    below = range(20_000, top) if top - 20_000 >= 1_000 else None
    for _ in range(200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", secrets.choice(below) if below else 0))
            except OSError:  # taken: draw again
                continue
            port = sock.getsockname()[1]
        if port not in SYSTEM_PORTS:
            return port
    raise RuntimeError("no free port found in 200 draws")


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux's default when unreadable)."""
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process meant to listen on 127.0.0.1:{port} exited ({process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def http_status(url: str, timeout: float = 2) -> int | None:
    """The status of a GET (any status, 4xx/5xx included); None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_http(url: str, timeout: float = 30.0, status: int = 200, *, streak: int = 1, interval: float = 0.1,
              proc: Proc | None = None) -> int:
    """Wait until GET url answers `status` `streak` times in a row (fresh connections: with
    gunicorn each may land on another worker); return that status. TimeoutError after
    `timeout`, RuntimeError at once if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last, run = None, 0
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.returncode}) before {url} answered {status}")
        last = http_status(url)
        run = run + 1 if last == status else 0
        if run >= streak:
            return status
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    """A real process in its own session, its output in log_path."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    name: str = ""
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.args[0]).name

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=ROOT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill9(self) -> None:
        """kill -9 the whole process group, as a crashed pod would die."""
        os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30, group: bool = False) -> int | None:
        """SIGTERM (to the process, or its whole group), then SIGKILL to the group after `timeout`."""
        if not self.alive():
            return self.returncode
        if group:
            os.killpg(self.pid, signal.SIGTERM)
        else:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            return self.process.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []


# ---------------------------------------------------------------- the apps


def app_env(rabbit_url: str, redis_url: str, base: dict[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """An app's environment: `base` (default: this process's) without any RABBITMQ_*, REDIS_*,
    API_TOKENS* or GUNICORN_* setting, the two URLs, INFO logs, unbuffered output, then overrides."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("RABBITMQ_", "REDIS_", "API_TOKENS", "GUNICORN_"))}
    env.update({"RABBITMQ_URL": rabbit_url, "REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def api_command(bin_dir: Path | None = None, *args: str) -> list[str]:
    """gunicorn with main-app's configuration; args: the app (default main-app's) and options."""
    return [str((bin_dir or Path(sys.executable).parent) / "gunicorn"), "--config", GUNICORN_CONF,
            *(args or (API_TARGET,))]


def worker_command(bin_dir: Path | None = None) -> list[str]:
    return [str((bin_dir or Path(sys.executable).parent) / "python"), "-m", "service_app"]


@dataclass
class App:
    """main-app (port: its API) or a service-app worker (port None) as a real process."""

    proc: Proc
    metrics_port: int
    port: int | None = None

    @property
    def url(self) -> str:
        """The API of main-app; a worker's /healthz, /readyz and /metrics."""
        return f"http://127.0.0.1:{self.port or self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, path: str = "/readyz", timeout: float = 30, streak: int = 1, interval: float = 0.1) -> App:
        """Wait for `path`; on failure stop the app and raise AssertionError with its log."""
        try:
            wait_http(self.url + path, timeout, streak=streak, interval=interval, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.proc.stop()
            raise AssertionError(f"{self.proc.name} did not start ({exc}):\n{self.proc.output()[-5000:]}") from None
        return self

    def stop(self, timeout: float = 30, group: bool = False) -> int | None:
        return self.proc.stop(timeout, group)


def start_api(env: dict[str, str], work: Path, *, name: str = "main-app", bin_dir: Path | None = None,
              args: tuple[str, ...] = (), port: int | None = None, metrics_port: int | None = None) -> App:
    """main-app (or `args`: another app and gunicorn options) under gunicorn with main-app's
    configuration, listening on free ports of 127.0.0.1; not waited for (App.wait_ready)."""
    port, metrics_port = port or free_port(), metrics_port or free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(work / f"prom-{name}-{port}"), **env,
           "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), "METRICS_HOST": "127.0.0.1",
           "METRICS_PORT": str(metrics_port)}
    proc = Proc(api_command(bin_dir, *args), env, work / f"{name}-{port}.log", name).start()
    return App(proc, metrics_port, port)


def start_worker(env: dict[str, str], work: Path, *, name: str = "service-app", bin_dir: Path | None = None,
                 metrics_port: int | None = None) -> App:
    """A service-app worker with its metrics and probes on a free port; not waited for."""
    metrics_port = metrics_port or free_port()
    env = {**env, "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port)}
    return App(Proc(worker_command(bin_dir), env, work / f"{name}-{metrics_port}.log", name).start(), metrics_port)


# ---------------------------------------------------------------- private nodes


def ensure_erlang_cookie() -> None:
    """The CLI tools and the node must share $HOME/.erlang.cookie; write it before either starts."""
    cookie = Path.home() / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)


def servers_installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("redis-server") is not None


@dataclass
class RabbitNode:
    base_dir: Path
    name: str = "jobs-test"
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    management_port: int | None = None
    user: str = field(default_factory=lambda: "dev-" + secrets.token_hex(3))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    plugins: tuple[str, ...] = ("rabbitmq_prometheus",)
    # A definitions document (users, permissions, topology) loaded at every boot.
    definitions: dict | None = None
    log_level: str = "warning"
    # Whether starting this node also started Erlang's port mapper (epmd), which outlives the
    # nodes that started it: stop() and kill() then end it, once no node is registered with it.
    _owns_epmd: bool = field(default=False, init=False, repr=False)

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return self.url_for(self.user, self.password)

    def url_for(self, user: str, password: str) -> str:
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbitmq.pid"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    def write_config(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            f"default_user = {self.user}",
            f"default_pass = {self.password}",
            "loopback_users = none",
            f"prometheus.tcp.port = {self.prometheus_port}",
            "prometheus.tcp.ip = 127.0.0.1",
            "log.console = false",
            f"log.file.level = {self.log_level}",
        ]
        if self.definitions is not None:
            path = self.base_dir / "definitions.json"
            path.write_text(json.dumps(self.definitions))
            path.chmod(0o600)
            lines.append(f"load_definitions = {path}")
        if self.management_port:
            lines += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("# private node: ignore /etc/rabbitmq/rabbitmq-env.conf\n")
        (self.base_dir / "advanced.config").write_text("[].\n")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 60.0) -> RabbitNode:
        ensure_erlang_cookie()
        self.write_config()
        self._owns_epmd = not self._epmd("-names")
        subprocess.run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_started(timeout)
        return self

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ node {self.nodename} wrote no pid file")
            time.sleep(0.1)
        self.ctl("wait", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 5)
        wait_for_port(self.amqp_port, timeout)

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        result = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *args], env=self.env(),
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
        return result.stdout

    def os_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """kill -9 the node, as a crashed pod would die (and end the epmd its start brought up)."""
        pid = self.os_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        if self._owns_epmd:
            # epmd itself refuses while any node (another stack's, the machine's) is registered; it
            # may also take a moment to see that this one's connection closed.
            deadline = time.monotonic() + 1.0
            while not self._epmd("-kill") and time.monotonic() < deadline:
                time.sleep(0.1)
            self._owns_epmd = False

    def stop(self) -> None:
        pid = self.os_pid()
        if pid is None:
            return
        try:
            self.ctl("stop", str(self.pid_file), timeout=60)  # returns once the node's process has exited
        except Exception:
            pass
        self.kill()

    def _epmd(self, *args: str) -> bool:
        """`epmd ARGS` with this node's environment (its epmd address and port): True if it succeeded."""
        epmd = shutil.which("epmd")
        if epmd is None:
            return False
        return subprocess.run([epmd, *args], env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacked) messages in a queue."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                       "messages_unacknowledged")
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == queue:
                return int(parts[1]), int(parts[2])
        return 0, 0


@dataclass
class RedisNode:
    base_dir: Path
    port: int = field(default_factory=free_port)
    # Server arguments instead of the private node's own (e.g. a StatefulSet's); the port,
    # the address and the foreground mode are added.
    args: list[str] | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        server = shutil.which("redis-server") or "redis-server"
        if self.args is not None:
            return [server, *self.args, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no"]
        # Append-only file: a restarted store keeps its records (a lost record is rebuilt
        # from the message by the worker, but clients would briefly see 404s).
        return [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.base_dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "yes"]

    def start(self, timeout: float = 15.0) -> RedisNode:
        """In its own session, like every server started here (Proc): a Ctrl-C in the caller's
        terminal does not reach it (the caller stops it when it is done), and the kernel's
        autogroup schedules it apart from the caller, e.g. the benchmark's load generator,
        as its own pod would be."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.base_dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.process)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.output()[-3000:]}") from None
        return self

    def output(self) -> str:
        return (self.base_dir / "redis.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# ---------------------------------------------------------------- a private stack


class PrivateStack:
    """Private RabbitMQ and Redis nodes under `work`, and the apps started on them; a context
    manager: the nodes start on entry, and on exit every app is stopped, Redis stopped and
    RabbitMQ killed (its data is thrown away)."""

    def __init__(self, work: Path, name: str, **rabbit: object):
        self.work = work
        self.rabbit = RabbitNode(work / "rabbitmq", name=name, **rabbit)
        self.redis = RedisNode(work / "redis")
        self.apps: list[App] = []

    def __enter__(self) -> PrivateStack:
        try:
            self.rabbit.start()
            self.redis.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for app in self.apps:
            app.stop()
        self.redis.stop()
        self.rabbit.kill()

    def env(self, **overrides: str) -> dict[str, str]:
        return app_env(self.rabbit.url, self.redis.url, **overrides)

    def api(self, env: dict[str, str] | None = None, **kwargs) -> App:
        """main-app (see start_api) on this stack, stopped with it."""
        app = start_api(self.env() if env is None else env, self.work, **kwargs)
        self.apps.append(app)
        return app

    def worker(self, env: dict[str, str] | None = None, **kwargs) -> App:
        """A service-app worker (see start_worker) on this stack, stopped with it."""
        app = start_worker(self.env() if env is None else env, self.work, **kwargs)
        self.apps.append(app)
        return app
