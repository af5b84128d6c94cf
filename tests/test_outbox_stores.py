"""Every store keeps the same outbox records and re-emits the same bytes, whatever form it holds them in.

The engine's records are JSON until a store writes them (the Table store deflates each; the in-memory
store deflates them with the state when it packs a group, and keeps them as they are while the group
is live). Batches big enough to push the outbox over its byte cap, redelivered in every tier and in
Azure Table (Azurite), must give byte-identical emissions and stored outboxes everywhere.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.engine import Engine, group_key
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import parse_rule_text
from shared.state import (
    MAX_OUTBOX_BYTES,
    Change,
    GroupKey,
    GroupState,
    MemoryStateStore,
    OutboxRecord,
    StateStore,
    packed_record,
    split_outbox,
)

from .test_engine import FAILURE_POINTS, T0, Flaky, deliver, fresh_table_store

BIG = parse_rule_text(  # one incident per group, updated by every event: one record per batch
    "id: BIG\nname: big\nseverity: 3\ncategory: Security\ntimeWindow: 60\nincidentLifetime: 600\nsubpatterns:\n"
    "  - {name: s, query: 'eventType = \"x\"', groupBy: [h], aggregateConstraint: 'COUNT(*) >= 1'}\n"
    "incidentAttributes: {n: s.COUNT(*)}\n"
)
_NORM = Normalizer(fmt="normalized")

# (seconds since the previous event, its group, bytes of evidence, whether that evidence compresses)
event_specs = st.lists(
    st.tuples(st.sampled_from([0, 1, 30, 700]), st.sampled_from(["a", "b"]), st.integers(0, 6000), st.booleans()),
    min_size=1,
    max_size=40,
)
# (events the next delivery takes, which earlier delivery it then repeats: None = none, k = the k-th
# last, and the store failure its first attempt meets, if any: the batch is retried until it goes through)
plans = st.lists(
    st.tuples(st.integers(1, 6), st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([None, *FAILURE_POINTS])),
    min_size=1,
    max_size=20,
)


def _events(specs: list[tuple[int, str, int, bool]], seed: int = 7) -> list[NormalizedEvent]:
    rnd, t, out = random.Random(seed), 0, []
    for i, (gap, group, size, compresses) in enumerate(specs):
        t += gap
        blob = ("evidence " * (size // 9 + 1))[:size] if compresses else rnd.randbytes(size // 2).hex()
        rec = {
            "eventType": "x",
            "h": group,
            "eventId": str(i),
            "blob": blob,
            "eventTime": (T0 + timedelta(seconds=t)).isoformat(),
        }
        ev = _NORM.normalize(rec, "t", T0)
        assert isinstance(ev, NormalizedEvent)
        out.append(ev)
    return out


Delivery = tuple[list[NormalizedEvent], str | None]  # a batch and the failure its first attempt meets


def _deliveries(events: list[NormalizedEvent], plan: list[Any]) -> list[Delivery]:
    """The batches in delivery order: each new batch, then (maybe) an earlier one again, verbatim."""
    sent, firsts, out = 0, [], []
    steps = iter(plan)
    while sent < len(events):
        take, again, failure = next(steps, (len(events), None, None))
        firsts.append(events[sent : sent + take])
        sent += take
        out.append((firsts[-1], failure))
        if again is not None:
            out.append((firsts[-min(again, len(firsts))], None))
    return out


def _emitted(store: StateStore, deliveries: list[Delivery]) -> list[list[bytes]]:
    """What each delivery emitted (a snapshot a failed attempt made is emitted again by the retry)."""
    batch: list[NormalizedEvent] = []
    other = Engine([BIG], store, lambda: T0)  # another instance on the same partition (lease handover)
    raced: list[bytes] = []
    flaky = Flaky(store, race=lambda: raced.extend(orjson.dumps(s) for s in other.process(batch).incidents))
    engine = Engine([BIG], flaky, lambda: T0)
    out = []
    for batch, failure in deliveries:
        emitted = deliver(engine, flaky, batch, [failure] if failure else [])
        out.append(raced + [orjson.dumps(s) for s in emitted])
        raced.clear()
    return out


def _group_keys(events: list[NormalizedEvent]) -> list[GroupKey]:
    return sorted({group_key(BIG, e) for e in events}, key=lambda k: k.text)


def _memory_outboxes(store: MemoryStateStore, keys: list[GroupKey]) -> dict[str, bytes]:
    out = {}
    for key in keys:
        with contextlib.suppress(KeyError):  # a group that never had a state
            out[key.values[0]] = store.stored(key)[1]
    return out


def _memory_stores() -> Iterator[MemoryStateStore]:
    yield MemoryStateStore()  # every group live: records kept as JSON
    yield MemoryStateStore(live_limit=0)  # every group packed as soon as written
    yield MemoryStateStore(hot_limit=1)  # all but the last written group on disk


def _check_alike(specs: list[tuple[int, str, int, bool]], plan: list[Any], table: Any = None) -> None:
    events = _events(specs)
    deliveries = _deliveries(events, plan)
    keys = _group_keys(events)
    runs, outboxes = [], []
    for store in _memory_stores():
        runs.append(_emitted(store, deliveries))
        outboxes.append(_memory_outboxes(store, keys))
        store.close()
    if table is not None:
        runs.append(_emitted(table, deliveries))
        outboxes.append({k.values[0]: _table_outbox(table, k) for k in keys if _table_outbox(table, k) is not None})
    assert all(run == runs[0] for run in runs[1:])  # every delivery, byte for byte, in every store
    assert all(o == outboxes[0] for o in outboxes[1:])
    # and a redelivery re-emits exactly what its first delivery emitted, as long as its record is kept
    first: dict[int, set[bytes]] = {}
    for (batch, _), emitted in zip(deliveries, runs[0], strict=True):
        if id(batch) in first:
            assert set(emitted) <= first[id(batch)]  # nothing new; what is re-emitted is what was emitted
        else:
            first[id(batch)] = set(emitted)
    for outbox in outboxes[0].values():
        records = split_outbox(outbox)
        assert len(records) == 1 or len(outbox) <= MAX_OUTBOX_BYTES
        assert all(packed_record(r) == r for r in records)  # written packed, as the previous release wrote them


def _table_outbox(table: Any, key: GroupKey) -> bytes | None:
    from azure.core.exceptions import ResourceNotFoundError

    from shared.table_store import _outbox

    try:
        return _outbox(table.table.get_entity(*table.keys_of(key)))
    except ResourceNotFoundError:
        return None


PINNED = [  # ~4 KiB records (incompressible) of one group, then older batches again: the byte cap drops records
    ([(1, "a", 6000, False)] * 18 + [(700, "b", 10, True)], [(1, None, None)] * 16 + [(1, 3, None), (1, 1, None), (1, 18, None)]),
    (
        [(0, "a", 6000, False)] * 30,
        [(3, None, "raced"), (3, 1, "mid save"), (3, 2, "after save"), (6, 1, "in output"), (6, 4, None)],
    ),
]


@settings(max_examples=40)
@given(specs=event_specs, plan=plans)
@example(*PINNED[0])
@example(*PINNED[1])
def test_every_memory_tier_keeps_and_re_emits_the_same_records(specs: list[tuple[int, str, int, bool]], plan: list[Any]) -> None:
    _check_alike(specs, plan)


@pytest.mark.azurite
@settings(max_examples=8)
@given(specs=event_specs, plan=plans)
@example(*PINNED[0])
@example(*PINNED[1])
def test_the_table_store_keeps_and_re_emits_what_the_memory_store_does(
    azurite: Any, specs: list[tuple[int, str, int, bool]], plan: list[Any]
) -> None:
    with fresh_table_store(azurite) as store:
        _check_alike(specs, plan, store)


def test_an_outbox_of_the_previous_release_extended_with_json_records_is_written_as_that_release_would() -> None:
    """Records loaded deflated (as the previous release wrote every record) and records the engine
    adds as JSON are packed alike: the outbox written is the one a store writing every record packed
    would have written, and it keeps the same records."""
    key = GroupKey("R", ("a", "t"), "t")
    rnd = random.Random(5)
    records = [
        OutboxRecord([i], [{"incidentId": "inc-1", "blob": rnd.randbytes(300 if i < 12 else 300 * i).hex()}]).encode()
        for i in range(24)
    ]
    old = GroupState(key)
    for r in records[:12]:
        old.add_record(packed_record(r))
    loaded = GroupState.decode(old.encode(), old.outbox_bytes())
    everything_packed = GroupState.decode(old.encode(), old.outbox_bytes())
    forms = set()
    for r in records[12:]:
        loaded.add_record(r)
        everything_packed.add_record(packed_record(r))
        forms.add(tuple(r[:1] == b"[" for r in loaded.outbox))
    assert any(True in f and False in f for f in forms)  # a mix of forms on the way
    assert loaded.outbox_bytes() == everything_packed.outbox_bytes()
    assert len(loaded.outbox) < 24 and len(loaded.outbox_bytes()) <= MAX_OUTBOX_BYTES


def _record_packed_to(size: int, text: str) -> bytes:
    """A JSON record (a prefix of ``text`` as its snapshot) whose packed form takes exactly ``size`` bytes."""

    def packed_len(n: int) -> int:
        return len(packed_record(OutboxRecord([1], [{"b": text[:n]}]).encode()))

    lo, hi = 0, len(text)
    while lo < hi:  # packed sizes grow with the prefix, by at most a byte per character of hex
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if packed_len(mid) < size else (lo, mid)
    assert packed_len(lo) == size
    return OutboxRecord([1], [{"b": text[:lo]}]).encode()


@pytest.mark.parametrize("over", [0, 1])
def test_records_exactly_at_the_outbox_cap_are_kept_and_one_byte_over_drops_the_oldest_in_every_form(over: int) -> None:
    text = random.Random(3).randbytes(40_000).hex()  # hex: about a byte packed per two characters
    older = OutboxRecord([0], [{"b": text[:30_000]}]).encode()
    newer = _record_packed_to(MAX_OUTBOX_BYTES - 8 - len(packed_record(older)) + over, text)
    key = GroupKey("R", ("a", "t"), "t")
    kept = []
    for forms in [(False, False), (True, True), (True, False), (False, True)]:
        st_ = GroupState(key)
        for record, pack in zip([older, newer], forms, strict=True):
            st_.add_record(packed_record(record) if pack else record)
        kept.append(st_.outbox_bytes())
        for store in _memory_stores():  # through a store: same records, whichever tier holds them
            store.save([Change(key, GroupState.decode(st_.encode(), kept[-1]), None, 2**62)])
            assert store.stored(key)[1] == kept[-1]
            store.close()
    assert all(k == kept[0] for k in kept)
    assert split_outbox(kept[0]) == [packed_record(r) for r in ([newer] if over else [older, newer])]
    assert len(kept[0]) == (MAX_OUTBOX_BYTES if not over else 4 + len(packed_record(newer)))
