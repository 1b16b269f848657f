"""The kind cluster `make cluster-up` creates: pinned node image, the versions the
manifests need, and a kind too old to enforce NetworkPolicies refused up front."""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from conftest import ROOT, pod_spec

CLUSTER = yaml.safe_load((ROOT / "k8s/kind/cluster.yaml").read_text())
MK = (ROOT / "mk/k8s.mk").read_text()
NODE_IMAGE = re.compile(r"^kindest/node:v(?P<version>\d+\.\d+\.\d+)@sha256:[0-9a-f]{64}$")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lstrip("v").split("."))


def test_every_node_image_is_pinned_by_digest():
    images = {node.get("image", "") for node in CLUSTER["nodes"]}
    assert len(images) == 1, f"nodes run different images: {images}"
    (image,) = images
    assert NODE_IMAGE.match(image), f"{image!r}: pin kindest/node:vX.Y.Z@sha256:... (kind's release notes)"


def test_node_kubernetes_supports_what_the_manifests_use(rendered):
    (image,) = {node["image"] for node in CLUSTER["nodes"]}
    node = _version(NODE_IMAGE.match(image).group("version"))
    uses_prestop_sleep = any(
        "sleep" in (c.get("lifecycle", {}).get("preStop") or {})
        for docs in rendered.values()
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in pod_spec(d)["containers"]
    )
    assert uses_prestop_sleep  # main-app's preStop (no shell in the image)
    assert node >= (1, 30), "lifecycle.preStop.sleep needs Kubernetes >= 1.30"


def test_minimum_kind_version_is_stated_and_installed_by_e2e():
    minimum = re.search(r"^KIND_MIN_VERSION := (\S+)$", MK, re.M).group(1)
    assert _version(minimum) >= (0, 24), "kind < 0.24 does not enforce NetworkPolicies"
    e2e = yaml.safe_load((ROOT / ".github/workflows/e2e.yml").read_text())
    assert _version(e2e["env"]["KIND_VERSION"]) >= _version(minimum)
    docs = (ROOT / "docs/kubernetes.md").read_text()
    assert re.search(rf"kind \| {re.escape(minimum.rsplit('.0', 1)[0])}\b", docs), "docs/kubernetes.md: minimum kind"
    assert "kind ≥ 0.24" in (ROOT / "README.md").read_text()


def test_cluster_up_refuses_an_old_kind(tmp_path):
    """`make cluster-up` with a kind 0.20 on PATH stops before creating anything."""
    calls = tmp_path / "calls"
    for tool, out in {"kind": "kind v0.20.0 go1.20.4 linux/amd64", "docker": "", "helm": "", "kubectl": ""}.items():
        script = tmp_path / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\necho "{out}"\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(["make", "cluster-up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "too old" in proc.stderr, proc.stdout + proc.stderr
    recorded = calls.read_text().splitlines() if calls.exists() else []
    assert not [c for c in recorded if c.startswith(("kind create", "helm", "kubectl"))], recorded
