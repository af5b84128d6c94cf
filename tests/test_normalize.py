from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.normalize import (
    MAX_RECORD_BYTES,
    NormalizedEvent,
    Normalizer,
    Rejection,
    Skipped,
    detect_format,
    iter_file,
    streaming_techniques,
    technique_ids,
)

ARRIVAL = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def items_of(path: Path, normalizer: Normalizer | None = None) -> list:
    with path.open("rb") as stream:
        return list(iter_file(normalizer or Normalizer(), stream, path.name, lambda: ARRIVAL))


def kinds(items: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        k = item.kind if isinstance(item, NormalizedEvent) else type(item).__name__
        out[k] = out.get(k, 0) + 1
    return out


def only(items: list, kind: str = "alert") -> list[NormalizedEvent]:
    return [i for i in items if isinstance(i, NormalizedEvent) and i.kind == kind]


class TestRealSamples:
    def test_graph_live_alert(self, samples: Path) -> None:
        items = items_of(samples / "graph-alerts_v2__rknightion-graph2otel__securityalerts-live-alert.json")
        assert kinds(items) == {"alert": 1}
        a = items[0].attrs
        assert a["eventType"] == "M365Defender-Alert-InitialAccess"
        assert a["alertIdStr"] == "da7d9031bd-68b8-4a8b-9a0a-e3789eba907d_1"
        assert a["tenantId"] == "4b8c18bd-2f9f-4227-af55-9f1061cf9c32"
        assert a["attackTechniqueId"] == ("T1119", "T1185")
        assert a["alertName"] == "Suspicious OpenClaw Installation"
        assert (a["eventSeverity"], a["eventSeverityCat"]) == (3, "LOW")
        assert a["hostName"] == "alex-2"
        assert a["incidentExtTicketId"] == "8"
        assert a["alertStatus"] == "resolved"
        assert items[0].event_time == datetime(2026, 5, 2, 20, 17, 34, 50000, tzinfo=timezone.utc)
        assert not items[0].time_fallback

    def test_graph_elastic_alert_with_sub_technique_gets_parent(self, samples: Path) -> None:
        items = items_of(samples / "graph-alerts_v2__elastic-integrations__m365_defender-alert-test-alert.log")
        assert kinds(items) == {"alert": 1}
        a = items[0].attrs
        assert a["attackTechniqueId"] == ("T1564.001", "T1564")
        assert a["eventType"] == "M365Defender-Alert-DefenseEvasion"
        assert a["serviceSource"] == "microsoftDefenderForEndpoint"
        assert a["detectionSource"] == "antivirus"
        assert a["hostName"] == "tempDns"

    def test_streaming_elastic_records_split_into_alerts_evidence_and_events(self, samples: Path) -> None:
        items = items_of(samples / "streaming-api__elastic-integrations__m365_defender-event-test-alert.log")
        assert kinds(items) == {"evidence": 1, "alert": 3, "event": 2}
        alerts = only(items)
        assert {a.attrs["alertIdStr"] for a in alerts} == {"da638034938542563831_172489803"}
        assert alerts[0].attrs["attackTechniqueId"] == ("T1078", "T1078.004")
        assert alerts[0].attrs["eventType"] == "MS-Defender-Endpoint-Alert-Persistence"
        assert alerts[0].attrs["tenantId"] == "12345af3-bc0e-4f36-b08e-27759e912345"
        assert len({a.identity for a in alerts}) == 3  # three different versions of one alert
        events = only(items, "event")
        assert {e.attrs["eventType"] for e in events} == {"MS-Defender-DeviceProcessEvents"}
        assert only(items, "evidence")[0].attrs["eventType"] == "MS-Defender-Endpoint-AlertEvidence"

    def test_streaming_alertinfo_with_empty_techniques(self, samples: Path) -> None:
        items = items_of(samples / "streaming-api__rknightion-graph2otel__alertinfo_test.go__liveRecord.json")
        assert kinds(items) == {"alert": 1}
        a = items[0].attrs
        assert "attackTechniqueId" not in a
        assert a["eventType"] == "MS-Defender-Endpoint-Alert-InitialAccess"
        assert (a["eventSeverity"], a["eventSeverityCat"]) == (9, "HIGH")

    @pytest.mark.parametrize("name", ["liveRecord", "userRecord"])
    def test_streaming_alert_evidence_is_not_an_alert(self, samples: Path, name: str) -> None:
        items = items_of(samples / f"streaming-api__rknightion-graph2otel__alertevidence_test.go__{name}.json")
        assert kinds(items) == {"evidence": 1}
        assert items[0].attrs["alertIdStr"] == "ad6450625369250ba3fc4b5752f34f474ec80b20ae"

    def test_streaming_behavior_info_is_an_ordinary_event(self, samples: Path) -> None:
        items = items_of(samples / "streaming-api__rknightion-graph2otel__behaviorinfo_test.go__liveRecord.json")
        assert kinds(items) == {"event": 1}
        assert items[0].attrs["eventType"] == "MS-Defender-BehaviorInfo"

    def test_mde_api_elastic_split_lines_share_identity_per_alert_version(self, samples: Path) -> None:
        items = items_of(samples / "mde-alerts-api__elastic-integrations__microsoft_defender_endpoint-log-test-defenderatp.log")
        alerts = only(items)
        assert len(alerts) == 4
        assert len({a.attrs["alertIdStr"] for a in alerts}) == 3
        assert len({a.identity for a in alerts}) == 3  # two evidence lines of one alert version: one identity
        assert not [i for i in items if isinstance(i, Rejection)]  # the empty page yields nothing
        assert alerts[0].attrs["eventType"] == "MS-Defender-Endpoint-Alert-Malware"
        assert alerts[0].attrs["hostName"] == "testserver4"

    def test_mde_api_docs_alert(self, samples: Path) -> None:
        items = items_of(samples / "mde-alerts-api__microsoftdocs-defender-docs__api-alerts.md-example.json")
        assert kinds(items) == {"alert": 1}
        a = items[0].attrs
        assert a["eventType"] == "MS-Defender-Endpoint-Alert-Execution"
        assert a["attackTechniqueId"] == ("T1064", "T1085", "T1220")
        assert a["tenantId"] == "a839b112-1253-6432-9bf6-94542403f21c"
        assert a["user"] == "temp123"
        assert a["incidentExtTicketId"] == "1126093"

    def test_siem_api_bare_array(self, samples: Path) -> None:
        items = items_of(samples / "mde-siem-api__microsoftdocs-windows-itpro-docs__pull-alerts-using-rest-api.md-example.json")
        assert kinds(items) == {"alert": 1}
        a = items[0].attrs
        assert a["eventType"] == "Microsoft-WinDefATP-Alert-Malware"
        assert a["alertIdStr"] == "da637370718981685665_16349121"
        assert a["alertWebUrl"].startswith("https://securitycenter.windows.com/alert/")
        assert (a["eventSeverity"], a["eventSeverityCat"]) == (9, "HIGH")

    def test_no_sample_is_rejected(self, samples: Path) -> None:
        for path in samples.iterdir():
            if path.suffix != ".md":
                assert not [i for i in items_of(path) if isinstance(i, Rejection)], path.name


class TestShapes:
    def test_records_envelope_and_odata_page_and_json_lines(self) -> None:
        n = Normalizer()
        rec = {"category": "AdvancedHunting-DeviceEvents", "tenantId": "t", "properties": {"Timestamp": "2026-01-01T00:00:00Z"}}
        envelope = orjson.dumps({"records": [rec, rec]})
        assert len(list(n.from_bytes(envelope, "m", ARRIVAL))) == 2
        page = orjson.dumps(
            {"@odata.context": "x", "value": [{"id": "a", "createdDateTime": "2026-01-01T00:00:00Z", "serviceSource": "s"}]}
        )
        assert [i.format for i in n.from_bytes(page, "p", ARRIVAL)] == ["graph"]
        lines = orjson.dumps(rec) + b"\n\n" + orjson.dumps(rec) + b"\n"
        positions = [i.position for i in n.from_bytes(lines, "f", ARRIVAL)]
        assert positions == ["f:1", "f:3"]

    def test_format_can_be_forced(self) -> None:
        rec = {"id": "x1", "title": "t", "category": "Persistence", "aadTenantId": "tt"}
        assert detect_format(rec) == "mde"
        forced = Normalizer(fmt="graph").normalize(rec, "r", ARRIVAL)
        assert isinstance(forced, NormalizedEvent) and forced.format == "graph"

    def test_missing_time_falls_back_to_arrival_and_is_recorded(self) -> None:
        e = Normalizer().normalize({"eventType": "x", "eventTime": "yesterday"}, "r", ARRIVAL)
        assert isinstance(e, NormalizedEvent)
        assert e.event_time == ARRIVAL and e.time_fallback
        assert e.attrs["eventTimeSource"] == "arrival"

    def test_same_record_twice_has_one_identity_new_version_another(self) -> None:
        n = Normalizer()
        v1 = {
            "id": "a1",
            "createdDateTime": "2026-01-01T00:00:00Z",
            "lastUpdateDateTime": "2026-01-01T00:00:00Z",
            "serviceSource": "s",
        }
        v2 = {**v1, "lastUpdateDateTime": "2026-01-01T01:00:00Z"}
        ids = [n.normalize(r, "r", ARRIVAL).identity for r in (v1, dict(reversed(list(v1.items()))), v2)]  # type: ignore[union-attr]
        assert ids[0] == ids[1] != ids[2]

    def test_prefilter_skips_without_building_attributes(self) -> None:
        n = Normalizer(prefilter=lambda t: t.startswith("MS-Defender-Endpoint-Alert"))
        other = {"category": "AdvancedHunting-DeviceProcessEvents", "properties": {"Timestamp": 5}}
        assert n.normalize(other, "r", ARRIVAL) == Skipped("MS-Defender-DeviceProcessEvents")

    def test_technique_helpers(self) -> None:
        assert technique_ids(["t1053.005", "T1053", " T1059.001 "]) == ("T1053.005", "T1053", "T1059.001", "T1059")
        assert streaming_techniques('["Scheduled Task/Job (T1053)","Scheduled Task (T1053.005)"]') == ("T1053", "T1053.005")
        assert streaming_techniques("") == ()


class TestBadInput:
    def good(self) -> bytes:
        return orjson.dumps({"eventType": "x", "eventId": "good"})

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            (b"{not json", r"not JSON"),
            (b'{"foo": 1}', r"record of no known format \(keys: foo\)"),
            (
                b'{"@odata.type": "#microsoft.graph.security.alert", "title": "t"}',
                r"missing required field 'id'.*\[graph field id\]",
            ),
            (b'{"category": "AdvancedHunting-AlertInfo", "properties": {"Title": "t"}}', r"'properties.AlertId'"),
            (b'{"category": "AdvancedHunting-AlertInfo", "properties": "oops"}', r"'properties' must be an object"),
            (
                b'{"id": "x", "createdDateTime": "z", "serviceSource": "s", "title": {"a": 1}}',
                r"field 'title' must be a string, got dict",
            ),
            (b'{"id": "x", "createdDateTime": "z", "mitreTechniques": "T1053"}', r"'mitreTechniques' must be a list"),
            (b'"just a string"', r"expected a JSON object or array"),
            (b'{"eventType": "x", "a": "\xff\xfe"}', r"invalid UTF-8 at byte"),
        ],
    )
    def test_bad_record_is_rejected_with_reason_and_position_and_the_rest_survives(self, line: bytes, reason: str) -> None:
        data = self.good() + b"\n" + line + b"\n" + self.good().replace(b"good", b"good2") + b"\n"
        items = list(iter_file(Normalizer(), io.BytesIO(data), "in.jsonl", lambda: ARRIVAL))
        rejected = [i for i in items if isinstance(i, Rejection)]
        assert len(rejected) == 1
        assert rejected[0].position == "in.jsonl:2"
        import re

        assert re.search(reason, str(rejected[0])), str(rejected[0])
        assert [i.identity for i in items if isinstance(i, NormalizedEvent)] == ["event:good", "event:good2"]

    def test_oversized_record_is_rejected_without_parsing(self) -> None:
        big = b'{"eventType": "x", "pad": "' + b"a" * (MAX_RECORD_BYTES + 10) + b'"}'
        data = big + b"\n" + self.good() + b"\n"
        items = list(iter_file(Normalizer(), io.BytesIO(data), "in", lambda: ARRIVAL))
        assert isinstance(items[0], Rejection) and "cap" in items[0].reason
        assert isinstance(items[1], NormalizedEvent)

    def test_bad_record_inside_an_envelope_keeps_its_index(self) -> None:
        body = orjson.dumps({"records": [{"category": "AdvancedHunting-AlertInfo", "properties": {}}, {"eventType": "ok"}]})
        items = list(Normalizer().from_bytes(body, "p0/s7", ARRIVAL))
        assert isinstance(items[0], Rejection) and items[0].position == "p0/s7#0"
        assert isinstance(items[1], NormalizedEvent)


def _real_records(samples_dir: Path) -> list[dict]:
    out: list[dict] = []
    for path in sorted(samples_dir.iterdir()):
        if path.suffix == ".md":
            continue
        text = path.read_text()
        try:
            doc = json.loads(text)
            out.extend(doc if isinstance(doc, list) else [doc])
        except json.JSONDecodeError:
            out.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return out


REAL = (
    _real_records(Path(__file__).resolve().parent.parent.parent / "shared" / "samples" / "real")
    if (Path(__file__).resolve().parent.parent.parent / "shared" / "samples" / "real").is_dir()
    else [{"eventType": "x"}]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _mutate(record: dict, key_index: int, value: object) -> dict:
    rec = dict(record)
    keys = sorted(rec)
    if keys:
        rec[keys[key_index % len(keys)]] = value
    return rec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REAL), st.integers(0, 200), json_values, st.binary(max_size=60))
def test_fuzzed_real_payloads_never_raise_and_good_records_still_normalize(
    record: dict, idx: int, value: object, noise: bytes
) -> None:
    mutated = _mutate(record, idx, value)
    good = {"eventType": "sentinel-event", "eventId": "keep-me"}
    body = b"\n".join([json.dumps(mutated).encode(), noise.replace(b"\n", b" "), orjson.dumps(good)])
    items = list(iter_file(Normalizer(), io.BytesIO(body), "fuzz", lambda: ARRIVAL))
    assert all(isinstance(i, (NormalizedEvent, Rejection, Skipped)) for i in items)
    assert any(isinstance(i, NormalizedEvent) and i.identity == "event:keep-me" for i in items)


@pytest.mark.parametrize(("skew", "age"), [(300, 400_000 * 365 * 86400), (10**12, 86400), (10**12, 10**12)])
def test_limits_wider_than_datetimes_range_clamp_nothing_in_range(skew: int, age: int) -> None:
    # "no limit in practice" set as a huge number must not clamp every honest time to arrival
    normalizer = Normalizer(max_skew_s=skew, max_age_s=age)
    record = {"eventTime": "2026-11-27T11:59:00Z", "eventType": "X", "tenantId": "t", "eventId": "e"}
    event = normalizer.normalize(record, "p", ARRIVAL)
    assert isinstance(event, NormalizedEvent)
    assert event.attrs["eventTime"] == "2026-11-27T11:59:00Z" and "eventTimeSource" not in event.attrs


# -- AlertEvidence rows that only feed the join (evidence_columns=False) ---------------------------

_TECHNIQUE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
    max_leaves=5,
)
# AttackTechniques as it may arrive: any JSON value, or a string holding JSON (or almost JSON) text.
technique_columns = _TECHNIQUE_VALUES | _TECHNIQUE_VALUES.map(lambda v: orjson.dumps(v).decode()) | st.text(max_size=12)


def _evidence_row(props: dict[str, object], tenant: object = "t1") -> dict[str, object]:
    return {"time": "2026-11-01T00:00:00Z", "tenantId": tenant, "category": "AdvancedHunting-AlertEvidence", "properties": props}


def _outcome(item: object) -> object:
    if isinstance(item, NormalizedEvent):
        return (item.identity, item.event_time, item.time_fallback, item.kind, item.raw)
    return item


@settings(max_examples=300, deadline=None)
@given(
    techniques=technique_columns,
    title=st.none() | st.text(max_size=4) | st.integers() | st.lists(st.integers(), max_size=1),
    alert_id=st.none() | st.just("") | st.just("da1") | st.integers(0, 9) | st.floats(allow_nan=False),
    extra=st.dictionaries(
        st.sampled_from(["tenantId", "hostName", "user", "eventTime", "DeviceName", "AccountName"]), _TECHNIQUE_VALUES
    ),
    tenant=st.none() | st.just("t1") | st.integers(0, 3),
)
def test_an_evidence_row_read_for_the_join_alone_is_rejected_kept_and_identified_as_in_full(
    techniques: object, title: object, alert_id: object, extra: dict[str, object], tenant: object
) -> None:
    props = {"AlertId": alert_id, "Title": title, "AttackTechniques": techniques, "ServiceSource": "x", **extra}
    rec = _evidence_row(props, tenant)
    full = Normalizer(evidence_columns=True).normalize(rec, "f:1", ARRIVAL)
    slim = Normalizer(evidence_columns=False).normalize(rec, "f:1", ARRIVAL)
    assert _outcome(slim) == _outcome(full)  # the same rejection (reason, field), or the same identity, time and raw
    if isinstance(full, NormalizedEvent):
        assert isinstance(slim, NormalizedEvent)
        for attr in ("eventType", "tenantId", "alertIdStr", "hostName", "user", "eventTime"):
            assert slim.attrs.get(attr) == full.attrs.get(attr)  # what the join and the replay summary read
        assert "AttackTechniques" not in slim.attrs and "alertName" not in slim.attrs  # the columns are not copied


@pytest.mark.parametrize("techniques", ["5", "true", "null", "{}", ' {"a": 1}', "1e3", 5, 0, False, {}, {"a": 1}, 1.5])
def test_an_evidence_row_whose_techniques_are_not_a_list_is_rejected_whether_or_not_its_columns_are_kept(
    techniques: object,
) -> None:
    rec = _evidence_row({"AlertId": "da1", "AttackTechniques": techniques})
    for columns in (True, False):
        rejected = Normalizer(evidence_columns=columns).normalize(rec, "f:1", ARRIVAL)
        assert isinstance(rejected, Rejection) and rejected.field == "AttackTechniques"


# -- remembered readings and the JSON lines fast path -------------------------------------------------


@given(st.one_of(st.text(max_size=40), _TECHNIQUE_VALUES.map(lambda v: json.dumps(v))))
def test_remembered_technique_texts_read_as_a_fresh_reading_does(text: str) -> None:
    from shared.errors import RecordError
    from shared.normalize import _read_techniques

    try:
        fresh: object = _read_techniques(text)
    except RecordError as err:
        fresh = err.reason
    for _ in range(2):  # the first call remembers, the second answers from memory
        try:
            again: object = streaming_techniques(text)
        except RecordError as err:
            again = err.reason
        assert again == fresh


def test_remembered_readings_stay_bounded() -> None:
    from shared import normalize, values

    for i in range(values.MAX_CACHED_TEXTS + 10):
        streaming_techniques(f'["Task (T{1000 + i % 9000})"]')
        normalize._pascal(f"category {i}")
    assert len(normalize._TECHNIQUES_OF) <= values.MAX_CACHED_TEXTS
    assert len(normalize._PASCAL_OF) <= values.MAX_CACHED_TEXTS
    assert normalize._pascal("credential_access/ lateral movement") == "CredentialAccessLateralMovement"


def test_json_lines_give_what_each_line_read_alone_gives() -> None:
    # The block reader parses plain records itself: envelopes, blank and bad lines must still read as from_line reads them
    alert = {"category": "AdvancedHunting-AlertInfo", "tenantId": "t", "properties": {"AlertId": "a1", "Category": "Execution"}}
    lines = [
        orjson.dumps(alert),
        b" \t\r\x0b\x0c",
        orjson.dumps({"records": [alert, {"eventType": "x", "eventId": "e1"}]}),
        orjson.dumps({"value": [{"eventType": "x", "eventId": "e2"}], "@odata.context": "c"}),
        orjson.dumps({"value": 1, "eventType": "x", "eventId": "e3"}),
        b"{not json",
        b"[1, 2]",
        b'"text"',
        orjson.dumps({"eventType": "x", "eventId": "e4"}),
    ]
    body = b"\n".join(lines) + b"\n"
    normalizer = Normalizer()
    got = list(iter_file(normalizer, io.BytesIO(body), "f", lambda: ARRIVAL))
    expected = [
        item
        for number, line in enumerate(lines, 1)
        if line.strip()
        for item in normalizer.from_line(line, f"f:{number}", ARRIVAL)
    ]
    assert got == expected
    assert len(got) == 10  # [1, 2] is two records


def test_long_texts_are_read_but_not_remembered() -> None:
    from shared import entities, normalize, values

    long_list = orjson.dumps([f"Task {'x' * 2000} (T1053.005)"]).decode()
    long_category = "Credential Access" + " " * 2000
    rec = {
        "category": "AdvancedHunting-AlertInfo",
        "tenantId": "t",
        "properties": {"AlertId": "a", "Category": long_category, "AttackTechniques": long_list},
    }
    event = Normalizer().normalize(rec, "p", ARRIVAL)
    assert isinstance(event, NormalizedEvent)
    assert event.attrs["attackTechniqueId"] == ("T1053.005", "T1053")
    assert event.event_type == "MS-Defender-Endpoint-Alert-CredentialAccess"
    assert [t["id"] for t in entities.extract(event)["techniques"]] == ["T1053.005"]
    remembered = [*normalize._TECHNIQUES_OF, *normalize._PASCAL_OF, *normalize._ALERT_TYPE_OF, *entities._TECHNIQUES_OF]
    remembered += [name or "" for _, name in entities._TECHNIQUE_OF]
    assert remembered and max(len(text or "") for text in remembered) <= values.MAX_CACHED_TEXT_CHARS


def test_a_text_memo_remembers_every_answer_of_a_short_text_even_none_and_reads_long_ones_each_time() -> None:
    from shared.values import MAX_CACHED_TEXT_CHARS, MAX_CACHED_TEXTS, TextMemo

    reads: list[str] = []

    def read(text: str) -> str | None:
        reads.append(text)
        return None if text == "none" else text.upper()

    memo: TextMemo[str, str | None] = TextMemo(read)
    assert [memo("none", 4), memo("none", 4), memo("a", 1), memo("a", 1)] == [None, None, "A", "A"]
    assert reads == ["none", "a"]
    long = "x" * (MAX_CACHED_TEXT_CHARS + 1)
    assert memo(long, len(long)) == memo(long, len(long)) == long.upper() and reads.count(long) == 2
    for i in range(MAX_CACHED_TEXTS + 5):
        memo(str(i), 1)
    assert 0 < len(memo) <= MAX_CACHED_TEXTS
