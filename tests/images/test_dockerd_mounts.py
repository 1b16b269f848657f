"""`dockerd.sh stop` unmounts what dockerd can leave mounted when it exits (`dockerd.sh
remove-mounts`): the host's network namespace under its exec root and its data root bound onto
itself. Checked in a mount and PID namespace of the test's own, so that neither the host's
mounts nor a dockerd running on the host are touched or seen."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "images" / "dockerd.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare (a mount namespace of its own)")


def run_isolated(tmp_path: Path, script: str, *, network: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`script` (bash, `set -e`) in mount and PID namespaces of the test's own (and a network
    namespace, with `network`), with dockerd's exec and data roots under tmp_path in
    DOCKER_EXEC_ROOT and DOCKER_DATA_ROOT; it must succeed."""
    exec_root, data_root = tmp_path / "exec", tmp_path / "data"
    (exec_root / "netns").mkdir(parents=True)
    (exec_root / "netns" / "default").touch()
    data_root.mkdir()
    env = {**os.environ, "DOCKER_EXEC_ROOT": str(exec_root), "DOCKER_DATA_ROOT": str(data_root), **env}
    namespaces = ["--mount", "--pid", *(["--net"] if network else [])]
    proc = subprocess.run(["unshare", *namespaces, "--fork", "--mount-proc", "--propagation", "private",
                           "bash", "-c", f"set -e\n{script}"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# What is still mounted, one word each on stdout.
MOUNTS_LEFT = 'mountpoint -q "$DOCKER_EXEC_ROOT/netns/default" && echo netns-mounted || true\n' \
              'mountpoint -q "$DOCKER_DATA_ROOT" && echo data-mounted || true'


def remove_mounts(tmp_path: Path, setup: str) -> dict[str, bool]:
    """Run `setup`, then `dockerd.sh remove-mounts`, in new mount and PID namespaces; which of
    the two places are still mount points afterwards."""
    proc = run_isolated(tmp_path, f'{setup}\n"{SCRIPT}" remove-mounts\n{MOUNTS_LEFT}')
    return {"netns": "netns-mounted" in proc.stdout, "data": "data-mounted" in proc.stdout}


DOCKERS_MOUNTS = 'mount --bind /proc/self/ns/net "$DOCKER_EXEC_ROOT/netns/default"\n' \
                 'mount --bind "$DOCKER_DATA_ROOT" "$DOCKER_DATA_ROOT"'


def test_dockers_mounts_are_removed(tmp_path):
    assert remove_mounts(tmp_path, DOCKERS_MOUNTS) == {"netns": False, "data": False}


def test_a_data_root_on_a_file_system_of_its_own_stays(tmp_path):
    setup = 'mount --bind /proc/self/ns/net "$DOCKER_EXEC_ROOT/netns/default"\n' \
            'mount -t tmpfs jobs-test "$DOCKER_DATA_ROOT"'
    assert remove_mounts(tmp_path, setup) == {"netns": False, "data": True}


def test_nothing_is_unmounted_while_a_dockerd_runs(tmp_path):
    fake = tmp_path / "bin" / "dockerd"
    fake.parent.mkdir()
    shutil.copy(shutil.which("sleep"), fake)
    setup = f'{DOCKERS_MOUNTS}\n"{fake}" 60 &\nsleep 0.2'
    assert remove_mounts(tmp_path, setup) == {"netns": True, "data": True}



def stop_after(tmp_path: Path, engine: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """dockerd.sh started an engine (its pid file) that is gone when `stop` runs; `engine` is the
    shell that writes that pid file. In mount, PID and network namespaces of the test's own, with
    dockerd's mounts, its bridge and an iptables chain of its in place: which of them are left."""
    pidfile = tmp_path / "dockerd.pid"
    script = f"""{DOCKERS_MOUNTS}
ip link add docker0 type bridge
iptables -N DOCKER
{engine}
"{SCRIPT}" stop
{MOUNTS_LEFT}
ip link show docker0 >/dev/null 2>&1 && echo bridge-left || true
iptables -S | grep -q -- '-N DOCKER' && echo chain-left || true
test -e "{pidfile}" && echo pidfile-left || true
if [ -f "{tmp_path}/other.pid" ] && kill -0 "$(cat "{tmp_path}/other.pid")"; then echo other-alive; fi
"""
    proc = run_isolated(tmp_path, script, network=True, DOCKERD_PIDFILE=str(pidfile),
                        DOCKER_SOCKET=str(tmp_path / "no-engine.sock"))
    return proc, proc.stdout.split()


needs_network_tools = pytest.mark.skipif(shutil.which("iptables") is None or shutil.which("ip") is None,
                                         reason="needs ip and iptables")


@needs_network_tools
def test_stop_after_the_engine_was_killed_still_removes_what_it_left(tmp_path):
    pidfile = tmp_path / "dockerd.pid"
    proc, left = stop_after(tmp_path, f'sleep 60 & echo $! > "{pidfile}"; kill $!; wait $! || true')
    assert "not running" in proc.stderr
    assert left == [], left


@needs_network_tools
def test_a_pid_reused_by_another_process_is_not_signalled(tmp_path):
    # The dead engine's pid now belongs to something else: stop must not send it SIGTERM.
    pidfile = tmp_path / "dockerd.pid"
    proc, left = stop_after(tmp_path, f'sleep 60 & echo $! > "{pidfile}"; echo $! > "{tmp_path}/other.pid"')
    assert "not running" in proc.stderr and "stopping dockerd" not in proc.stderr
    assert left == ["other-alive"], left
