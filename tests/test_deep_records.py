"""Records nested close to what orjson can write (it reads 1,024 levels but writes only 254): a raw
record sits several levels down in an outbox record, a snapshot, a chained event and a webhook body,
so an alert whose own JSON was writable must still give its incident, with its raw evidence
previewed when it could not be written where it goes."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.engine import Engine
from shared.normalize import NormalizedEvent, Normalizer
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules, parse_rule_text
from shared.state import MemoryStateStore

RULES = load_rules([default_rules_dir()])
SEED = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def graph_alert(depth: int) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": f"da-deep-{depth}",
        "tenantId": "tenant-a",
        "title": "Suspicious Task Scheduler activity",
        "category": "Persistence",
        "severity": "high",
        "serviceSource": "microsoftDefenderForEndpoint",
        "mitreTechniques": ["T1053.005"],
        "createdDateTime": "2026-11-01T10:00:00Z",
        "lastUpdateDateTime": "2026-11-01T10:00:01Z",
        "extra": nested(depth),
    }


@pytest.mark.parametrize("depth", [10, 200, 230, 240, 246, 249, 251, 253, 254, 300, 1000])
def test_an_alert_nested_near_the_encoders_limit_still_makes_its_incident(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(orjson.dumps(graph_alert(depth)) if depth < 250 else _dumps_deep_line(graph_alert(depth)))
    out, err = io.BytesIO(), io.StringIO()
    summary = replay([str(path)], RULES, out=out, err=err)
    assert summary.rejected == 0, err.getvalue()
    snaps = [orjson.loads(line) for line in out.getvalue().splitlines()]
    seed = [s for s in snaps if s["ruleId"] == SEED]
    assert len(seed) == 1 and seed[0]["triggerCount"] == 1
    raw = seed[0]["triggerEvents"][0]["raw"]
    if depth <= 246:  # its outbox record (six levels above it) can be written: the record as it came
        assert raw["extra"] == nested(depth)
    else:  # a preview, in the record and the snapshot alike
        assert raw["truncated"] is True and raw["preview"].startswith("{")


def _dumps_deep_line(rec: dict[str, Any]) -> bytes:
    """A JSON line orjson cannot write itself (over 254 levels), as a producer would send it."""
    extra = rec.pop("extra")
    depth = 0
    while isinstance(extra, list):
        extra, depth = extra[0], depth + 1
    head = orjson.dumps(rec)[:-1]
    return head + b',"extra":' + b"[" * depth + orjson.dumps(extra) + b"]" * depth + b"}"


DEEP_RULE = (
    "id: DEEP\nname: deep\nseverity: 3\ncategory: Security\ntimeWindow: 600\nsubpatterns:\n"
    "  - {name: s, query: 'eventType = \"x\"', groupBy: [h], aggregateConstraint: 'COUNT(*) >= 1'}\n"
    "incidentAttributes: {h: s.h, n: s.COUNT(*)}\n"
)


@pytest.mark.parametrize("depth", [10, 240, 246, 249, 253, 300])
def test_an_event_attribute_nested_near_the_encoders_limit_still_makes_its_incident(tmp_path: Path, depth: int) -> None:
    """Attributes of the trigger event are written in its snapshot and outbox record like its raw record."""
    record = {"eventType": "x", "h": "host-1", "eventId": "e1", "eventTime": "2026-11-01T10:00:00Z", "blob": nested(depth)}
    path = tmp_path / "events.jsonl"
    path.write_bytes(_dumps_deep_line(dict(record, extra=record.pop("blob"))).replace(b'"extra"', b'"blob"'))
    out, err = io.BytesIO(), io.StringIO()
    summary = replay([str(path)], [parse_rule_text(DEEP_RULE)], out=out, err=err)
    assert summary.rejected == 0, err.getvalue()
    [snap] = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert snap["attributes"] == {"h": "host-1", "n": 1}
    blob = snap["triggerEvents"][0]["attributes"]["blob"]
    if depth <= 246:  # its outbox record (six levels above it) can be written: the value as it came
        assert blob == nested(depth)
    else:  # as its JSON text, in the record and the snapshot alike
        assert isinstance(blob, str) and orjson.loads(blob) == nested(depth)


def test_a_redelivered_deep_event_is_reemitted_byte_for_byte_as_first_emitted() -> None:
    normalizer = Normalizer(fmt="normalized")
    event = normalizer.normalize(
        {"eventType": "x", "h": "host-1", "eventId": "e1", "eventTime": "2026-11-01T10:00:00Z", "blob": nested(300)},
        "t:1",
        datetime(2026, 11, 1, 10, 0, 5, tzinfo=timezone.utc),
    )
    assert isinstance(event, NormalizedEvent)
    engine = Engine([parse_rule_text(DEEP_RULE)], MemoryStateStore())
    [first] = engine.process([event]).incidents
    [again] = engine.process([event]).incidents  # the same batch delivered again: the outbox answers
    assert orjson.dumps(again) == orjson.dumps(first)
    assert isinstance(first["triggerEvents"][0]["attributes"]["blob"], str)
