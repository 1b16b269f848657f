#!/usr/bin/env python3
"""Dev-only supervisor: run a command and restart it when watched Python files change.

Used as the service-app image's `dev` target command (Tilt / Skaffold file sync
replaces files under /app; this restarts the worker so the new code runs).
Standard library only, polling mtimes, so it works on any base image and on
overlay/volume mounts where inotify events do not arrive.

    dev-reload.py python -m service_app

Environment:
  DEV_RELOAD_PATHS     colon-separated directories to watch (default /app)
  DEV_RELOAD_INTERVAL  seconds between scans (default 1)
  DEV_RELOAD_STOP_TIMEOUT  seconds to wait for the child after SIGTERM before
                       SIGKILL (default SHUTDOWN_GRACE_SECONDS + 5, i.e. 30)

SIGTERM/SIGINT are forwarded to the child (which drains), and the supervisor
exits with the child's exit status, so `docker stop` / pod termination behave
as in production. A child that exits on its own (crash) is restarted on the
next file change, not in a tight loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PATHS = [p for p in os.environ.get("DEV_RELOAD_PATHS", "/app").split(":") if p]
INTERVAL = float(os.environ.get("DEV_RELOAD_INTERVAL", "1"))
STOP_TIMEOUT = float(
    os.environ.get(
        "DEV_RELOAD_STOP_TIMEOUT",
        float(os.environ.get("SHUTDOWN_GRACE_SECONDS", "25")) + 5,
    )
)

_stop_signal: int | None = None


def log(msg: str) -> None:
    print(f"[dev-reload] {msg}", file=sys.stderr, flush=True)


def snapshot() -> dict[str, tuple[int, int]]:
    state: dict[str, tuple[int, int]] = {}
    for root in PATHS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in filenames:
                if name.endswith((".py", ".json", ".yaml", ".yml", ".toml")):
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    state[path] = (st.st_mtime_ns, st.st_size)
    return state


def changed(old: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))


def stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"child {proc.pid} still running after {STOP_TIMEOUT:.0f}s; killing it")
            proc.kill()
            proc.wait()
    return proc.returncode


def on_signal(signum: int, _frame: object) -> None:
    global _stop_signal
    _stop_signal = signum


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    state = snapshot()
    proc: subprocess.Popen[bytes] | None = subprocess.Popen(argv)
    log(f"started {' '.join(argv)} (pid {proc.pid}); watching {':'.join(PATHS)}")
    while True:
        time.sleep(INTERVAL)
        if _stop_signal is not None:
            if proc is None:
                return 0
            log(f"received signal {_stop_signal}; stopping child {proc.pid}")
            code = stop_child(proc, _stop_signal)
            log(f"child exited with {code}")
            return 0 if code is None else (code if code >= 0 else 128 - code)
        if proc is not None and proc.poll() is not None:
            log(f"child exited with {proc.returncode}; waiting for a file change to restart")
            proc = None
        new_state = snapshot()
        diff = changed(state, new_state)
        if diff:
            state = new_state
            shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
            log(f"change detected ({shown}); restarting")
            if proc is not None:
                stop_child(proc)
            proc = subprocess.Popen(argv)
            log(f"started {' '.join(argv)} (pid {proc.pid})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
