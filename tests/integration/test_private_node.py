"""A private RabbitMQ node leaves no process behind: Erlang's port mapper (epmd), which the first
node on a machine starts and which outlives it, is ended by the node that started it, and left
alone when it was there before (the machine's own, or another stack's)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from jobs_devtools.stack import RabbitNode, free_port

pytestmark = pytest.mark.slow


def _epmd_answers() -> bool:
    """Whether an epmd listens on this test's port (ERL_EPMD_PORT, set by the fixture)."""
    return subprocess.run(["epmd", "-names"], capture_output=True).returncode == 0


@pytest.fixture
def own_epmd_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A port of this test's own for epmd: the session's node keeps the default one busy."""
    shutil.which("epmd") or pytest.fail("epmd missing: `make services-deps`")
    port = free_port()
    monkeypatch.setenv("ERL_EPMD_PORT", str(port))
    monkeypatch.setenv("ERL_EPMD_ADDRESS", "127.0.0.1")
    yield port
    subprocess.run(["epmd", "-kill"], capture_output=True)  # whatever a failed test left


def test_a_node_that_started_epmd_ends_it_when_it_stops(own_epmd_port: int, tmp_path: Path):
    assert not _epmd_answers()
    node = RabbitNode(tmp_path / "rabbitmq", name=f"jobs-epmd-{os.getpid()}")
    node.start()
    assert _epmd_answers()  # the node brought it up
    node.stop()
    assert not _epmd_answers()


def test_a_node_killed_ends_the_epmd_it_started(own_epmd_port: int, tmp_path: Path):
    node = RabbitNode(tmp_path / "rabbitmq", name=f"jobs-epmd-{os.getpid()}")
    node.start()
    assert _epmd_answers()
    node.kill()
    assert not _epmd_answers()


def test_a_node_leaves_an_epmd_that_was_there_before_it(own_epmd_port: int, tmp_path: Path):
    subprocess.run(["epmd", "-daemon"], check=True)
    assert _epmd_answers()
    node = RabbitNode(tmp_path / "rabbitmq", name=f"jobs-epmd-{os.getpid()}")
    node.start()
    node.stop()
    assert _epmd_answers()
