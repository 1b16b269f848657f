"""`make scaling-demo`: watch KEDA scale main-app and service-app on a real cluster, and
measure the HPA model of `make scaling-preview` against it.

Needs a cluster with the system deployed (the sandbox: `make sandbox-up` then
`make deploy`; or kind: `make cluster-up` then `make dev`/`make deploy`), KEDA and a
Prometheus Operator Prometheus (`prometheus-operated` in namespace `monitoring`).

1. Starts the in-cluster Locust Job (`loadtest/`: the step profile against Service
   main-app; --step-users/--stage-seconds/--cooldown-stages override its env), after
   deleting a finished Job of the same name.
2. Every --interval seconds, until the load is over and both Deployments are back at
   their minimum (or --max-cooldown seconds after the load), samples: Locust's users (its
   stage schedule from the pod's start), each Deployment's desired and ready replicas,
   each HPA's desired replicas and current metric values, and the ScaledObjects' trigger
   queries evaluated by the cluster's Prometheus through the API server's service proxy
   (request rate, backlog, busy ratio).
3. Model vs reality: reads the same trigger queries over the run from Prometheus
   (query_range, 15 s = the HPA sync period), replays them through the HPA algorithm
   (scripts/observability/hpa.py, what `make scaling-preview` uses) with the ScaledObjects'
   live settings, and compares its replicas with the real ones: time to first scale-up,
   peak replicas, time back to the minimum after the load.
4. Writes to --out (reports/scaling-demo): demo.csv (samples), model.csv (replay),
   summary.json (the comparison, Locust's response counts), scaling-cluster.png.

--dry-run prints the commands it would run and renders loadtest/ without a cluster.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

from jobs_devtools.observability import hpa

ROOT = Path(__file__).resolve().parents[2]

DEPLOYMENTS = ("main-app", "service-app")
SYNC_SECONDS = 15
SANDBOX_CONTEXT = "jobs-sandbox"


class Kubectl:
    def __init__(self, binary: str, namespace: str, dry_run: bool):
        self.binary, self.namespace, self.dry_run = binary, namespace, dry_run

    def run(self, *args: str, check: bool = True, namespaced: bool = True, stdin: str | None = None) -> str:
        cmd = [self.binary, *(["-n", self.namespace] if namespaced else []), *args]
        if self.dry_run:
            print("would run:", shlex.join(cmd), flush=True)
            return ""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, input=stdin)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str, namespaced: bool = True) -> dict:
        out = self.run(*args, "-o", "json", namespaced=namespaced, check=False)
        try:
            return json.loads(out) if out else {}
        except json.JSONDecodeError:
            return {}


def prom_get(kc: Kubectl, service: str, api: str, params: dict) -> list:
    """A Prometheus API call through the API server's service proxy (no port-forward)."""
    ns, name_port = service.split("/", 1)
    path = f"/api/v1/namespaces/{ns}/services/{name_port}/proxy/api/v1/{api}?" + urllib.parse.urlencode(params)
    out = kc.run("get", "--raw", path, check=False, namespaced=False)
    try:
        return json.loads(out)["data"]["result"]
    except (ValueError, KeyError, TypeError):
        return []


def prom_query(kc: Kubectl, service: str, expr: str) -> float | None:
    result = prom_get(kc, service, "query", {"query": expr})
    try:
        return float(result[0]["value"][1]) if result else 0.0
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def quantity(value: str | None) -> float | None:
    """A Kubernetes quantity as the HPA reports metric values ("12500m", "3", "1k")."""
    if value is None:
        return None
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    if value[-1:] in suffixes:
        return float(value[:-1]) * suffixes[value[-1]]
    return float(value)


# ---------------------------------------------------------------- the load
def stage_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    if args.step_users:
        env["LOADTEST_STEP_USERS"] = args.step_users
    if args.stage_seconds is not None:
        env["LOADTEST_STAGE_SECONDS"] = str(args.stage_seconds)
    if args.cooldown_stages is not None:
        env["LOADTEST_COOLDOWN_STAGES"] = str(args.cooldown_stages)
    return env


def loadtest_dir(kc: Kubectl, chosen: str | None) -> Path:
    """loadtest/, or on the sandbox (context jobs-sandbox) k8s/sandbox/loadtest: the same Job with
    the stand-in Locust image, as Skaffold's and Tilt's sandbox settings pick its overlays."""
    if chosen:
        return Path(chosen).resolve()
    context = kc.run("config", "current-context", check=False, namespaced=False).strip()
    return ROOT / ("k8s/sandbox/loadtest" if context == SANDBOX_CONTEXT else "loadtest")


def locust_job(kc: Kubectl, directory: Path, overrides: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    """The Locust kustomization rendered, with `overrides` in the Job's env; also returns the Job's env."""
    objects = json.loads(kc.run("apply", "-k", str(directory), "--dry-run=client", "-o", "json",
                                namespaced=False) or '{"items": []}')
    items = objects.get("items", [objects])
    env: dict[str, str] = {}
    for obj in items:
        if obj.get("kind") == "Job":
            container = obj["spec"]["template"]["spec"]["containers"][0]
            entries = {e["name"]: e for e in container.get("env", [])}
            for name, value in overrides.items():
                entries[name] = {"name": name, "value": value}
            container["env"] = list(entries.values())
            env = {e["name"]: e.get("value", "") for e in container["env"]}
    return items, env


def stages(env: dict[str, str]) -> list[tuple[float, int]]:
    """The step profile's [(seconds, users)], as loadtest/locustfile.py's stages_for reads the env."""
    stage = float(env.get("LOADTEST_STAGE_SECONDS") or 60)
    users = [int(u) for u in (env.get("LOADTEST_STEP_USERS") or "5,10,20,40").split(",") if u.strip()]
    cooldown = int(env.get("LOADTEST_COOLDOWN_STAGES") or 2)
    return [(stage, u) for u in users] + ([(stage * cooldown, 0)] if cooldown else [])


def users_at(schedule: list[tuple[float, int]], elapsed: float | None) -> int:
    if elapsed is None or elapsed < 0:
        return 0
    end = 0.0
    for seconds, users in schedule:
        end += seconds
        if elapsed < end:
            return users
    return 0


def locust_started(kc: Kubectl) -> float | None:
    pods = kc.json("get", "pods", "-l", "app.kubernetes.io/name=locust").get("items", [])
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses", []):
            for state in ("running", "terminated"):
                started = status.get("state", {}).get(state, {}).get("startedAt")
                if started:
                    return datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
    return None


# ---------------------------------------------------------------- sampling
def sample(kc: Kubectl, prom_service: str, triggers: list[tuple[str, str, str]]) -> dict:
    row: dict = {"t": time.time()}
    for item in kc.json("get", "deployments", *DEPLOYMENTS).get("items", []):
        name = item["metadata"]["name"]
        row[f"{name}_replicas"] = item["spec"].get("replicas", 0)
        row[f"{name}_ready"] = item.get("status", {}).get("readyReplicas", 0) or 0
    names = {so: [t for s, t, _ in triggers if s == so] for so, _, _ in triggers}
    for item in kc.json("get", "hpa").get("items", []):
        name = item["metadata"]["name"]
        status = item.get("status", {})
        row[f"{name}_hpa_desired"] = status.get("desiredReplicas")
        # KEDA names its External metrics s<trigger index>-<type>.
        for metric in status.get("currentMetrics") or []:
            ext = metric.get("external") or {}
            metric_name = ext.get("metric", {}).get("name", "")
            index = metric_name.split("-", 1)[0][1:]
            if index.isdigit() and int(index) < len(names.get(name, [])):
                value = quantity(ext.get("current", {}).get("averageValue"))
                row[f"{name}:{names[name][int(index)]}:hpa_value"] = value
    for so, trig, query in triggers:
        row[f"{so}:{trig}"] = prom_query(kc, prom_service, query)
    status = kc.json("get", "job", "locust").get("status", {})
    row["locust_done"] = bool(status.get("succeeded") or status.get("failed"))
    return row


def scaled_objects(kc: Kubectl) -> dict[str, dict]:
    return {so["metadata"]["name"]: so for so in kc.json("get", "scaledobjects.keda.sh").get("items", [])}


# ---------------------------------------------------------------- model vs reality
def replay(kc: Kubectl, prom_service: str, sos: dict[str, dict], start: float, end: float,
           start_replicas: dict[str, int]) -> dict[str, list[dict]]:
    """The trigger queries over [start, end] from Prometheus, replayed through the HPA model."""
    start, end = float(int(start)), float(int(end))
    out = {}
    for name, so in sos.items():
        config = hpa.config_from_scaled_object(so)
        columns = {}
        for trig in so["spec"]["triggers"]:
            result = prom_get(kc, prom_service, "query_range",
                              {"query": trig["metadata"]["query"], "start": start, "end": end, "step": SYNC_SECONDS})
            columns[trig.get("name") or trig["type"]] = (
                {round(float(t)): float(v) for t, v in result[0]["values"]} if result else {})
        series = [(t - start, {m: col.get(round(t)) for m, col in columns.items()})
                  for t in range(int(start), int(end) + 1, SYNC_SECONDS)]
        out[name] = hpa.simulate(config, series, start_replicas=start_replicas.get(name, config.min_replicas),
                                 sync_period=SYNC_SECONDS)
    return out


def milestones(points: list[tuple[float, int]], minimum: int, load_end: float) -> dict:
    """From [(seconds since the load started, replicas)]: first scale-up, peak, back to minimum."""
    first_up = next((t for t, r in points if r > minimum), None)
    peak = max((r for _, r in points), default=minimum)
    back = next((t for t, r in points if t >= load_end and r <= minimum), None)
    return {"first_scale_up_s": first_up, "peak": peak,
            "back_to_min_after_load_s": None if back is None else round(back - load_end, 1)}


def compare(rows: list[dict], decisions: dict[str, list[dict]], sos: dict[str, dict], t0: float,
            load_seconds: float) -> dict:
    out = {}
    for name in DEPLOYMENTS:
        if name not in sos:
            continue
        minimum = hpa.config_from_scaled_object(sos[name]).min_replicas
        real = [(r["t"] - t0, r.get(f"{name}_replicas", 0)) for r in rows]
        model = [(d["t"], d["desired"]) for d in decisions.get(name, [])]
        out[name] = {"min": minimum, "real": milestones(real, minimum, load_seconds),
                     "model": milestones(model, minimum, load_seconds)}
    return out


# ---------------------------------------------------------------- outputs
def write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: list[dict], decisions: dict[str, list[dict]], sos: dict[str, dict], t0: float,
         title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [(r["t"] - t0) / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8.2), sharex=True, dpi=80)
    ax = axes[0]
    ax.plot(x, [r.get("main-app:http-requests-per-pod") or 0 for r in rows], color="tab:blue",
            label="API requests/s (trigger)")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.step(x, [r.get("locust_users", 0) for r in rows], where="post", color="tab:gray", alpha=0.6,
             label="Locust users")
    ax2.set_ylabel("users")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    ax.plot(x, [r.get("service-app:queue-backlog-per-replica") or 0 for r in rows], color="tab:orange",
            label="ready backlog (trigger)")
    ax.set_ylabel("messages")
    ax3 = ax.twinx()
    ax3.plot(x, [r.get("service-app:worker-busy-ratio") or 0 for r in rows], color="tab:red",
             label="sum of busy ratios (trigger)")
    ax3.set_ylabel("busy ratio sum")
    ax.legend(loc="upper left", fontsize=8)
    ax3.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    colors = {"main-app": "tab:blue", "service-app": "tab:green"}
    for name in DEPLOYMENTS:
        if name not in sos:
            continue
        cfg = hpa.config_from_scaled_object(sos[name])
        ax.step(x, [r.get(f"{name}_replicas", 0) for r in rows], where="post", color=colors[name], linewidth=2,
                label=f"{name} replicas, real (min {cfg.min_replicas}, max {cfg.max_replicas})")
        decs = decisions.get(name, [])
        ax.step([d["t"] / 60 for d in decs], [d["desired"] for d in decs], where="post", color=colors[name],
                linestyle="--", alpha=0.8, label=f"{name}, HPA model replay")
    ax.set_ylabel("replicas")
    ax.set_xlabel("minutes since the load started")
    peak = max([r.get(f"{d}_replicas", 0) or 0 for r in rows for d in DEPLOYMENTS] + [1])
    ax.set_ylim(0, peak + 2)  # room for the legend above the curves
    ax.legend(loc="upper center", fontsize=8, ncol=2)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def locust_responses(kc: Kubectl, out: Path) -> dict[str, int]:
    """The `loadtest responses: {...}` line loadtest/locustfile.py prints when it quits (its
    whole output is kept in locust.log)."""
    logs = kc.run("logs", "job/locust", check=False)
    (out / "locust.log").write_text(logs)
    for line in logs.splitlines():
        if line.startswith("loadtest responses: "):
            return json.loads(line.split(": ", 1)[1])
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="jobs")
    parser.add_argument("--prometheus", default="monitoring/prometheus-operated:9090",
                        help="namespace/service:port of the Prometheus KEDA queries")
    parser.add_argument("--interval", type=float, default=5)
    parser.add_argument("--loadtest", help="the Locust kustomization (default: loadtest/, on the sandbox "
                        "k8s/sandbox/loadtest)")
    parser.add_argument("--step-users", help="Locust step users, e.g. 5,10,20,40 (default: loadtest/'s)")
    parser.add_argument("--stage-seconds", type=int, help="seconds per stage (default: loadtest/'s)")
    parser.add_argument("--cooldown-stages", type=int, help="idle stages after the steps (default: loadtest/'s)")
    parser.add_argument("--max-cooldown", type=float, default=900,
                        help="seconds after the load to wait for both Deployments to reach their minimum")
    parser.add_argument("--settle-seconds", type=float, default=30,
                        help="seconds both Deployments must stay at their minimum after the load before stopping")
    parser.add_argument("--no-load", action="store_true", help="only sample for --max-cooldown (drive load yourself)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "scaling-demo"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, render loadtest/, no cluster")
    args = parser.parse_args()

    kubectl = shutil.which("kubectl") or str(ROOT / ".tools" / "k8s" / "bin" / "kubectl")
    if not Path(kubectl).exists() and not shutil.which(kubectl):
        print("error: kubectl not found (make k8s-tools puts one in .tools/k8s/bin)", file=sys.stderr)
        return 127
    kc = Kubectl(kubectl, args.namespace, args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.dry_run:
        rendered = subprocess.run([kubectl, "kustomize", str(ROOT / "loadtest")], capture_output=True, text=True)
        if rendered.returncode != 0:
            print(rendered.stderr, file=sys.stderr)
            return 1
        kinds = [line.split(":", 1)[1].strip() for line in rendered.stdout.splitlines() if line.startswith("kind:")]
        print(f"dry run: loadtest/ renders {kinds}; env overrides {stage_env(args)}", flush=True)
    else:
        kc.run("version", namespaced=False)  # fails early without a reachable cluster

    sos = scaled_objects(kc)
    triggers = [(name, t.get("name", t["type"]), t["metadata"]["query"])
                for name, so in sos.items() for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
    if not triggers and not args.dry_run:
        print("error: no ScaledObjects with prometheus triggers in namespace "
              f"{args.namespace}: deploy with the autoscaling component (make dev / make deploy)", file=sys.stderr)
        return 1

    schedule: list[tuple[float, int]] = []
    if not args.no_load:
        kc.run("delete", "job", "locust", "--ignore-not-found", "--wait=true")
        if args.dry_run:
            kc.run("apply", "-k", str(ROOT / "loadtest"), namespaced=False)
        else:
            directory = loadtest_dir(kc, args.loadtest)
            print(f"Locust: {directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory}",
                  flush=True)
            items, env = locust_job(kc, directory, stage_env(args))
            schedule = stages(env)
            job_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
            kc.run("apply", "-f", "-", namespaced=False, stdin=job_list)
    if args.dry_run:
        sample(kc, args.prometheus, triggers or [("service-app", "queue-backlog-per-replica", "<query>")])
        print("dry run done: no samples written", flush=True)
        return 0

    load_seconds = sum(s for s, u in schedule if u > 0)
    minimum = {name: hpa.config_from_scaled_object(so).min_replicas for name, so in sos.items()}
    rows: list[dict] = []
    started = time.time()
    t0 = None  # when Locust started: the load's time zero
    at_min_since = None
    while True:
        row = sample(kc, args.prometheus, triggers)
        if t0 is None and not args.no_load:
            t0 = locust_started(kc)
        row["locust_users"] = users_at(schedule, None if t0 is None else row["t"] - t0)
        rows.append(row)
        summary = " ".join(f"{d}={row.get(f'{d}_ready', '?')}/{row.get(f'{d}_replicas', '?')}" for d in DEPLOYMENTS)
        signals = " ".join(f"{t}={row.get(f'{so}:{t}')}" for so, t, _ in triggers)
        print(f"[{row['t'] - started:6.0f}s] users={row['locust_users']} ready/spec {summary} | {signals}",
              flush=True)
        load_over = args.no_load or (t0 is not None and row["t"] - t0 >= load_seconds)
        at_min = all(row.get(f"{d}_replicas") == minimum.get(d) for d in DEPLOYMENTS if d in minimum)
        at_min_since = (at_min_since or row["t"]) if load_over and at_min else None
        after_load = row["t"] - (started if args.no_load else (t0 or started) + load_seconds)
        settled = at_min_since is not None and row["t"] - at_min_since >= args.settle_seconds
        if load_over and settled and row["locust_done"]:
            break
        if load_over and after_load >= args.max_cooldown:
            print(f"stopping: {args.max_cooldown:.0f}s after the load and not back at the minimum", flush=True)
            break
        time.sleep(args.interval)

    t0 = t0 or started
    first = rows[0]
    decisions = replay(kc, args.prometheus, sos, t0, rows[-1]["t"],
                       {d: first.get(f"{d}_replicas", minimum.get(d, 1)) for d in DEPLOYMENTS})
    comparison = compare(rows, decisions, sos, t0, load_seconds)
    summary = {"load_started": t0, "load_seconds": load_seconds, "schedule": schedule,
               "locust_responses": locust_responses(kc, out), "deployments": comparison}
    write_csv(out / "demo.csv", [{**r, "t_since_load": round(r["t"] - t0, 1)} for r in rows])
    write_csv(out / "model.csv", [{"t_since_load": d["t"], "deployment": name, "model_replicas": d["desired"],
                                   **{f"value:{k}": v for k, v in d["values"].items()}}
                                  for name, decs in decisions.items() for d in decs])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    users = ",".join(str(u) for _, u in schedule if u)
    plot(out / "scaling-cluster.png", rows, decisions, sos, t0,
         f"Real cluster: Locust step {users} users; replicas real (solid) vs HPA model replay (dashed)")
    for name, c in comparison.items():
        print(f"{name}: real {c['real']} | model {c['model']}", flush=True)
    print(f"wrote {out}/demo.csv, model.csv, summary.json, scaling-cluster.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
