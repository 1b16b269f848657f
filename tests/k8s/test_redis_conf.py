"""Run the machine's redis-server with the exact arguments of the redis StatefulSet
(only the password, data directory and port substituted) and check what they set; run
the readiness probe's redis-cli command against it the way the kubelet would."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time

import pytest

from conftest import find, pod_spec
from jobs_devtools.stack import RedisNode


@pytest.mark.parametrize("overlay", ["ci", "prod"])
def test_redis_arguments_and_probe(rendered, overlay, tmp_path):
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if not (server and cli):
        pytest.fail("redis-server/redis-cli missing: `make services-deps`")
    (container,) = pod_spec(find(rendered[overlay], "StatefulSet", "redis"))["containers"]
    password = secrets.token_hex(16)
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]
    args[args.index("--dir") + 1] = str(tmp_path)
    node = RedisNode(tmp_path, args=args)
    node.start()
    port, proc = node.port, node.process
    try:
        env = {**os.environ, "REDISCLI_AUTH": password}
        deadline = time.monotonic() + 15
        out = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                [cli, "-p", str(port), "-h", "127.0.0.1", "ping"], env=env, capture_output=True, text=True
            ).stdout
            if "PONG" in out or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, node.output()
        assert "PONG" in out

        def config(name):
            res = subprocess.run([cli, "-p", str(port), "config", "get", name], env=env, capture_output=True, text=True)
            return res.stdout.split()[1]

        assert config("appendonly") == "yes"
        assert config("maxmemory-policy") == "noeviction"
        assert config("dir") == str(tmp_path)
        noauth = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True)
        assert "NOAUTH" in noauth.stdout + noauth.stderr
        # --requirepass is an argument, yet not in /proc/<pid>/cmdline once the server has started:
        # redis-server overwrites its arguments with its process title. (It is still in the
        # container's environment and spec, as any Secret passed as an environment variable is.)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert password.encode() not in cmdline.read()
        # The readiness probe, pointed at this port.
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["sh", "-c"]
        script = re.sub(r"redis-cli", f"{cli} -p {port}", probe[2])
        assert subprocess.run(["sh", "-c", script], env=env).returncode == 0
        names = {e["name"] for e in container["env"]}
        assert "REDISCLI_AUTH" in names
    finally:
        node.stop()
