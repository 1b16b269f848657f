"""Boot a private RabbitMQ node (jobs_devtools.stack, scripts/stack.py) with the configuration the cluster
uses (rabbitmq/rabbitmq.conf, rabbitmq/enabled_plugins): a misspelt key or a bad value
stops the node at boot, so this catches them before a pod crash-loops.

Only the listener ports are replaced (free ports, 127.0.0.1). The node is the
machine's RabbitMQ (Debian's, possibly older than the 4.1 image): keys that only newer
versions know (the 4.1 peer discovery and quorum reconciliation settings of
rabbitmq/cluster/cluster.conf) are checked only when the installed version has them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from jobs_devtools.stack import RabbitNode, free_port

RABBITMQ_LIB = Path("/usr/lib/rabbitmq/lib")
# Replaced for the test node: ports, and the definitions path (the Secret's mount point
# in the pod; here a file with definitions generated the way the overlays make them).
PORT_KEYS = ("listeners.tcp.", "management.tcp.port", "prometheus.tcp.port", "load_definitions")


def installed_version() -> tuple[int, ...]:
    dirs = sorted(RABBITMQ_LIB.glob("rabbitmq_server-*"))
    if not dirs:
        pytest.fail("RabbitMQ server not installed: `make services-deps`")
    return tuple(int(x) for x in re.findall(r"\d+", dirs[-1].name.split("-", 1)[1])[:3])


def conf_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.startswith(PORT_KEYS):
            lines.append(stripped)
    return lines


def plugins(path: Path) -> tuple[str, ...]:
    return tuple(p.strip() for p in path.read_text().strip().strip("[].").split(","))


@pytest.fixture
def node_class():
    class ProjectConfNode(RabbitNode):
        """A private node whose rabbitmq.conf is the project's, with test ports."""

        extra: list[str] = []

        def write_config(self) -> None:
            super().write_config()
            theirs = (self.base_dir / "rabbitmq.conf").read_text().splitlines()
            ours = [
                *[line for line in theirs if line.startswith("load_definitions")],
                f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
                f"default_user = {self.user}",
                f"default_pass = {self.password}",
                f"prometheus.tcp.port = {self.prometheus_port}",
                "prometheus.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
                *self.extra,
            ]
            (self.base_dir / "rabbitmq.conf").write_text("\n".join(ours) + "\n")

    return ProjectConfNode, free_port


def generated_definitions() -> tuple[dict, str, str]:
    """Definitions and admin credentials exactly as k8s/scripts/gen-secrets.py makes them."""
    spec = importlib.util.spec_from_file_location("gen_secrets", ROOT / "k8s/scripts/gen-secrets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.render()
    env = dict(line.split("=", 1) for line in files["rabbitmq.env"].splitlines())
    return json.loads(files["definitions.json"]), env["RABBITMQ_ADMIN_USER"], env["RABBITMQ_ADMIN_PASSWORD"]


def boot(node_class, tmp_path, extra, plugin_list):
    cls, free_port = node_class
    cls.extra = extra
    definitions, user, password = generated_definitions()
    node = cls(
        tmp_path / "rabbitmq",
        name=f"k8s-conf-{tmp_path.name[-8:]}",
        plugins=plugin_list,
        definitions=definitions,
        user=user,
        password=password,
    )
    node.management_port = free_port()
    try:
        node.start(timeout=90)
    except Exception as exc:  # noqa: BLE001
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "rabbitmq").rglob("*.log"))
        node.stop()
        pytest.fail(f"RabbitMQ did not boot with the project's configuration: {exc}\n{logs}")
    return node


def test_base_config_loads_definitions_from_the_secret_mount():
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/definitions/definitions.json" in conf


def test_base_config_boots_and_applies(node_class, tmp_path):
    extra = conf_lines(ROOT / "rabbitmq" / "rabbitmq.conf")
    node = boot(node_class, tmp_path, extra, plugins(ROOT / "rabbitmq" / "enabled_plugins"))
    try:
        assert "1800000" in node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
        assert "0.6" in node.ctl("eval", "application:get_env(rabbit, vm_memory_high_watermark).")
        out = node.ctl("list_users")
        # Users from the definitions (no default/guest user when definitions load at boot).
        assert {node.user, "main-app", "service-app"} <= set(re.findall(r"^(\S+)\t", out, re.M))
        assert "guest" not in out
        assert re.search(r"^jobs\s+quorum$", node.ctl("list_queues", "-q", "--no-table-headers", "name", "type"), re.M)
        url = f"http://127.0.0.1:{node.prometheus_port}/metrics/detailed?family=queue_coarse_metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{node.management_port}/api/overview", timeout=5) as resp:
            raise AssertionError(f"management API answered without credentials: {resp.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401  # the management plugin is up and wants credentials
    finally:
        node.stop()


def test_cluster_config_boots(node_class, tmp_path):
    version = installed_version()
    if version < (4, 1):
        pytest.skip(
            f"installed RabbitMQ {'.'.join(map(str, version))} predates the 4.1 peer discovery settings "
            "of rabbitmq/cluster/cluster.conf (checked where RabbitMQ >= 4.1 is installed)"
        )
    extra = conf_lines(ROOT / "rabbitmq" / "rabbitmq.conf") + conf_lines(ROOT / "rabbitmq" / "cluster" / "cluster.conf")
    node = boot(node_class, tmp_path, extra, plugins(ROOT / "rabbitmq" / "cluster" / "enabled_plugins"))
    node.stop()


def test_cluster_plugins_exist_in_the_installed_server():
    version = installed_version()
    available = {re.sub(r"-[\d.]+(\.ez)?$", "", p.name) for p in RABBITMQ_LIB.glob("rabbitmq_server-*/plugins/*")}
    wanted = set(plugins(ROOT / "rabbitmq" / "cluster" / "enabled_plugins"))
    assert wanted <= available, f"RabbitMQ {version} lacks {wanted - available}"
