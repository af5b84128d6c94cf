from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from shared.engine import MAX_TRIGGER_EVENTS, Engine
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import default_rules_dir, load_rules, parse_rule_text
from shared.state import MAX_WINDOW_ENTRIES, GroupKey, MemoryStateStore

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
SEED = load_rules([default_rules_dir() / "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity.yaml"])[0]


def alert(
    version: str,
    *,
    alert_id: str = "da1_1",
    tenant: str = "tenant-a",
    name: str = "Suspicious Task Scheduler activity",
    at: float = 0,
    **extra: Any,
) -> NormalizedEvent:
    rec = {
        "eventType": "M365Defender-Alert-Persistence",
        "alertName": name,
        "alertIdStr": alert_id,
        "tenantId": tenant,
        "attackTechniqueId": ["T1053.005"],
        "eventId": f"{alert_id}:{version}",
        "eventTime": (T0 + timedelta(seconds=at)).isoformat(),
        **extra,
    }
    ev = Normalizer(fmt="normalized").normalize(rec, "test", T0)
    assert isinstance(ev, NormalizedEvent)
    return ev


class Timeline:
    """Feeds events one batch at a time and keeps every snapshot."""

    def __init__(self, rules: list | None = None, store: MemoryStateStore | None = None) -> None:
        self.now = T0
        self.store = store if store is not None else MemoryStateStore()  # an empty store is falsy (len 0)
        self.engine = Engine(rules or [SEED], self.store, lambda: self.now)
        self.snapshots: list[dict[str, Any]] = []
        self.stats: list[Any] = []

    def feed(self, *events: NormalizedEvent) -> list[dict[str, Any]]:
        result = self.engine.process(list(events))
        self.snapshots.extend(result.incidents)
        self.stats.append(result.stats)
        return result.incidents

    def pairs(self) -> set[tuple[str, int]]:
        return {(s["incidentId"], s["revision"]) for s in self.snapshots}


def test_first_matching_event_creates_an_incident_with_the_mapped_attributes() -> None:
    tl = Timeline()
    [snap] = tl.feed(alert("v1"))
    assert snap["action"] == "created" and snap["revision"] == 1 and snap["triggerCount"] == 1
    assert snap["attributes"] == {
        "alertName": "Suspicious Task Scheduler activity",
        "alertIdStr": "da1_1",
        "tenantId": "tenant-a",
        "incidentCount": 1,
    }
    assert (snap["ruleId"], snap["severity"], snap["category"]) == (SEED.id, 9, "Security")
    assert snap["techniques"][0]["id"] == "T1053.002" and snap["tactics"][0]["id"] == "TA0003"
    assert snap["firstSeen"] == snap["lastSeen"] == "2026-03-01T00:00:00Z"
    assert snap["remediation"].startswith("Investigate")
    assert snap["triggerEvents"][0]["attributes"]["alertIdStr"] == "da1_1"
    assert snap["incidentId"].startswith("inc-")


def test_new_version_inside_the_window_updates_with_count_two() -> None:
    tl = Timeline()
    first = tl.feed(alert("v1"))[0]
    [snap] = tl.feed(alert("v2", at=120))
    assert snap["incidentId"] == first["incidentId"]
    assert (snap["action"], snap["revision"], snap["attributes"]["incidentCount"], snap["triggerCount"]) == ("updated", 2, 2, 1)
    assert snap["lastSeen"] == "2026-03-01T00:02:00Z"


def test_byte_identical_duplicate_changes_nothing() -> None:
    tl = Timeline()
    tl.feed(alert("v1"))
    again = tl.feed(alert("v1"))
    assert all(s["revision"] == 1 for s in again)  # re-emitting the same snapshot is allowed
    assert tl.stats[-1].counts["duplicates"] == 1 and tl.stats[-1].counts["counted"] == 0
    [snap] = tl.feed(alert("v2", at=10))
    assert snap["revision"] == 2 and snap["attributes"]["incidentCount"] == 2


def test_after_a_window_of_silence_the_same_incident_updates_with_count_one_and_trigger_count_two() -> None:
    tl = Timeline()
    first = tl.feed(alert("v1"))[0]
    [snap] = tl.feed(alert("v2", at=301))
    assert snap["incidentId"] == first["incidentId"]
    assert (snap["revision"], snap["attributes"]["incidentCount"], snap["triggerCount"]) == (2, 1, 2)
    assert snap["firstSeen"] == "2026-03-01T00:00:00Z"


def test_after_the_incident_lifetime_of_silence_a_new_incident_is_created() -> None:
    tl = Timeline()
    first = tl.feed(alert("v1"))[0]
    later = tl.feed(alert("v2", at=3600))[0]
    assert later["incidentId"] == first["incidentId"]
    [fresh] = tl.feed(alert("v3", at=3600 + 86400 + 1))
    assert fresh["incidentId"] != first["incidentId"]
    assert (fresh["action"], fresh["revision"], fresh["triggerCount"]) == ("created", 1, 1)


def test_out_of_order_events_inside_the_window_count() -> None:
    tl = Timeline()
    tl.feed(alert("v2", at=200))
    [snap] = tl.feed(alert("v1", at=50))
    assert snap["attributes"]["incidentCount"] == 2


def test_events_older_than_the_window_are_counted_as_late_not_dropped_silently() -> None:
    tl = Timeline()
    tl.feed(alert("v2", at=1000))
    assert tl.feed(alert("v1", at=100)) == []
    assert tl.stats[-1].counts["late"] == 1
    assert tl.stats[-1].per_rule[SEED.id]["late"] == 1


def test_two_tenants_never_share_an_incident() -> None:
    tl = Timeline()
    a = tl.feed(alert("v1", tenant="tenant-a"))[0]
    b = tl.feed(alert("v1", tenant="tenant-b"))[0]
    assert a["incidentId"] != b["incidentId"]
    assert b["action"] == "created" and b["attributes"]["tenantId"] == "tenant-b"


def test_group_key_is_case_insensitive_but_keeps_the_first_case() -> None:
    tl = Timeline()
    tl.feed(alert("v1", name="Task Activity"))
    [snap] = tl.feed(alert("v2", name="TASK ACTIVITY", at=5))
    assert snap["revision"] == 2 and snap["attributes"]["alertName"] == "Task Activity"


def test_missing_group_by_value_is_an_empty_value() -> None:
    ev = Normalizer(fmt="normalized").normalize(
        {"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": "T1053", "alertIdStr": "x", "eventId": "1"}, "t", T0
    )
    [snap] = Timeline().feed(ev)  # type: ignore[arg-type]
    assert snap["attributes"]["alertName"] == "" and snap["attributes"]["tenantId"] == ""


def test_non_matching_events_touch_no_storage() -> None:
    tl = Timeline()
    other = Normalizer(fmt="normalized").normalize(
        {"eventType": "M365Defender-Alert-Execution", "attackTechniqueId": "T1059.001"}, "t", T0
    )
    tl.feed(other)  # type: ignore[arg-type]
    assert tl.store.calls == {"load": 0, "save": 0, "purge": 0}


def test_a_batch_loads_and_saves_each_group_once() -> None:
    tl = Timeline()
    events = [alert(f"v{i}", alert_id=f"da{i % 3}", at=i) for i in range(30)]
    snaps = tl.feed(*events)
    assert tl.store.calls["load"] == 1 and tl.store.calls["save"] == 1
    assert len(snaps) == 3  # one snapshot per incident per batch, its final revision
    assert sorted(s["attributes"]["incidentCount"] for s in snaps) == [10, 10, 10]
    assert all(len(s["triggerEvents"]) == MAX_TRIGGER_EVENTS for s in snaps)


def test_replaying_the_same_input_gives_the_same_incident_revisions() -> None:
    events = [alert(f"v{i}", alert_id=f"da{i % 4}", tenant=f"t{i % 2}", at=i * 97) for i in range(40)]
    runs = []
    for _ in range(2):
        tl = Timeline()
        for ev in events:
            tl.feed(ev)
        runs.append(tl.pairs())
    assert runs[0] == runs[1] and runs[0]


def test_processing_a_batch_twice_changes_no_count() -> None:
    tl = Timeline()
    batch = [alert(f"v{i}", at=i) for i in range(5)]
    first = tl.feed(*batch)
    second = tl.feed(*batch)
    assert {(s["incidentId"], s["revision"]) for s in second} <= {(s["incidentId"], s["revision"]) for s in first}
    assert second[0]["attributes"]["incidentCount"] == 5


def test_window_is_capped_and_evicts_the_oldest() -> None:
    rule = parse_rule_text(
        "id: CAP\nname: cap\nseverity: 3\ncategory: Security\ntimeWindow: 100000\nsubpatterns:\n"
        "  - {name: s, query: 'eventType = \"x\"', groupBy: [h], aggregateConstraint: 'COUNT(*) >= 1'}\n"
        "incidentAttributes: {n: s.COUNT(*)}\n"
    )
    tl = Timeline([rule])
    n = Normalizer(fmt="normalized")
    events = [
        n.normalize(
            {"eventType": "x", "h": "a", "eventId": str(i), "eventTime": (T0 + timedelta(seconds=i)).isoformat()}, "t", T0
        )
        for i in range(MAX_WINDOW_ENTRIES + 10)
    ]
    [snap] = tl.feed(*events)  # type: ignore[arg-type]
    assert snap["attributes"]["n"] == MAX_WINDOW_ENTRIES
    assert tl.stats[-1].counts["evicted"] == 10


def test_distinct_count_rule_fires_only_at_its_threshold() -> None:
    rule = parse_rule_text(
        "id: SPRAY\nname: spray\nseverity: 5\ncategory: Security\ntimeWindow: 600\nsubpatterns:\n"
        "  - {name: s, query: 'eventType CONTAIN \"Alert\"', groupBy: [tenantId],\n"
        "     aggregateConstraint: 'COUNT(DISTINCT hostName) >= 3'}\n"
        "incidentAttributes: {tenantId: s.tenantId, hosts: s.COUNT(DISTINCT hostName), n: s.COUNT(*)}\n"
    )
    tl = Timeline([rule])
    n = Normalizer(fmt="normalized")

    def ev(i: int, host: str) -> NormalizedEvent:
        e = n.normalize(
            {
                "eventType": "Alert",
                "tenantId": "t",
                "hostName": host,
                "eventId": str(i),
                "eventTime": (T0 + timedelta(seconds=i)).isoformat(),
            },
            "t",
            T0,
        )
        assert isinstance(e, NormalizedEvent)
        return e

    assert tl.feed(ev(1, "h1")) == [] and tl.feed(ev(2, "H1")) == [] and tl.feed(ev(3, "h2")) == []
    [snap] = tl.feed(ev(4, "h3"))
    assert snap["attributes"] == {"tenantId": "t", "hosts": 3, "n": 4}


def test_disabled_rules_do_not_run() -> None:
    disabled = SEED.model.model_copy(update={"enabled": False})
    from dataclasses import replace

    tl = Timeline([replace(SEED, model=disabled)])
    assert tl.feed(alert("v1")) == []


def test_state_is_keyed_by_rule_and_group() -> None:
    tl = Timeline()
    tl.feed(alert("v1"))
    key = GroupKey(SEED.id, ("Suspicious Task Scheduler activity", "da1_1", "tenant-a"))
    assert tl.store.load([key], 0)[key].state is not None


@pytest.mark.parametrize("cap", [MAX_TRIGGER_EVENTS])
def test_trigger_events_carry_capped_raw_records(cap: int) -> None:
    big = alert("v1", pad="x" * 10000)
    [snap] = Timeline().feed(big)
    raw = snap["triggerEvents"][0]["raw"]
    assert raw["truncated"] is True and raw["bytes"] > 10000
    assert len(snap["triggerEvents"]) <= cap


def test_alert_evidence_never_counts_as_an_alert_unless_a_rule_declares_it() -> None:
    generic = next(r for r in load_rules([default_rules_dir()]) if r.id == "PH_RULE_MS_DefEndpoint_Alert_Generic")
    evidence_rule = parse_rule_text(
        "id: EVID\nname: evidence\nseverity: 3\ncategory: Security\ntimeWindow: 60\nsubpatterns:\n"
        "  - {name: s, query: 'eventType = \"MS-Defender-Endpoint-AlertEvidence\"', groupBy: [alertIdStr],\n"
        "     aggregateConstraint: 'COUNT(*) >= 1'}\n"
        "incidentAttributes: {alertIdStr: s.alertIdStr}\nalertEvidence: events\n"
    )
    record = {
        "category": "AdvancedHunting-AlertEvidence",
        "tenantId": "t",
        "properties": {"Timestamp": "2026-03-01T00:00:00Z", "AlertId": "da1", "EntityType": "File"},
    }
    tl = Timeline([generic, evidence_rule])
    assert tl.engine.could_match("MS-Defender-Endpoint-AlertEvidence")
    ev = Normalizer().normalize(record, "t", T0)
    assert isinstance(ev, NormalizedEvent) and ev.kind == "evidence"
    snaps = tl.feed(ev)
    assert [s["ruleId"] for s in snaps] == ["EVID"]  # Generic's CONTAIN "MS-Defender-Endpoint-Alert" does not see it
    alone = Timeline([generic])  # the row passes the prefilter (it may enrich its alert's incident) but counts nowhere
    assert alone.engine.could_match("MS-Defender-Endpoint-AlertEvidence") and alone.feed(ev) == []


@pytest.mark.parametrize(("declared", "counted"), [("join", []), ("events", ["ANYALERT"])])
def test_the_declared_alert_evidence_property_decides_whether_rows_reach_a_rule(declared: str, counted: list[str]) -> None:
    rule = parse_rule_text(
        "id: ANYALERT\nname: any\nseverity: 3\ncategory: Security\ntimeWindow: 60\nsubpatterns:\n"
        "  - {name: s, query: 'eventType CONTAIN \"Alert\"', groupBy: [alertIdStr], aggregateConstraint: 'COUNT(*) >= 1'}\n"
        f"incidentAttributes: {{alertIdStr: s.alertIdStr}}\nalertEvidence: {declared}\n"
    )
    record = {
        "category": "AdvancedHunting-AlertEvidence",
        "tenantId": "t",
        "properties": {"Timestamp": "2026-03-01T00:00:00Z", "AlertId": "da1", "EntityType": "File"},
    }
    ev = Normalizer().normalize(record, "t", T0)
    assert isinstance(ev, NormalizedEvent) and ev.kind == "evidence"
    assert [s["ruleId"] for s in Timeline([rule]).feed(ev)] == counted


def scribble_everything(value: Any) -> None:
    """Change every list and dict inside ``value`` in place (what a careless consumer might do)."""
    if isinstance(value, dict):
        for v in list(value.values()):
            scribble_everything(v)
        value["scribbled"] = True
    elif isinstance(value, list):
        for v in value:
            scribble_everything(v)
        value.append("scribbled")


def feed_and_scribble(clean: Timeline, scribbled: Timeline, batch: list[Any]) -> None:
    """Feed ``batch`` to both timelines, which must emit the same bytes, then scribble over every
    snapshot ``scribbled`` emitted (its store must not notice)."""
    expected = [orjson.dumps(s) for s in clean.feed(*batch)]
    got = scribbled.feed(*batch)
    assert [orjson.dumps(s) for s in got] == expected
    for snap in got:
        scribble_everything(snap)


@pytest.mark.parametrize("live_limit", [0, 4096])
def test_what_a_consumer_does_to_emitted_snapshots_never_changes_the_stored_incident(live_limit: int) -> None:
    """The in-memory store keeps saved states as objects: no snapshot may share a list or dict
    with them, or a consumer changing a snapshot would change the incident's next revisions."""
    rules = load_rules([default_rules_dir()])  # single- and multi-subpattern rules
    clean, scribbled = (Timeline(rules, MemoryStateStore(live_limit=live_limit)) for _ in range(2))
    batches = [
        [alert("v1", hostName="ws-1", user="a")],
        [alert("v2", at=30, hostName="ws-2", user="b"), alert("v1")],  # an update and a redelivery
        [alert("v3", at=60, hostName="ws-3", alertName="Credential dumping", attackTechniqueId=["T1003.001"])],
        [alert("v2", at=30, hostName="ws-2", user="b")],  # redelivered: re-emitted from the outbox
    ]
    for batch in batches:
        feed_and_scribble(clean, scribbled, batch)
    assert len(clean.snapshots) >= 4


def test_huge_group_by_values_are_bounded_but_stay_distinct() -> None:
    tl = Timeline()
    a = tl.feed(alert("v1", name="A" * 100_000))[0]
    b = tl.feed(alert("v1", name="A" * 99_999 + "B"))[0]
    assert a["incidentId"] != b["incidentId"]
    assert len(a["attributes"]["alertName"]) <= 512
    key = next(iter(tl.store.held_keys()))
    stored = tl.store.load([key], 0)[key].state
    assert stored is not None and len(stored.encode()) < 4096


# -- properties --------------------------------------------------------------------------------

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

streams = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 400)),  # (alert, version, seconds since previous)
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("clear", ["", "clear: {after: 600}\n"])  # the classic path and shared/sequence.py
@pytest.mark.parametrize("score", ["1e20", "-1e300", "9223372036854775807"])
def test_an_aggregate_beyond_64_bit_integers_is_mapped_as_a_number_and_never_fails_the_batch(clear: str, score: str) -> None:
    rule = parse_rule_text(
        "id: BIG_SUM\nname: big\nseverity: 5\ncategory: Security\ntimeWindow: 60\nsubpatterns:\n"
        '  - {name: s, query: eventType CONTAIN "Alert", groupBy: [hostName], aggregateConstraint: COUNT(*) >= 1}\n'
        "incidentAttributes: {hostName: s.hostName, total: s.SUM(riskScore)}\n" + clear,
        "big.yaml",
    )
    rec = {"eventType": "M365Defender-Alert-X", "alertIdStr": "a1", "tenantId": "t", "hostName": "h", "eventId": "e1"}
    line = orjson.dumps({**rec, "eventTime": "2026-03-01T00:00:00Z"})[:-1] + b',"riskScore":' + score.encode() + b"}"
    [event] = Normalizer(fmt="normalized").from_bytes(line, "f", T0)
    assert isinstance(event, NormalizedEvent)
    [snap] = Engine([rule], MemoryStateStore(), lambda: T0).process([event]).incidents
    assert snap["attributes"]["total"] == float(score)


def _events(stream: list[tuple[int, int, int]]) -> list[NormalizedEvent]:
    out, t = [], 0
    for alert_n, version, gap in stream:
        t += gap
        out.append(alert(f"v{version}@{t}", alert_id=f"da{alert_n}", at=t))
    return out


def _final(snaps: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    latest: dict[str, dict[str, Any]] = {}
    for s in snaps:
        if s["revision"] >= latest.get(s["incidentId"], {"revision": 0})["revision"]:
            latest[s["incidentId"]] = s
    return {k: (v["attributes"]["incidentCount"], v["triggerCount"]) for k, v in latest.items()}


@given(streams, st.integers(1, 7))
@example([(0, 1, 0), (0, 0, 0)], 2)  # issue #12: ids hashed the first identity; same-time ties differed
def test_final_incidents_do_not_depend_on_how_an_in_order_stream_is_batched(
    stream: list[tuple[int, int, int]], size: int
) -> None:
    events = _events(stream)
    one_by_one = Timeline()
    for ev in events:
        one_by_one.feed(ev)
    batched = Timeline()
    for i in range(0, len(events), size):
        batched.feed(*events[i : i + size])
    assert _final(batched.snapshots) == _final(one_by_one.snapshots)


@given(streams)
def test_incident_count_is_the_number_of_distinct_events_in_the_window(stream: list[tuple[int, int, int]]) -> None:
    events = _events(stream) * 2  # every event delivered twice
    tl = Timeline()
    emitted: dict[str, int] = {}
    for i, ev in enumerate(events):
        snaps = tl.feed(ev)
        for snap in snaps:
            if snap["revision"] <= emitted.get(snap["incidentId"], 0):
                continue  # a redelivery re-emits the earlier snapshot as it was
            emitted[snap["incidentId"]] = snap["revision"]
            alert_id = snap["attributes"]["alertIdStr"]
            seen = [e for e in events[: i + 1] if e.attrs["alertIdStr"] == alert_id]
            newest = max(e.event_time for e in seen)
            in_window = {e.identity for e in seen if newest - e.event_time <= timedelta(seconds=300)}
            assert snap["attributes"]["incidentCount"] == len(in_window)


# -- exactly once: every failure of issue #12 ----------------------------------------------------

import logging  # noqa: E402
import os  # noqa: E402

from shared.engine import group_key  # noqa: E402
from shared.state import MAX_OUTBOX_RECORDS, OUTBOX_PROPERTIES, OUTBOX_PROPERTY_BYTES, GroupState  # noqa: E402


def _bytes(snaps: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(s) for s in snaps]


def test_events_tied_in_time_make_the_same_incident_id_whatever_their_batching() -> None:
    one_by_one, together = Timeline(), Timeline()
    first = one_by_one.feed(alert("v1"))[0]
    one_by_one.feed(alert("v0"))
    [both] = together.feed(alert("v1"), alert("v0"))
    assert both["incidentId"] == first["incidentId"]


def test_a_retry_after_save_re_emits_the_batch_whose_events_span_more_than_the_window() -> None:
    tl = Timeline()
    batch = [alert("v1", at=0), alert("v2", at=1000)]
    lost = tl.feed(*batch)  # state saved, output lost
    assert lost and _bytes(tl.feed(*batch)) == _bytes(lost)


def test_a_retry_after_save_re_emits_the_batch_that_held_a_late_event() -> None:
    tl = Timeline()
    tl.feed(alert("v3", at=1000))
    batch = [alert("v1", at=100), alert("v4", at=1100)]  # v1 is late
    lost = tl.feed(*batch)
    assert tl.stats[-1].counts["late"] == 1
    again = tl.feed(*batch)
    assert lost and _bytes(again) == _bytes(lost)
    assert tl.stats[-1].counts["late"] == 0 and tl.stats[-1].counts["counted"] == 0


def test_a_re_emitted_snapshot_keeps_the_created_action_of_the_lost_one() -> None:
    tl = Timeline()
    batch = [alert("v1", at=0), alert("v2", at=10)]
    [lost] = tl.feed(*batch)
    assert (lost["revision"], lost["action"]) == (2, "created")
    [again] = tl.feed(*batch)
    assert orjson.dumps(again) == orjson.dumps(lost)


def test_a_re_cut_redelivery_re_emits_every_batch_whose_events_it_holds() -> None:
    tl = Timeline()
    b1, b2 = [alert("v1", at=0), alert("v2", at=10)], [alert("v3", at=20)]
    lost = tl.feed(*b1)  # output lost
    delivered = tl.feed(*b2)
    again = tl.feed(b1[1], b2[0], alert("v4", at=30))  # a replay from an older checkpoint, cut differently
    assert _bytes(again[:2]) == _bytes(lost + delivered)
    assert (again[2]["revision"], again[2]["action"]) == (4, "updated")


def _cap_rule() -> Any:
    return parse_rule_text(
        "id: CAP\nname: cap\nseverity: 3\ncategory: Security\ntimeWindow: 100000\nsubpatterns:\n"
        "  - {name: s, query: 'eventType = \"x\"', groupBy: [h], aggregateConstraint: 'COUNT(*) >= 1'}\n"
        "incidentAttributes: {n: s.COUNT(*)}\n"
    )


def _x_events(n: int, start: int = 0) -> list[NormalizedEvent]:
    norm = Normalizer(fmt="normalized")
    out = []
    for i in range(start, start + n):
        ev = norm.normalize(
            {"eventType": "x", "h": "a", "eventId": str(i), "eventTime": (T0 + timedelta(seconds=i)).isoformat()}, "t", T0
        )
        assert isinstance(ev, NormalizedEvent)
        out.append(ev)
    return out


def test_an_overflowed_window_does_not_recount_evicted_events_when_the_batch_comes_again() -> None:
    tl = Timeline([_cap_rule()])
    batch = _x_events(MAX_WINDOW_ENTRIES + 500)
    [first] = tl.feed(*batch)
    assert first["revision"] == MAX_WINDOW_ENTRIES + 500
    for _ in range(2):
        [again] = tl.feed(*batch)
        assert orjson.dumps(again) == orjson.dumps(first)
    assert tl.feed(*batch[:500]) == [first]  # only the evicted ones
    [later] = tl.feed(*_x_events(1, MAX_WINDOW_ENTRIES + 500))
    assert later["revision"] == MAX_WINDOW_ENTRIES + 501 and later["attributes"]["n"] == MAX_WINDOW_ENTRIES


def test_evicted_events_are_recognised_after_their_outbox_record_is_gone() -> None:
    tl = Timeline([_cap_rule()])
    tl.feed(*_x_events(MAX_WINDOW_ENTRIES + 10))
    for i in range(MAX_OUTBOX_RECORDS + 1):
        tl.feed(*_x_events(1, MAX_WINDOW_ENTRIES + 10 + i))
    revision = tl.snapshots[-1]["revision"]
    assert tl.feed(*_x_events(10)) == []  # evicted long ago, outbox forgot them: still nothing recounted
    assert tl.stats[-1].counts["duplicates"] == 10 and tl.stats[-1].counts["counted"] == 0
    assert tl.feed(*_x_events(1, 5000))[0]["revision"] == revision + 1


def test_eviction_warns_once_per_group_and_batch_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    tl = Timeline([_cap_rule()])
    with caplog.at_level(logging.WARNING, logger="shared.engine"):
        tl.feed(*_x_events(MAX_WINDOW_ENTRIES + 37))
    warnings = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert len(warnings) == 1 and "evicted 37 " in warnings[0]
    assert tl.stats[-1].counts["evicted"] == 37


def _incident_event(tenant: str) -> NormalizedEvent:
    ev = Normalizer(fmt="normalized").normalize(
        {
            "eventType": "M365Defender-Incident",
            "eventSeverityCat": "high",
            "incidentTitle": "Multi-stage incident",
            "incidentExtTicketId": "42",
            "tenantId": tenant,
            "eventId": f"{tenant}:42",
            "eventTime": T0.isoformat(),
        },
        "t",
        T0,
    )
    assert isinstance(ev, NormalizedEvent)
    return ev


def test_a_rule_that_does_not_group_by_tenant_still_keeps_tenants_apart() -> None:
    generic = next(r for r in load_rules([default_rules_dir()]) if r.id == "PH_RULE_MS_DefEndpoint_Incident_Generic")
    assert "tenantId" not in generic.group_by
    tl = Timeline([generic])
    [a] = tl.feed(_incident_event("tenant-a"))
    [b] = tl.feed(_incident_event("tenant-b"))
    assert a["incidentId"] != b["incidentId"]
    assert (a["revision"], a["tenantId"], b["revision"], b["action"], b["tenantId"]) == (1, "tenant-a", 1, "created", "tenant-b")
    assert group_key(generic, _incident_event("T")).tenant == "T"


def test_every_snapshot_carries_its_tenant() -> None:
    [snap] = Timeline().feed(alert("v1", tenant="Tenant-X"))
    assert snap["tenantId"] == "Tenant-X"


def test_incident_ids_of_rules_grouping_by_tenant_keep_their_storage_key() -> None:
    key = group_key(SEED, alert("v1"))
    assert key.values == ("Suspicious Task Scheduler activity", "da1_1", "tenant-a")  # no second tenant value
    assert key.text == SEED.id + "\x1fsuspicious task scheduler activity\x1fda1_1\x1ftenant-a"


def test_an_open_incident_of_a_version_1_state_keeps_its_id() -> None:
    tl = Timeline()
    key = group_key(SEED, alert("v1"))
    v1 = orjson.dumps(
        {"r": key.rule_id, "k": list(key.values), "e": [[to_ms_(0), 1]], "n": to_ms_(0), "i": ["inc-old", 1, to_ms_(0),
         to_ms_(0), to_ms_(0), to_ms_(0), 1, {"incidentCount": 1}], "x": 0}
    )  # fmt: skip
    tl.store.put_stored(key, v1, b"", 1, 10**15)
    [snap] = tl.feed(alert("v2", at=5))
    assert (snap["incidentId"], snap["revision"], snap["tenantId"]) == ("inc-old", 2, "tenant-a")


def to_ms_(seconds: float) -> int:
    return int((T0 + timedelta(seconds=seconds)).timestamp() * 1000)


def test_a_state_from_newer_code_is_refused_not_misread() -> None:
    with pytest.raises(ValueError, match="version 3"):
        GroupState.from_bytes(orjson.dumps({"v": 3, "r": "R", "k": [], "e": [], "n": None, "i": None}))


def test_the_outbox_fits_its_table_property_and_re_emits_exactly_what_was_emitted() -> None:
    rule = parse_rule_text(
        "id: MANY\nname: many\nseverity: 3\ncategory: Security\ntimeWindow: 60\nincidentLifetime: 60\nsubpatterns:\n"
        "  - {name: s, query: 'eventType = \"x\"', groupBy: [h], aggregateConstraint: 'COUNT(*) >= 1'}\n"
        "incidentAttributes: {n: s.COUNT(*)}\n"
    )
    import random

    rnd = random.Random(12)
    norm = Normalizer(fmt="normalized")
    batch = []
    for i in range(60):  # 12 episodes of 5 events, each carrying ~10 KiB of incompressible evidence
        rec = {"eventType": "x", "h": "a", "eventId": str(i), "blob": rnd.randbytes(10_000).hex()}
        rec["eventTime"] = (T0 + timedelta(seconds=(i // 5) * 1000 + i % 5)).isoformat()
        ev = norm.normalize(rec, "t", T0)
        assert isinstance(ev, NormalizedEvent)
        batch.append(ev)
    tl = Timeline([rule])
    lost = tl.feed(*batch)
    assert len(lost) == 12 and any("triggerEventsTrimmed" in s for s in lost)
    assert len(tl.store.stored(next(iter(tl.store.held_keys())))[1]) <= OUTBOX_PROPERTIES * OUTBOX_PROPERTY_BYTES
    assert _bytes(tl.feed(*batch)) == _bytes(lost)


EPISODIC = parse_rule_text(  # every alert is its own episode once a minute has passed
    "id: EPISODIC\nname: e\nseverity: 3\ncategory: Security\ntimeWindow: 60\nincidentLifetime: 60\nsubpatterns:\n"
    "  - {name: s, query: 'eventType CONTAIN \"Persist\"', groupBy: [alertName, user], aggregateConstraint: 'COUNT(*) >= 1'}\n"
    "incidentAttributes: {alertName: s.alertName, user: s.user, n: s.COUNT(*)}\n"
)


def test_a_replay_batch_of_a_thousand_episodes_of_one_group_fits_the_outbox_property_and_emits_them_all() -> None:
    import random

    rnd = random.Random(18)  # hostile: each episode brings its own long, incompressible host name
    batch = [alert(f"v{i}", alert_id=f"a{i}", at=i * 61, user="u", hostName=rnd.randbytes(60).hex()) for i in range(1000)]
    tl = Timeline([EPISODIC])
    first = tl.feed(*batch)
    assert len({s["incidentId"] for s in first}) == 1000
    assert len(tl.store.stored(next(iter(tl.store.held_keys())))[1]) <= OUTBOX_PROPERTIES * OUTBOX_PROPERTY_BYTES
    again = tl.feed(*batch)  # retried after its save: every snapshot comes back byte for byte
    assert _bytes(again) == _bytes(first)


def test_a_window_over_its_byte_cap_counts_the_same_whatever_the_batching() -> None:
    import random

    distinct = parse_rule_text(  # each entry keeps a 400-char host: about 150 fit in the 60 KiB state
        "id: DIST\nname: d\nseverity: 3\ncategory: Security\ntimeWindow: 100000\nincidentLifetime: 100000\nsubpatterns:\n"
        "  - {name: s, query: 'eventType CONTAIN \"Persist\"', groupBy: [alertName], aggregateConstraint: 'COUNT(*) >= 1'}\n"
        "incidentAttributes: {n: s.COUNT(DISTINCT hostName)}\n"
    )
    rnd = random.Random(3)
    events = [alert(f"v{i}", alert_id=f"a{i}", at=i, hostName=rnd.randbytes(200).hex()) for i in range(400)]
    whole, single = Timeline([distinct]), Timeline([distinct])
    at_once = whole.feed(*events)[-1]
    one_by_one = [s for e in events for s in single.feed(e)][-1]
    assert at_once["attributes"] == one_by_one["attributes"] and at_once["attributes"]["n"] < 400
    assert (at_once["revision"], at_once["incidentId"]) == (one_by_one["revision"], one_by_one["incidentId"])


def test_group_values_holding_the_key_separator_never_share_an_incident_id_or_an_entity() -> None:
    from shared.table_store import TableStateStore

    one, other = alert("x", alert_id="p", name="a\x1fb", user="c"), alert("y", alert_id="q", name="a", user="b\x1fc")
    tl = Timeline([EPISODIC])
    assert tl.feed(one)[0]["incidentId"] != tl.feed(other)[0]["incidentId"]
    keys = [group_key(EPISODIC, one), group_key(EPISODIC, other)]
    assert TableStateStore.keys_of(mock.Mock(), keys[0]) != TableStateStore.keys_of(mock.Mock(), keys[1])  # not one entity


def test_a_value_posing_as_a_shortened_long_value_gets_its_own_group() -> None:
    long_name = "Persistence " + "x" * 900
    shortened = group_key(EPISODIC, alert("x", name=long_name)).values[0]
    assert len(shortened) == 512 and shortened.endswith(shortened[-16:]) and "...#" in shortened
    crafted = alert("y", alert_id="da1_1", name=shortened)  # a 512-char value equal to the shortened form
    assert group_key(EPISODIC, crafted) != group_key(EPISODIC, alert("x", name=long_name))
    tl = Timeline([EPISODIC])
    assert tl.feed(alert("x", name=long_name))[0]["incidentId"] != tl.feed(crafted)[0]["incidentId"]


def test_long_values_that_differ_only_in_case_are_one_group_like_short_ones() -> None:
    upper, lower = "PERSISTENCE " + "AB" * 400, "persistence " + "ab" * 400
    assert group_key(EPISODIC, alert("x", name=upper)) == group_key(EPISODIC, alert("y", name=lower))
    assert group_key(EPISODIC, alert("x", name="Short")) == group_key(EPISODIC, alert("y", name="short"))
    assert group_key(EPISODIC, alert("x", name="Short")).values[0] == "Short"  # short values kept as written
    long_sharp, long_ss = "Persistence straße " + "x" * 600, "PERSISTENCE STRASSE " + "X" * 600
    short_sharp, short_ss = "Persistence straße", "PERSISTENCE STRASSE"  # lower() keeps ß: two groups, long or short
    assert (group_key(EPISODIC, alert("x", name=long_sharp)) == group_key(EPISODIC, alert("y", name=long_ss))) == (
        group_key(EPISODIC, alert("x", name=short_sharp)) == group_key(EPISODIC, alert("y", name=short_ss))
    )


# -- exactly once under redelivery and failures, on both stores -----------------------------------

import contextlib  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from unittest import mock  # noqa: E402

from shared.errors import StoreError  # noqa: E402
from shared.state import Change, Loaded, StateStore  # noqa: E402

THRESHOLD = parse_rule_text(  # groups without tenantId: the tenant is implicit
    "id: TWO\nname: two\nseverity: 3\ncategory: Security\ntimeWindow: 300\nincidentLifetime: 900\nsubpatterns:\n"
    "  - {name: s, query: 'eventType CONTAIN \"Persistence\"', groupBy: [alertName], aggregateConstraint: 'COUNT(*) >= 2'}\n"
    "incidentAttributes: {alertName: s.alertName, n: s.COUNT(*)}\n"
)
FAILURE_POINTS = ["before load", "after load", "mid save", "after save", "in output", "raced"]


class Flaky:
    """A store that fails once at the given point of the next batch (the failure is infrastructure)."""

    def __init__(self, inner: StateStore, race: Any = None) -> None:
        self.inner = inner
        self.fail: str | None = None
        self.race = race  # "raced": another instance processes the same batch between our load and save

    def _take(self, point: str) -> bool:
        hit = self.fail == point
        if hit:
            self.fail = None
        return hit

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        if self._take("before load"):
            raise StoreError("injected: before load")
        return self.inner.load(keys, now_ms)

    def save(self, changes: Sequence[Change]) -> None:
        if self._take("raced"):
            self.race()
        if self._take("after load"):
            raise StoreError("injected: after load")
        if self._take("mid save"):
            self.inner.save(changes[: len(changes) // 2])
            raise StoreError("injected: mid save")
        self.inner.save(changes)
        if self._take("after save"):
            raise StoreError("injected: after save")

    def purge_expired(self, now_ms: int) -> int:
        return self.inner.purge_expired(now_ms)

    def __getattr__(self, name: str) -> Any:  # the rest of the StateStore interface
        return getattr(self.inner, name)


tenant_streams = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 400)),  # (alert, tenant, seconds since previous)
    min_size=1,
    max_size=16,
)
deliveries = st.lists(
    st.tuples(
        st.integers(1, 5),  # how many new events the next delivery takes
        st.integers(0, 6),  # how many already-delivered events it repeats (an overlapping or older batch)
        st.randoms(use_true_random=False),  # the order inside the delivery
        st.lists(st.sampled_from(FAILURE_POINTS), max_size=2),  # failures before it goes through
    ),
    min_size=1,
    max_size=12,
)


def _tenant_events(stream: list[tuple[int, int, int]]) -> list[NormalizedEvent]:
    out, t = [], 0
    for i, (alert_n, tenant, gap) in enumerate(stream):
        t += gap
        out.append(alert(f"v{i}", alert_id=f"da{alert_n}", tenant=f"t{tenant}", at=t))
    return out


def _outcome(snaps: list[dict[str, Any]]) -> dict[str, tuple[int, bytes, str]]:
    """Per incident: its highest revision, that revision's attributes, and its first action."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        by_id.setdefault(s["incidentId"], []).append(s)
    out = {}
    for inc, group in by_id.items():
        top = max(group, key=lambda s: s["revision"])
        first = min(group, key=lambda s: s["revision"])
        out[inc] = (top["revision"], orjson.dumps(top["attributes"]), first["action"])
    return out


def deliver(engine: Engine, flaky: Flaky, batch: list[NormalizedEvent], failures: Sequence[str]) -> list[dict[str, Any]]:
    """What ``batch`` emits when its first attempts meet ``failures`` (one each): the trigger's retry
    policy runs it until it goes through (a failure "in output" loses what the attempt emitted)."""
    for point in [*failures, None]:
        flaky.fail = point
        try:
            result = engine.process(batch)
        except StoreError:
            continue
        if point != "in output":
            return result.incidents
    raise AssertionError("unreachable: the last attempt meets no failure")


def _run_exactly_once(store: StateStore, stream: list[tuple[int, int, int]], plan: list[Any], cap: int | None = None) -> None:
    if cap is not None:  # a tiny window cap, so that eviction and its mark are exercised
        with mock.patch("shared.engine.MAX_WINDOW_ENTRIES", cap):
            return _run_exactly_once(store, stream, plan)
    events = _tenant_events(stream)
    clean = Timeline([SEED, THRESHOLD])
    for ev in events:
        clean.feed(ev)
    delivered: list[dict[str, Any]] = []
    batch: list[NormalizedEvent] = []
    other = Engine([SEED, THRESHOLD], store, lambda: T0)  # a second instance on the same partition (lease handover)
    flaky = Flaky(store, race=lambda: delivered.extend(other.process(batch).incidents))
    engine = Engine([SEED, THRESHOLD], flaky, lambda: T0)
    sent = 0
    steps = iter(plan)
    while sent < len(events):
        take, repeat, rnd, failures = next(steps, (len(events), 0, None, []))
        batch = events[sent : sent + take] + events[max(0, sent - repeat) : sent]
        if rnd is not None:
            rnd.shuffle(batch)
        sent += take
        delivered.extend(deliver(engine, flaky, batch, failures))
    assert _outcome(delivered) == _outcome(clean.snapshots)
    assert all(action == "created" for _, _, action in _outcome(delivered).values())
    keys = {group_key(rule, ev) for ev in events for rule in (SEED, THRESHOLD) if rule.query.matches(ev.attrs)}
    latest = {inc: rev for inc, (rev, _, _) in _outcome(delivered).items()}
    for loaded in store.load(sorted(keys, key=lambda k: k.text), to_ms_(0)).values():
        if loaded.state is not None and loaded.state.incident is not None:  # saved, so it must have been delivered
            assert latest[loaded.state.incident.incident_id] == loaded.state.incident.revision


@given(tenant_streams, deliveries, st.sampled_from([None, 1, 2, 3]))
def test_redeliveries_and_failures_deliver_what_one_clean_pass_delivers_memory(
    stream: list[tuple[int, int, int]], plan: list[Any], cap: int | None
) -> None:
    _run_exactly_once(MemoryStateStore(), stream, plan, cap)


@pytest.mark.azurite
@settings(max_examples=25, deadline=None)
@given(stream=tenant_streams, plan=deliveries)
def test_redeliveries_and_failures_deliver_what_one_clean_pass_delivers_table(
    azurite: Any, stream: list[tuple[int, int, int]], plan: list[Any]
) -> None:
    with fresh_table_store(azurite) as store:
        _run_exactly_once(store, stream, plan)


@contextlib.contextmanager
def fresh_table_store(azurite: Any) -> Iterator[Any]:
    """A Table store on a new table of Azurite (deleted after): one per hypothesis example."""
    from shared.table_store import TableStateStore

    store = TableStateStore.from_connection_string(azurite.connection_string, "p" + uuid.uuid4().hex[:20])
    store.ensure_table()
    try:
        yield store
    finally:
        store.table.delete_table()


def test_hypothesis_runs_derandomized_without_a_database_when_ci_is_set() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None and ci.print_blob
    if os.environ.get("CI") and not os.environ.get("HYPOTHESIS_PROFILE"):
        assert settings.default.derandomize and settings.default.database is None
