"""The worker's HTTP endpoints: /metrics, /healthz (liveness), /readyz (readiness).

/healthz answers 200 while every stage thread runs and none has held work
without progress past the liveness timeout, 503 otherwise (Kubernetes then
restarts the pod); /readyz answers 200 while every readiness check holds. Both
return their checks as JSON.

They expose counts and states only: no settings, no secrets, no payloads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class StatusServer:
    """Serves the endpoints on a daemon thread until :meth:`close`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        alive: Callable[[], dict[str, Any]],
        ready: Callable[[], dict[str, bool]],
    ) -> None:
        handler = _handler(registry, alive, ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="embedstream-http", daemon=True
        )
        self._thread.start()
        log.info("metrics and health on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    registry: CollectorRegistry,
    alive: Callable[[], dict[str, Any]],
    ready: Callable[[], dict[str, bool]],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                checks = alive()
                ok = bool(checks.get("stages_running")) and not checks.get("stalled")
                self._json(200 if ok else 503, {"alive": ok, "checks": checks})
            elif path == "/readyz":
                checks = ready()
                ok = all(checks.values())
                self._json(200 if ok else 503, {"ready": ok, "checks": checks})
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, object]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler
