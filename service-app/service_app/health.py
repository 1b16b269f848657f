"""A small HTTP server for /metrics, /healthz and /readyz on METRICS_PORT."""

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def serve(host: str, port: int, alive: Callable[[], bool], ready: Callable[[], bool]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = alive()
                self._send(200 if ok else 503, b'{"status":"ok"}' if ok else b'{"status":"stuck"}')
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b'{"status":"ready"}' if ok else b'{"status":"not ready"}')
            else:
                self._send(404, b'{"status":"not found"}')

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: keep logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server


class Heartbeat:
    """Liveness: the consume loop beats every iteration; silence means it is stuck."""

    def __init__(self, max_silence_seconds: float = 60.0):
        self.max_silence = max_silence_seconds
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.max_silence
