"""main-app's gunicorn workers each listen on a socket of their own (SO_REUSEPORT), so that the
kernel spreads connections over them. On one shared socket, whichever worker woke first
accepted: a burst of keep-alive connections could all land on one worker, which then served
alone, bound by its GIL, while the other idled (docs/performance.md)."""

import os
import socket
from pathlib import Path

from conftest import TOKEN

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
    listening = tcp_sockets(port_of(api.url), LISTEN)
    workers = api.proc.children()
    held = {pid: socket_inodes(pid) & listening for pid in workers}
    assert len(workers) == 2 and len(listening) == 2, (workers, listening)
    assert sorted(len(inodes) for inodes in held.values()) == [1, 1], held
    assert held[workers[0]] != held[workers[1]]
    assert not socket_inodes(api.proc.pid) & listening  # the master accepts nothing


def test_kept_alive_connections_are_spread_over_the_workers(rabbit, redis_node, redis_client, amqp, start_api):
    api = start_api(rabbit.url, redis_node.url, GUNICORN_WORKERS="2")
    port = port_of(api.url)
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
    listening = tcp_sockets(port_of(api.url), LISTEN)
    assert len(listening) == 1
    assert socket_inodes(api.proc.pid) & listening
