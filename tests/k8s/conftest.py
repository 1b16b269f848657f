"""Shared fixtures for the Kubernetes proof: rendered manifests, tool paths, schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas"
OVERLAYS = ("dev", "ci", "prod")
# Extra variants built from a temporary kustomization: base + alternative components.
VARIANTS = {
    # Clusters without KEDA: the plain-HPA component instead of `autoscaling`.
    "hpa": {"resources": ["k8s/base"], "components": ["k8s/components/autoscaling-hpa", "k8s/components/monitoring"]},
    "prod-external-redis": {"resources": ["k8s/overlays/prod"], "components": ["k8s/components/external-redis"]},
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def kubectl() -> str:
    tools = ROOT / ".tools" / "k8s" / "bin" / "kubectl"
    if tools.exists():
        return str(tools)
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: run `make k8s-tools` (pinned kubectl in .tools/k8s/bin)")
    return found


def render_dir(path: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def ensure_secrets() -> None:
    for overlay in ("dev", "ci"):
        subprocess.run(
            [sys.executable, str(K8S / "scripts" / "gen-secrets.py"), str(K8S / "overlays" / overlay)], check=True
        )


def render_variant(name: str) -> list[dict]:
    if name in OVERLAYS:
        return render_dir(K8S / "overlays" / name)
    spec = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"k8s-{name}-") as tmp:
        # kustomize wants paths relative to the kustomization
        doc = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "jobs",  # as the overlays: also for objects the components add
            "resources": [os.path.relpath(ROOT / p, tmp) for p in spec["resources"]],
            "components": [os.path.relpath(ROOT / p, tmp) for p in spec["components"]],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc))
        return render_dir(Path(tmp))


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay and variant, rendered once; also written to reports/k8s/rendered/."""
    ensure_secrets()
    out = ROOT / "reports" / "k8s" / "rendered"
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in (*OVERLAYS, *VARIANTS):
        docs = render_variant(name)
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        result[name] = docs
    return result


def find(docs: list[dict], kind: str, name: str) -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"{kind}/{name} not rendered")


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(
            f"reference schemas not found at {SCHEMAS} (../shared/schemas is only present in the team workspace)"
        )
    return SCHEMAS
