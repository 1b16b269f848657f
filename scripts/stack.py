"""Private RabbitMQ and Redis nodes for the local stack and the tests.

Never the machine's own services: each node gets its own name, ports and data
directory, so tests may kill and restart it. RabbitMQ is started by calling the
scripts in /usr/lib/rabbitmq/bin directly (the /usr/sbin wrappers switch user
and Erlang cookie when run as root).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def ensure_erlang_cookie() -> None:
    """The CLI tools and the node must share $HOME/.erlang.cookie; write it before either starts."""
    cookie = Path.home() / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)


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

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.amqp_port}/%2F"

    def url_for(self, user: str, password: str) -> str:
        from urllib.parse import quote

        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbitmq.pid"

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
            "log.file.level = warning",
        ]
        if self.definitions is not None:
            import json

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
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def foreground_command(self) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmq-server")]

    def start(self, timeout: float = 60.0) -> None:
        ensure_erlang_cookie()
        self.write_config()
        subprocess.run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_started(timeout)

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
        """kill -9 the node, as a crashed pod would die."""
        pid = self.os_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 10)
        self.pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        pid = self.os_pid()
        if pid is None:
            return
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pass
        self.kill()

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
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        # Append-only file: a restarted store keeps its records (a lost record is rebuilt
        # from the message by the worker, but clients would briefly see 404s).
        return [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.base_dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--protected-mode", "yes"]

    def start(self, timeout: float = 15.0) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.base_dir / "redis.log", "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout)

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
