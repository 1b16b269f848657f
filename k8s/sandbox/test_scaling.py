#!/usr/bin/env python3
"""Pods scale for real, and the prod topology survives faults (make test-cluster-scaling).

1. scaling: `make deploy PROFILE=ci` on the sandbox, then `make scaling-demo`'s script
   (scripts/observability/scaling_demo.py): a Locust step load through the cluster's
   Service; KEDA scales service-app (backlog, busy ratio) and main-app (request rate) up
   and back down; samples, the HPA model replayed on the same signals, the picture.
2. accounting of that run: every job accepted (Locust's `POST 202` count) has a record
   created during the run and every record is final (Redis, read in the pod); no job ran
   more often than its type needs (a scale-in that interrupted a job would show as an extra
   attempt: workers drain on SIGTERM); no 5xx and no unanswered request at all.
3. model: the replay's peak replicas equal the real ones (time to first scale-up and back
   to the minimum are reported).
4. prod: the sandbox's prod overlay (3-node RabbitMQ, quorum queues, prod's PDBs and
   bounds; k8s/sandbox/components/one-node-prod) on a fresh namespace; the cluster forms
   (3 running nodes, every quorum queue with 3 members); under a steady load from
   loadtest/ledger.py (in the cluster, one Idempotency-Key per job, retries on 5xx): delete
   a RabbitMQ pod, evict (Eviction API, PDBs respected) a service-app pod, then a main-app
   pod, then `kubectl rollout restart` both apps. Every request accounted for: lost = 0,
   jobs that ran more than once counted, each fault's error window and recovery time.

Ends with the line
`scaling: service_app=1->N->1 main_app=1->M->1 preview_vs_real_peak=a/b lost=0 prod_rabbitmq_nodes=3 prod_fault_lost=0`
(a/b: service-app's peak replicas in the model replay / in reality) and exits non-zero on
any shortfall. Writes reports/cluster-scaling/ (demo CSVs, summary.json, faults.md,
scaling-cluster.png). Expects PATH to hold skaffold and kubectl, KUBECONFIG the sandbox's,
and --python a Python with matplotlib (the loadtest tools venv).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import urllib.parse

from test_cluster import REPO, Shortfall, kubectl, run

NAMESPACE = "jobs"
PROMETHEUS = "/api/v1/namespaces/monitoring/services/prometheus-operated:9090/proxy/api/v1/"
DASHBOARD = REPO / "k8s" / "components" / "monitoring" / "grafana-dashboard-jobs.json"
# kube-state-metrics series: the module proxy serves no k8s.io/kube-state-metrics, so the
# sandbox has none (docs/observability.md).
NEEDS_KUBE_STATE_METRICS = "kube_"
EXPECTED_ATTEMPTS = {"echo": 1, "sleep": 1, "cpu": 1, "flaky": 2}
# Records: created_at, status, type and attempts of every job created since ARGV[1].
COUNT_JOBS = """
local out = {total = 0, status = {}, attempts = {}}
for _, key in ipairs(redis.call('KEYS', 'job:*')) do
  local f = redis.call('HMGET', key, 'created_at', 'status', 'type', 'attempts')
  if f[1] and f[1] >= ARGV[1] then
    out.total = out.total + 1
    out.status[f[2]] = (out.status[f[2]] or 0) + 1
    local k = f[3] .. ':' .. (f[4] or '0')
    out.attempts[k] = (out.attempts[k] or 0) + 1
  end
end
return cjson.encode(out)
"""


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def jobs_since(t: float) -> dict:
    out = kubectl("-n", NAMESPACE, "exec", "redis-0", "-c", "redis", "--", "redis-cli", "EVAL", COUNT_JOBS, "0",
                  iso(t)).stdout
    data = json.loads(out)
    # cjson encodes an empty table as {} or []
    return {k: (v if isinstance(v, (int, dict)) else {}) for k, v in data.items()}


def wait_for(what: str, check, timeout: float, interval: float = 3) -> float:
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            last = check()
            if last is True:
                return time.monotonic() - started
        except Shortfall as exc:
            last = str(exc)
        time.sleep(interval)
    raise Shortfall(f"{what}: not within {timeout:.0f}s (last: {last})")


def fresh_namespace(log: pathlib.Path) -> None:
    """Each step deploys into a new namespace: the other overlay's StatefulSets (replicas, volume
    sizes) cannot be changed in place, and a single-node broker's data must not meet the cluster."""
    run(["kubectl", "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=600s"],
        timeout=660, log=log)


# ---------------------------------------------------------------- 1-3: scaling
def step_scaling(report: pathlib.Path, args: argparse.Namespace, results: dict) -> None:
    log = report / "scaling.log"
    fresh_namespace(log)
    run(["make", "deploy", "PROFILE=ci"], timeout=1800, log=log)
    started = time.time()
    demo = report / "demo"
    run([args.python, "scripts/observability/scaling_demo.py", "--out", str(demo), "--interval", "5",
         "--step-users", args.step_users, "--stage-seconds", str(args.stage_seconds)], timeout=3600, log=log)
    summary = json.loads((demo / "summary.json").read_text())
    deployments = summary["deployments"]
    for name, key in (("service-app", "service_app"), ("main-app", "main_app")):
        real = deployments[name]["real"]
        end = deployments[name]["min"] if real["back_to_min_after_load_s"] is not None else "not-back"
        results[key] = f"{deployments[name]['min']}->{real['peak']}->{end}"
        if real["peak"] <= deployments[name]["min"]:
            raise Shortfall(f"{name} never scaled up (peak {real['peak']})")
        if real["back_to_min_after_load_s"] is None:
            raise Shortfall(f"{name} did not scale back to {deployments[name]['min']}")
    sa = deployments["service-app"]
    results["preview_vs_real_peak"] = f"{sa['model']['peak']}/{sa['real']['peak']}"

    # accounting
    responses = summary["locust_responses"]
    accepted = responses.get("POST 202", 0)
    records = wait_for_final(started)
    not_final = records["total"] - sum(records["status"].get(s, 0) for s in ("succeeded", "failed"))
    lost = not_final + max(0, accepted - records["total"])
    extra = {k: n for k, n in records["attempts"].items()
             if int(k.split(":")[1]) > EXPECTED_ATTEMPTS.get(k.split(":")[0], 1)}
    errors = {k: n for k, n in responses.items() if k.split()[1] == "0" or int(k.split()[1]) >= 500}
    results["lost"] = lost
    accounting = {"accepted": accepted, "records": records, "lost": lost, "ran_more_than_once": extra,
                  "errors": errors}
    (report / "scaling-accounting.json").write_text(json.dumps(accounting, indent=2) + "\n")
    print(f"   accounting: {json.dumps(accounting)}", flush=True)
    if accepted == 0:
        raise Shortfall("Locust reported no accepted job")
    if lost:
        raise Shortfall(f"{lost} accepted jobs not final ({accounting})")
    if extra:
        raise Shortfall(f"jobs ran more often than their type needs (interrupted?): {extra}")
    if errors:
        raise Shortfall(f"5xx or unanswered requests during the scaling run: {errors}")
    dashboard = check_dashboard(summary["load_started"], summary["load_started"] + summary["load_seconds"], report)
    if dashboard["empty"] or dashboard["error"]:
        raise Shortfall(f"dashboard queries without data under load: {dashboard['empty'] + dashboard['error']}")
    for name, c in deployments.items():
        print(f"   model vs real {name}: real {c['real']} model {c['model']}", flush=True)
    if sa["model"]["peak"] != sa["real"]["peak"] or deployments["main-app"]["model"]["peak"] != \
            deployments["main-app"]["real"]["peak"]:
        raise Shortfall(f"the HPA model's peaks differ from the real ones: {deployments}")


def check_dashboard(t0: float, t1: float, report: pathlib.Path) -> dict:
    """Every query of the Grafana dashboard, over the load, on the sandbox's Prometheus:
    each must be valid PromQL and return data (kube-state-metrics series excepted)."""
    dashboard = json.loads(DASHBOARD.read_text())
    outcome: dict[str, list[str]] = {"data": [], "empty": [], "error": [], "no_kube_state_metrics": []}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$namespace", NAMESPACE)
            params = urllib.parse.urlencode({"query": expr, "start": int(t0), "end": int(t1), "step": 15})
            proc = kubectl("get", "--raw", PROMETHEUS + "query_range?" + params, check=False)
            if proc.returncode != 0 or json.loads(proc.stdout or "{}").get("status") != "success":
                outcome["error"].append(f"{panel['title']}: {expr}: {proc.stderr.strip()[-200:]}")
            elif NEEDS_KUBE_STATE_METRICS in expr:
                outcome["no_kube_state_metrics"].append(expr)
            elif any(series["values"] for series in json.loads(proc.stdout)["data"]["result"]):
                outcome["data"].append(expr)
            else:
                outcome["empty"].append(f"{panel['title']}: {expr}")
    (report / "dashboard-queries.json").write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"   dashboard: {len(outcome['data'])} queries returned data, {len(outcome['empty'])} empty, "
          f"{len(outcome['error'])} errors, {len(outcome['no_kube_state_metrics'])} need kube-state-metrics",
          flush=True)
    return outcome


def wait_for_final(since: float) -> dict:
    records: dict = {}

    def all_final() -> bool | str:
        nonlocal records
        records = jobs_since(since)
        done = sum(records["status"].get(s, 0) for s in ("succeeded", "failed"))
        return True if done == records["total"] else f"{records['total'] - done} of {records['total']} not final"

    try:
        wait_for("every job of the run final", all_final, timeout=300, interval=5)
    except Shortfall as exc:
        print(f"   {exc}", flush=True)
    return records


# ---------------------------------------------------------------- 4: prod under faults
def rabbit_nodes() -> int:
    out = kubectl("-n", NAMESPACE, "exec", "rabbitmq-0", "-c", "rabbitmq", "--", "rabbitmqctl", "cluster_status",
                  "--formatter", "json", check=False)
    if out.returncode != 0:
        raise Shortfall(f"cluster_status: {out.stderr.strip()[-200:]}")
    return len(json.loads(out.stdout).get("running_nodes", []))


def quorum_members() -> dict[str, int]:
    out = kubectl("-n", NAMESPACE, "exec", "rabbitmq-0", "-c", "rabbitmq", "--", "rabbitmqctl", "list_queues",
                  "-p", "/", "name", "type", "members", "--formatter", "json")
    return {q["name"]: len(q.get("members") or []) for q in json.loads(out.stdout) if q.get("type") == "quorum"}


def ready(kind: str, name: str, want: int | None = None) -> bool | str:
    """Whole: as many pods as wanted, all of the current revision, all ready, none left over."""
    obj = json.loads(kubectl("-n", NAMESPACE, "get", kind, name, "-o", "json").stdout)
    spec = obj["spec"].get("replicas", 1) if want is None else want
    status = obj.get("status", {})
    counts = [status.get(k, 0) for k in ("replicas", "readyReplicas", "updatedReplicas")]
    if kind == "deployment":
        counts.append(status.get("availableReplicas", 0))
    ok = all(c == spec for c in counts) and status.get("observedGeneration") == obj["metadata"]["generation"]
    return True if ok else f"{kind}/{name}: replicas/ready/updated(/available) {counts}, want {spec}"


def pod_uid(name: str) -> str:
    return kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "jsonpath={.metadata.uid}", check=False).stdout


def pod_gone(name: str) -> bool | str:
    proc = kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "name", check=False)
    return True if proc.returncode != 0 and "NotFound" in proc.stderr else f"pod {name} still there"


def replaced_and_ready(name: str, old_uid: str) -> bool | str:
    pod = json.loads(kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "json", check=False).stdout or "{}")
    if not pod or pod["metadata"]["uid"] == old_uid:
        return f"pod {name} not replaced yet"
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return True if conditions.get("Ready") == "True" else f"new pod {name} not ready"


def pod_of(app: str) -> str:
    pods = json.loads(kubectl("-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/name={app}",
                              "-o", "json").stdout)["items"]
    running = sorted(p["metadata"]["name"] for p in pods
                     if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp"))
    if not running:
        raise Shortfall(f"no running {app} pod")
    return running[0]


def evict(pod: str) -> float:
    """Evict through the Eviction API, as `kubectl drain` does: a PDB may refuse (429) for a while."""
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                       "metadata": {"name": pod, "namespace": NAMESPACE}})
    started = time.monotonic()
    while True:
        proc = subprocess.run(["kubectl", "create", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/eviction",
                               "-f", "-"], input=body, capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return time.monotonic() - started
        if "429" not in proc.stderr and "disruption budget" not in proc.stderr:
            raise Shortfall(f"evicting {pod}: {proc.stderr.strip()[-300:]}")
        if time.monotonic() - started > 300:
            raise Shortfall(f"the PDB refused to evict {pod} for 300s")
        time.sleep(2)


def ledger_job(image: str) -> dict:
    script = (REPO / "loadtest" / "ledger.py").read_text()
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "ledger", "namespace": NAMESPACE},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "ledger", "jobs.example.com/api-client": "true"}},
            "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "ledger", "image": image, "command": ["python3", "-c", script],
                    "env": [{"name": "LEDGER_RATE", "value": "10"}, {"name": "LEDGER_MAX_SECONDS", "value": "1800"}],
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}},
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                  "limits": {"cpu": "500m", "memory": "256Mi"}},
                    "volumeMounts": [{"name": "tokens", "mountPath": "/var/run/secrets/jobs/api-tokens",
                                      "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "tokens", "secret": {"secretName": "main-app-api-tokens", "defaultMode": 0o440}},
                            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
            }}},
    }


def step_prod(report: pathlib.Path, args: argparse.Namespace, results: dict) -> None:
    log = report / "prod.log"
    fresh_namespace(log)
    run(["make", "deploy", "PROFILE=prod"], timeout=1800, log=log)
    wait_for("3 RabbitMQ pods ready", lambda: ready("statefulset", "rabbitmq", 3), timeout=900)
    wait_for("3 running RabbitMQ nodes", lambda: (n := rabbit_nodes()) == 3 or f"{n} nodes", timeout=300)
    for app in ("main-app", "service-app"):
        wait_for(f"{app} ready", lambda app=app: ready("deployment", app), timeout=600)

    members: dict[str, int] = {}

    def three_members() -> bool | str:
        nonlocal members
        members = quorum_members()
        return True if members and all(n == 3 for n in members.values()) else f"members {members}"
    wait_for("every quorum queue with 3 members", three_members, timeout=300)
    results["prod_rabbitmq_nodes"] = rabbit_nodes()
    print(f"   cluster formed: {results['prod_rabbitmq_nodes']} nodes, quorum queues {members}", flush=True)

    image = kubectl("-n", NAMESPACE, "get", "deploy", "main-app",
                    "-o", "jsonpath={.spec.template.spec.containers[0].image}").stdout
    kubectl("-n", NAMESPACE, "delete", "job", "ledger", "--ignore-not-found", "--wait=true")
    subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(ledger_job(image)), check=True,
                   capture_output=True, text=True, timeout=60)
    wait_for("ledger running", lambda: bool(kubectl("-n", NAMESPACE, "get", "pods", "-l",
                                                     "app.kubernetes.io/name=ledger", "-o",
                                                     "jsonpath={.items[0].status.containerStatuses[0].state.running}"
                                                     ).stdout) or "not yet", timeout=180, interval=2)
    time.sleep(args.settle)

    faults: list[dict] = []

    def fault(name: str, action, recovered) -> None:
        started = time.time()
        print(f"   fault: {name}", flush=True)
        detail = action()
        took = wait_for(f"recovery from {name}", recovered, timeout=900)
        faults.append({"fault": name, "at": started, "recovered_s": round(time.time() - started, 1),
                       "detail": detail, "wait_s": round(took, 1)})
        time.sleep(args.settle)

    def whole_again(*checks):
        def check() -> bool | str:
            for c in checks:
                result = c()
                if result is not True:
                    return result
            return True
        return check

    rabbit_pod = "rabbitmq-1"
    rabbit_uid = pod_uid(rabbit_pod)
    fault(f"delete RabbitMQ pod {rabbit_pod}",
          lambda: kubectl("-n", NAMESPACE, "delete", "pod", rabbit_pod, "--wait=false").stdout.strip(),
          whole_again(lambda: replaced_and_ready(rabbit_pod, rabbit_uid), lambda: ready("statefulset", "rabbitmq", 3),
                      lambda: rabbit_nodes() == 3 or "not 3 running nodes"))
    worker = pod_of("service-app")
    fault(f"evict service-app pod {worker}", lambda: f"evicted after {evict(worker):.1f}s",
          whole_again(lambda: pod_gone(worker), lambda: ready("deployment", "service-app")))
    api = pod_of("main-app")
    fault(f"evict main-app pod {api}", lambda: f"evicted after {evict(api):.1f}s",
          whole_again(lambda: pod_gone(api), lambda: ready("deployment", "main-app")))
    fault("rollout restart main-app and service-app",
          lambda: kubectl("-n", NAMESPACE, "rollout", "restart", "deployment/main-app",
                          "deployment/service-app").stdout.strip(),
          whole_again(lambda: ready("deployment", "main-app"), lambda: ready("deployment", "service-app")))

    pod = kubectl("-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=ledger",
                  "-o", "jsonpath={.items[0].metadata.name}").stdout
    kubectl("-n", NAMESPACE, "exec", pod, "--", "python3", "-c", "open('/tmp/ledger-stop', 'w').close()")
    wait_for("the ledger's final accounting", lambda: kubectl(
        "-n", NAMESPACE, "get", "job", "ledger", "-o", "jsonpath={.status.succeeded}").stdout == "1" or "running",
        timeout=420, interval=5)
    line = next(ln for ln in kubectl("-n", NAMESPACE, "logs", "job/ledger").stdout.splitlines()
                if ln.startswith("ledger: "))
    ledger = json.loads(line.split(": ", 1)[1])
    windows = [{"fault": "steady load (before the faults)", "at": ledger["started"], "recovered_s": 0.0}] + faults
    for i, f in enumerate(windows):
        end = windows[i + 1]["at"] if i + 1 < len(windows) else float("inf")
        statuses = [code for t, code in ledger["requests"] if f["at"] <= t < end]
        jobs = [j for j in ledger["jobs"] if f["at"] <= j[0] < end]
        failed = [t for t, code in ledger["requests"] if f["at"] <= t < end and (code == 0 or code >= 500)]
        f.update(requests=len(statuses), accepted=sum(c in (200, 202) for c in statuses),
                 final=sum(j[2] in ("succeeded", "failed") for j in jobs),
                 lost=sum(j[2] not in ("succeeded", "failed") for j in jobs),
                 more_than_once=sum(j[3] > EXPECTED_ATTEMPTS.get(j[1], 1) for j in jobs),
                 s503=statuses.count(503), no_answer=statuses.count(0),
                 other=sum(c not in (0, 200, 202, 503) for c in statuses),
                 error_window_s=round(max(failed) - min(failed), 1) if failed else 0.0)
    results["prod_fault_lost"] = ledger["lost"]
    (report / "prod-ledger.json").write_text(json.dumps({"ledger": ledger, "windows": windows,
                                                          "quorum_members": members}, indent=2) + "\n")
    write_fault_table(report / "faults.md", ledger, windows, results["prod_rabbitmq_nodes"])
    print((report / "faults.md").read_text(), flush=True)
    if ledger["lost"]:
        raise Shortfall(f"{ledger['lost']} accepted jobs lost in the prod fault run")
    if ledger["given_up"]:
        raise Shortfall(f"{ledger['given_up']} submissions never got a 202 however often the ledger retried")


def write_fault_table(path: pathlib.Path, ledger: dict, windows: list[dict], nodes: int) -> None:
    lines = [
        f"Prod topology on the sandbox: {nodes} RabbitMQ nodes, every quorum queue with 3 members; a steady "
        f"load from `loadtest/ledger.py` in the cluster ({ledger['submissions']} submissions over "
        f"{ledger['seconds']:.0f} s, each with an Idempotency-Key, retried on 5xx or no answer). Jobs that "
        f"ran more than once: {ledger['ran_more_than_once'] or 'none'}.",
        "",
        "| window | requests | 202s | reached final state | lost | ran more than once | 503s | no answer | other "
        "| error window (s) | whole again after (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in windows:
        lines.append(f"| {w['fault']} | {w['requests']} | {w['accepted']} | {w['final']} | {w['lost']} | "
                     f"{w['more_than_once']} | {w['s503']} | {w['no_answer']} | {w['other']} | "
                     f"{w['error_window_s']:.1f} | {w['recovered_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


STEPS = [("scaling", step_scaling), ("prod", step_prod)]
SUMMARY = ["service_app", "main_app", "preview_vs_real_peak", "lost", "prod_rabbitmq_nodes", "prod_fault_lost"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-dir", default="reports/cluster-scaling")
    parser.add_argument("--python", default=str(REPO / ".tools" / "locust" / "bin" / "python"))
    parser.add_argument("--step-users", default="5,10,20,40")
    parser.add_argument("--stage-seconds", type=int, default=60)
    parser.add_argument("--settle", type=float, default=20, help="seconds of steady load around each fault")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    args = parser.parse_args()
    report = REPO / args.report_dir
    report.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    failures = []
    for name, fn in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            fn(report, args, results)
            print(f"   {name}: ok ({time.monotonic() - started:.0f}s)", flush=True)
        except (Shortfall, subprocess.SubprocessError, OSError, KeyError, ValueError, StopIteration) as exc:
            failures.append(f"{name}: {exc}")
            print(f"   {name}: FAILED ({time.monotonic() - started:.0f}s): {exc}", flush=True)
    for failure in failures:
        print(f"shortfall: {failure}")
    print("scaling: " + " ".join(f"{k}={results.get(k, 'not-run')}" for k in SUMMARY))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
