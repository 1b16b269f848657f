"""Ports for private servers (scripts/stack.py): never one an outgoing connection can take meanwhile."""

import socket

from jobs_devtools import stack


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_free_ports_lie_below_the_ephemeral_and_the_nodeport_ranges_and_are_free():
    low, _ = stack.ephemeral_port_range()
    ports = {stack.free_port() for _ in range(50)}
    assert all(20_000 <= port < min(low, 30_000) for port in ports), (low, sorted(ports))
    assert not ports & stack.SYSTEM_PORTS
    assert all(_bindable(port) for port in ports)
    assert len(ports) > 40  # drawn at random, not the same few


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(stack, "ephemeral_port_range", lambda: (32768, 60999))
        draws = iter([port, port, port - 1, port - 2])
        monkeypatch.setattr(stack.secrets, "choice", lambda _ports: next(draws))
        assert stack.free_port() in (port - 1, port - 2)  # the listening port is drawn twice, and skipped


def test_without_room_below_the_range_any_free_port_will_do(monkeypatch):
    monkeypatch.setattr(stack, "ephemeral_port_range", lambda: (1024, 65000))
    port = stack.free_port()
    assert 1024 <= port <= 65535 and _bindable(port)


def test_the_ephemeral_range_is_read_from_the_kernel_with_linux_default_as_fallback(tmp_path):
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert stack.ephemeral_port_range(setting) == (40000, 50000)
    assert stack.ephemeral_port_range(tmp_path / "missing") == (32768, 60999)
