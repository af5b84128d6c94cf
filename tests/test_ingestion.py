"""Ingestion never stalls a partition and never loses a record (issue 11).

The decorated ``correlate_alerts`` is called with real ``func.EventHubEvent`` objects. The invariant
under test: whatever the bytes and the batch shape, the function completes (or raises only an
infrastructure error), and every record it does not count is dead-lettered, whole, with a reason.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
import pytest
from azure.functions.meta import Datum
from hypothesis import example, given
from hypothesis import strategies as st

import shared.engine
from shared.claimcheck import MemoryClaims
from shared.deadletters import MAX_REASON_CHARS, decode_letters, raw_of
from shared.engine import MAX_PREFILTER_CACHE, Engine
from shared.errors import StoreError
from shared.functions import (
    MAX_QUEUE_MESSAGE_BYTES,
    AlertBatchHandler,
    BatchOutcome,
    QueuePoison,
    Runtime,
    set_runtime,
)
from shared.normalize import MAX_RECORD_BYTES, NormalizedEvent, Normalizer
from shared.rules import default_rules_dir, load_rules
from shared.settings import load_settings
from shared.state import MemoryStateStore

from .conftest import app_functions

REPO = Path(__file__).resolve().parent.parent
RULES = load_rules([default_rules_dir()])
SEED = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"
NOW = datetime(2026, 11, 1, 10, 0, tzinfo=timezone.utc)
EXTREME_TIMES = ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.9999999Z")
META = {"PartitionContext": Datum(json.dumps({"PartitionId": "3"}), "json")}


class ListQueue:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.calls = 0

    def send(self, messages: Sequence[str]) -> None:
        self.calls += 1
        self.messages.extend(messages)


class Recording(AlertBatchHandler):
    """The production handler, remembering its last outcome for the assertions."""

    last: BatchOutcome | None = None

    def handle(self, events: Any) -> BatchOutcome:
        self.last = super().handle(events)
        return self.last


class Harness:
    def __init__(self) -> None:
        self.queue = ListQueue()
        self.claims = MemoryClaims()
        self.store = MemoryStateStore()
        self.engine = Engine(RULES, self.store, clock=lambda: NOW)
        self.handler = Recording(self.engine, self.queue, clock=lambda: NOW, claims=self.claims)
        settings = load_settings({"ALERTS_EVENTHUB_NAME": "alerts", "STATE_STORAGE_CONNECTION": "UseDevelopmentStorage=true"})
        set_runtime(Runtime(settings, RULES, self.store, self.handler))

    def call(self, bodies: Sequence[bytes], first_seq: int = 0) -> list[dict[str, Any]]:
        events = [
            func.EventHubEvent(body=b, trigger_metadata=META, sequence_number=first_seq + i, enqueued_time=NOW)
            for i, b in enumerate(bodies)
        ]
        out = Out()
        app_functions()["correlate_alerts"].get_user_function()(events, out)  # type: ignore[attr-defined]
        return [json.loads(m) for m in out.value or []]

    @property
    def summary(self) -> dict[str, Any]:
        assert self.handler.last is not None
        return self.handler.last.summary

    def letters(self) -> list[dict[str, Any]]:
        out = []
        for message in self.queue.messages:
            parsed = json.loads(message)
            out.extend(decode_letters(self.claims.get(parsed["claimCheck"]["blob"])))
        return out


class Out:
    value: list[str] | None = None

    def set(self, value: list[str]) -> None:
        self.value = value


@pytest.fixture
def hub() -> Iterator[Harness]:
    yield Harness()
    set_runtime(None)


def graph_alert(alert_id: str, updated: str, tenant: str = "tenant-a", category: Any = "Persistence") -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": alert_id,
        "tenantId": tenant,
        "title": "Suspicious Task Scheduler activity",
        "category": category,
        "severity": "high",
        "serviceSource": "microsoftDefenderForEndpoint",
        "mitreTechniques": ["T1053.005"],
        "createdDateTime": "2026-11-01T09:00:00Z",
        "lastUpdateDateTime": updated,
    }


def at(seconds: float) -> str:
    return (NOW + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def assert_invariant(h: Harness, n_letters_before: int = 0) -> None:
    """Every record is accepted, skipped or dead-lettered; every dead letter has a reason and its bytes."""
    s = h.summary
    assert s["records"] == s["accepted"] + s["rejected"] + s["skipped"]
    letters = h.letters()[n_letters_before:]
    assert len(letters) == s["rejected"]
    assert all(x["reason"] and len(x["reason"]) <= MAX_REASON_CHARS for x in letters)
    assert all(len(m.encode()) <= MAX_QUEUE_MESSAGE_BYTES for m in h.queue.messages)


# -- the invariant, as properties -----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(EXTREME_TIMES)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
extreme_datetimes = (
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc) | st.none()).map(
        lambda d: d.isoformat()
    )
    | st.sampled_from(EXTREME_TIMES)
    | st.integers(min_value=-(2**63), max_value=2**63)
)

# Every wire format's fields, each drawn from nasty values (and the extreme times for time fields).
FIELDS = {
    "graph": [
        "id",
        "tenantId",
        "title",
        "category",
        "severity",
        "mitreTechniques",
        "evidence",
        "incidentId",
        "status",
        "createdDateTime",
        "lastUpdateDateTime",
        "serviceSource",
        "detectionSource",
        "description",
        "alertWebUrl",
    ],
    "mde": [
        "id",
        "aadTenantId",
        "title",
        "category",
        "severity",
        "mitreTechniques",
        "incidentId",
        "computerDnsName",
        "relatedUser",
        "alertCreationTime",
        "lastUpdateTime",
        "status",
        "detectionSource",
        "machineId",
    ],
    "siem": [
        "AlertId",
        "AlertTitle",
        "Category",
        "Severity",
        "LinkToWDATP",
        "AlertTime",
        "LastProcessedTimeUtc",
        "ComputerDnsName",
        "UserName",
        "UserDomain",
        "ThreatName",
        "FileName",
        "Sha1",
    ],
    "streaming": ["time", "tenantId"],
    "normalized": ["eventType", "eventTime", "eventId", "alertIdStr", "attackTechniqueId", "hostName", "tenantId"],
}
BASES: dict[str, dict[str, Any]] = {
    "graph": graph_alert("g1", at(0)),
    "mde": {"id": "m1", "aadTenantId": "t", "category": "Persistence", "alertCreationTime": at(0), "machineId": "x"},
    "siem": {"AlertId": "s1", "AlertTitle": "x", "AlertTime": at(0), "Category": "Persistence"},
    "streaming": {
        "time": at(0),
        "tenantId": "t",
        "category": "AdvancedHunting-AlertInfo",
        "properties": {"AlertId": "a1", "Category": "Persistence", "Timestamp": at(0), "Title": "x"},
    },
    "normalized": {"eventType": "M365Defender-Alert-Persistence", "eventTime": at(0), "eventId": "e1"},
}
STREAM_PROPS = [
    "AlertId",
    "Category",
    "Timestamp",
    "Title",
    "Severity",
    "AttackTechniques",
    "DeviceName",
    "AccountName",
    "ServiceSource",
    "DetectionSource",
]


@st.composite
def wire_records(draw: st.DrawFn) -> dict[str, Any]:
    fmt = draw(st.sampled_from(sorted(BASES)))
    rec = json.loads(json.dumps(BASES[fmt]))
    for name in draw(st.lists(st.sampled_from(FIELDS[fmt]), max_size=4, unique=True)):
        time_field = "Time" in name or "time" in name.lower()
        rec[name] = draw(extreme_datetimes if time_field and draw(st.booleans()) else json_values)
    if fmt == "streaming":
        for name in draw(st.lists(st.sampled_from(STREAM_PROPS), max_size=3, unique=True)):
            rec["properties"][name] = draw(extreme_datetimes if name == "Timestamp" else json_values)
        rec["category"] = draw(
            st.sampled_from(["AdvancedHunting-AlertInfo", "AdvancedHunting-AlertEvidence", "AdvancedHunting-DeviceEvents"])
        )
    return rec


def body_of(records: list[Any], shape: str) -> bytes:
    if shape == "array":
        return orjson.dumps(records)
    if shape == "records":
        return orjson.dumps({"records": records})
    if shape == "lines":
        return b"\n".join(orjson.dumps(r) for r in records)
    return orjson.dumps(records[0]) if records else b""


@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
@example(bodies=[b"\xff\xfe", b"[" * 2000, b"1e400", b""])
def test_any_bytes_complete_and_every_record_is_accounted_for(bodies: list[bytes]) -> None:
    h = Harness()
    good = orjson.dumps(graph_alert("good", at(0)))
    snaps = h.call([*bodies, good])
    assert_invariant(h)
    assert any(s["ruleId"] == SEED and s["attributes"]["alertIdStr"] == "good" for s in snaps)


@given(docs=st.lists(json_values, min_size=1, max_size=5))
def test_any_json_completes_and_every_record_is_accounted_for(docs: list[Any]) -> None:
    h = Harness()
    h.call([orjson.dumps(d) for d in docs])
    assert_invariant(h)


@given(records=st.lists(wire_records(), min_size=1, max_size=6), shape=st.sampled_from(["array", "records", "lines", "one"]))
@example(records=[{**BASES["graph"], "id": f"e{i}", "lastUpdateDateTime": t} for i, t in enumerate(EXTREME_TIMES)], shape="array")
def test_every_wire_format_with_nasty_fields_completes_and_accounts_for_every_record(
    records: list[dict[str, Any]], shape: str
) -> None:
    h = Harness()
    good = orjson.dumps(graph_alert("good", at(1)))
    h.call([body_of(records, shape), good])
    assert_invariant(h)
    assert h.summary["accepted"] >= 1


# -- the boundary catches bugs, not infrastructure --------------------------------------------


def test_a_parser_bug_rejects_its_record_naming_the_exception(hub: Harness) -> None:
    normalizer = hub.handler.normalizer
    original = normalizer._graph

    def buggy(rec: dict[str, Any], position: str, arrival: datetime) -> Any:
        if rec.get("id") == "boom":
            raise ZeroDivisionError("division by zero")
        return original(rec, position, arrival)

    normalizer._graph = buggy  # type: ignore[method-assign]
    snaps = hub.call([orjson.dumps([graph_alert("boom", at(0)), graph_alert("ok", at(0))])])
    assert [s["attributes"]["alertIdStr"] for s in snaps if s["ruleId"] == SEED] == ["ok"]
    [rejected] = hub.letters()
    assert "ZeroDivisionError" in rejected["reason"] and rejected["position"] == "partition 3 seq 0#0"
    assert orjson.loads(raw_of(rejected))["id"] == "boom"


def test_an_engine_bug_on_one_event_rejects_that_event_only(hub: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    original = shared.engine.apply_events

    def buggy(rule: Any, key: Any, state: Any, events: Sequence[NormalizedEvent], stats: Any) -> Any:
        if any(e.attrs.get("alertIdStr") == "boom" for e in events):
            raise KeyError("window column")
        return original(rule, key, state, events, stats)

    monkeypatch.setattr(shared.engine, "apply_events", buggy)
    bodies = [orjson.dumps(graph_alert(f"a{i}", at(i))) for i in range(7)]
    bodies.insert(3, orjson.dumps(graph_alert("boom", at(0))))
    snaps = hub.call(bodies)
    assert sorted(s["attributes"]["alertIdStr"] for s in snaps if s["ruleId"] == SEED) == [f"a{i}" for i in range(7)]
    [rejected] = hub.letters()
    assert "engine failed on this record (KeyError" in rejected["reason"] and rejected["sequenceNumber"] == 3
    assert_invariant(hub)


class DownStore(MemoryStateStore):
    def load(self, keys: Any, now_ms: int) -> Any:
        raise StoreError("table unreachable")


def test_an_infrastructure_error_still_fails_the_batch_for_a_retry(hub: Harness) -> None:
    hub.handler.engine.store = DownStore()
    with pytest.raises(StoreError, match="table unreachable"):
        hub.call([orjson.dumps(graph_alert("a", at(0)))])
    assert hub.queue.messages == []


def test_an_unreachable_dead_letter_queue_fails_the_batch_for_a_retry(hub: Harness) -> None:
    def down(messages: Sequence[str]) -> None:
        raise StoreError("queue unreachable")

    hub.queue.send = down  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="queue unreachable"):
        hub.call([b"{bad"])


# -- the numbered failures of issue 11 ----------------------------------------------------------


@pytest.mark.parametrize("extreme", EXTREME_TIMES)
def test_1_extreme_iso_times_never_fail_the_batch_and_the_good_alert_beside_them_fires(hub: Harness, extreme: str) -> None:
    snaps = hub.call([orjson.dumps(graph_alert("edge", extreme)), orjson.dumps(graph_alert("good", at(0)))])
    fired = {s["attributes"]["alertIdStr"]: s for s in snaps if s["ruleId"] == SEED}
    assert set(fired) == {"edge", "good"}
    [edge] = fired["edge"]["triggerEvents"]
    assert edge["attributes"]["eventTimeSource"] == "clamped" and edge["attributes"]["eventTimeReported"] == extreme
    assert edge["eventTime"] == "2026-11-01T10:00:00Z"  # the arrival time


def test_1_replay_with_extreme_times_writes_incidents(tmp_path: Path) -> None:
    path = tmp_path / "extreme.jsonl"
    now = datetime.now(timezone.utc).isoformat()
    lines = [graph_alert(f"x{i}", t) for i, t in enumerate(EXTREME_TIMES)] + [graph_alert("good", now)]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines))
    result = subprocess.run([sys.executable, "-m", "shared", "replay", str(path)], capture_output=True, cwd=REPO, timeout=120)
    assert b"Traceback" not in result.stderr and result.returncode == 0
    fired = {json.loads(x)["attributes"]["alertIdStr"] for x in result.stdout.splitlines()}
    assert fired >= {"x0", "x1", "x2", "good"}


def test_2_a_reason_quoting_a_70_kb_key_still_makes_a_small_dead_letter(hub: Harness) -> None:
    record = {"k" * 70_000: 1, "other": 2}
    hub.call([orjson.dumps(record)])
    [message] = hub.queue.messages
    assert len(message.encode()) < MAX_QUEUE_MESSAGE_BYTES
    [rejected] = hub.letters()
    assert "no known format" in rejected["reason"] and len(rejected["reason"]) < 300
    assert orjson.loads(raw_of(rejected)) == record


def test_3_half_a_million_tiny_invalid_records_are_one_blob_and_one_message(hub: Harness) -> None:
    body = b"[" + b",".join([b"1"] * 500_000) + b"]"
    assert len(body) <= MAX_RECORD_BYTES
    hub.call([body, orjson.dumps(graph_alert("good", at(0)))])
    assert (hub.queue.calls, len(hub.queue.messages), hub.claims.puts) == (1, 1, 1)
    message = json.loads(hub.queue.messages[0])
    assert message["records"] == 500_000 and message["reasonsOmitted"] == 500_000 - len(message["reasons"])
    assert hub.summary["rejected"] == 500_000 and hub.summary["accepted"] == 1


def test_4_an_alert_from_2099_cannot_silence_its_group(hub: Harness) -> None:
    first = hub.call([orjson.dumps(graph_alert("da1", "2099-01-01T00:00:00Z"))])
    assert first[0]["triggerEvents"][0]["attributes"]["eventTimeSource"] == "clamped"
    later = hub.call([orjson.dumps(graph_alert("da1", at(60)))], first_seq=1)  # the real next version
    assert hub.summary["late"] == 0
    [snap] = [s for s in later if s["ruleId"] == SEED]
    assert (snap["revision"], snap["attributes"]["incidentCount"]) == (2, 2)


def test_4_an_absurdly_old_time_is_clamped_too(hub: Harness) -> None:
    hub.handler.normalizer = Normalizer(prefilter=hub.engine.could_match, max_skew_s=300, max_age_s=86400)
    [snap] = [s for s in hub.call([orjson.dumps(graph_alert("old", "2026-10-01T00:00:00Z"))]) if s["ruleId"] == SEED]
    assert snap["triggerEvents"][0]["attributes"]["eventTimeSource"] == "clamped"
    [inside] = [s for s in hub.call([orjson.dumps(graph_alert("skew", at(299)))], 1) if s["ruleId"] == SEED]
    assert "eventTimeSource" not in inside["triggerEvents"][0]["attributes"]  # within the skew: honoured


def test_5_a_dead_letter_keeps_the_whole_record(hub: Harness) -> None:
    record = {"weird": "x" * 600_000}
    hub.call([orjson.dumps(record)])
    [rejected] = hub.letters()
    assert raw_of(rejected) == orjson.dumps(record) and rejected["rawBytes"] == len(orjson.dumps(record))


@pytest.mark.parametrize("shape", ["single", "array"])
def test_a_record_nested_past_the_encoders_depth_limit_is_dead_lettered_whole(hub: Harness, shape: str) -> None:
    # orjson reads 1,024 levels but writes only 254: the re-serialized record must not come out empty
    deep = b'{"deep":' + b"[" * 1000 + b"]" * 1000 + b"}"
    body = deep if shape == "single" else b"[" + orjson.dumps(graph_alert("ok", at(-5))) + b"," + deep + b"]"
    hub.call([body])
    [rejected] = hub.letters()
    assert raw_of(rejected) == deep and rejected["rawBytes"] == len(deep)


def deep_alert(alert_id: str) -> bytes:
    return orjson.dumps(graph_alert(alert_id, at(-5)))[:-1] + b',"deep":' + b"[" * 600 + b"]" * 600 + b"}"


def test_an_alert_with_a_field_nested_past_the_encoders_depth_limit_still_fires(hub: Harness) -> None:
    snaps = hub.call([deep_alert("deep")])
    assert [s["attributes"]["alertIdStr"] for s in snaps if s["ruleId"] == SEED] == ["deep"]
    assert hub.letters() == []


def test_an_engine_failure_on_a_deeply_nested_record_dead_letters_it_whole(hub: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(*args: Any) -> Any:
        raise KeyError("window column")

    monkeypatch.setattr(shared.engine, "apply_events", buggy)
    hub.call([deep_alert("deep")])
    [rejected] = hub.letters()
    assert "engine failed on this record" in rejected["reason"]
    assert raw_of(rejected) == deep_alert("deep")


def test_6_an_event_body_over_one_mebibyte_is_rejected_whole(hub: Harness) -> None:
    alert = graph_alert("big", at(0))
    alert["description"] = "d" * MAX_RECORD_BYTES
    body = orjson.dumps(alert)
    snaps = hub.call([body])
    assert snaps == []
    [rejected] = hub.letters()
    assert "exceeds the 1048576-byte cap" in rejected["reason"] and raw_of(rejected) == body


def test_6_replay_and_send_reject_a_record_over_one_mebibyte(tmp_path: Path) -> None:
    alert = graph_alert("big", datetime.now(timezone.utc).isoformat())
    alert["description"] = "d" * (3 * MAX_RECORD_BYTES)
    path = tmp_path / "big.json"
    path.write_bytes(orjson.dumps(alert))
    result = subprocess.run([sys.executable, "-m", "shared", "replay", str(path)], capture_output=True, cwd=REPO, timeout=120)
    assert result.stdout == b"" and result.returncode == 1
    assert b"exceeds the 1048576-byte cap" in result.stderr
    from shared.send import raw_records

    [item] = list(raw_records([str(path)], "auto"))
    assert "exceeds the 1048576-byte cap" in str(item)


def test_7_the_prefilter_cache_is_bounded() -> None:
    engine = Engine(RULES, MemoryStateStore())
    normalizer = Normalizer(prefilter=engine.could_match)
    for i in range(3 * MAX_PREFILTER_CACHE):
        normalizer.normalize({"eventType": f"Custom-{i}"}, "t", NOW)
    assert 0 < len(engine._wanted) <= MAX_PREFILTER_CACHE
    assert engine.could_match("M365Defender-Alert-Persistence") is True  # still answers after clearing


@pytest.mark.parametrize("category", ["null", "None", "", "NULL", None])
def test_9_null_like_categories_are_no_category(category: Any) -> None:
    graph = Normalizer().normalize(graph_alert("g", at(0), category=category), "t", NOW)
    mde = Normalizer().normalize({**BASES["mde"], "category": category}, "t", NOW)
    stream = Normalizer().normalize({**BASES["streaming"], "properties": {"AlertId": "a", "Category": category}}, "t", NOW)
    assert isinstance(graph, NormalizedEvent) and isinstance(mde, NormalizedEvent) and isinstance(stream, NormalizedEvent)
    assert (graph.event_type, mde.event_type, stream.event_type) == (
        "M365Defender-Alert",
        "MS-Defender-Endpoint-Alert",
        "MS-Defender-Endpoint-Alert",
    )
    assert "attackTactic" not in graph.attrs


# -- poison messages always fit and keep their body -----------------------------------------------


def test_a_poison_message_too_big_for_the_queue_is_claim_checked_whole() -> None:
    queue = type("Q", (), {"queue_name": "incidents-poison", "sent": []})()
    queue.create_queue = lambda: None
    queue.send_message = lambda m: queue.sent.append(m)
    claims = MemoryClaims()
    body = orjson.dumps({"incidentId": "inc-1", "revision": 3, "attributes": {"x": "y" * 200_000}})
    QueuePoison(queue, claims, clock=lambda: NOW).send(
        orjson.dumps({"reason": "r" * 5000, "messageId": "m1", "body": body.decode()}).decode()
    )
    [message] = [json.loads(m) for m in queue.sent]
    assert len(queue.sent[0].encode()) <= MAX_QUEUE_MESSAGE_BYTES
    assert message["body"] is None and message["bodyBytes"] == len(body) and len(message["reason"]) <= MAX_REASON_CHARS
    assert message["claimCheck"]["blob"].startswith("poison/2026/11/01/m1-")
    assert claims.get(message["claimCheck"]["blob"]) == body


def test_a_small_poison_message_goes_inline_unchanged() -> None:
    queue = type("Q", (), {"queue_name": "p", "sent": []})()
    queue.create_queue = lambda: None
    queue.send_message = lambda m: queue.sent.append(m)
    message = orjson.dumps({"reason": "HTTP 400", "messageId": "m", "body": '{"incidentId": "i"}'}).decode()
    QueuePoison(queue, MemoryClaims()).send(message)
    assert queue.sent == [message]


def test_dead_letter_blobs_of_a_retried_batch_are_the_same_blob(hub: Harness) -> None:
    hub.call([b"{bad", b"[1,2]"])
    hub.call([b"{bad", b"[1,2]"])
    assert len(hub.claims.blobs) == 1 and len(hub.queue.messages) == 2
    assert base64.b64decode(hub.letters()[0]["raw"]) == b"{bad"


def test_a_batch_retried_after_midnight_rewrites_the_same_dead_letter_blob(hub: Harness) -> None:
    from datetime import timedelta

    hub.call([b"{bad", b"[1,2]"])
    hub.handler.clock = lambda: NOW + timedelta(days=1)  # the retry runs the next day (UTC)
    hub.call([b"{bad", b"[1,2]"])  # same events, same enqueued time
    assert len(hub.claims.blobs) == 1
    assert NOW.strftime("%Y/%m/%d") in next(iter(hub.claims.blobs))  # named by the events' own day


def test_a_batch_mixing_naive_and_aware_enqueued_times_is_processed_and_reads_naive_as_utc(hub: Harness) -> None:
    """The Functions library gives a naive ``enqueued_time`` for a host time without a zone, an aware one
    otherwise: a batch holding both must not fail (the retry policy would re-run it for ever)."""
    naive = (NOW - timedelta(hours=1)).replace(tzinfo=None)
    events = [
        func.EventHubEvent(body=b"{bad", trigger_metadata=META, sequence_number=1, enqueued_time=naive),
        func.EventHubEvent(
            body=orjson.dumps(graph_alert("da1", at(0))), trigger_metadata=META, sequence_number=2, enqueued_time=NOW
        ),
    ]
    out = Out()
    app_functions()["correlate_alerts"].get_user_function()(events, out)  # type: ignore[attr-defined]
    assert [json.loads(m)["ruleId"] for m in out.value or []].count(SEED) == 1
    assert (hub.summary["rejected"], hub.summary["maxLagSeconds"]) == (1, 3600.0)
    [message] = hub.queue.messages
    assert json.loads(message)["claimCheck"]["blob"].startswith("rejected/2026/11/01/")
    assert hub.letters()[0]["enqueuedTime"] == "2026-11-01T09:00:00+00:00"
