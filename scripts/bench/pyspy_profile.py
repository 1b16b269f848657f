"""`make bench-profile`: py-spy profiles of main-app under wrk load and of service-app
draining a pre-filled queue, with the same private nodes and settings as `make bench`.

Writes flame graphs (SVG) and `py-spy top`-style text summaries (the hottest frames by
own and total time) to reports/bench/profile/.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs_devtools.bench import bench

GIL_ONLY = False


def record(py_spy: str, pid: int, seconds: float, out: Path, subprocesses: bool = False,
           nonblocking: bool = True) -> subprocess.Popen:
    """nonblocking: sample without pausing the process (pausing halves main-app's req/s)."""
    args = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250"]
    if nonblocking:
        args.append("--nonblocking")
    if GIL_ONLY:
        args.append("--gil")
    if subprocesses:
        args.append("--subprocesses")
    return subprocess.Popen([*args, "-f", "raw", "-o", str(out.with_suffix(".txt"))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def require_recorded(spy: subprocess.Popen, name: str, timeout: float) -> None:
    """Stop with py-spy's own reason when it recorded nothing (e.g. it attached to a process whose
    interpreter was not up yet), rather than leave that profile out without a word."""
    _, errors = spy.communicate(timeout=timeout)
    if spy.returncode != 0:
        raise SystemExit(f"py-spy recorded no profile of {name} (exit code {spy.returncode}): {errors.strip()}")


def hottest(raw: Path, top: int = 25) -> str:
    """Own and total sample counts per frame from py-spy's collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # a frame name with a newline in it: skip the fragment
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "", "own%   frame"]
    lines += [f"{100 * n / samples:5.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "total% frame"]
    lines += [f"{100 * n / samples:5.1f}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--out", default=str(bench.ROOT / "reports" / "bench" / "profile"))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--jobs", type=int, default=60_000, help="echo jobs service-app drains while profiled")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL: where the CPU goes")
    parser.add_argument("--only", choices=("main-app", "service-app"))
    parser.add_argument("--connections", type=int, default=50, help="wrk connections against main-app")
    args = parser.parse_args()
    global GIL_ONLY
    GIL_ONLY = args.gil
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jobs-profile-"))
    try:
        with bench.bench_stack(work, "jobs-profile") as (stack, store):
            if args.only != "service-app":
                api = bench.start_server(stack, "api")
                bench.run_wrk(api.url, 2, args.connections)
                spy = record(args.py_spy, api.proc.pid, args.seconds + 1, out / "main-app", subprocesses=True)
                time.sleep(0.5)
                result = bench.run_wrk(api.url, args.seconds, args.connections)
                require_recorded(spy, "main-app", 60)
                bench.log(f"main-app under profile: {result['rps']:.0f} req/s")
                api.stop()
                bench.purge(stack.rabbit.url)
                store.flushdb()
            if args.only != "main-app":
                bench.prefill_jobs(stack.rabbit.url, store, args.jobs)
                spies: list[subprocess.Popen] = []

                def start_spy(worker) -> None:
                    worker.wait_ready()  # py-spy cannot attach before the interpreter is up
                    # py-spy 0.4.1 without pausing it crashed (SIGSEGV) after a few seconds of service-app
                    spies.append(record(args.py_spy, worker.proc.pid, args.seconds, out / "service-app",
                                        nonblocking=False))

                drained = bench.worker_drain(stack, args.jobs, "profile", {}, on_start=start_spy)
                require_recorded(spies[0], "service-app", 120)
                bench.log(f"service-app under profile: {drained['jobs_per_s']:.0f} jobs/s")
        for name in ("main-app", "service-app"):
            raw = (out / name).with_suffix(".txt")
            if raw.exists() and args.only in (None, name):
                (out / f"{name}-hot.txt").write_text(hottest(raw))
                print(f"\n== {name} ==\n" + "\n".join(hottest(raw).splitlines()[:40]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
