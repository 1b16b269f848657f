"""A flood of bad requests, run as its own process by test_flood.py (so its CPU use is
the server machine's problem, not the measuring client's GIL).

    python flood.py URL TOKEN SECONDS CONNECTIONS  ->  prints {"sent": n, "status": {...}} as JSON
"""

import itertools
import json
import sys
import threading
import time

import requests

BAD = [
    ("POST", "/jobs", {"Authorization": "Bearer wrong-token-0123456789abcdef"}, b'{"type":"echo"}'),
    ("POST", "/jobs", None, b'{"type": "echo", "payload": {'),
    ("POST", "/jobs", None, b'{"type": "echo", "payload": {"s": "' + b"x" * 70_000 + b'"}}'),
    ("POST", "/jobs", None, b'{"type": "sleep", "payload": {"seconds": -1}}'),
    ("POST", "/jobs", {"Content-Type": "text/plain"}, b"hello"),
    ("POST", "/jobs", None, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("GET", "/jobs/..%2f..%2fetc%2fpasswd", None, None),
    ("GET", "/jobs/00000000-0000-4000-8000-000000000000", None, None),
    ("GET", "/jobs/x", {"Authorization": ""}, None),
]


def main() -> None:
    url, token, seconds, connections = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    deadline = time.monotonic() + seconds
    counts: dict[str, int] = {}
    lock = threading.Lock()
    cycle = itertools.count()

    def run() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            method, path, headers, body = BAD[next(cycle) % len(BAD)]
            merged = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})}
            try:
                status = str(session.request(method, url + path, data=body, headers=merged, timeout=10).status_code)
            except requests.RequestException as exc:
                status = type(exc).__name__
                session = requests.Session()
            with lock:
                counts[status] = counts.get(status, 0) + 1

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"sent": sum(counts.values()), "status": counts, "seconds": seconds}))


if __name__ == "__main__":
    main()
