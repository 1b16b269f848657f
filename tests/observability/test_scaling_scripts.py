"""scaling_demo.py against a fake kubectl (no cluster here), and its dry run;
`bash -n`-style syntax checks of the scripts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS_PY = ROOT / ".tools" / "locust" / "bin" / "python"
DEMO = ROOT / "scripts" / "observability" / "scaling_demo.py"

FAKE_KUBECTL = r'''#!PYTHON
"""Answers the kubectl calls scaling_demo.py makes, from a small state file."""
import json, sys
from pathlib import Path
state_file = Path(__file__).with_name("state.json")
state = json.loads(state_file.read_text()) if state_file.exists() else {"samples": 0}
args = [a for a in sys.argv[1:]]
if args[:2] == ["-n", "jobs"]:
    args = args[2:]
with open(Path(__file__).with_name("calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
def out(obj):
    print(json.dumps(obj))
if args[0] == "version":
    print("Client Version: fake")
elif args[:2] == ["get", "scaledobjects.keda.sh"]:
    out({"items": [
        {"metadata": {"name": "main-app"}, "spec": {"triggers": [
            {"type": "prometheus", "name": "http-requests-per-pod", "metadata": {"query": "sum(rate(x[2m]))"}}]}},
        {"metadata": {"name": "service-app"}, "spec": {"triggers": [
            {"type": "prometheus", "name": "queue-backlog-per-replica", "metadata": {"query": "sum(backlog)"}},
            {"type": "prometheus", "name": "worker-busy-ratio", "metadata": {"query": "sum(busy)"}}]}}]})
elif args[0] in ("delete", "apply"):
    print("ok")
elif args[:2] == ["get", "deployments"]:
    n = state["samples"]
    state["samples"] = n + 1
    state_file.write_text(json.dumps(state))
    out({"items": [
        {"metadata": {"name": "main-app"}, "spec": {"replicas": 1 + n // 2}, "status": {"readyReplicas": 1 + n // 3}},
        {"metadata": {"name": "service-app"}, "spec": {"replicas": 1 + n}, "status": {"readyReplicas": 1 + n // 2}}]})
elif args[:2] == ["get", "hpa"]:
    out({"items": [{"metadata": {"name": "main-app"}, "status": {"desiredReplicas": 2}},
                   {"metadata": {"name": "service-app"}, "status": {"desiredReplicas": 4}}]})
elif args[:2] == ["get", "--raw"]:
    out({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "12.5"]}]}})
elif args[:2] == ["get", "job"]:
    done = state["samples"] >= 4
    out({"status": {"active": 0 if done else 1, **({"succeeded": 1} if done else {})}})
else:
    sys.exit("fake kubectl: unexpected " + " ".join(sys.argv[1:]))
'''


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "kubectl"
    script.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    script.chmod(0o755)
    return bindir


def run_demo(bindir: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if not TOOLS_PY.exists():
        pytest.skip("tools venv missing: make loadtest-tools")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    return subprocess.run([str(TOOLS_PY), str(DEMO), "--out", str(tmp_path / "out"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_demo_samples_and_plots(fake_kubectl, tmp_path):
    proc = run_demo(fake_kubectl, tmp_path, "--interval", "0", "--cooldown", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (fake_kubectl / "calls.log").read_text()
    assert "delete job locust --ignore-not-found" in calls and "apply -k" in calls
    assert "/api/v1/namespaces/monitoring/services/prometheus-operated:9090/proxy/api/v1/query?query=sum%28backlog%29" \
        in calls
    with open(tmp_path / "out" / "demo.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # until the fake Job succeeded (after the 4th sample)
    assert rows[-1]["service-app_replicas"] == "4" and rows[-1]["service-app:queue-backlog-per-replica"] == "12.5"
    assert rows[0]["main-app_hpa_desired"] == "2"
    png = (tmp_path / "out" / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_demo_dry_run_needs_no_cluster(tmp_path):
    proc = run_demo(tmp_path / "nothing", tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loadtest/ renders ['ConfigMap', 'Job']" in proc.stdout
    assert "would run:" in proc.stdout and "apply -k" in proc.stdout


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "observability").glob("*.py")), ids=lambda p: p.name)
def test_scripts_compile(script):
    compile(script.read_text(), str(script), "exec")


def test_locust_job_renders_and_uses_the_pinned_version():
    sys.path.insert(0, str(ROOT / "scripts" / "observability"))
    import promstack

    proc = subprocess.run([promstack.kubectl(), "kustomize", str(ROOT / "loadtest")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}
    pod = docs["Job"]["spec"]["template"]
    assert pod["metadata"]["labels"]["jobs.example.com/api-client"] == "true"
    image = pod["spec"]["containers"][0]["image"]
    pinned = [ln for ln in (ROOT / "loadtest" / "requirements.txt").read_text().splitlines()
              if ln.startswith("locust==")][0].split("==")[1].split()[0]
    assert image == f"locustio/locust:{pinned}"
    assert docs["ConfigMap"]["data"]["locustfile.py"] == (ROOT / "loadtest" / "locustfile.py").read_text()
    assert json.dumps(docs["Job"]).count("main-app-api-tokens") == 1
