"""main-app's gunicorn workers each listen on a socket of their own (SO_REUSEPORT), so that the
kernel spreads connections over them. On one shared socket, whichever worker woke first
accepted: a burst of keep-alive connections could all land on one worker, which then served
alone, bound by its GIL, while the other idled (docs/performance.md)."""

import os
import socket
import time
from pathlib import Path

import pytest
import requests

from conftest import TOKEN
from jobs_devtools import stack
from jobs_devtools.stack import app_env, free_port

LISTEN, ESTABLISHED = "0A", "01"
BODY = b'{"type":"echo"}'
REQUEST = (b"POST /jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + TOKEN.encode()
           + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)


def tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of this network namespace's TCP sockets on local `port` in `state`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def listening(port: int, count: int, timeout: float = 15) -> set[int]:
    """The port's listening sockets, once there are `count` (a ready answer from one worker says
    nothing about the other, which opens its socket when it is ready itself)."""
    deadline = time.monotonic() + timeout
    while len(found := tcp_sockets(port, LISTEN)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_each_worker_listens_on_its_own_socket(rabbit, redis_node, redis_client, amqp, start_api):
    api = start_api(rabbit.url, redis_node.url, GUNICORN_WORKERS="2")
    sockets = listening(port_of(api.url), 2)
    workers = api.proc.children()
    held = {pid: socket_inodes(pid) & sockets for pid in workers}
    assert len(workers) == 2 and len(sockets) == 2, (workers, sockets)
    assert sorted(len(inodes) for inodes in held.values()) == [1, 1], held
    assert held[workers[0]] != held[workers[1]]
    assert not socket_inodes(api.proc.pid) & sockets  # the master accepts nothing


def test_kept_alive_connections_are_spread_over_the_workers(rabbit, redis_node, redis_client, amqp, start_api):
    """A sanity check of the outcome: on a quiet machine a shared socket usually spreads them too
    (its 16/0 splits came under load); the test above is what tells the two apart."""
    api = start_api(rabbit.url, redis_node.url, GUNICORN_WORKERS="2")
    port = port_of(api.url)
    assert len(listening(port, 2)) == 2
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
    try:
        for connection in connections:  # all opened at once, as a client pool does; each then used
            connection.sendall(REQUEST)
        for connection in connections:
            assert connection.recv(65536).startswith(b"HTTP/1.1 202"), "not accepted"
        established = tcp_sockets(port, ESTABLISHED)
        per_worker = [len(socket_inodes(pid) & established) for pid in api.proc.children()]
    finally:
        for connection in connections:
            connection.close()
    # The kernel hashes each connection to a worker's socket: all 32 on one of two workers
    # would happen once in 2**31 runs.
    assert sum(per_worker) == 32 and min(per_worker) > 0, per_worker


def test_a_single_worker_keeps_the_masters_socket(rabbit, redis_node, redis_client, amqp, start_api):
    """With one worker there is nothing to spread, and the master's socket keeps connections
    waiting while that worker restarts (dev's --reload)."""
    api = start_api(rabbit.url, redis_node.url, GUNICORN_WORKERS="1")
    sockets = tcp_sockets(port_of(api.url), LISTEN)
    assert len(sockets) == 1
    assert socket_inodes(api.proc.pid) & sockets


def test_a_worker_opens_its_socket_only_once_ready(redis_node, tmp_path):
    """A worker still waiting for RabbitMQ (here: unreachable, for STARTUP_BROKER_WAIT_SECONDS)
    has no socket on the port, so the kernel hands its share of connections to no worker that
    cannot serve them; once the wait is over it listens, and answers 503 to submissions."""
    unreachable = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    api = stack.start_api(app_env(unreachable, redis_node.url, API_TOKENS=TOKEN, GUNICORN_WORKERS="2",
                                  STARTUP_BROKER_WAIT_SECONDS="6"), tmp_path)
    port = port_of(api.url)
    try:
        deadline = time.monotonic() + 30
        while len(api.proc.children()) < 2:
            assert time.monotonic() < deadline and api.proc.alive(), api.proc.output()[-2000:]
            time.sleep(0.1)
        time.sleep(1.5)  # both loading the app or waiting for the broker: past where gunicorn binds
        assert tcp_sockets(port, LISTEN) == set()
        assert "RabbitMQ not reachable yet" not in api.proc.output()  # still within the wait
        api.wait_ready("/healthz", 30)
        assert len(listening(port, 2)) == 2
        answer = requests.post(f"{api.url}/jobs", json={"type": "echo"}, headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=10)
        assert answer.status_code == 503
    finally:
        api.stop()


@pytest.mark.parametrize("other_reuses_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_stops_gunicorn_at_once(redis_node, tmp_path, other_reuses_port):
    """Each worker binds its own socket: without the master's check a taken port would only make
    workers fail one after another, and another SO_REUSEPORT server would share our connections."""
    other = socket.socket()
    if other_reuses_port:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    api = stack.start_api(app_env("amqp://127.0.0.1:1/", redis_node.url, API_TOKENS=TOKEN, GUNICORN_WORKERS="2"),
                          tmp_path, port=port)
    try:
        assert api.proc.wait(20) == 1
        assert f"127.0.0.1:{port} is already in use" in api.proc.output()
    finally:
        api.stop()
        other.close()
