"""The pre-parse filter is exact: whatever it skips, the full path would have skipped the same way."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any
from unittest import mock

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared import normalize
from shared.engine import Engine
from shared.normalize import Item, NormalizedEvent, Normalizer, Rejection, Skipped, iter_file
from shared.preparse import LineFilter
from shared.rules import Rule, default_rules_dir, load_rules, parse_rule_text
from shared.state import MemoryStateStore

ARRIVAL = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
TABLES = ["DeviceProcessEvents", "DeviceNetworkEvents", "AlertInfo", "AlertEvidence", "DeviceLogonEvents", "", "X-Y"]
DEFAULT_RULES = [r for r in load_rules([default_rules_dir()]) if not r.sequence]  # single-subpattern ones
NASTY = "__nasty__"
ALERT_ROW = orjson.dumps(
    {
        "time": "2026-11-01T00:00:00Z",
        "tenantId": "t",
        "category": "AdvancedHunting-AlertInfo",
        "properties": {"AlertId": "da1", "Title": "x", "Category": "Persistence", "AttackTechniques": '["T (T1053)"]'},
    }
)


def _table_rule(table: str) -> Rule:
    """A rule that reads a non-alert table, so that the filter must let that table through."""
    return parse_rule_text(
        orjson.dumps(
            {
                "id": f"PH_RULE_TEST_{table or 'none'}".replace("-", "_"),
                "name": f"reads {table}",
                "severity": 5,
                "category": "Security",
                "timeWindow": 300,
                "subpatterns": [
                    {
                        "name": "s",
                        "query": f'eventType = "MS-Defender-{table}" AND ActionType CONTAIN "a"',
                        "groupBy": ["DeviceName"],
                        "aggregateConstraint": "COUNT(*) >= 1",
                    }
                ],
                "incidentAttributes": {"hostName": "s.DeviceName"},
            }
        ).decode()
    )


# Raw JSON tokens orjson and a skipping parser may disagree on: out-of-range numbers, big integers,
# lone surrogates, deep nesting, and bytes that are not UTF-8.
nasty_tokens = st.sampled_from(
    [
        b"1e400",
        b"-1.5E+0400",
        b"1e-400",
        b"2e308",
        b"1" * 320,
        b"123456789012345678901234567890",
        b'"\\ud800"',
        b'"\\udc00\\ud800"',
        b'"\xff\xfe"',
        b'"\xed\xa0\x80"',
        b'"caf\xc3\xa9"',
        b"[" * 1100 + b"]" * 1100,
        b"[" * 1020 + b"]" * 1020,
        b'{"value": [1]}',
        b"0.5",
        b'"e000"',
        b"1e100",
    ]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    table = draw(st.sampled_from(TABLES))
    streaming = f"AdvancedHunting-{table}"
    category = draw(st.sampled_from([streaming, streaming, streaming, streaming, table, 5, None]))
    props: Any = draw(st.dictionaries(st.sampled_from(["ActionType", "DeviceName", "Title", "x", "AlertId"]), json_values))
    if table in ("AlertInfo", "AlertEvidence") and draw(st.booleans()):
        props.update({"AlertId": "da1", "Category": "Persistence", "AttackTechniques": '["T (T1053.005)"]'})
    props = draw(st.sampled_from([props, props, props, props, "text", [props], None]))
    rec: dict[str, Any] = {"time": "2026-11-01T00:00:00Z", "tenantId": "t", "category": category, "properties": props}
    if draw(st.integers(0, 3)) == 0:
        rec[draw(st.sampled_from(["value", "records", "id", "eventType", "@odata.context", "x"]))] = draw(json_values)
    nasty = draw(st.none() | st.none() | nasty_tokens)
    if nasty is not None:
        target = draw(st.sampled_from(["top", "props"]))
        if target == "props" and isinstance(props, dict):
            props["n"] = NASTY
        else:
            rec["n"] = NASTY
    data = orjson.dumps(rec)
    if nasty is not None:
        data = data.replace(orjson.dumps(NASTY), nasty)
    cut = draw(st.none() | st.none() | st.integers(0, max(0, len(data) - 1)))
    if cut is not None:  # damage one byte, or cut the line short
        how = draw(st.sampled_from(["truncate", "flip", "insert"]))
        byte = draw(st.binary(min_size=1, max_size=1))
        data = data[:cut] if how == "truncate" else data[:cut] + byte + data[cut + (how == "flip") :]
    return data.replace(b"\n", b" ")


def full_path(normalizer: Normalizer, line: bytes) -> list[Item]:
    return list(normalizer.from_line(line, "f:1", ARRIVAL))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines(), st.sets(st.sampled_from(TABLES)))
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{"a":1e400}}', set())
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{"a":"\xff"}}', set())
@example(b'{"category":"\x80dvancedHunting-DeviceProcessEvents","properties":{}}', set())
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{"a":"\\ud800"}}', set())
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{},"value":[]}', set())
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":"x"}', set())
@example(b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{},"category":"AdvancedHunting-AlertInfo"}', set())
@example(b'{"categ\\u006fry":"AdvancedHunting-DeviceFileEvents","properties":{}}', set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{},"v\\u0061lue":[]}', set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{},"properties":"x"}', set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":123456789012345678901234567890}}', set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":' + b"[" * 1022 + b"]" * 1022 + b"}}", set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":' + b"[" * 1023 + b"]" * 1023 + b"}}", set())
@example(b'{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":-12.5e0400}}', set())
@example(b'{"category":{"AdvancedHunting-DeviceFileEvents":1},"properties":{}}', set())  # a category no dict key can be
@example(b'{"category":["AdvancedHunting-DeviceFileEvents"],"properties":{}}', set())
@example(b'{"category":"AdvancedHunting-AlertInfo","properties":{}}', set())
def test_a_line_the_filter_skips_is_skipped_the_same_way_by_the_full_path(line: bytes, readers: set[str]) -> None:
    rules = [*DEFAULT_RULES, *(_table_rule(t) for t in sorted(readers))]
    engine = Engine(rules, MemoryStateStore())
    normalizer = Normalizer(prefilter=engine.could_match)
    decided = LineFilter(engine.could_match)(line)
    full = full_path(normalizer, line)
    if decided is not None:
        assert full == [decided]


def test_the_filter_skips_the_rows_no_rule_reads_and_keeps_every_other_row() -> None:
    engine = Engine([*DEFAULT_RULES, _table_rule("DeviceLogonEvents")], MemoryStateStore())
    skip = LineFilter(engine.could_match)
    row = {"time": "2026-11-01T00:00:00Z", "tenantId": "t", "properties": {"ActionType": "a", "DeviceName": "h"}}
    assert skip(orjson.dumps({**row, "category": "AdvancedHunting-DeviceProcessEvents"})) == Skipped(
        "MS-Defender-DeviceProcessEvents"
    )
    # a rule reads it / its event type needs the alert's category / evidence rows enrich the alerts' incidents
    for kept in ("DeviceLogonEvents", "AlertInfo", "AlertEvidence"):
        assert skip(orjson.dumps({**row, "category": f"AdvancedHunting-{kept}"})) is None
    assert skip(b'{"eventType": "MS-Defender-DeviceProcessEvents"}') is None  # not a streaming record


def _replay(data: bytes, rules: list[Rule], *, use_filter: bool) -> tuple[list[Any], list[str], list[dict[str, Any]]]:
    engine = Engine(rules, MemoryStateStore(), lambda: ARRIVAL)
    normalizer = Normalizer(prefilter=engine.could_match)
    if not use_filter:
        normalizer.line_filter = lambda: None  # type: ignore[method-assign]
    items = list(iter_file(normalizer, io.BytesIO(data), "in.jsonl", lambda: ARRIVAL))
    events = [i for i in items if isinstance(i, NormalizedEvent)]
    rejections = [str(i) for i in items if isinstance(i, Rejection)]
    skipped: dict[str, int] = {}
    for i in items:
        if isinstance(i, Skipped):
            skipped[i.event_type] = skipped.get(i.event_type, 0) + i.count
    shape = [type(i).__name__ for i in items if not isinstance(i, Skipped)] + sorted(skipped.items())
    return shape, rejections, engine.process(events).incidents


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), min_size=1, max_size=12), st.sets(st.sampled_from(TABLES)))
def test_a_replay_gives_the_same_incidents_and_rejections_with_and_without_the_filter(
    rows: list[bytes], readers: set[str]
) -> None:
    data = b"\n".join([ALERT_ROW, *rows, ALERT_ROW.replace(b"da1", b"da2")]) + b"\n"
    rules = [*DEFAULT_RULES, *(_table_rule(t) for t in sorted(readers))]
    with_filter = _replay(data, rules, use_filter=True)
    assert with_filter == _replay(data, rules, use_filter=False)
    assert len(with_filter[2]) >= 2  # the two alerts around the rows still make their incidents


def test_skipped_lines_cost_no_clock_call_and_no_parse_of_their_own() -> None:
    engine = Engine(DEFAULT_RULES, MemoryStateStore())
    normalizer = Normalizer(prefilter=engine.could_match)
    row = {"time": "2026-11-01T00:00:00Z", "tenantId": "t", "category": "AdvancedHunting-DeviceProcessEvents"}
    lines = [orjson.dumps({**row, "properties": {"ReportId": i}}) for i in range(100)]
    alert = orjson.dumps(
        {**row, "category": "AdvancedHunting-AlertInfo", "properties": {"AlertId": "da1", "Category": "Persistence"}}
    )
    calls = []

    def clock() -> datetime:
        calls.append(1)
        return ARRIVAL

    items = list(iter_file(normalizer, io.BytesIO(b"\n".join([*lines, alert, *lines]) + b"\n"), "in", clock))
    assert len(calls) == 1  # only the alert line asked for its arrival time
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert sum(i.count for i in skipped) == 200 and {i.event_type for i in skipped} == {"MS-Defender-DeviceProcessEvents"}
    assert [i.position for i in items if isinstance(i, NormalizedEvent)] == ["in:101"]


CAP = 200  # record cap while reading in tiny blocks, so that lines over it are cheap to generate


@st.composite
def file_rows(draw: st.DrawFn) -> bytes:
    """A row of a JSON lines file: a streaming row, blank, over the (test) cap, or with a CR."""
    kind = draw(st.sampled_from(["row", "row", "row", "blank", "long", "cr"]))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t "]))
    row = draw(lines())
    if kind == "long":
        return row + b" " * (CAP + 1 - len(row)) if len(row) <= CAP else row
    return row + b"\r" if kind == "cr" else row


def _line_by_line(data: bytes, rules: list[Rule]) -> tuple[list[str], dict[str, int], list[dict[str, Any]]]:
    """The oracle: split on newlines, reject lines over the cap, parse every other non-blank line."""
    engine = Engine(rules, MemoryStateStore(), lambda: ARRIVAL)
    normalizer = Normalizer(prefilter=engine.could_match)
    items: list[Item] = []
    for number, line in enumerate(data.split(b"\n")[: -1 if data.endswith(b"\n") else None], 1):
        if len(line) > CAP:
            items.append(Rejection(f"in:{number}", f"record exceeds the {CAP}-byte cap"))
        elif line.strip():
            items += normalizer.from_line(line, f"in:{number}", ARRIVAL)
    return _outcome(items, engine)


def _outcome(items: list[Item], engine: Engine) -> tuple[list[str], dict[str, int], list[dict[str, Any]]]:
    """What a reader's items come to: events and rejections in order, skipped counts, incidents."""
    shown = [
        f"{i.position} {i.identity}" if isinstance(i, NormalizedEvent) else str(i) for i in items if not isinstance(i, Skipped)
    ]
    skipped: dict[str, int] = {}
    for i in items:
        if isinstance(i, Skipped):
            skipped[i.event_type] = skipped.get(i.event_type, 0) + i.count
    events = [i for i in items if isinstance(i, NormalizedEvent)]
    return shown, skipped, engine.process(events).incidents


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(file_rows(), max_size=10),
    st.integers(1, 300),
    st.booleans(),
    st.sets(st.sampled_from(TABLES)),
    st.lists(st.sampled_from([b"", b" ", b"\t\r"]), max_size=3),
)
@example([b"{not json"], 300, True, set(), [b"", b" "])  # blank lines before the first row still count as lines
@example([b"x" * 450, b'{"eventType":"y","eventId":"e"}'], 7, True, set(), [])  # over the cap across many blocks
@example(
    [b'{"category":"AdvancedHunting-DeviceProcessEvents","properties":{}}' + b" " * CAP], 64, False, set(), []
)  # skippable but over
@example([b'{"eventType":"y","eventId":"e"}'], 1, True, set(), [b" "])  # one byte per block
def test_reading_in_blocks_of_any_size_gives_what_reading_line_by_line_gives(
    rows: list[bytes], block: int, newline_at_end: bool, readers: set[str], leading: list[bytes]
) -> None:
    data = b"\n".join([*leading, ALERT_ROW, *rows]) + (b"\n" if newline_at_end else b"")
    rules = [*DEFAULT_RULES, *(_table_rule(t) for t in sorted(readers))]
    engine = Engine(rules, MemoryStateStore(), lambda: ARRIVAL)
    normalizer = Normalizer(prefilter=engine.could_match)
    with mock.patch.object(normalize, "READ_BLOCK_BYTES", block), mock.patch.object(normalize, "MAX_RECORD_BYTES", CAP):
        read = _outcome(list(iter_file(normalizer, io.BytesIO(data), "in", lambda: ARRIVAL)), engine)
        assert read == _line_by_line(data, rules)
