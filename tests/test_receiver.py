"""The local webhook receiver under hostile clients: lengths, idle connections, odd timestamps."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shared.receiver import serve
from shared.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify_signature

from .test_webhook import readme_verifier

SECRET = "receiver-secret"


class Running:
    def __init__(self, **kw: float) -> None:
        self.out = io.StringIO()
        self.server = serve("127.0.0.1", 0, SECRET, self.out, **kw)  # type: ignore[arg-type]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def raw(self, head: bytes, body: bytes = b"", timeout: float = 5) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(head + body)
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def post(self, body: bytes, *, length: str | None = None, timestamp: str | None = None, signature: str | None = None) -> int:
        ts = timestamp if timestamp is not None else str(int(time.time()))
        sig = signature if signature is not None else sign(SECRET, ts, body)
        lines = [b"POST /hook HTTP/1.1", b"Host: x", f"{TIMESTAMP_HEADER}: {ts}".encode(), f"{SIGNATURE_HEADER}: {sig}".encode()]
        if length != "omit":
            lines.append(f"Content-Length: {length if length is not None else len(body)}".encode())
        answer = self.raw(b"\r\n".join(lines) + b"\r\n\r\n", body)
        return int(answer.split(b" ", 2)[1]) if answer else 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Running]:
    r = Running(idle_timeout_s=1.0, max_connections=8)
    yield r
    r.close()


GOOD = b'{"incidentId": "inc-1", "revision": 1, "action": "created", "severity": 5, "ruleId": "R"}'


def test_a_signed_incident_is_accepted(receiver: Running) -> None:
    assert receiver.post(GOOD) == 204
    assert receiver.out.getvalue().startswith("RECEIVED inc-1 rev 1 created sev 5 R")


@pytest.mark.parametrize("length", ["-1", "abc", "\u0661\u0662", "1e3", "0x10", "+5", "99999999999999999999"])
def test_a_malformed_content_length_is_refused_without_reading(receiver: Running, length: str) -> None:
    assert receiver.post(GOOD, length=length) == 400


def test_a_missing_content_length_is_refused(receiver: Running) -> None:
    assert receiver.post(GOOD, length="omit") == 411


def test_a_length_over_the_cap_is_refused_before_the_body_is_read(receiver: Running) -> None:
    assert receiver.post(GOOD, length=str(10**9)) == 413


@pytest.mark.parametrize("timestamp", ["\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660", "\u00b2", "-1", "1e9", ""])
def test_a_timestamp_with_non_ascii_or_non_digits_is_a_401_not_a_crash(receiver: Running, timestamp: str) -> None:
    assert receiver.post(GOOD, timestamp=timestamp, signature=sign(SECRET, timestamp, GOOD)) == 401


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'{"incidentId": "inc-1"}',
        b'{"incidentId": 7, "revision": 1}',
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,  # nested past the JSON parser's depth: an answer, not a dropped connection
    ],
)
def test_a_signed_body_that_is_not_an_incident_snapshot_is_a_400(receiver: Running, body: bytes) -> None:
    assert receiver.post(body) == 400


def test_idle_connections_are_closed_and_threads_stay_bounded(receiver: Running) -> None:
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= 8  # at most max_connections handler threads
        assert receiver.post(GOOD) in (204, 503)  # never hangs: served, or refused at once while full
        time.sleep(1.5)  # past the idle timeout every idle connection is dropped ...
        assert threading.active_count() - before <= 1
        assert receiver.post(GOOD) == 204  # ... and the receiver serves again
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_client_dripping_a_byte_at_a_time_is_cut_at_the_connection_limit(phase: str) -> None:
    r = Running(idle_timeout_s=1.0, connection_timeout_s=1.0, max_connections=8)
    body = GOOD
    head = (
        f"POST /hook HTTP/1.1\r\nHost: x\r\n{TIMESTAMP_HEADER}: {int(time.time())}\r\n"
        f"{SIGNATURE_HEADER}: {sign(SECRET, str(int(time.time())), body)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    drip, sent = (head + body, b"") if phase == "headers" else (body, head)
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            s.sendall(sent)
            with pytest.raises(OSError):  # the server cuts the connection: a send fails (broken pipe/reset)
                for byte in drip[:-1] * 100:  # each byte well inside the 1 s idle timeout, never finishing
                    s.send(bytes([byte]))
                    time.sleep(0.2)
                    if time.monotonic() - started > 20:
                        break
        assert time.monotonic() - started < 10  # cut near the 1 s limit, not after the 20 s of dripping
        assert r.post(GOOD) == 204  # and the receiver still serves
    finally:
        r.close()


@pytest.mark.parametrize("timestamp", ["\u0661\u0667\u0660\u0660", "\u00b2", " 1700000000", "+1700000000"])
def test_the_readme_snippet_and_the_library_refuse_non_ascii_digit_timestamps(timestamp: str) -> None:
    verify = readme_verifier()
    signature = sign(SECRET, timestamp, GOOD)
    assert verify(SECRET.encode(), timestamp, GOOD, signature) is False
    assert verify_signature(SECRET, {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}, GOOD) is False


def test_a_signature_with_non_ascii_characters_is_a_401_not_a_crash(receiver: Running) -> None:
    assert receiver.post(GOOD, signature="sha256=\u00e9") == 401


@pytest.mark.parametrize("signature", ["sha256=\u00e9", "\u0661", "sha256=" + "\u00ff" * 64])
def test_the_readme_snippet_and_the_library_refuse_non_ascii_signatures(signature: str) -> None:
    timestamp = str(int(time.time()))
    verify = readme_verifier()
    assert verify(SECRET.encode(), timestamp, GOOD, signature) is False
    assert verify_signature(SECRET, {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}, GOOD) is False
