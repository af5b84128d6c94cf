"""A small webhook receiver for local runs and tests: verifies signatures, prints incidents.

``python -m shared receiver --port 8787`` (secret from ``WEBHOOK_SECRET``). Answers 204 to a
correctly signed, fresh request, 401 otherwise, 413 over the size cap.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

from . import views
from .webhook import IDEMPOTENCY_HEADER, MAX_PAYLOAD_BYTES, verify_signature


def make_handler(secret: str | None, out: IO[str], tolerance_s: int = 300) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "defender-correlator-receiver/1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0") or 0)
            if length > MAX_PAYLOAD_BYTES:
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            headers = {k: v for k, v in self.headers.items()}
            if secret is not None and not verify_signature(secret, headers, body, tolerance_s=tolerance_s):
                with lock:
                    out.write(f"REJECTED bad or stale signature ({self.headers.get(IDEMPOTENCY_HEADER)})\n")
                    out.flush()
                self.send_response(401)
                self.end_headers()
                return
            try:
                incident = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            with lock:
                if isinstance(incident, dict):  # host, user, tenant, link first; further entities indented below
                    out.write("\n".join([views.receiver_line(incident), *views.entity_lines(incident)]) + "\n")
                else:
                    out.write(f"RECEIVED a JSON {type(incident).__name__}, not an incident snapshot\n")
                out.flush()
            self.send_response(204)
            self.end_headers()

    return Handler


def serve(host: str, port: int, secret: str | None, out: IO[str] = sys.stdout) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(secret, out))
    return server


def main(host: str, port: int, secret_env: str) -> int:
    secret = os.environ.get(secret_env)
    if not secret:
        print(f"warning: {secret_env} is not set: signatures are NOT verified", file=sys.stderr)
    server = serve(host, port, secret)
    print(f"receiver listening on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
