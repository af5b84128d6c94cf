"""The incident snapshot's type (shared/snapshot.py) matches what goes on the wire."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from shared.engine import SNAPSHOT_ORDER, fit_snapshot
from shared.snapshot import RuleFields, Snapshot, TriggerEvent, as_snapshot
from shared.webhook import Forwarder, MemoryDeliveryLog

from .test_sequence import CRED, PERSIST, Run, ev, rule


def test_the_type_declares_exactly_the_keys_the_engine_writes_in_wire_order() -> None:
    assert set(Snapshot.__required_keys__) == set(SNAPSHOT_ORDER)
    assert set(RuleFields.__required_keys__) < set(SNAPSHOT_ORDER)
    # optional keys: what fit_snapshot, the entity join and the webhook body add
    assert set(Snapshot.__optional_keys__) == {
        "entities",
        "triggerEventsTrimmed",
        "attributesTrimmed",
        "entitiesTrimmed",
        "schemaVersion",
    }


def test_an_emitted_snapshot_is_a_plain_dict_with_the_declared_keys_and_value_types() -> None:
    [snap] = Run(rule()).each(ev(PERSIST, 0), ev(CRED, 60)).snaps
    assert type(snap) is dict  # a TypedDict is a dict at run time: nothing to convert, same bytes
    assert list(snap)[: len(SNAPSHOT_ORDER)] == list(SNAPSHOT_ORDER)
    assert set(snap) <= set(Snapshot.__required_keys__) | set(Snapshot.__optional_keys__)
    [event] = snap["triggerEvents"]
    assert set(event) == set(TriggerEvent.__required_keys__)
    hints = {"incidentId": str, "revision": int, "action": str, "triggerCount": int, "severity": int, "firstSeen": str}
    assert {k: type(snap[k]) for k in hints} == hints
    assert as_snapshot(orjson.loads(fit_snapshot(snap, 1 << 20))) == snap  # read back from the queue: the same


@pytest.mark.parametrize(
    "value",
    [
        [1],
        "inc-1",
        {"revision": 1},
        {"incidentId": 7, "revision": 1},
        {"incidentId": "i", "revision": "1"},
        {"incidentId": "i", "revision": True},
    ],
)
def test_decoded_json_is_a_snapshot_only_with_a_string_id_and_an_integer_revision(value: Any) -> None:
    with pytest.raises(ValueError, match="incident snapshot"):
        as_snapshot(value)


def test_a_queued_message_that_is_not_a_snapshot_goes_to_the_poison_sink_named_as_such() -> None:
    parked: list[dict[str, Any]] = []
    sink = type("P", (), {"send": lambda self, m: parked.append(json.loads(m))})()
    fw = Forwarder([], MemoryDeliveryLog(), poison=sink)
    result = fw.handle(orjson.dumps({"incidentId": "inc-1", "revision": "one"}), message_id="m1")
    assert result.failed == {"*": "not an incident snapshot"}
    assert [p["reason"] for p in parked] == [
        "not an incident snapshot (ValueError: an incident snapshot needs a string incidentId and an integer revision)"
    ]
