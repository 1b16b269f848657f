"""`dockerd.sh stop` removes what dockerd leaves behind when it exits: the docker0 bridge and
Docker's iptables rules and chains (`dockerd.sh remove-network`). Checked in a network
namespace of the test's own, holding the rules dockerd creates beside rules of someone else."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "images" / "dockerd.sh"

DOCKER_RULES = {
    "filter": ["-N DOCKER", "-N DOCKER-ISOLATION-STAGE-1", "-N DOCKER-ISOLATION-STAGE-2", "-N DOCKER-USER",
               "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
               "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
               "-A FORWARD -o docker0 -j DOCKER", "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
               "-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2",
               "-A DOCKER-ISOLATION-STAGE-1 -j RETURN", "-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP",
               "-A DOCKER-ISOLATION-STAGE-2 -j RETURN", "-A DOCKER-USER -j RETURN"],
    "nat": ["-N DOCKER", "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
            "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
            "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE", "-A DOCKER -i docker0 -j RETURN"],
}
OTHER_RULES = {"filter": ["-N KEEP-ME", "-A FORWARD -i lo -j KEEP-ME"],
               "nat": ["-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE"]}


def _in(netns: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *command], capture_output=True, text=True, check=check)


def _rules(netns: str, table: str) -> list[str]:
    return _in(netns, "iptables", "-t", table, "-S").stdout.splitlines()


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("iptables") is None or shutil.which("ip") is None:
        pytest.skip("needs root, ip and iptables (a network namespace of its own)")
    name = f"jobs-dockerd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _in(name, "ip", "link", "add", "docker0", "type", "bridge")
        for table, rules in (*DOCKER_RULES.items(), *OTHER_RULES.items()):
            for rule in rules:
                _in(name, "iptables", "-t", table, *rule.split())
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_remove_network_takes_dockers_bridge_and_rules_and_leaves_the_rest(netns):
    result = _in(netns, str(SCRIPT), "remove-network")
    assert "removed docker0" in result.stderr
    for table in ("filter", "nat"):
        left = _rules(netns, table)
        assert not [rule for rule in left if "DOCKER" in rule or "docker0" in rule], left
        assert all(rule in left for rule in OTHER_RULES[table]), left
    assert _in(netns, "ip", "link", "show", "docker0", check=False).returncode != 0


def test_a_running_engines_network_is_left_alone(netns, tmp_path):
    fake = tmp_path / "dockerd"  # a process named dockerd in that namespace
    shutil.copy("/bin/sleep", fake)
    engine = subprocess.Popen(["ip", "netns", "exec", netns, str(fake), "60"])
    try:
        comm = Path(f"/proc/{engine.pid}/comm")
        deadline = time.monotonic() + 10
        while comm.read_text().strip() != "dockerd" and time.monotonic() < deadline:
            time.sleep(0.01)  # until `ip netns exec` has become the fake engine
        result = _in(netns, str(SCRIPT), "remove-network")
    finally:
        engine.kill()
        engine.wait()
    assert "its network stays" in result.stderr
    for table, rules in DOCKER_RULES.items():
        left = _rules(netns, table)
        assert all(rule in left for rule in rules), left
    assert _in(netns, "ip", "link", "show", "docker0").returncode == 0
