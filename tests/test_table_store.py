"""The Azure Table store passes the same contract as the in-memory store, against Azurite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.data.tables import TableClient

from shared.errors import StoreError
from shared.state import Change, GroupKey, KeysConflict
from shared.table_store import TableStateStore

from .conftest import Azurite
from .store_contract import NOW, StoreContract, state_for

pytestmark = pytest.mark.azurite


@pytest.fixture
def store(azurite: Azurite, table_name: str) -> Iterator[TableStateStore]:
    s = TableStateStore.from_connection_string(azurite.connection_string, table_name)
    s.ensure_table()
    yield s
    s.table.delete_table()


class TestTableStore(StoreContract):
    pass


class TestSequentialTableStore(StoreContract):
    """The one-call-at-a-time mode (the benchmark's baseline) keeps the same contract."""

    @pytest.fixture
    def store(self, azurite: Azurite, table_name: str) -> Iterator[TableStateStore]:
        s = TableStateStore.from_connection_string(
            azurite.connection_string,
            table_name,
            concurrency=1,
            transactions=False,
        )
        s.ensure_table()
        yield s
        s.table.delete_table()


def test_expires_at_is_written_as_int64(store: TableStateStore) -> None:
    key = GroupKey("R", ("a", "b", "t"))
    store.save([Change(key, state_for(key), None, NOW + 1)])
    pk, rk = store.keys_of(key)
    entity = store.table.get_entity(pk, rk)
    assert entity["expiresAt"].value == NOW + 1 if hasattr(entity["expiresAt"], "value") else entity["expiresAt"] == NOW + 1


def test_tenant_is_in_the_partition_key_and_forbidden_characters_are_escaped(store: TableStateStore) -> None:
    pk_a, rk_a = store.keys_of(GroupKey("R", ("n", "id", "Tenant/A#?"), "Tenant/A#?"))
    pk_b, _ = store.keys_of(GroupKey("R", ("n", "id", "tenant-b"), "tenant-b"))
    assert "tenant%2Fa%23%3F" in pk_a and "tenant-b" in pk_b
    assert not any(c in pk_a + rk_a for c in "/\\#?")


def test_long_keys_are_hashed_and_still_round_trip(store: TableStateStore) -> None:
    key = GroupKey("R", ("x" * 5000, "id", "t" * 3000))
    store.save([Change(key, state_for(key), None, NOW + 60_000)])
    pk, rk = store.keys_of(key)
    assert len(pk) < 1024 and len(rk) < 1024
    assert store.load([key], NOW)[key].state.key == key  # type: ignore[union-attr]


def test_unreachable_storage_raises_store_error() -> None:
    dead = TableStateStore(
        TableClient.from_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/devstoreaccount1;",
            "x",
            retry_total=0,
        )
    )
    with pytest.raises(StoreError, match="loading state"):
        dead.load([GroupKey("R", ("a",))], NOW)


class CountingTable:
    """A TableClient that counts its round trips by method (everything else passes through)."""

    def __init__(self, inner: TableClient) -> None:
        self.inner = inner
        self.counts: dict[str, int] = {}

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def counted(*args: object, **kwargs: object) -> object:
            self.counts[name] = self.counts.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


def one_partition_keys(store: TableStateStore, n: int, shard: str = "00") -> list[GroupKey]:
    """``n`` keys of rule R, tenant t, all in the same shard (so one partition key)."""
    keys: list[GroupKey] = []
    i = 0
    while len(keys) < n:
        key = GroupKey("R", (f"a{i}", "x", "t"))
        if store.keys_of(key)[0].endswith(shard):
            keys.append(key)
        i += 1
    return keys


def test_a_burst_of_new_groups_in_one_partition_is_one_transaction(store: TableStateStore) -> None:
    keys = one_partition_keys(store, 100)
    counting = CountingTable(store.table)
    store.table = counting  # type: ignore[assignment]
    loaded = store.load(keys, NOW)
    store.save([Change(k, state_for(k), loaded[k].token, NOW + 60_000) for k in keys])
    assert counting.counts == {"get_entity": 100, "submit_transaction": 1}
    again = store.load(keys, NOW)
    assert all(again[k].state == state_for(k) for k in keys)


def test_writes_over_the_transaction_limit_split_into_chunks(store: TableStateStore) -> None:
    keys = one_partition_keys(store, 130)
    counting = CountingTable(store.table)
    store.table = counting  # type: ignore[assignment]
    store.save([Change(k, state_for(k), None, NOW + 60_000) for k in keys])
    assert counting.counts == {"submit_transaction": 2}
    assert all(v.state is not None for v in store.load(keys, NOW).values())


def test_one_stale_token_in_a_transaction_loses_only_its_own_key(store: TableStateStore) -> None:
    keys = one_partition_keys(store, 10)
    store.save([Change(k, state_for(k), None, NOW + 60_000) for k in keys])
    tokens = {k: v.token for k, v in store.load(keys, NOW).items()}
    store.save([Change(keys[3], state_for(keys[3], 2), tokens[keys[3]], NOW + 60_000)])  # another writer
    with pytest.raises(KeysConflict) as conflict:
        store.save([Change(k, state_for(k, 3), tokens[k], NOW + 60_000) for k in keys])
    assert conflict.value.keys == [keys[3]]
    after = store.load(keys, NOW)
    assert after[keys[3]].state == state_for(keys[3], 2)  # the other writer's state is kept
    assert all(after[k].state == state_for(k, 3) for k in keys if k != keys[3])


def test_groups_in_many_partitions_load_and_save_concurrently_with_the_same_results(store: TableStateStore) -> None:
    keys = [GroupKey("R", (f"n{i}", "x", f"tenant{i % 7}"), f"tenant{i % 7}") for i in range(100)]
    assert len({store.keys_of(k)[0] for k in keys}) > 50  # spread: transactions alone would not help
    store.save([Change(k, state_for(k), None, NOW + 60_000) for k in keys[:50]])
    loaded = store.load(keys, NOW)
    assert [loaded[k].state is not None for k in keys] == [True] * 50 + [False] * 50
    with pytest.raises(KeysConflict) as conflict:
        store.save([Change(k, state_for(k, 2), None, NOW + 60_000) for k in keys])  # creates: first 50 exist
    assert sorted(conflict.value.keys, key=keys.index) == keys[:50]


def test_the_entity_names_its_state_version_and_holds_the_outbox_beside_the_state(store: TableStateStore) -> None:
    from shared.state import STATE_VERSION, OutboxRecord

    key = GroupKey("R", ("a", "t"), "t")
    st = state_for(key)
    st.add_record(OutboxRecord([1], [{"incidentId": "inc-1"}]).encode())
    store.save([Change(key, st, None, NOW + 60_000)])
    entity = store.table.get_entity(*store.keys_of(key))
    assert entity["version"] == STATE_VERSION == 2
    assert bytes(entity["outbox"]) == st.outbox_bytes() and bytes(entity["state"]) == st.encode()


def test_an_outbox_larger_than_one_property_spans_several_and_a_smaller_one_leaves_none_behind(
    store: TableStateStore,
) -> None:
    import os

    from shared.state import MAX_RECORD_BYTES, OUTBOX_PROPERTY_BYTES

    key = GroupKey("R", ("big", "t"), "t")
    st = state_for(key)
    st.add_record(os.urandom(MAX_RECORD_BYTES))  # a backfill batch's record: incompressible, the largest allowed
    store.save([Change(key, st, None, NOW + 60_000)])
    entity = store.table.get_entity(*store.keys_of(key))
    used = [name for name in entity if name.startswith("outbox")]
    assert len(used) == -(-len(st.outbox_bytes()) // OUTBOX_PROPERTY_BYTES) > 1
    loaded = store.load([key], NOW)[key]
    assert loaded.state is not None and loaded.state.outbox == st.outbox
    small = loaded.state
    small.outbox = []
    small.add_record(b"tiny")
    store.save([Change(key, small, loaded.token, NOW + 60_000)])
    entity = store.table.get_entity(*store.keys_of(key))
    assert [name for name in entity if name.startswith("outbox")] == ["outbox"]
    again = store.load([key], NOW)[key].state
    assert again is not None and again.outbox == [b"tiny"]


def test_point_reads_of_a_batch_are_in_flight_together() -> None:
    """Each read waits for a second one to arrive: one-at-a-time reads would break the barrier."""
    import threading

    from azure.core.exceptions import ResourceNotFoundError

    class PairedTable:
        def __init__(self, timeout: float) -> None:
            self.barrier = threading.Barrier(2, timeout=timeout)

        def get_entity(self, pk: str, rk: str) -> None:
            self.barrier.wait()
            raise ResourceNotFoundError("absent")

    keys = [GroupKey("R", (f"k{i}",), "t") for i in range(8)]
    store = TableStateStore(PairedTable(timeout=10))  # type: ignore[arg-type]
    assert all(v.state is None and v.token is None for v in store.load(keys, NOW).values())
    sequential = TableStateStore(PairedTable(timeout=0.2), concurrency=1)  # type: ignore[arg-type]
    with pytest.raises(threading.BrokenBarrierError):
        sequential.load(keys, NOW)


def test_a_group_at_both_size_limits_is_one_storable_entity(store: TableStateStore) -> None:
    import random

    from shared.state import MAX_OUTBOX_BYTES, MAX_RECORD_BYTES, MAX_STATE_BYTES, OutboxRecord

    rnd = random.Random(5)
    key = GroupKey("R", ("a", "t"), "t")
    st = state_for(key)
    st.entries = []
    while len(st.to_bytes()) < MAX_STATE_BYTES - 100:  # incompressible: random hashes and values
        st.entries.append([NOW + len(st.entries), rnd.getrandbits(63), rnd.randbytes(8).hex()])
    while True:
        record = OutboxRecord([rnd.getrandbits(63)], [{"blob": rnd.randbytes(2000).hex()}]).encode()
        if len(st.outbox_bytes()) + 4 + len(record) > MAX_OUTBOX_BYTES:
            break
        st.add_record(record)
    assert len(st.outbox_bytes()) > MAX_OUTBOX_BYTES - 5000
    store.save([Change(key, st, None, NOW + 60_000)])
    got = store.load([key], NOW)[key].state
    assert got is not None and got.to_bytes() == st.to_bytes() and got.outbox_bytes() == st.outbox_bytes()
    st.add_record(rnd.randbytes(MAX_RECORD_BYTES))  # then a backfill batch's record of the largest size
    store.save([Change(key, st, store.load([key], NOW)[key].token, NOW + 60_000)])
    got = store.load([key], NOW)[key].state
    assert got is not None and got.outbox_bytes() == st.outbox_bytes() and len(got.outbox_bytes()) > MAX_RECORD_BYTES
