from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared import state as state_module
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules
from shared.state import MAX_SHARED_VALUES, Change, GroupKey, GroupState, MemoryStateStore, OutboxRecord

from .store_contract import NOW, StoreContract, state_for
from .test_engine import T0, _run_exactly_once, deliveries, tenant_streams


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> MemoryStateStore:
        return MemoryStateStore()


class TestMemoryStoreSpillingEveryState(StoreContract):
    """The same contract when every state but the last written one lives in the spill file."""

    @pytest.fixture
    def store(self) -> Iterator[MemoryStateStore]:
        store = MemoryStateStore(hot_limit=1)
        yield store
        store.close()


class TestMemoryStorePackingEveryState(StoreContract):
    """The same contract when no state is kept as an object (every one packed as soon as written)."""

    @pytest.fixture
    def store(self) -> MemoryStateStore:
        return MemoryStateStore(live_limit=0)


class TestMemoryStoreInEveryTier(StoreContract):
    """The same contract with one state kept as an object, one packed and the rest on disk."""

    @pytest.fixture
    def store(self) -> Iterator[MemoryStateStore]:
        store = MemoryStateStore(hot_limit=2, live_limit=1)
        yield store
        store.close()


def test_states_beyond_the_hot_limit_move_to_disk_and_come_back_unchanged(tmp_path: Path) -> None:
    store = MemoryStateStore(hot_limit=10, spill_dir=str(tmp_path))
    keys = [GroupKey("R", (f"Host{i}", "t")) for i in range(100)]
    store.save([Change(k, state_for(k, 2), None, NOW + 60_000, due_at=NOW + i) for i, k in enumerate(keys)])
    assert store.on_disk >= 90 and len(store) == 100
    loaded = store.load([GroupKey("R", (f"HOST{i}", "T")) for i in range(100)], NOW)  # case-insensitive on disk too
    assert [v.state.to_bytes() for v in loaded.values()] == [state_for(k, 2).to_bytes() for k in keys]  # type: ignore[union-attr]
    assert len(store.load_due(NOW + 49, NOW, 1000)) == 50 and len(store.load_due(NOW + 99, NOW, 7)) == 7
    # a write through a stale token conflicts on disk as in memory; the fresh one brings the state back
    first = keys[0]
    token = loaded[GroupKey("R", ("HOST0", "T"))].token
    store.save([Change(first, state_for(first, 3), token, NOW + 60_000)])
    assert store.load([first], NOW)[first].state.to_bytes() == state_for(first, 3).to_bytes()  # type: ignore[union-attr]
    assert len(store) == 100
    assert store.purge_expired(NOW + 60_000) == 100 and len(store) == 0


def test_closing_the_store_deletes_its_spill_file(tmp_path: Path) -> None:
    store = MemoryStateStore(hot_limit=1, spill_dir=str(tmp_path))
    keys = [GroupKey("R", (str(i),)) for i in range(3)]
    store.save([Change(k, state_for(k), None, NOW + 60_000) for k in keys])
    assert os.listdir(tmp_path)
    store.close()
    assert not os.listdir(tmp_path)


@settings(max_examples=80)
@given(tenant_streams, deliveries, st.sampled_from([1, 2, 3]), st.sampled_from([0, 1, 2]))
def test_a_spilling_store_delivers_what_one_clean_pass_delivers(
    stream: list[tuple[int, int, int]], plan: list[Any], hot_limit: int, live_limit: int
) -> None:
    """Redeliveries, failures at every point and a racing second instance, with states on disk,
    packed and kept as objects."""
    _run_exactly_once(MemoryStateStore(hot_limit=hot_limit, live_limit=live_limit), stream, plan)


LATER = T0 + timedelta(days=30)  # arrival after every event time (times ahead of arrival are clamped)
RULES = load_rules([default_rules_dir()])  # every default rule: sequences, absences (due times), the join
CATEGORIES = ["Persistence", "CredentialAccess", "Execution", "Discovery"]
TECHNIQUES = [["T1053.005"], ["T1003.001"], ["T1059.001"], []]

# (alert, category, host, seconds from the previous record: negative = late, status, delivered again?)
records = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(0, 3),
        st.integers(0, 2),
        st.integers(-900, 16000),
        st.sampled_from(["new", "new", "inProgress"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)


def _lines(spec: list[tuple[int, int, int, int, str, bool]]) -> bytes:
    out, t = [], 0
    for i, (alert_n, category, host, gap, status, again) in enumerate(spec):
        t = max(0, t + gap)
        rec = {
            "eventType": f"M365Defender-Alert-{CATEGORIES[category]}",
            "alertName": f"Suspicious {CATEGORIES[category]} activity",
            "alertIdStr": f"da{alert_n}",
            "tenantId": "t1",
            "hostName": f"host{host}",
            "attackTactic": CATEGORIES[category],
            "attackTechniqueId": TECHNIQUES[category],
            "eventSeverityCat": "HIGH",
            "alertStatus": status,
            "eventId": str(i),
            "eventTime": (T0 + timedelta(seconds=t)).isoformat(),
        }
        out.append(orjson.dumps(rec))
        if again:
            out.append(out[max(0, len(out) - 4)])  # a redelivery of a recent record
    return b"\n".join(out) + b"\n"


def _replayed(path: Path, store: MemoryStateStore, batch: int) -> bytes:
    sink = io.BytesIO()
    with mock.patch("shared.replay.REPLAY_BATCH", batch):
        replay([str(path)], RULES, out=sink, err=io.StringIO(), store=store, clock=lambda: LATER)
    return sink.getvalue()


@settings(max_examples=60)
@given(records, st.integers(1, 4), st.sampled_from([1, 3]))
@example(
    [(0, 0, 0, 0, "new", False), (0, 0, 0, -100, "new", True), (1, 1, 0, 600, "new", True), (0, 0, 0, 16000, "inProgress", True)],
    1,
    1,
)
@example(
    [(0, 0, 0, 0, "new", False)] * 5 + [(2, 0, 0, 0, "new", False), (0, 0, 0, 5998, "new", False), (0, 0, 0, 8230, "new", False)],
    1,
    1,
)
def test_replay_with_states_on_disk_emits_byte_identical_snapshots(
    tmp_path_factory: pytest.TempPathFactory, spec: list[tuple[int, int, int, int, str, bool]], batch: int, hot_limit: int
) -> None:
    """Late records inside and beyond the window, redeliveries, absences firing as event time moves."""
    path = tmp_path_factory.mktemp("spill") / "alerts.jsonl"
    path.write_bytes(_lines(spec))
    spilling = MemoryStateStore(hot_limit=hot_limit)
    expected = _replayed(path, MemoryStateStore(live_limit=0), batch)  # every state packed, none on disk
    assert expected  # the stream makes incidents
    assert _replayed(path, spilling, batch) == expected
    assert spilling.on_disk > 0 or len(spilling) <= hot_limit
    spilling.close()


def test_a_replay_leaves_no_spill_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(_lines([(i, i % 4, 0, 60, "new", False) for i in range(6)]))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    seen: list[int] = []
    real_put = state_module._Spill.put

    def put(self: Any, rows: Any) -> None:  # records that states did move to disk
        seen.append(len(rows))
        real_put(self, rows)

    with (
        mock.patch("tempfile.tempdir", str(scratch)),
        mock.patch("shared.replay.REPLAY_HOT_GROUPS", 1),
        mock.patch("shared.replay.REPLAY_BATCH", 1),
        mock.patch("shared.state._Spill.put", put),
    ):
        replay([str(path)], RULES, out=io.BytesIO(), err=io.StringIO(), clock=lambda: LATER)
    assert sum(seen) > 0
    assert not list(scratch.iterdir())


def _one_record_state(key: GroupKey, record: bytes) -> GroupState:
    st = state_for(key, 2)
    st.outbox = [record]
    return st


def test_a_group_with_one_outbox_record_keeps_it_byte_for_byte() -> None:
    """What comes back is the record as the engine made it, in memory and from the Table-store view."""
    store = MemoryStateStore(live_limit=0)
    key = GroupKey("R", ("Host1", "t"))
    record = OutboxRecord([5, -7], [{"incidentId": "inc-1", "attributes": {"hostName": "Host1"}}]).encode()
    store.save([Change(key, _one_record_state(key, record), None, NOW + 60_000)])
    loaded = store.load([key], NOW)[key].state
    assert loaded is not None and loaded.outbox == [record]
    assert OutboxRecord.decode(loaded.outbox[0]) == OutboxRecord.decode(bytes(record))
    assert store.stored(key)[1] == _one_record_state(key, record).outbox_bytes()


@pytest.mark.parametrize(
    "record",
    [
        zlib.compress(b'[[1],[{"a":"b"}]]', 9),  # zlib, but not what this code's deflate makes
        state_module.deflate(b'[[1],[{"a":"\x00"}]]', zdict=state_module._ZDICT),  # holds the body's separator
        state_module.deflate(b"[[1],[]]", zdict=state_module._ZDICT) + b"tail",  # bytes after the stream
        b"\x78\x9c not zlib at all",
        b"",
    ],
)
def test_an_outbox_record_from_elsewhere_comes_back_unchanged(record: bytes) -> None:
    store = MemoryStateStore(hot_limit=1)
    key, other = GroupKey("R", ("a",)), GroupKey("R", ("b",))
    store.put_stored(key, state_for(key).encode(), struct.pack(">I", len(record)) + record, 4, NOW + 60_000)
    assert store.stored(key)[1:] == (struct.pack(">I", len(record)) + record, 4, NOW + 60_000)
    loaded = store.load([key], NOW)[key]
    assert loaded.state is not None and loaded.state.outbox == [record]
    store.save([Change(key, loaded.state, loaded.token, NOW + 60_000), Change(other, state_for(other), None, NOW)])
    assert store.on_disk == 1  # the group went to disk and comes back the same
    assert store.stored(key)[1] == struct.pack(">I", len(record)) + record


group_values = st.lists(st.text(alphabet="aA\x1f\x1b\x1e\x1d0,é", max_size=4), max_size=3).map(tuple)


def _tenanted(rule: str, values: tuple[str, ...], at: int) -> GroupKey:
    """A key whose tenant is its value at ``at`` (when there is one), else an unrelated tenant."""
    return GroupKey(rule, values, values[at] if at < len(values) else "elsewhere")


@pytest.mark.parametrize("hot_limit", [None, 1])
@pytest.mark.parametrize("shared_values", [MAX_SHARED_VALUES, 1])
@settings(max_examples=200)
@given(
    keys=st.lists(st.tuples(st.sampled_from(["R", "R\x1fa", "0", "1"]), group_values, st.integers(0, 3)), min_size=1, max_size=8)
)
@example(keys=[("R", (), 0), ("R", ("",), 0)])
@example(keys=[("R", ("a\x1fb",), 0), ("R", ("a", "b"), 0)])
@example(keys=[("R\x1fa", (), 0), ("R", ("a",), 0)])
@example(keys=[("R", ("\x1b\x1e",), 0), ("R", ("\x1f",), 0)])
@example(keys=[("R", ("a", "t"), 1), ("R", ("a", "\x1b\x1d0"), 1), ("R", ("a", "u"), 1), ("R", ("a", "\x1b\x1d1"), 0)])
@example(keys=[("R", ("a", "A"), 1), ("R", ("a", "0"), 1), ("R", ("a", "\x1b\x1d0"), 1)])  # numbered or written out
@example(keys=[("R", ("t", "a"), 0), ("R", ("a", "t"), 1), ("R", ("t",), 0), ("R", ("t", "a", "b"), 2)])
def test_groups_share_a_state_exactly_when_their_keys_are_equal(
    keys: list[tuple[str, tuple[str, ...], int]], hot_limit: int | None, shared_values: int
) -> None:
    """Packed (and spilled) states are keyed by a compact form of the key (rule number, escaped
    values, one of them numbered when it is a shared tenant value): no two different keys may meet
    there, and keys equal but for case (or for the tenant they name) must."""
    store = MemoryStateStore(hot_limit=hot_limit, live_limit=0)
    written: dict[GroupKey, GroupState] = {}  # the last state written per group (equal keys: one entry)
    with mock.patch("shared.state.MAX_SHARED_VALUES", shared_values):
        for i, (rule, values, at) in enumerate(keys):
            key = _tenanted(rule, values, at)
            loaded = store.load([key], NOW)[key]
            assert (loaded.state is None) == (key not in written)
            written[key] = state_for(key, 1 + i % 3)
            store.save([Change(key, written[key], loaded.token, NOW + 60_000)])
        assert len(store) == len(written)
        for key, last in written.items():
            upper = GroupKey(key.rule_id, tuple(v.upper() for v in key.values), key.tenant[::-1])
            state = store.load([upper], NOW)[upper].state
            assert state is not None and state.to_bytes() == last.to_bytes()
    if hot_limit is None:
        assert {(k.rule_id, k.norm) for k in store.held_keys()} == {(k.rule_id, k.norm) for k in written}


def test_a_closed_store_holds_nothing_and_refuses_every_read_and_write(tmp_path: Path) -> None:
    """Closing used to delete only the spill file: later loads then answered from memory for some
    groups and "absent" for those that had been on disk, silently."""
    store = MemoryStateStore(hot_limit=2, live_limit=1, spill_dir=str(tmp_path))
    keys = [GroupKey("R", (str(i),)) for i in range(5)]
    store.save([Change(k, state_for(k), None, NOW + 60_000, due_at=NOW) for k in keys])
    assert store.on_disk == 3 and len(store) == 5  # one live, one packed, three on disk
    store.close()
    assert len(store) == 0 and store.on_disk == 0 and not os.listdir(tmp_path)
    calls = [
        lambda: store.load(keys, NOW),
        lambda: store.save([Change(keys[0], state_for(keys[0]), None, NOW + 60_000)]),
        lambda: store.load_due(NOW, NOW, 10),
        lambda: store.purge_expired(NOW),
        lambda: store.stored(keys[0]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="closed"):
            call()
