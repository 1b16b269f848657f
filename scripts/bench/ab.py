"""A/B comparison for performance work: the code at a git ref (A) against the working
tree (B), or one settings variant against another, run side by side and interleaved on
the same private nodes, so a busy machine skews both alike.

    python scripts/bench/ab.py ingest --ref HEAD --rounds 4
    python scripts/bench/ab.py ingest --ref WORKTREE --env-b GUNICORN_THREADS=16
    python scripts/bench/ab.py worker --ref HEAD --jobs 20000
    python scripts/bench/ab.py e2e --ref HEAD --rate 400   # submit-to-succeeded p99, API + one worker each
    python scripts/bench/ab.py ingest --ref WORKTREE --peer-b peer_naive   # B: a peer (make bench-peers)
    python scripts/bench/ab.py worker --ref WORKTREE --peer-b peer_dramatiq_worker
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs_devtools.bench import bench

PACKAGES = ("main-app/main_app", "service-app/service_app", "contract/jobs_contract")
WARM_ALL_THREADS_CONNECTIONS = 100  # more than gunicorn's workers x threads (2 x 32)


def checkout(ref: str, into: Path) -> str:
    """Copy the three packages at `ref` into `into`; return a PYTHONPATH that puts them first."""
    archive = subprocess.run(["git", "archive", ref, *PACKAGES], cwd=bench.ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return os.pathsep.join(str(into / p.split("/")[0]) for p in PACKAGES)


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("ingest", "worker", "e2e"))
    parser.add_argument("--ref", default="HEAD", help="git ref for A, or WORKTREE to run the working tree as A too")
    parser.add_argument("--ref-b", default="WORKTREE", help="git ref for B (default: the working tree)")
    parser.add_argument("--env-a", nargs="*", default=[])
    parser.add_argument("--env-b", nargs="*", default=[])
    parser.add_argument("--peer-b", choices=(*bench.PEER_PRODUCERS, *bench.PEER_WORKERS),
                        help="B is this peer of `make bench` instead of our code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=400, help="e2e: submissions per second (open loop)")
    args = parser.parse_args()
    peers_for = {"ingest": bench.PEER_PRODUCERS, "worker": bench.PEER_WORKERS, "e2e": {}}
    if args.peer_b and args.peer_b not in peers_for[args.what]:
        choices = ", ".join(peers_for[args.what])
        parser.error(f"--peer-b for {args.what}: one of {choices}" if choices else "e2e has no --peer-b")
    work = Path(tempfile.mkdtemp(prefix="jobs-ab-"))
    env_a, env_b = parse_env(args.env_a), parse_env(args.env_b)
    if args.ref != "WORKTREE":
        (work / "a").mkdir()
        env_a["PYTHONPATH"] = checkout(args.ref, work / "a")
    if args.ref_b != "WORKTREE":
        (work / "b").mkdir()
        env_b["PYTHONPATH"] = checkout(args.ref_b, work / "b")
    results: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    submit_p99: dict[str, list[float]] = {"A": [], "B": []}  # e2e
    try:
        with bench.bench_stack(work, f"jobs-ab-{os.getpid()}") as (stack, store):
            variants = {"A": env_a, "B": env_b}
            if args.what in ("ingest", "e2e"):
                servers = {name: bench.start_server(stack, f"api-{name}", env=bench.bench_env(stack, **env))
                           for name, env in variants.items() if not (name == "B" and args.peer_b)}
                if args.peer_b:
                    servers["B"] = bench.start_server(stack, args.peer_b, "--pythonpath", str(bench.HERE),
                                                      bench.PEER_PRODUCERS[args.peer_b],
                                                      env=bench.peer_env(stack, **env_b),
                                                      bin_dir=bench.PEERS_VENV / "bin")
                for server in servers.values():
                    # Every gunicorn thread serves a request first: the naive peer opens a broker
                    # connection per thread on its first request, which must not fall in a measured run.
                    bench.run_wrk(server.url, 3, WARM_ALL_THREADS_CONNECTIONS)
                    bench.run_wrk(server.url, 2, args.connections)
                bench.purge(stack.rabbit.url)
            for i in range(args.rounds):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    if args.what == "ingest":
                        r = bench.load(servers[name], args.seconds, args.connections, bench.node_pids(stack))
                        results[name].append(r["rps"])
                        cpu[name].append(r["cpu_us_per_req"])
                        bench.log(f"{name}: {r['rps']:.0f} req/s p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                                  f"cpu {r['cpu_us_per_req']:.0f} us/req wake-ups/req {r['wakeups_per_req']:.1f} "
                                  f"(RabbitMQ {r['wakeups_per_req_rabbitmq']:.1f}, "
                                  f"Redis {r['wakeups_per_req_redis']:.1f}) "
                                  f"connections per worker {bench.split_text(r)} "
                                  f"non-2xx {r['non_2xx'] + r['socket_errors']} load {os.getloadavg()[0]:.1f}")
                    elif args.what == "e2e":
                        worker = stack.worker(bench.bench_env(stack, **variants[name]), name=f"worker-{name}{i}")
                        worker.wait_ready()
                        try:
                            bench.end_to_end(servers[name], store, args.rate, 1.0)  # warm-up
                            bench.wait_until_quiet(bench.node_pids(stack))
                            r = bench.end_to_end(servers[name], store, args.rate, args.seconds,
                                                 bench.e2e_others(stack, worker))
                        finally:
                            worker.stop()
                        results[name].append(r["e2e_p99_ms"])
                        submit_p99[name].append(r["submit_p99_ms"])
                        cpu[name].append(r["api_cpu_us_per_req"])
                        bench.log(f"{name}: e2e p50 {r['e2e_p50_ms']:.1f} ms p99 {r['e2e_p99_ms']:.1f} ms, submit p99 "
                                  f"{r['submit_p99_ms']:.1f} ms, cpu us/req: "
                                  + ", ".join(f"{p} {r[f'{p}_cpu_us_per_req'] or 0:.0f}" for p in bench.E2E_PROCESSES)
                                  + ", wake-ups/req: "
                                  + ", ".join(f"{p} {r[f'{p}_wakeups_per_req'] or 0:.1f}" for p in bench.E2E_PROCESSES)
                                  + f", machine busy {r['machine_busy']:.2f} steal {r['machine_steal']:.2f}, "
                                  f"not succeeded {r['not_succeeded']}, "
                                  f"connections per API worker {bench.split_text(r, 'api_')} "
                                  f"load {os.getloadavg()[0]:.1f}")
                    elif name == "B" and args.peer_b:
                        peer = bench.PEER_WORKERS[args.peer_b]
                        bench.peer_prefill(stack, peer, args.jobs)
                        r = bench.peer_worker_drain(stack, peer, args.jobs, f"{name}{i}", bench.worker_settings(env_b))
                        results[name].append(r["jobs_per_s"])
                        cpu[name].append(r.get("cpu_us_per_job", 0))
                        bench.log(f"{name}: {r['jobs_per_s']:.0f} jobs/s load {os.getloadavg()[0]:.1f}")
                    else:
                        bench.prefill_jobs(stack.rabbit.url, store, args.jobs)
                        r = bench.worker_drain(stack, args.jobs, f"{name}{i}", variants[name])
                        results[name].append(r["jobs_per_s"])
                        cpu[name].append(r["cpu_us_per_job"])
                        bench.log(f"{name}: {r['jobs_per_s']:.0f} jobs/s cpu {r['cpu_us_per_job']:.0f} us/job "
                                  f"RSS max {r['rss_mb_max']:.1f} MB "
                                  f"load {os.getloadavg()[0]:.1f}")
                    bench.purge(stack.rabbit.url)
                    if args.peer_b:
                        bench.purge_queues(stack.rabbit.url, list(bench.PEER_QUEUES.values()))
                    store.flushdb()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.what == "e2e":
        for name, ref, env in (("A", args.ref, args.env_a), ("B", args.ref_b, args.env_b)):
            print(f"{name} ({ref} {env}): e2e p99 median {statistics.median(results[name]):.1f} ms {results[name]}, "
                  f"submit p99 median {statistics.median(submit_p99[name]):.1f} ms, "
                  f"API CPU {statistics.median(cpu[name]):.0f} us/req")
        print(f"B/A API CPU per request: {statistics.median(cpu['B']) / statistics.median(cpu['A']):.2f}")
        return 0
    a, b = statistics.median(results["A"]), statistics.median(results["B"])
    ratios = [rb / ra for ra, rb in zip(results["A"], results["B"], strict=True)]
    print(f"A ({args.ref} {args.env_a}): median {a:.0f}/s {results['A']}, "
          f"CPU {statistics.median(cpu['A']):.0f} us each (app processes)")
    print(f"B ({args.peer_b or args.ref_b} {args.env_b}): median {b:.0f}/s {results['B']}, "
          f"CPU {statistics.median(cpu['B']):.0f} us each")
    print(f"B/A throughput: {b / a:.2f} (per round {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"B/A CPU per item: {statistics.median(cpu['B']) / statistics.median(cpu['A']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
