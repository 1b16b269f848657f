"""Shared fixtures for the Kubernetes proof: rendered manifests, tool paths, schemas."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from jobs_devtools.observability import promstack

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
    """The pinned kubectl of .tools/k8s/bin, else kubectl on PATH (as promstack finds it)."""
    try:
        return promstack.kubectl()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def render_dir(path: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def ensure_secrets() -> None:
    for overlay in (K8S / "overlays" / "dev", K8S / "overlays" / "ci", K8S / "sandbox" / "overlays" / "prod"):
        subprocess.run([sys.executable, str(K8S / "scripts" / "gen-secrets.py"), str(overlay)], check=True)


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


# ---------------------------------------------------------------- the real Skaffold and Tilt
# `make test-k8s` builds them from their pinned Go modules (k8s/sandbox/tools) and passes
# their paths; nothing here needs a cluster. Each run gets a throw-away HOME (Skaffold's
# global config) and a kubeconfig whose only server refuses connections at once.
SANDBOX_CONTEXT = "jobs-sandbox"
KIND_CONTEXT = "kind-jobs"


def real_tool(env: str, name: str) -> str:
    path = os.environ.get(env, "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"{env} is not set to an executable {name} ({path!r}): run `make test-k8s`, which builds the "
            f"pinned {name} (k8s/sandbox/tools/build.sh {name}), or pass {env}=/path/to/{name}"
        )
    return path


@pytest.fixture(scope="session")
def skaffold_bin() -> str:
    return real_tool("SKAFFOLD_BIN", "skaffold")


@pytest.fixture(scope="session")
def tilt_bin() -> str:
    return real_tool("TILT_BIN", "tilt")


def dummy_kubeconfig(path: Path, context: str) -> Path:
    """A kubeconfig with one context, pointing at a port nothing listens on."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": context, "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "jobs"}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="session")
def tool_env(tmp_path_factory):
    """tool_env(context) -> environment for a real skaffold/tilt run against `context`."""
    base = tmp_path_factory.mktemp("real-tools")

    def make(context: str = KIND_CONTEXT, skaffold_global: dict | None = None) -> dict[str, str]:
        home = base / f"home-{context}-{len(list(base.iterdir()))}"
        (home / ".skaffold").mkdir(parents=True)
        config = copy.deepcopy(skaffold_global or {})
        # No telemetry, update check or survey prompt (nothing may leave the machine).
        config.setdefault("global", {}).update(
            {"collect-metrics": False, "update-check": False, "survey": {"disable-prompt": True}}
        )
        (home / ".skaffold" / "config").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKAFFOLD_", "TILT_", "KUBE"))}
        env.pop("CI", None)  # GitHub sets CI=true, which auto-activates profile ci
        env.update(
            HOME=str(home),
            KUBECONFIG=str(dummy_kubeconfig(home / "kubeconfig", context)),
            SKAFFOLD_UPDATE_CHECK="false",
            SKAFFOLD_INTERACTIVE="false",
            TILT_DISABLE_ANALYTICS="1",
            DOCKER_HOST="unix:///nonexistent/docker.sock",  # nothing may build or pull
        )
        return env

    return make


def rel(path: str) -> str:
    """skaffold diagnose prints absolute paths: make them repo-relative."""
    return str(Path(path).relative_to(ROOT)) if Path(path).is_absolute() else path


@pytest.fixture(scope="session")
def diagnose(skaffold_bin, tool_env):
    """diagnose(profile, context, ci_env) -> (effective config, profiles in the order applied)."""
    cache: dict = {}

    def get(profile=None, context=KIND_CONTEXT, ci_env=False):
        key = (profile, context, ci_env)
        if key not in cache:
            env = tool_env(context)
            if ci_env:
                env["CI"] = "true"
            cmd = [skaffold_bin, "diagnose", "--yaml-only", "-v", "info"] + (["-p", profile] if profile else [])
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{shlex.join(cmd)} (context {context}):\n{proc.stderr[-3000:]}"
            (config,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
            applied = re.findall(r'msg="applying profile: ([^"]+)"', proc.stderr)
            cache[key] = (config, applied)
        return cache[key]

    return get


def skaffold_verify_job(case: dict) -> dict:
    """The Job `skaffold verify` creates for a kubernetesCluster test case with a
    jobManifestPath: Skaffold's k8sjob.createJobFromManifestPath + patchToK8sContainer
    (v2.24): the manifest's container named like verify[].container keeps its env,
    mounts and security context; image, name, command and args are overwritten, the
    latter two unconditionally (empty = the image's default command)."""
    path = ROOT / rel(case["executionMode"]["kubernetesCluster"]["jobManifestPath"])
    job = yaml.safe_load(path.read_text())
    spec = job["spec"]["template"]["spec"]
    want = case["container"]
    original = next((c for c in spec["containers"] if c["name"] == want["name"]), {})
    container = copy.deepcopy(original)
    container["image"] = want["image"]
    container["name"] = want["name"]
    for field in ("command", "args"):
        container.pop(field, None)
        if want.get(field):
            container[field] = want[field]
    container.setdefault("env", []).extend({"name": e["name"], "value": e["value"]} for e in want.get("env", []))
    spec["containers"] = [container]
    spec["restartPolicy"] = "Never"
    job["metadata"]["name"] = case["name"]
    return job
