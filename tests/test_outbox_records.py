"""Outbox records are held as JSON until a store writes them, and then deflated once.

What a group keeps, what a store writes and what a redelivery re-emits must not depend on when (or
whether) a record was deflated: the size caps count packed bytes whichever form the state holds.
"""

from __future__ import annotations

import os
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.state import (
    MAX_OUTBOX_BYTES,
    MAX_OUTBOX_RECORDS,
    Change,
    GroupKey,
    GroupState,
    MemoryStateStore,
    OutboxRecord,
    deflate,
    packed_record,
    record_size_within,
)

from .store_contract import NOW, state_for

# A record's text: compressible (repeated words) or not (random hex), so packed sizes straddle the caps.
texts = st.one_of(
    st.integers(0, 3000).map(lambda n: "word " * n),
    st.integers(0, 40_000).map(lambda n: os.urandom(n // 2).hex()),
)
records = st.tuples(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3), texts).map(
    lambda r: OutboxRecord(r[0], [{"incidentId": "inc-1", "attributes": {"alertName": r[1]}}]).encode()
)


def test_the_engine_s_record_is_json_and_its_packed_form_decodes_to_the_same_record() -> None:
    record = OutboxRecord([1, -2], [{"incidentId": "inc-1", "revision": 1}]).encode()
    assert record[:1] == b"["
    packed = packed_record(record)
    assert packed[0] & 0x0F == 8 and packed != record  # a zlib header (deflate), never "["
    assert packed_record(packed) == packed  # already packed: as is
    assert (
        OutboxRecord.decode(packed)
        == OutboxRecord.decode(record)
        == OutboxRecord([1, -2], [{"incidentId": "inc-1", "revision": 1}])
    )


@given(record=records, limit=st.integers(0, 50_000))
@settings(max_examples=150)
def test_the_size_check_answers_as_the_packed_size_does(record: bytes, limit: int) -> None:
    assert record_size_within(record, limit) == (len(packed_record(record)) <= limit)


@given(batch=st.lists(records, min_size=1, max_size=MAX_OUTBOX_RECORDS + 4))
@settings(max_examples=60)
def test_a_group_keeps_the_same_records_whether_they_were_held_as_json_or_packed(batch: list[bytes]) -> None:
    as_json, packed, packed_late = GroupState(GroupKey("R", ("a",))), GroupState(GroupKey("R", ("a",))), None
    for i, record in enumerate(batch):
        as_json.add_record(record)
        packed.add_record(packed_record(record))
        if i == len(batch) // 2:  # a store wrote the group half way: its records are packed from then on
            as_json.outbox_bytes()
            packed_late = list(as_json.outbox)
    assert as_json.outbox_bytes() == packed.outbox_bytes()
    assert len(packed.outbox) <= MAX_OUTBOX_RECORDS and (
        len(packed.outbox) == 1 or len(packed.outbox_bytes()) <= MAX_OUTBOX_BYTES
    )
    assert packed_late is not None and all(r[0] & 0x0F == 8 for r in packed_late)


def test_a_store_write_deflates_each_record_once_and_the_in_memory_store_keeps_json_until_then() -> None:
    store = MemoryStateStore(live_limit=0)  # every state packed at once
    key = GroupKey("R", ("a", "t"))
    st_ = state_for(key)
    record = OutboxRecord([7], [{"incidentId": "inc-1", "attributes": {"x": "y" * 500}}]).encode()
    st_.add_record(record)
    store.save([Change(key, st_, None, NOW + 60_000)])
    loaded = store.load([key], NOW)[key].state
    assert loaded is not None and loaded.outbox == [record]  # still JSON: packed with the state, not alone
    assert store.stored(key)[1][4:] == packed_record(record)  # what the Table store would hold
    loaded.outbox_bytes()
    assert loaded.outbox == [packed_record(record)]  # the packed form replaced the JSON: deflated once


def test_a_packed_group_costs_less_than_its_state_and_record_packed_apart() -> None:
    """Deflating the record with its state (one stream, one dictionary) is what brings an open
    COUNT(*) group under 500 bytes; apart, the record's own stream costs its header and dictionary id."""
    store = MemoryStateStore(live_limit=0)
    key = GroupKey("R", ("Suspicious Task Scheduler activity", "da638", "tenant-1"))
    st_ = state_for(key)
    record = OutboxRecord(
        [7],
        [
            {
                "incidentId": "inc-1",
                "revision": 1,
                "action": "created",
                "attributes": {"alertName": "Suspicious Task Scheduler activity"},
            }
        ],
    ).encode()
    st_.add_record(record)
    store.save([Change(key, st_, None, NOW + 60_000)])
    ck = store._key(key)
    apart = 16 + len(deflate(st_.to_bytes(), raw=True, zdict=store._zdict(ck))) + 4 + len(packed_record(record))
    assert len(store._data[ck]) < apart - 20


def test_a_record_held_by_a_state_takes_about_its_own_size_in_memory() -> None:
    """Thousands of states hold their newest record as JSON between batches: each must cost its own
    bytes, not the encoder's buffer (orjson's result keeps 4 KiB or more for a short JSON)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [OutboxRecord([i], [{"incidentId": f"inc-{i}", "revision": 1}]).encode() for i in range(500)]
        per_record = (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()
    assert per_record < max(map(len, held)) + 200


def _json_bytes(state: GroupState) -> int:
    return sum(len(r) for r in state.outbox if r[:1] == b"[")


def test_a_group_never_holds_more_json_records_than_the_outbox_cap_even_when_one_batch_made_them_all() -> None:
    """Records stay JSON only while they are small: the in-memory store keeps its live states as
    objects, so a lone record of a batch of a thousand episodes (a megabyte of JSON, 70 KB packed)
    would otherwise stay a megabyte in memory until the group's next write."""
    episodes = [{"incidentId": f"inc-{i}", "attributes": {"alertName": "word " * 40}} for i in range(2000)]
    lone = OutboxRecord([1], episodes).encode()
    assert len(lone) > 8 * MAX_OUTBOX_BYTES and record_size_within(lone, MAX_OUTBOX_BYTES)
    st_ = GroupState(GroupKey("R", ("a",)))
    st_.add_record(lone)
    assert _json_bytes(st_) <= MAX_OUTBOX_BYTES and st_.outbox == [packed_record(lone)]
    small = OutboxRecord([2], [{"incidentId": "inc-1"}]).encode()
    st_.add_record(small)  # small records stay JSON until a store writes them
    assert st_.outbox == [packed_record(lone), small]


def test_a_live_group_of_a_batch_of_a_thousand_episodes_holds_its_record_packed() -> None:
    from .test_engine import EPISODIC, Timeline, alert

    tl = Timeline([EPISODIC])
    snaps = tl.feed(*[alert(f"v{i}", alert_id=f"a{i}", at=i * 61, user="u", hostName=f"h{i % 7}") for i in range(1000)])
    assert len(snaps) == 1000
    [(state, _, _)] = tl.store._live.values()
    assert len(state.outbox) == 1 and _json_bytes(state) <= MAX_OUTBOX_BYTES
