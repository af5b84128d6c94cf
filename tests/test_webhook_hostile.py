"""Webhook delivery against hostile or broken receivers (a raw loopback socket server): a server that
drips its answer, sends an endless or compressed body, or asks for long Retry-After waits must never
hold a delivery (or the queue-triggered function) past its time budget, nor fill the memory; one such
target never keeps an incident from the others."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import orjson
import pytest
from azure.data.tables import TableClient

from shared.webhook import DeliveryError, Forwarder, MemoryDeliveryLog, TableDeliveryLog, WebhookTarget

from .conftest import Azurite
from .test_webhook import Script, snapshot

Behaviour = Callable[[socket.socket], None]


class RawServer:
    """A loopback server that reads one request per connection, then runs ``behaviour`` on the socket."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.sent = 0  # bytes of answers the behaviours managed to send
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                )
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests += 1
                self.behaviour(conn)
            except OSError:
                return

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Behaviour], RawServer]]:
    servers: list[RawServer] = []

    def make(behaviour: Behaviour) -> RawServer:
        servers.append(RawServer(behaviour))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def hostile_target(url: str, name: str = "default", **kw: object) -> WebhookTarget:
    return WebhookTarget.model_validate(
        {"name": name, "url": url, "secret": "s3cret", "allow_http": True, "timeout_s": 1, "retries": 0, "backoff_s": 0.05, **kw}
    )


def drip(server: RawServer, conn: socket.socket, head: bytes, unit: bytes) -> None:
    server.send(conn, head)
    while not server.stop.is_set():
        server.send(conn, unit)
        time.sleep(0.2)


@pytest.mark.parametrize(
    "phase, head, unit",
    [
        ("status line", b"HTTP/1.1 2", b"0"),
        ("headers", b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n"),
    ],
)
def test_a_receiver_dripping_its_answer_is_cut_at_the_attempt_timeout(
    raw: Callable[[Behaviour], RawServer], phase: str, head: bytes, unit: bytes
) -> None:
    server = raw(lambda c: drip(server, c, head, unit))
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        Forwarder([hostile_target(server.url)], MemoryDeliveryLog()).handle(orjson.dumps(snapshot()))
    assert time.monotonic() - started < 3.5  # timeout_s = 1: each byte came within it, the whole answer did not
    assert not caught.value.permanent
    assert "no answer within 1s" in str(caught.value)


def test_an_endless_or_compressed_body_of_a_2xx_is_never_read(raw: Callable[[Behaviour], RawServer]) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=6)  # 64 MiB once decompressed

    def endless(conn: socket.socket) -> None:
        server.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3000000000\r\n\r\n")
        while not server.stop.is_set():
            server.send(conn, b"x" * 65536)

    def compressed(conn: socket.socket) -> None:
        zipped.send(conn, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)

    server, zipped = raw(endless), raw(compressed)
    fw = Forwarder([hostile_target(server.url, "endless"), hostile_target(zipped.url, "zipped")], MemoryDeliveryLog())
    tracemalloc.start()
    try:
        started = time.monotonic()
        result = fw.handle(orjson.dumps(snapshot()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.delivered == ["endless", "zipped"]  # the status says delivered; the body is not ours to read
    assert time.monotonic() - started < 3
    assert peak < 8 << 20, f"{peak} bytes held while delivering"
    assert server.sent < 64 << 20  # the socket was closed, not drained


def test_a_retry_after_longer_than_the_delivery_budget_is_not_waited_and_the_reason_says_so(
    raw: Callable[[Behaviour], RawServer],
) -> None:
    server = raw(lambda c: server.send(c, b"HTTP/1.1 503 Busy\r\nRetry-After: 100000\r\nContent-Length: 0\r\n\r\n"))
    fw = Forwarder([hostile_target(server.url, retries=4)], MemoryDeliveryLog(), delivery_budget_s=5)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        fw.handle(orjson.dumps(snapshot()))
    assert time.monotonic() - started < 2
    assert server.requests == 1
    assert not caught.value.permanent
    assert "Retry-After" in str(caught.value) and "100000" in str(caught.value)


def test_retries_and_waits_stop_at_the_delivery_budget(raw: Callable[[Behaviour], RawServer]) -> None:
    server = raw(lambda c: server.send(c, b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"))
    fw = Forwarder([hostile_target(server.url, retries=10)], MemoryDeliveryLog(), delivery_budget_s=2.5)
    started = time.monotonic()
    with pytest.raises(DeliveryError):
        fw.handle(orjson.dumps(snapshot()))
    assert time.monotonic() - started < 3.5
    assert 2 <= server.requests <= 3  # Retry-After honoured while it fits the budget, not ten times


def test_a_dripping_target_never_keeps_an_incident_from_the_other_targets(raw: Callable[[Behaviour], RawServer]) -> None:
    slow = raw(lambda c: drip(slow, c, b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n"))
    good = Script()
    try:
        deliveries = MemoryDeliveryLog()
        fw = Forwarder([hostile_target(slow.url, "slow", retries=1), hostile_target(good.url, "good")], deliveries)
        with pytest.raises(DeliveryError):
            fw.handle(orjson.dumps(snapshot()), dequeue_count=1)
        assert len(good.requests) == 1 and deliveries.delivered_revision("good", "inc-abc") == 1
        started = time.monotonic()
        with pytest.raises(DeliveryError):  # the queue's next delivery tries the slow target only, cut again
            fw.handle(orjson.dumps(snapshot()), dequeue_count=2)
        assert len(good.requests) == 1 and time.monotonic() - started < 3.5
    finally:
        good.close()


@pytest.fixture
def slow_and_good(raw: Callable[[Behaviour], RawServer]) -> Iterator[tuple[WebhookTarget, WebhookTarget, Script]]:
    """A target dripping its headers for ever, then a healthy one (with its server)."""
    slow = raw(lambda c: drip(slow, c, b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n"))
    good = Script()
    yield hostile_target(slow.url, "slow", retries=5), hostile_target(good.url, "good"), good
    good.close()


def test_targets_after_the_message_budget_is_spent_are_left_to_the_next_delivery(
    slow_and_good: tuple[WebhookTarget, WebhookTarget, Script],
) -> None:
    slow, good, server = slow_and_good
    fw = Forwarder([slow, good], MemoryDeliveryLog(), delivery_budget_s=1.5, message_budget_s=1.5)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        fw.handle(orjson.dumps(snapshot()), dequeue_count=1)
    assert time.monotonic() - started < 3
    assert server.requests == [] and "target good: not tried" in str(caught.value)


def test_each_delivery_of_a_message_starts_at_another_target(slow_and_good: tuple[WebhookTarget, WebhookTarget, Script]) -> None:
    slow, good, server = slow_and_good
    fw = Forwarder([slow, good], MemoryDeliveryLog(), delivery_budget_s=1.5, message_budget_s=1.0)
    with pytest.raises(DeliveryError):
        fw.handle(orjson.dumps(snapshot()), dequeue_count=1)
    assert server.requests == []
    with pytest.raises(DeliveryError):  # the second delivery starts at the second target
        fw.handle(orjson.dumps(snapshot()), dequeue_count=2)
    assert len(server.requests) == 1


# -- hostile messages --------------------------------------------------------------------------


@pytest.mark.parametrize("severity", ["high", "9", None, [9], True, 7.5])
def test_a_message_whose_severity_is_not_an_integer_is_parked_at_once_with_its_reason(severity: object) -> None:
    """Not a traceback on every dequeue (the host would park it after five, without a reason)."""
    parked: list[dict[str, object]] = []
    sink = type("Sink", (), {"send": lambda self, m: parked.append(orjson.loads(m))})()
    body = orjson.dumps({**snapshot(), "severity": severity})
    fw = Forwarder([hostile_target("http://127.0.0.1:9/x")], MemoryDeliveryLog(), poison=sink)
    result = fw.handle(body, dequeue_count=1)
    assert result.failed == {"*": "not an incident snapshot"} and not result.delivered
    [message] = parked
    assert "severity" in str(message["reason"]) and message["body"] == body.decode()


@pytest.mark.parametrize("incident", ["inc-\u20ac", "inc\r\nX-Forged: 1", "a" * 300, "", "inc id"])
def test_a_message_whose_incident_id_cannot_be_a_header_is_parked_at_once_and_never_sent(incident: str) -> None:
    """The id goes into the Idempotency-Key header (and log lines): a non-Latin-1 character raised a
    UnicodeEncodeError on every dequeue, CR/LF was retried five times as if the receiver were down."""
    parked: list[dict[str, object]] = []
    sink = type("Sink", (), {"send": lambda self, m: parked.append(orjson.loads(m))})()
    server = Script()
    try:
        fw = Forwarder([hostile_target(server.url)], MemoryDeliveryLog(), poison=sink)
        result = fw.handle(orjson.dumps(snapshot(incident=incident)), dequeue_count=1)
    finally:
        server.close()
    assert result.failed == {"*": "not an incident snapshot"} and server.requests == []
    [message] = parked
    assert "incidentId" in str(message["reason"])


@pytest.mark.azurite
def test_a_revision_past_32_bits_is_delivered_and_recorded_once_on_table_storage(azurite: Azurite, table_name: str) -> None:
    """Table Storage writes a Python int as Int32: a revision of 2**31 or more must still be recorded
    (else the webhook gets the revision again on every dequeue)."""
    server = Script()
    try:
        deliveries = TableDeliveryLog(TableClient.from_connection_string(azurite.connection_string, table_name))
        fw = Forwarder([hostile_target(server.url)], deliveries)
        for _ in range(2):
            fw.handle(orjson.dumps(snapshot(revision=2**40)))
        assert len(server.requests) == 1
        assert deliveries.delivered_revision("default", "inc-abc") == 2**40
        deliveries.record_poisoned("default", "inc-abc", 2**33)
        assert deliveries.poisoned_revision("default", "inc-abc") == 2**33
    finally:
        server.close()
