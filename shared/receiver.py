"""A small webhook receiver for local runs and tests: verifies signatures, prints incidents.

``python -m shared receiver --port 8787`` (secret from ``WEBHOOK_SECRET``). Answers 204 to a
correctly signed, fresh request, 401 otherwise, 413 over the size cap, 411 without a
``Content-Length``, 400 for a malformed one or a body that is not a JSON object. Idle connections are
closed after ``idle_timeout_s``, and every connection after ``connection_timeout_s`` whatever it does (a
client dripping its headers or body a byte at a time stays under the idle timeout); at most
``max_connections`` are served at once (503 beyond).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

from . import views
from .snapshot import as_snapshot
from .webhook import IDEMPOTENCY_HEADER, MAX_PAYLOAD_BYTES, verify_signature

IDLE_TIMEOUT_S = 10.0
CONNECTION_TIMEOUT_S = 30.0  # a connection's whole life: headers, body and keep-alive requests
MAX_CONNECTIONS = 32
_LENGTH = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() would also take '-1', ' 7', '١٢'


def make_handler(
    secret: str | None,
    out: IO[str],
    tolerance_s: int = 300,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "defender-correlator-receiver/1"
        timeout = idle_timeout_s  # socket timeout: a silent client is dropped

        def setup(self) -> None:
            super().setup()
            # a slow-drip client answers every read in time: only a limit on the whole connection ends it
            self.rfile = io.BufferedReader(
                _DeadlineReader(self.connection, time.monotonic() + connection_timeout_s, idle_timeout_s)
            )

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                self._answer(411)
                return
            if not _LENGTH.fullmatch(raw_length.strip(" \t")):
                self._answer(400)
                return
            length = int(raw_length)
            if length > MAX_PAYLOAD_BYTES:
                self._answer(413)
                return
            try:
                body = self.rfile.read(length)
            except OSError:  # idle timeout, or the connection was cut at its time limit
                self.close_connection = True
                return
            if len(body) != length:
                self.close_connection = True  # the client went away mid-body
                return
            headers = {k: v for k, v in self.headers.items()}
            if secret is not None and not verify_signature(secret, headers, body, tolerance_s=tolerance_s):
                with lock:
                    out.write(f"REJECTED bad or stale signature ({self.headers.get(IDEMPOTENCY_HEADER)})\n")
                    out.flush()
                self._answer(401)
                return
            try:
                incident = as_snapshot(json.loads(body))
            except (ValueError, RecursionError):  # not JSON (or nested past the parser's depth), or not a snapshot
                self._answer(400)
                return
            with lock:  # host, user, tenant, link first; further entities indented below
                out.write("\n".join([views.receiver_line(incident), *views.entity_lines(incident)]) + "\n")
                out.flush()
            self._answer(204)

    return Handler


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each waiting at most ``idle_s`` and none past ``deadline`` (monotonic)."""

    def __init__(self, sock: socket.socket, deadline: float, idle_s: float) -> None:
        self.sock, self.deadline, self.idle_s = sock, deadline, idle_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connection time limit reached")
        self.sock.settimeout(min(self.idle_s, left))
        return self.sock.recv_into(buffer)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading server that serves at most ``max_connections`` connections at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a broken client connection is that client's problem; no traceback on stderr


def serve(
    host: str,
    port: int,
    secret: str | None,
    out: IO[str] = sys.stdout,
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """Raises: OSError when the address cannot be bound (in use, not local, no permission)."""
    handler = make_handler(secret, out, idle_timeout_s=idle_timeout_s, connection_timeout_s=connection_timeout_s)
    return BoundedHTTPServer((host, port), handler, max_connections)


def main(host: str, port: int, secret_env: str) -> int:
    """Raises: OSError when the address cannot be bound."""
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
