"""The Graph poller against a Graph emulator on loopback, and the Event Hub publisher's batching."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from azure.data.tables import TableClient
from azure.eventhub import EventDataBatch

from shared import graph
from shared.engine import Engine
from shared.errors import SettingsError
from shared.functions import build_graph_runtime
from shared.graph import BatchPublisher, GraphError, GraphPoller, MemoryCursorStore, RateLimiter, TableCursorStore, graph_session
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import default_rules_dir, load_rules
from shared.send import send
from shared.settings import load_graph_settings
from shared.state import MemoryStateStore

from .conftest import Azurite, app_functions

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


def alert(tenant: str, n: int, seconds: int | None = None) -> dict[str, Any]:
    updated = (T0 + timedelta(seconds=n if seconds is None else seconds)).isoformat().replace("+00:00", "Z")
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": f"da{tenant}_{n}",
        "tenantId": tenant,
        "title": "Suspicious Task Scheduler activity",
        "category": "Persistence",
        "mitreTechniques": ["T1053.005"],
        "serviceSource": "microsoftDefenderForEndpoint",
        "createdDateTime": T0.isoformat().replace("+00:00", "Z"),
        "lastUpdateDateTime": updated,
    }


class GraphEmulator:
    """Serves /v1.0/security/alerts_v2 with $filter=lastUpdateDateTime ge, paging, and injected faults."""

    def __init__(self, page_size: int = 2) -> None:
        self.alerts: dict[str, list[dict[str, Any]]] = {}
        self.incidents: dict[str, list[dict[str, Any]]] = {}  # served at /security/incidents
        self.forbidden: set[str] = set()  # resources answering 403 (a permission not granted)
        self.descending = False  # a service that ignores $orderby and returns newest first
        self.next_link_base: str | None = None  # where nextLink points (default: this server)
        self.faults: list[tuple[str, Any]] = []  # consumed one per request: ("429", retry_after|None), ("503", None), ...
        self.requests: list[tuple[str, str]] = []
        self.valid_tokens: set[str] = set()
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                emu.requests.append((self.path, token))
                fault = emu.faults.pop(0) if emu.faults else None
                if fault and fault[0] == "429":
                    self.send_response(429)
                    if fault[1] is not None:
                        self.send_header("Retry-After", str(fault[1]))
                    self.end_headers()
                    self.wfile.write(b'{"error":{"code":"TooManyRequests"}}')
                    return
                if fault and fault[0] == "503":
                    self.send_response(503)
                    self.end_headers()
                    return
                if token not in emu.valid_tokens:
                    self.send_response(401)
                    self.end_headers()
                    return
                if fault and fault[0] == "drip":  # a slow-drip server: every read is quick, the body never ends
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    stop = time.monotonic() + fault[1]
                    try:
                        while time.monotonic() < stop:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass  # the client gave up, as it should
                    return
                if fault and fault[0] == "drip-headers":  # the status line at once, then a header a byte at a time
                    stop = time.monotonic() + fault[1]
                    try:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                        while time.monotonic() < stop:
                            self.wfile.write(b"z")
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                if fault and fault[0] == "malformed":
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b'{"value": [ {"id": "x"')
                    return
                tenant = token.split(":")[0]
                resource = urlsplit(self.path).path.rsplit("/", 1)[-1]
                if resource in emu.forbidden:
                    self.send_response(403)
                    self.end_headers()
                    return
                query = parse_qs(urlsplit(self.path).query)
                since = query["$filter"][0].split(" ge ")[1]
                skip = int(query.get("$skip", ["0"])[0])
                source = emu.incidents if resource == "incidents" else emu.alerts
                items = sorted(
                    (a for a in source.get(tenant, []) if a["lastUpdateDateTime"] >= since),
                    key=lambda a: a["lastUpdateDateTime"],
                    reverse=emu.descending,
                )
                page = items[skip : skip + page_size]
                body: dict[str, Any] = {"@odata.context": "x", "value": page}
                if skip + page_size < len(items):
                    nxt = dict(query)
                    nxt["$skip"] = [str(skip + page_size)]
                    body["@odata.nextLink"] = f"{emu.next_link_base or emu.base_url}/security/{resource}?" + "&".join(
                        f"{k}={v[0]}" for k, v in nxt.items()
                    )
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1.0"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Token:
    def __init__(self, token: str) -> None:
        self.token = token
        self.expires_on = int(time.time()) + 3600


class FakeCredential:
    """An azure-identity compatible credential; each refresh issues a new token."""

    def __init__(self, tenant: str, emu: GraphEmulator) -> None:
        self.tenant, self.emu, self.calls = tenant, emu, 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Token:
        assert scopes == ("https://graph.microsoft.com/.default",)
        self.calls += 1
        token = f"{self.tenant}:{self.calls}"
        self.emu.valid_tokens.add(token)
        return Token(token)


class Published:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def publish(self, tenant: str, records: list[bytes]) -> list[str]:
        self.records += [(tenant, orjson.loads(r)) for r in records]
        return []

    def ids(self, tenant: str) -> list[str]:
        return [r["id"] for t, r in self.records if t == tenant]


@pytest.fixture
def emu() -> Iterator[GraphEmulator]:
    e = GraphEmulator()
    yield e
    e.close()


def make_poller(emu: GraphEmulator, **kw: Any) -> tuple[GraphPoller, Published, dict[str, FakeCredential]]:
    creds: dict[str, FakeCredential] = {}
    published = kw.pop("published", Published())

    def credential_for(tenant: str) -> FakeCredential:
        return creds.setdefault(tenant, FakeCredential(tenant, emu))

    poller = GraphPoller(
        credential_for,
        kw.pop("cursors", MemoryCursorStore()),
        published,
        base_url=emu.base_url,
        session=graph_session(retries=2, backoff_s=0.05),
        clock=kw.pop("clock", lambda: T0 + timedelta(hours=1)),
        backoff_s=0.05,
        **kw,
    )
    return poller, published, creds


def test_paging_publishes_every_alert_once_in_order_and_moves_the_cursor(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(7)]
    poller, published, _ = make_poller(emu)
    result = poller.poll("tA")
    assert published.ids("tA") == [f"datA_{n}" for n in range(7)]
    assert result.pages == 4 and result.published == 7
    assert result.cursor == "2026-11-20T09:00:06Z"
    again = poller.poll("tA")  # `ge` returns the boundary alert again: recognised, not re-published
    assert again.published == 0 and again.duplicates == 1
    emu.alerts["tA"].append(alert("tA", 7))
    poller.poll("tA")
    assert published.ids("tA") == [f"datA_{n}" for n in range(8)]


def test_429_with_and_without_retry_after_and_503_are_retried(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(3)]
    emu.faults = [("429", "0.3"), ("429", None), ("503", None)]
    poller, published, _ = make_poller(emu)
    start = time.monotonic()
    poller.poll("tA")
    assert time.monotonic() - start >= 0.3  # the fractional Retry-After was honoured
    assert published.ids("tA") == ["datA_0", "datA_1", "datA_2"]
    assert len(emu.requests) == 3 + 2  # three faults, then two pages


def test_expired_token_triggers_exactly_one_refresh(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", 0)]

    class ExpiredFirst(FakeCredential):
        """Hands out a token the server no longer accepts, then fresh ones."""

        def get_token(self, *scopes: str, **kwargs: Any) -> Token:
            self.calls += 1
            if self.calls == 1:
                return Token("tA:expired")
            token = f"tA:{self.calls}"
            self.emu.valid_tokens.add(token)
            return Token(token)

    credential = ExpiredFirst("tA", emu)
    published = Published()
    poller = GraphPoller(
        lambda t: credential,
        MemoryCursorStore(),
        published,
        base_url=emu.base_url,
        session=graph_session(retries=2, backoff_s=0.05),
        clock=lambda: T0 + timedelta(hours=1),
    )
    poller.poll("tA")
    assert published.ids("tA") == ["datA_0"]
    assert [t for _, t in emu.requests] == ["tA:expired", "tA:2"]
    assert credential.calls == 2


def counted_once(published: Published) -> list[int]:
    """The incident counts the correlator makes of everything published (each alert version once)."""
    engine = Engine(load_rules([default_rules_dir()]), MemoryStateStore())
    events = [Normalizer().normalize(r, "p", T0) for _, r in published.records]
    result = engine.process([e for e in events if isinstance(e, NormalizedEvent)])
    return sorted(s["attributes"]["incidentCount"] for s in result.incidents)


@pytest.mark.parametrize("drip", ["drip", "drip-headers"])  # its body, or a header line, a byte at a time
def test_a_server_dripping_its_answer_is_cut_at_the_request_limit_and_the_next_tenant_still_runs(
    emu: GraphEmulator, monkeypatch: pytest.MonkeyPatch, drip: str
) -> None:
    monkeypatch.setattr(graph, "MAX_REQUEST_S", 0.5)  # each read is quick; only a total limit stops it
    emu.alerts["tA"] = [alert("tA", n) for n in range(3)]
    emu.alerts["tB"] = [alert("tB", n) for n in range(2)]
    poller, published, _ = make_poller(emu)
    emu.faults = [(drip, 20.0)]
    started = time.monotonic()
    results = poller.poll_all(["tA", "tB"])
    assert time.monotonic() - started < 15  # not the 20 s of the drip
    assert results[0].error and "time limit" in results[0].error and not published.ids("tA")
    assert published.ids("tB") == ["datB_0", "datB_1"]
    poller.poll("tA")  # its cursor did not move: the next run publishes everything
    assert published.ids("tA") == ["datA_0", "datA_1", "datA_2"]


def test_a_response_larger_than_the_page_cap_is_refused_and_the_cursor_stays(
    emu: GraphEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph, "MAX_PAGE_BYTES", 300)  # a page of two alerts is about 1 KB
    emu.alerts["tA"] = [alert("tA", n) for n in range(3)]
    poller, published, _ = make_poller(emu)
    [result] = poller.poll_all(["tA"])
    assert result.error and "larger than 300 bytes" in result.error and not published.ids("tA")
    monkeypatch.setattr(graph, "MAX_PAGE_BYTES", 1 << 20)
    poller.poll("tA")
    assert published.ids("tA") == ["datA_0", "datA_1", "datA_2"]


def test_malformed_json_fails_that_tenant_only_and_loses_nothing(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(5)]
    emu.alerts["tB"] = [alert("tB", n) for n in range(2)]
    poller, published, _ = make_poller(emu)
    emu.faults = [(None, None), ("malformed", None)]  # first page fine, second page broken
    results = poller.poll_all(["tA", "tB"])
    assert results[0].error and "malformed JSON" in results[0].error
    assert published.ids("tA") == ["datA_0", "datA_1"]
    assert published.ids("tB") == ["datB_0", "datB_1"]
    poller.poll("tA")  # the cursor did not move: the next run re-reads from the start, skipping nothing
    assert set(published.ids("tA")) == {f"datA_{n}" for n in range(5)}
    assert poller.poll("tA").published == 0  # and once complete, the overlap is recognised by identity


def test_crash_before_the_cursor_save_re_publishes_but_never_skips(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(4)]

    class Flaky(MemoryCursorStore):
        fail = True

        def save(self, tenant: str, cursor: str, boundary: list[str], resource: str = "alerts_v2") -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("crash before the cursor was saved")
            super().save(tenant, cursor, boundary, resource)

    cursors = Flaky()
    poller, published, _ = make_poller(emu, cursors=cursors)
    with pytest.raises(RuntimeError):
        poller.poll("tA")
    poller.poll("tA")
    ids = published.ids("tA")
    assert set(ids) == {f"datA_{n}" for n in range(4)}  # nothing skipped
    assert len(ids) == 8  # everything was published twice ...
    assert counted_once(published) == [1, 1, 1, 1]  # ... and the correlator counts each alert version once


def test_next_link_to_another_origin_fails_the_tenant_and_never_carries_the_token(emu: GraphEmulator) -> None:
    other = GraphEmulator()
    try:
        emu.alerts["tA"] = [alert("tA", n) for n in range(5)]
        emu.alerts["tB"] = [alert("tB", 0)]
        for base in (other.base_url, emu.base_url.replace("127.0.0.1", "localhost"), "https://evil.example/v1.0"):
            emu.next_link_base = base
            poller, published, _ = make_poller(emu)
            results = poller.poll_all(["tA", "tB"])
            assert results[0].error and "nextLink" in results[0].error and "not followed" in results[0].error
            assert results[1].error is None and published.ids("tB") == ["datB_0"]  # the next tenant carries on
        assert other.requests == []  # no request at all, so no bearer token, reached the other server
        emu.next_link_base = f"http://user:pw@127.0.0.1:{emu.port}/v1.0"  # userinfo is refused too
        poller, _, _ = make_poller(emu)
        assert "not followed" in (poller.poll_all(["tA"])[0].error or "")
    finally:
        other.close()


def test_a_plain_http_next_link_from_an_https_base_is_refused() -> None:
    poller = GraphPoller(lambda t: None, MemoryCursorStore(), Published())  # type: ignore[arg-type,return-value]
    assert poller._next("https://graph.microsoft.com/v1.0/security/alerts_v2?$skiptoken=x")
    assert poller._next("https://GRAPH.microsoft.com:443/v1.0/x")  # same origin, spelled differently
    for link in (
        "http://graph.microsoft.com/v1.0/security/alerts_v2?$skiptoken=x",
        "https://graph.microsoft.com:8443/v1.0/x",
        "https://graph.microsoft.com.evil.example/v1.0/x",
        "https://evil.example\\@graph.microsoft.com/v1.0/x",
        "https://x@graph.microsoft.com/v1.0/x",
        "//graph.microsoft.com/v1.0/x",
    ):
        with pytest.raises(GraphError, match="not followed"):
            poller._next(link)


@pytest.mark.parametrize("retry_after", ["100000", "inf", "nan", "-1", "soon"])
def test_an_unbounded_or_unusable_retry_after_fails_that_tenant_quickly_and_the_others_are_polled(
    emu: GraphEmulator, retry_after: str
) -> None:
    emu.alerts["tA"] = [alert("tA", 0)]
    emu.alerts["tB"] = [alert("tB", 0)]
    emu.faults = [("429", retry_after)]
    poller, published, _ = make_poller(emu)
    start = time.monotonic()
    results = poller.poll_all(["tA", "tB"])
    assert time.monotonic() - start < 5
    error = results[0].error or ""
    assert "Retry-After" in error or "exceeds" in error
    assert published.ids("tA") == [] and published.ids("tB") == ["datB_0"]
    assert poller.poll("tA").published == 1  # next run: nothing was lost


def test_waits_stay_within_the_run_budget(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", 0)]
    emu.alerts["tB"] = [alert("tB", 0)]
    emu.faults = [("429", "0.4"), ("429", "0.4")]
    now = [0.0]  # a clock that only waits move: the machine's load cannot decide the outcome

    def sleep(seconds: float) -> None:
        now[0] += seconds

    poller, published, _ = make_poller(emu, budget_s=0.6, monotonic=lambda: now[0], sleep=sleep)
    results = poller.poll_all(["tA", "tB"])
    assert results[0].error and "exceeds" in results[0].error  # the second wait would pass the budget
    assert results[1].error is None and published.ids("tB") == ["datB_0"]
    assert now[0] == 0.4  # one wait taken, the one that would pass the budget refused


def test_a_slow_service_cannot_run_a_tenant_past_the_run_budget(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(20)]  # 10 pages of 2
    emu.alerts["tB"] = [alert("tB", 0)]
    # every request "takes" 10 s: the run's budget of 35 s allows about 4 pages, not 10 and then tenant tB
    poller, published, _ = make_poller(emu, budget_s=35, monotonic=lambda: 10.0 * len(emu.requests))
    results = poller.poll_all(["tA", "tB"])
    assert len(emu.requests) <= 5 and results[0].pages < 10
    assert results[1].error and "budget" in results[1].error and published.ids("tB") == []
    again = poller.poll_all(["tA", "tB"])  # next run: a fresh budget carries on from the cursor, nothing lost
    while any(r.error for r in again):
        again = poller.poll_all(["tA", "tB"])
    assert sorted(published.ids("tA")) == sorted(f"datA_{n}" for n in range(20)) and published.ids("tB") == ["datB_0"]


class Exploding(Published):
    def publish(self, tenant: str, records: list[bytes]) -> list[str]:
        if tenant == "tA":
            raise KeyError("anything at all")
        return super().publish(tenant, records)


def test_any_exception_of_one_tenant_leaves_the_other_tenants_polled(emu: GraphEmulator) -> None:
    for t in ("tA", "tB", "tC"):
        emu.alerts[t] = [alert(t, 0)]
    poller, published, _ = make_poller(emu, published=Exploding())
    results = poller.poll_all(["tA", "tB", "tC"])
    assert results[0].error == "KeyError: 'anything at all'"
    assert [r.error for r in results[1:]] == [None, None]
    assert published.ids("tB") == ["datB_0"] and published.ids("tC") == ["datC_0"]


def test_cursor_is_right_when_the_service_ignores_orderby_and_page_two_fails(emu: GraphEmulator) -> None:
    emu.descending = True  # newest first: page 1 holds the newest alerts
    emu.alerts["tA"] = [alert("tA", n) for n in range(6)]
    cursors = MemoryCursorStore()
    poller, published, _ = make_poller(emu, cursors=cursors)
    emu.faults = [(None, None), ("malformed", None)]  # page 2 fails
    assert poller.poll_all(["tA"])[0].error
    assert cursors.load("tA") == (None, [])  # nothing moved although page 1 was published
    result = poller.poll("tA")
    assert set(published.ids("tA")) == {f"datA_{n}" for n in range(6)}  # the older alerts were not skipped
    assert result.cursor == "2026-11-20T09:00:05Z"
    emu.alerts["tA"].append(alert("tA", 7, seconds=9))
    assert poller.poll("tA").duplicates == 1
    assert published.ids("tA")[-1] == "datA_7"
    assert counted_once(published) == [1] * 7


def test_cursor_never_passes_the_time_of_the_poll(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", 0), {**alert("tA", 1), "lastUpdateDateTime": "2099-01-01T00:00:00Z"}]
    poller, published, _ = make_poller(emu)
    result = poller.poll("tA")
    assert result.cursor == "2026-11-20T10:00:00Z"  # the poll time, not 2099
    emu.alerts["tA"].append(alert("tA", 2, seconds=3700))  # arrives after the poll, before 2099
    again = poller.poll("tA")
    assert published.ids("tA") == ["datA_0", "datA_1", "datA_2"]  # the 2099 alert is not re-published
    assert again.duplicates == 1


def test_a_stored_cursor_in_the_future_re_reads_the_lookback(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n, seconds=3500 + n) for n in range(2)]  # a little before the poll
    cursors = MemoryCursorStore({"tA": ("2099-01-01T00:00:00Z", [])})  # left by a clock gone wrong
    poller, published, _ = make_poller(emu, cursors=cursors)
    assert poller.poll("tA").cursor == "2026-11-20T09:58:21Z"
    assert published.ids("tA") == ["datA_0", "datA_1"]


def test_rate_limiter_keeps_to_150_requests_per_minute_per_tenant() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(150, 60, clock=lambda: now[0], sleep=sleep)
    for i in range(150):
        now[0] = i * 0.1
        assert limiter.acquire("tA") == 0
    assert limiter.acquire("tB") == 0  # another tenant has its own budget
    waited = limiter.acquire("tA")
    assert waited == pytest.approx(60 - 14.9, abs=0.01) and slept


def test_publisher_splits_batches_at_the_size_limit_and_rejects_oversized_records() -> None:
    sent: list[EventDataBatch] = []
    publisher = BatchPublisher(lambda key: EventDataBatch(max_size_in_bytes=1500, partition_key=key), sent.append)
    records = [orjson.dumps({"n": i, "pad": "x" * 300}) for i in range(10)] + [orjson.dumps({"pad": "y" * 5000})]
    rejected = publisher.publish("tenant-1", records)
    assert len(rejected) == 1 and "exceeds the hub's batch size limit" in rejected[0] and "record 10" in rejected[0]
    assert sum(len(b) for b in sent) == 10 and len(sent) >= 3
    assert all(b.size_in_bytes <= 1500 for b in sent)
    assert publisher.sent == 10


def test_send_command_publishes_demo_files_by_tenant() -> None:
    by_key: dict[str, int] = {}

    def make(key: str) -> EventDataBatch:
        by_key.setdefault(key, 0)
        return EventDataBatch(max_size_in_bytes=256 * 1024, partition_key=key)

    def record(batch: EventDataBatch) -> None:
        by_key[batch._partition_key.decode() if isinstance(batch._partition_key, bytes) else batch._partition_key] += len(batch)

    files = [str(p) for p in sorted((REPO / "samples" / "demo").glob("*.json*"))]
    counts = send(files, BatchPublisher(make, record))
    assert counts["rejected"] == 0 and counts["sent"] == counts["read"] == 9
    assert by_key["0b1f6c2e-5a3d-4e8f-9c7b-1d2e3f4a5b6c"] >= 5 and by_key["5d7e8f90-1a2b-4c3d-8e9f-0a1b2c3d4e5f"] == 1


def test_poll_function_binding_and_off_unless_tenants_configured() -> None:
    functions: dict[str, Any] = app_functions()  # type: ignore[assignment]
    bindings = json.loads(functions["poll_graph_alerts"].get_function_json())["bindings"]
    assert bindings[0]["type"] == "timerTrigger" and bindings[0]["schedule"] == "%GRAPH_POLL_SCHEDULE%"
    assert build_graph_runtime({"ALERTS_EVENTHUB_NAME": "a", "STATE_STORAGE_CONNECTION": "x"}) is None
    with pytest.raises(SettingsError, match="GRAPH_CLIENT_SECRET"):
        load_graph_settings({"GRAPH_TENANTS": "t1", "GRAPH_AUTH": "client_secret", "GRAPH_CLIENT_ID": "c"})
    s = load_graph_settings(
        {
            "GRAPH_TENANTS": "t1, t2",
            "ALERTS_EVENTHUB__fullyQualifiedNamespace": "ns.servicebus.windows.net",
            "ALERTS_EVENTHUB_NAME": "alerts",
        }
    )
    assert s.tenants == ("t1", "t2") and s.auth == "managed_identity"


@pytest.mark.azurite
def test_table_cursor_store_round_trips(azurite: Azurite, table_name: str) -> None:
    store = TableCursorStore(TableClient.from_connection_string(azurite.connection_string, table_name))
    assert store.load("tenant/1") == (None, [])
    store.save("tenant/1", "2026-11-20T09:00:06Z", ["graph:a:1", "graph:b:1"])
    assert store.load("tenant/1") == ("2026-11-20T09:00:06Z", ["graph:a:1", "graph:b:1"])


@pytest.mark.azurite
def test_a_boundary_of_long_identities_still_fits_one_table_property_keeping_the_newest(
    azurite: Azurite, table_name: str
) -> None:
    # 500 Graph alert versions at the cursor's time: id + lastUpdateDateTime is ~70 characters each
    idents = [f"graph:da{i:030d}_{i:010d}:2026-11-20T09:00:06.1234567Z" for i in range(600)]
    store = TableCursorStore(TableClient.from_connection_string(azurite.connection_string, table_name))
    store.save("t", "2026-11-20T09:00:06Z", idents)
    entity = store.table.get_entity(TableCursorStore.PARTITION, next(iter(store.table.list_entities()))["RowKey"])
    assert len(entity["boundary"]) <= 30_000 < len(orjson.dumps(idents[-500:]))  # Table: 32K UTF-16 characters
    cursor, kept = store.load("t")
    assert cursor == "2026-11-20T09:00:06Z" and kept and kept == idents[-len(kept) :]  # the newest are kept


@pytest.mark.azurite
def test_an_incidents_cursor_is_kept_apart_from_the_alerts_cursor_of_the_same_tenant(azurite: Azurite, table_name: str) -> None:
    store = TableCursorStore(TableClient.from_connection_string(azurite.connection_string, table_name))
    store.save("t1", "2026-11-20T09:00:06Z", ["graph:a:1"])
    store.save("t1", "2026-11-20T10:00:00Z", ["graph-incident:7:1"], "incidents")
    assert store.load("t1") == ("2026-11-20T09:00:06Z", ["graph:a:1"])  # alerts: the key it always had
    assert store.load("t1", "incidents") == ("2026-11-20T10:00:00Z", ["graph-incident:7:1"])
    assert store.load("t1_incidents") == (None, [])  # no tenant name reaches the incidents key


def incident(tenant: str, n: int, severity: str = "high") -> dict[str, Any]:
    updated = (T0 + timedelta(seconds=n)).isoformat().replace("+00:00", "Z")
    return {
        "@odata.type": "#microsoft.graph.security.incident",
        "id": f"{tenant}-{n}",
        "tenantId": tenant,
        "displayName": f"Multi-stage incident {n}",
        "severity": severity,
        "status": "active",
        "incidentWebUrl": f"https://security.microsoft.com/incidents/{n}?tid={tenant}",
        "createdDateTime": T0.isoformat().replace("+00:00", "Z"),
        "lastUpdateDateTime": updated,
    }


def test_incidents_are_polled_beside_alerts_with_their_own_cursor(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", n) for n in range(3)]
    emu.incidents["tA"] = [incident("tA", n) for n in range(5)]
    poller, published, _ = make_poller(emu, resources=("alerts_v2", "incidents"))
    results = poller.poll_all(["tA"])
    assert [(r.resource, r.published, r.error) for r in results] == [("alerts_v2", 3, None), ("incidents", 5, None)]
    assert sorted(published.ids("tA")) == sorted([f"datA_{n}" for n in range(3)] + [f"tA-{n}" for n in range(5)])
    assert any("/security/incidents?" in path and "%24orderby" not in path for path, _ in emu.requests)
    again = poller.poll_all(["tA"])  # each overlap recognised by its own identities
    assert [r.published for r in again] == [0, 0] and [r.duplicates for r in again] == [1, 1]
    emu.incidents["tA"].append(incident("tA", 9))
    assert [r.published for r in poller.poll_all(["tA"])] == [0, 1]


def test_a_missing_incident_permission_fails_only_the_incidents_and_names_the_permission(emu: GraphEmulator) -> None:
    emu.alerts["tA"] = [alert("tA", 0)]
    emu.incidents["tA"] = [incident("tA", 0)]
    emu.forbidden.add("incidents")
    poller, published, _ = make_poller(emu, resources=("alerts_v2", "incidents"))
    alerts, incidents = poller.poll_all(["tA"])
    assert alerts.error is None and published.ids("tA") == ["datA_0"]
    assert incidents.error and "SecurityIncident.Read.All" in incidents.error


def test_a_polled_graph_incident_fires_fortisiems_incident_rule_unless_its_severity_is_low() -> None:
    rules = load_rules([default_rules_dir() / "PH_RULE_MS_DefEndpoint_Incident_Generic.yaml"])
    engine = Engine(rules, MemoryStateStore(), clock=lambda: T0 + timedelta(minutes=5))
    normalizer = Normalizer()
    events = [
        normalizer.normalize(incident("tA", n, severity), "graph", T0 + timedelta(minutes=5))
        for n, severity in [(1, "high"), (2, "low"), (3, "medium")]
    ]
    assert all(isinstance(e, NormalizedEvent) for e in events)
    snaps = engine.process(events).incidents  # type: ignore[arg-type]
    assert sorted(s["attributes"]["incidentExtTicketId"] for s in snaps) == ["tA-1", "tA-3"]
    assert {s["tenantId"] for s in snaps} == {"tA"} and all(s["attributes"]["incidentTitle"] for s in snaps)


def test_graph_resources_setting_is_validated_and_defaults_to_alerts_and_incidents() -> None:
    base = {
        "GRAPH_TENANTS": "t1",
        "ALERTS_EVENTHUB": "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=dg==",
        "ALERTS_EVENTHUB_NAME": "alerts",
    }
    assert load_graph_settings(base).resources == ("alerts_v2", "incidents")
    assert load_graph_settings({**base, "GRAPH_RESOURCES": "alerts_v2"}).resources == ("alerts_v2",)
    with pytest.raises(SettingsError, match="GRAPH_RESOURCES"):
        load_graph_settings({**base, "GRAPH_RESOURCES": "alerts"})


def test_graph_error_is_a_correlator_error() -> None:
    assert issubclass(GraphError, ValueError)
