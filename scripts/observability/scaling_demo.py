"""`make scaling-demo`: watch KEDA scale main-app and service-app on a real cluster.

Needs a cluster with the system deployed (`make cluster-up`, then `make dev` or
`make deploy`), KEDA and the kube-prometheus-stack Prometheus (namespace `monitoring`).

1. Starts the in-cluster Locust Job (`kubectl apply -k loadtest/`: step profile against
   Service main-app), after deleting a finished Job of the same name.
2. Every --interval seconds until the Job has finished and --cooldown seconds more,
   samples: the replicas of both Deployments (spec and ready), each ScaledObject's HPA
   (desired replicas, current metric values), and the trigger queries themselves, read
   from the ScaledObjects in the cluster and evaluated by the cluster's Prometheus through
   the API server's service proxy (backlog, busy ratio, request rate).
3. Writes reports/scaling-demo/demo.csv and demo.png (load, backlog, replicas vs time).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("main-app", "service-app")


class Kubectl:
    def __init__(self, binary: str, namespace: str, dry_run: bool):
        self.binary, self.namespace, self.dry_run = binary, namespace, dry_run

    def run(self, *args: str, check: bool = True, namespaced: bool = True) -> str:
        cmd = [self.binary, *(["-n", self.namespace] if namespaced else []), *args]
        if self.dry_run:
            print("would run:", shlex.join(cmd), flush=True)
            return ""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str, namespaced: bool = True) -> dict:
        out = self.run(*args, "-o", "json", namespaced=namespaced, check=False)
        try:
            return json.loads(out) if out else {}
        except json.JSONDecodeError:
            return {}


def prom_query(kc: Kubectl, service: str, expr: str) -> float | None:
    """Instant query through the API server's service proxy (no port-forward needed)."""
    ns, name_port = service.split("/", 1)
    path = f"/api/v1/namespaces/{ns}/services/{name_port}/proxy/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr})
    out = kc.run("get", "--raw", path, check=False, namespaced=False)
    try:
        result = json.loads(out)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def sample(kc: Kubectl, prom_service: str, triggers: list[tuple[str, str, str]]) -> dict:
    row: dict = {"t": time.time()}
    deps = kc.json("get", "deployments", *DEPLOYMENTS)
    for item in deps.get("items", []):
        name = item["metadata"]["name"]
        row[f"{name}_replicas"] = item["spec"].get("replicas", 0)
        row[f"{name}_ready"] = item.get("status", {}).get("readyReplicas", 0)
    hpas = kc.json("get", "hpa")
    for item in hpas.get("items", []):
        name = item["metadata"]["name"]
        row[f"{name}_hpa_desired"] = item.get("status", {}).get("desiredReplicas")
    for so, trig, query in triggers:
        row[f"{so}:{trig}"] = prom_query(kc, prom_service, query)
    job = kc.json("get", "job", "locust")
    status = job.get("status", {})
    row["locust_active"] = status.get("active", 0) or 0
    row["locust_done"] = bool(status.get("succeeded") or status.get("failed"))
    return row


def plot(rows: list[dict], path: Path, triggers: list[tuple[str, str, str]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rows[0]["t"]
    x = [(r["t"] - t0) / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True, dpi=80)
    for so, trig, _ in triggers:
        key = f"{so}:{trig}"
        ax = axes[0] if so == "main-app" else axes[1]
        ax.plot(x, [r.get(key) or 0 for r in rows], label=key)
    axes[0].set_ylabel("requests/s")
    axes[0].set_title("Load (trigger queries on the cluster's Prometheus)")
    axes[1].set_ylabel("backlog / busy")
    axes[1].set_yscale("symlog")
    for name in DEPLOYMENTS:
        axes[2].step(x, [r.get(f"{name}_ready", 0) for r in rows], where="post", label=f"{name} ready", linewidth=2)
        axes[2].step(x, [r.get(f"{name}_replicas", 0) for r in rows], where="post", linestyle="--",
                     label=f"{name} spec.replicas")
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="jobs")
    parser.add_argument("--prometheus", default="monitoring/prometheus-operated:9090",
                        help="namespace/service:port of the Prometheus KEDA queries")
    parser.add_argument("--interval", type=float, default=10)
    parser.add_argument("--cooldown", type=float, default=420, help="seconds to keep sampling after the load")
    parser.add_argument("--max-seconds", type=float, default=3600)
    parser.add_argument("--no-load", action="store_true", help="only sample (drive the load yourself)")
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
        print(f"dry run: loadtest/ renders {kinds}", flush=True)
    else:
        kc.run("version", namespaced=False)  # fails early without a reachable cluster

    sos = kc.json("get", "scaledobjects.keda.sh")
    triggers = [(so["metadata"]["name"], t.get("name", t["type"]), t["metadata"]["query"])
                for so in sos.get("items", []) for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
    if not triggers and not args.dry_run:
        print("error: no ScaledObjects with prometheus triggers in namespace "
              f"{args.namespace}: deploy with the autoscaling component (make dev / make deploy)", file=sys.stderr)
        return 1

    if not args.no_load:
        kc.run("delete", "job", "locust", "--ignore-not-found", "--wait=true")
        kc.run("apply", "-k", str(ROOT / "loadtest"), namespaced=False)

    rows: list[dict] = []
    started = time.time()
    done_at = None
    while not args.dry_run:
        row = sample(kc, args.prometheus, triggers)
        rows.append(row)
        summary = " ".join(f"{d}={row.get(f'{d}_ready', '?')}/{row.get(f'{d}_replicas', '?')}" for d in DEPLOYMENTS)
        signals = " ".join(f"{t}={row.get(f'{so}:{t}')}" for so, t, _ in triggers)
        print(f"[{row['t'] - started:6.0f}s] ready/spec {summary} | {signals}", flush=True)
        if done_at is None and (row["locust_done"] or args.no_load):
            done_at = row["t"]
        if done_at is not None and row["t"] - done_at >= args.cooldown:
            break
        if row["t"] - started > args.max_seconds:
            break
        time.sleep(args.interval)

    if args.dry_run:
        sample(kc, args.prometheus, triggers or [("service-app", "queue-backlog-per-replica", "<query>")])
        print("dry run done: no samples written", flush=True)
        return 0
    keys = sorted({k for r in rows for k in r})
    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "demo.png", triggers)
    print(f"wrote {out / 'demo.csv'} and {out / 'demo.png'}; Locust: kubectl -n {args.namespace} logs job/locust")
    return 0


if __name__ == "__main__":
    sys.exit(main())
