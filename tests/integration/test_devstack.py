"""`make run` (jobs_devtools.devstack): the stack comes up ready, and Ctrl-C stops every process
of it gracefully: a job running at that moment finishes and its outcome is recorded, the nodes
stop after the apps, and none is left to a SIGKILL."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import redis
import requests

from conftest import TOKEN
from jobs_contract import JobStore
from jobs_devtools import devstack
from jobs_devtools.stack import RedisNode, free_port, wait_http


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_the_local_stack_starts_ready_and_ctrl_c_stops_every_process_gracefully(tmp_path):
    ports = [8000, 9100, *(devstack.PORTS[name] for name in ("amqp", "management", "redis"))]
    if any(_in_use(port) for port in ports):
        pytest.skip("a local stack (make run) is already using its ports")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jobs_devtools.devstack", "run", "--workers", "1",
                             "--run-dir", str(run_dir)], env={**os.environ, "API_TOKENS": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_http(f"{devstack.API}/readyz", 120, interval=0.5)
        assert proc.poll() is None, "the stack exited"
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700  # its files hold the dev credentials
        job_id = _submit_and_wait_running({"type": "sleep", "payload": {"seconds": 3}})
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        output, _ = proc.communicate(timeout=devstack.STOP_GRACE_SECONDS + 90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    stopped = dict(re.findall(r"system\s+\| (\S+) stopped \(rc=(-?\d+)\)", output))
    assert set(stopped) >= {"api.1", "worker.1"}, output[-3000:]
    assert "SIGKILL" not in output, output[-3000:]
    assert all(stopped[name] == "0" for name in ("api.1", "worker.1")), stopped
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]  # honcho's answer to a Ctrl-C, as before
    # The running job was finished and settled, not cut off: the nodes were still up while the worker drained.
    assert "unsettled" not in output and "unavailable" not in output, output[-3000:]
    assert output.index("worker.1 stopped") < output.index("stopping Redis and RabbitMQ"), output[-3000:]
    assert "RabbitMQ and Redis stopped" in output, output[-3000:]
    assert _record_after_the_stack_stopped(run_dir, job_id)["status"] == "succeeded"


def _submit_and_wait_running(job: dict) -> str:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(f"{devstack.API}/jobs", json=job, headers=auth, timeout=10)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 30
    while requests.get(f"{devstack.API}/jobs/{job_id}", headers=auth, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)
    return job_id


def _record_after_the_stack_stopped(run_dir, job_id: str) -> dict:
    """The job's record, from the dev stack's Redis data started again (append-only file)."""
    node = RedisNode(run_dir / "redis", port=free_port()).start()
    try:
        return JobStore(redis.Redis.from_url(node.url)).get(job_id)
    finally:
        node.stop()
