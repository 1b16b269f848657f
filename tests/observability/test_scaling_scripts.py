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
import json, sys, time
from pathlib import Path
state_file = Path(__file__).with_name("state.json")
state = json.loads(state_file.read_text()) if state_file.exists() else {"samples": 0, "start": time.time()}
state_file.write_text(json.dumps(state))
args = [a for a in sys.argv[1:]]
if args[:2] == ["-n", "jobs"]:
    args = args[2:]
with open(Path(__file__).with_name("calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
def out(obj):
    print(json.dumps(obj))
def so(name, lo, hi, triggers):
    return {"metadata": {"name": name}, "spec": {"minReplicaCount": lo, "maxReplicaCount": hi, "triggers": [
        {"type": "prometheus", "name": t, "metricType": "AverageValue",
         "metadata": {"query": q, "threshold": "20"}} for t, q in triggers]}}
# replicas per sample: up, peak, back down to the minimum; the Job is done after the 4th sample
MAIN = [1, 2, 3, 2, 1]
SERVICE = [1, 3, 3, 1, 1]
n = min(state["samples"], 4)
if args[0] == "version":
    print("Client Version: fake")
elif args[:2] == ["config", "current-context"]:
    print("jobs-sandbox")
elif args[:2] == ["get", "scaledobjects.keda.sh"]:
    out({"items": [so("main-app", 1, 3, [("http-requests-per-pod", "sum(rate(x[2m]))")]),
                   so("service-app", 1, 3, [("queue-backlog-per-replica", "sum(backlog)"),
                                            ("worker-busy-ratio", "sum(busy)")])]})
elif args[:1] == ["apply"] and "--dry-run=client" in args:
    out({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "locustfile"}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "locust"}, "spec": {"template": {"spec": {
            "containers": [{"name": "locust", "env": [{"name": "LOADTEST_STEP_USERS", "value": "10,20"}]}]}}}}]})
elif args[0] in ("delete", "apply"):
    sys.stdin.read() if args[:3] == ["apply", "-f", "-"] else None
    print("ok")
elif args[:2] == ["get", "deployments"]:
    state["samples"] += 1
    state_file.write_text(json.dumps(state))
    out({"items": [
        {"metadata": {"name": "main-app"}, "spec": {"replicas": MAIN[n]}, "status": {"readyReplicas": MAIN[n]}},
        {"metadata": {"name": "service-app"}, "spec": {"replicas": SERVICE[n]}, "status": {"readyReplicas": 1}}]})
elif args[:2] == ["get", "hpa"]:
    out({"items": [{"metadata": {"name": "main-app"}, "status": {"desiredReplicas": 2, "currentMetrics": [
        {"type": "External",
         "external": {"metric": {"name": "s0-prometheus"}, "current": {"averageValue": "12500m"}}}]}},
                   {"metadata": {"name": "service-app"}, "status": {"desiredReplicas": 4}}]})
elif args[:2] == ["get", "--raw"] and "/query_range?" in args[2]:
    out({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {}, "values": [[state["start"] - 5, "12.5"]]}]}})
elif args[:2] == ["get", "--raw"]:
    out({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "12.5"]}]}})
elif args[:2] == ["get", "job"]:
    done = state["samples"] >= 4
    out({"status": {"active": 0 if done else 1, **({"succeeded": 1} if done else {})}})
elif args[:2] == ["get", "pods"]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state["start"]))
    out({"items": [{"status": {"containerStatuses": [{"state": {"running": {"startedAt": started}}}]}}]})
elif args[:2] == ["logs", "job/locust"]:
    print('loadtest summary: ...')
    print('loadtest responses: {"GET 200": 40, "POST 202": 12}')
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


def test_demo_samples_compares_with_the_model_and_plots(fake_kubectl, tmp_path):
    """The sampling loop, the Job's env overrides, the replay and the outputs, against a
    scripted kubectl (the real run is make test-cluster-scaling on the sandbox)."""
    proc = run_demo(fake_kubectl, tmp_path, "--interval", "0", "--settle-seconds", "0", "--step-users", "3",
                    "--stage-seconds", "0", "--cooldown-stages", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (fake_kubectl / "calls.log").read_text()
    assert "delete job locust --ignore-not-found" in calls and "apply -f -" in calls
    assert "apply -k " + str(ROOT / "k8s" / "sandbox" / "loadtest") in calls  # the sandbox's stand-in Locust
    assert "/api/v1/namespaces/monitoring/services/prometheus-operated:9090/proxy/api/v1/query?query=sum%28backlog%29" \
        in calls
    assert "/proxy/api/v1/query_range?query=sum%28busy%29" in calls
    with open(tmp_path / "out" / "demo.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # up to the peak and back to the minimum, with the Job done
    assert [r["service-app_replicas"] for r in rows] == ["1", "3", "3", "1", "1"]
    assert rows[-1]["service-app:queue-backlog-per-replica"] == "12.5"
    assert rows[0]["main-app_hpa_desired"] == "2" and rows[0]["main-app:http-requests-per-pod:hpa_value"] == "12.5"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["schedule"] == [[0.0, 3]]  # --step-users/--stage-seconds/--cooldown-stages overrode the Job's env
    assert summary["locust_responses"] == {"GET 200": 40, "POST 202": 12}
    real = summary["deployments"]["service-app"]["real"]
    assert real["peak"] == 3 and real["back_to_min_after_load_s"] is not None
    assert summary["deployments"]["main-app"]["real"]["peak"] == 3
    # 12.5 per trigger against a threshold of 20: the model stays at the minimum
    assert summary["deployments"]["service-app"]["model"]["peak"] == 1
    png = (tmp_path / "out" / "scaling-cluster.png").read_bytes()
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
    from jobs_devtools.observability import promstack

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


class FakePrometheus:
    """query_range answers like Prometheus: millisecond timestamps from start to end by step."""

    def __init__(self, values: dict[str, float]):
        self.values = values

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        n = int(round((end - start) / step)) + 1
        value = next((v for k, v in self.values.items() if k in expr), None)
        if value is None:
            return []
        return [{"metric": {}, "values": [[round(start + i * step, 3), str(value)] for i in range(n)]}]


def test_preview_records_and_replays_the_rendered_configuration(tmp_path):
    from jobs_devtools.observability import promstack, scaling_preview

    manifests = promstack.Manifests(promstack.render("dev"))
    prom = FakePrometheus({"jobs_api_http_requests_total": 50.0, "rabbitmq_detailed_queue_messages_ready": 100.0,
                           "jobs_worker_busy_ratio": 1.0})
    times, columns = scaling_preview.record(prom, manifests, 1_000_000.123456, 1_000_000.123456 + 300, 15)
    assert len(times) == 21
    for name in ("http-requests-per-pod", "queue-backlog-per-replica", "worker-busy-ratio"):
        assert all(v is not None for v in columns[name]), (name, columns[name])
    decisions = scaling_preview.replay(manifests, times, columns, 15)
    service = [d["desired"] for d in decisions["service-app"]]
    main = [d["desired"] for d in decisions["main-app"]]
    # dev: service-app 1..5, main-app 1..3; 30 s scale-up window, then +100 % / +4 pods per 30 s
    assert service[0] == 1 and service[-1] == 5 and service == sorted(service)
    assert main[-1] == 3
    scaling_preview.write_csv(tmp_path / "p.csv", times, columns, decisions, [5] * len(times))
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.endswith("main-app_replicas,service-app_replicas")
