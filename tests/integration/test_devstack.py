"""`make run` (jobs_devtools.devstack): the stack comes up ready, and Ctrl-C stops every process
of it gracefully; none is left to honcho's SIGKILL (RabbitMQ takes longer than honcho's 5 s)."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from jobs_devtools import devstack
from jobs_devtools.stack import wait_http


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_the_local_stack_starts_ready_and_ctrl_c_stops_every_process_gracefully(tmp_path):
    ports = [8000, 9100, *(devstack.PORTS[name] for name in ("amqp", "management", "redis"))]
    if any(_in_use(port) for port in ports):
        pytest.skip("a local stack (make run) is already using its ports")
    proc = subprocess.Popen([sys.executable, "-m", "jobs_devtools.devstack", "run", "--workers", "1",
                             "--run-dir", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_http(f"{devstack.API}/readyz", 120, interval=0.5)
        assert proc.poll() is None, "the stack exited"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        output, _ = proc.communicate(timeout=devstack.STOP_GRACE_SECONDS + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    stopped = dict(re.findall(r"system\s+\| (\S+) stopped \(rc=(-?\d+)\)", output))
    assert set(stopped) >= {"api.1", "worker.1", "rabbitmq.1", "redis.1"}, output[-3000:]
    assert "SIGKILL" not in output, output[-3000:]
    assert all(stopped[name] == "0" for name in ("api.1", "worker.1", "rabbitmq.1", "redis.1")), stopped
