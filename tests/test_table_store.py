"""The Azure Table store passes the same contract as the in-memory store, against Azurite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.data.tables import TableClient

from shared.errors import StoreError
from shared.state import Change, GroupKey
from shared.table_store import TableStateStore

from .conftest import Azurite
from .store_contract import NOW, StoreContract, state_for

pytestmark = pytest.mark.azurite


@pytest.fixture
def store(azurite: Azurite, table_name: str) -> Iterator[TableStateStore]:
    s = TableStateStore.from_connection_string(
        azurite.connection_string, table_name, group_by={"R": ("alertName", "alertIdStr", "tenantId")}
    )
    s.ensure_table()
    yield s
    s.table.delete_table()


class TestTableStore(StoreContract):
    pass


def test_expires_at_is_written_as_int64(store: TableStateStore) -> None:
    key = GroupKey("R", ("a", "b", "t"))
    store.save([Change(key, state_for(key), None, NOW + 1)])
    pk, rk = store.keys_of(key)
    entity = store.table.get_entity(pk, rk)
    assert entity["expiresAt"].value == NOW + 1 if hasattr(entity["expiresAt"], "value") else entity["expiresAt"] == NOW + 1


def test_tenant_is_in_the_partition_key_and_forbidden_characters_are_escaped(store: TableStateStore) -> None:
    pk_a, rk_a = store.keys_of(GroupKey("R", ("n", "id", "Tenant/A#?")))
    pk_b, _ = store.keys_of(GroupKey("R", ("n", "id", "tenant-b")))
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
