"""`make scaling-preview`: the replica curves the autoscaling configuration would produce,
without a cluster.

1. Renders k8s/overlays/<overlay> and reads the KEDA ScaledObjects (trigger queries,
   thresholds, min/max, behavior) and the monitors / rules (scripts/observability/promstack.py).
2. Starts a private local stack (RabbitMQ with rabbitmq_prometheus, Redis, main-app under
   gunicorn, --workers service-app workers) and Debian's Prometheus scraping it like the
   cluster's Prometheus Operator would.
3. Runs Locust's `step` profile (loadtest/locustfile.py) against the API.
4. Reads every trigger query from Prometheus over the run (query_range, 15 s = the HPA
   sync period), replays the values through the HPA algorithm (scripts/observability/hpa.py)
   for each ScaledObject, and writes reports/scaling-preview/preview.csv and preview.png.

The replay is open-loop: the local stack keeps its fixed size, so the recorded signals are
those of that fixed capacity (a scaled-out cluster would drain the backlog faster and see
a lower busy ratio after scaling). The curve shows when and how far the configuration
reacts to the load, including stabilisation windows and rate policies.

Run with the tools venv (.tools/locust: Locust, matplotlib, PyYAML); the apps run from the
app venv (--app-venv, default .venv).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs_devtools.observability import hpa, promstack
from jobs_devtools.stack import ROOT, PrivateStack, wait_for_port

TOKEN = "scaling-preview-token-0123456789"


def record(prom: promstack.Prometheus, manifests: promstack.Manifests, start_t: float, end_t: float,
           step: float) -> tuple[list[float], dict[str, list[float | None]]]:
    start_t = float(int(start_t))  # whole seconds: Prometheus answers with millisecond timestamps
    times = [start_t + i * step for i in range(int((end_t - start_t) // step) + 1)]
    queries = {t.name: t.query for t in manifests.triggers()}
    queries.update({
        "jobs_in_progress": "sum(jobs_worker_jobs_in_progress)",
        "processed_per_s": "sum(rate(jobs_worker_jobs_processed_total[1m]))",
    })
    columns: dict[str, list[float | None]] = {}
    for name, expr in queries.items():
        result = prom.query_range(expr, times[0], times[-1], step)
        values = {round(float(t) * 1000): float(v) for t, v in result[0]["values"]} if result else {}
        columns[name] = [values.get(round(t * 1000)) for t in times]
    return times, columns


def replay(manifests: promstack.Manifests, times: list[float], columns: dict[str, list[float | None]],
           sync: float) -> dict[str, list[dict]]:
    out = {}
    for name, obj in manifests.scaled_objects().items():
        config = hpa.config_from_scaled_object(obj)
        series = [(t - times[0], {m.name: columns[m.name][i] for m in config.metrics}) for i, t in enumerate(times)]
        out[name] = hpa.simulate(config, series, start_replicas=config.min_replicas, sync_period=sync)
    return out


def write_csv(path: Path, times: list[float], columns: dict, decisions: dict[str, list[dict]], users: list) -> None:
    names = list(columns)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_seconds", "locust_users", *names, *(f"{so}_replicas" for so in decisions)])
        for i, t in enumerate(times):
            row = [round(t - times[0], 1), users[i] if i < len(users) else ""]
            row += ["" if columns[n][i] is None else round(columns[n][i], 4) for n in names]
            row += [decisions[so][i]["desired"] if i < len(decisions[so]) else "" for so in decisions]
            w.writerow(row)


def plot(path: Path, manifests: promstack.Manifests, times: list[float], columns: dict, decisions: dict,
         users: list, overlay: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [(t - times[0]) / 60 for t in times]
    trig = {t.name: t for t in manifests.triggers()}
    fig, axes = plt.subplots(3, 1, figsize=(9, 8.2), sharex=True, dpi=80)

    ax = axes[0]
    ax.plot(x, [v or 0 for v in columns["http-requests-per-pod"]], color="tab:blue", label="API requests/s (trigger)")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.step(x, users[: len(x)], where="post", color="tab:gray", alpha=0.6, label="Locust users")
    ax2.set_ylabel("users")
    ax.set_title(f"Load: Locust step profile; thresholds from k8s/overlays/{overlay}")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    ax.plot(x, [v or 0 for v in columns["queue-backlog-per-replica"]], color="tab:orange",
            label=f"ready backlog (trigger; target {trig['queue-backlog-per-replica'].threshold:g}/replica)")
    ax.set_ylabel("messages")
    ax3 = ax.twinx()
    ax3.plot(x, [v or 0 for v in columns["worker-busy-ratio"]], color="tab:red",
             label=f"sum of busy ratios (trigger; target {trig['worker-busy-ratio'].threshold:g}/replica)")
    ax3.set_ylabel("busy ratio sum")
    ax.legend(loc="upper left", fontsize=8)
    ax3.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    colors = {"main-app": "tab:blue", "service-app": "tab:green"}
    for so, decs in decisions.items():
        cfg = hpa.config_from_scaled_object(manifests.scaled_objects()[so])
        ax.step(x[: len(decs)], [d["desired"] for d in decs], where="post", color=colors.get(so), linewidth=2,
                label=f"{so} replicas (min {cfg.min_replicas}, max {cfg.max_replicas})")
    ax.set_ylabel("replicas (HPA replay)")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def locust_users(csv_history: Path, times: list[float]) -> list:
    """Users at each sample time, from Locust's --csv-full-history stats history."""
    points = []
    if csv_history.exists():
        with open(csv_history) as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    points.append((float(row["Timestamp"]), int(row["User Count"])))
    out = []
    for t in times:
        before = [u for ts, u in points if ts <= t]
        out.append(before[-1] if before else 0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", default="dev", help="k8s/overlays/<overlay> to read the autoscaling from")
    parser.add_argument("--app-venv", default=".venv", help="venv with the apps (gunicorn, service_app)")
    parser.add_argument("--workers", type=int, default=1, help="local service-app workers (fixed)")
    parser.add_argument("--stage-seconds", type=float, default=60, help="length of one step of the load")
    parser.add_argument("--step-users", default="5,10,20,40", help="users of the rising stages")
    parser.add_argument("--cooldown-stages", type=int, default=3, help="idle stages at the end (scale-in)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "scaling-preview"))
    parser.add_argument("--png-copy", help="also write the PNG here (e.g. docs/img/scaling-preview.png)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app_bin = (ROOT / args.app_venv / "bin").resolve()
    manifests = promstack.Manifests(promstack.render(args.overlay))
    sync = hpa.SYNC_PERIOD_SECONDS

    work = Path(tempfile.mkdtemp(prefix="scaling-preview-"))
    print(f"starting a private RabbitMQ, Redis, main-app and {args.workers} worker(s) under {work}", flush=True)
    try:
        with PrivateStack(work, f"jobs-preview-{os.getpid()}") as stack:
            return run_preview(args, stack, manifests, out, app_bin, sync)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_preview(args: argparse.Namespace, stack: PrivateStack, manifests: promstack.Manifests, out: Path,
                app_bin: Path, sync: float) -> int:
    base = stack.env(PATH=f"{app_bin}:{os.environ['PATH']}")
    main_app = stack.api({**base, "API_TOKENS": TOKEN}, bin_dir=app_bin)
    workers = [stack.worker({**base, "SHUTDOWN_GRACE_SECONDS": "2"}, bin_dir=app_bin) for _ in range(args.workers)]
    worker_targets = [promstack.Target(f"127.0.0.1:{w.metrics_port}", f"service-app-local-{i}", "service-app")
                      for i, w in enumerate(workers)]
    api = main_app.url
    for app in (main_app, *workers):
        app.wait_ready(timeout=60)
    wait_for_port(stack.rabbit.prometheus_port, 30)
    scrape = promstack.scrape_configs(manifests, {
        "main-app": [promstack.Target(f"127.0.0.1:{main_app.metrics_port}", "main-app-local-0", "main-app")],
        "service-app": worker_targets,
        "rabbitmq": [promstack.Target(f"127.0.0.1:{stack.rabbit.prometheus_port}", "rabbitmq-0", "rabbitmq")],
    })
    prom = promstack.Prometheus(stack.work / "prometheus", scrape, manifests.rule_groups())
    try:
        prom.start()
        prom.wait_targets_up(60)
        print(f"Prometheus {prom.url} scraping {len(prom.targets())} targets", flush=True)

        start_t = time.time()
        locust_out = out / "locust"
        env = {**os.environ, "LOADTEST_TOKEN": TOKEN, "LOADTEST_PROFILE": "step",
               "LOADTEST_STAGE_SECONDS": str(args.stage_seconds), "LOADTEST_STEP_USERS": args.step_users,
               "LOADTEST_COOLDOWN_STAGES": str(args.cooldown_stages),
               # the preview observes; it does not judge latency on a 2-core laptop
               "LOADTEST_MAX_P95_MS": os.environ.get("LOADTEST_MAX_P95_MS", "100000"),
               "LOADTEST_MAX_ERROR_RATIO": os.environ.get("LOADTEST_MAX_ERROR_RATIO", "0.05")}
        locust = Path(sys.executable).parent / "locust"
        print(f"Locust step profile: users {args.step_users}, {args.stage_seconds:g}s per stage, "
              f"{args.cooldown_stages} idle stage(s)", flush=True)
        proc = subprocess.run([str(locust), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
                               "--host", api, "--csv", str(locust_out), "--csv-full-history",
                               "--html", f"{locust_out}.html", "--only-summary"], env=env, cwd=ROOT)
        end_t = time.time()
        time.sleep(2)
        times, columns = record(prom, manifests, start_t, end_t, sync)
        users = locust_users(Path(f"{locust_out}_stats_history.csv"), times)
        decisions = replay(manifests, times, columns, sync)
        write_csv(out / "preview.csv", times, columns, decisions, users)
        plot(out / "preview.png", manifests, times, columns, decisions, users, args.overlay)
        if args.png_copy:
            shutil.copy(out / "preview.png", args.png_copy)
        for so, decs in decisions.items():
            print(f"{so}: replicas over time {[d['desired'] for d in decs]}", flush=True)
        print(f"wrote {out / 'preview.csv'} and {out / 'preview.png'} (Locust reports: {locust_out}*)", flush=True)
        if proc.returncode != 0:
            print(f"note: Locust exited {proc.returncode} (thresholds); the preview was still written", flush=True)
        return 0
    finally:
        prom.stop()


if __name__ == "__main__":
    sys.exit(main())
