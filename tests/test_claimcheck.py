"""Claim checks and the storage client factory: the same contract on Azurite blobs and in memory."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from azure.core.exceptions import ResourceNotFoundError

from shared.claimcheck import BlobClaims, ClaimMissing, ClaimStore, MemoryClaims, claim_name, claim_ref
from shared.clients import StorageClients
from shared.errors import SettingsError, StoreError
from shared.settings import load_settings

WHEN = datetime(2026, 11, 28, 23, 59, tzinfo=timezone.utc)


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def claims(request: pytest.FixtureRequest) -> Iterator[ClaimStore]:
    if request.param == "memory":
        yield MemoryClaims("deadletters")
        return
    azurite = request.getfixturevalue("azurite")
    name = "c" + hashlib.blake2b(request.node.nodeid.encode(), digest_size=8).hexdigest()
    container = StorageClients.from_connection_string(azurite.connection_string).container(name)
    yield BlobClaims(container)
    with contextlib.suppress(ResourceNotFoundError):  # a test that never wrote created no container
        container.delete_container()


def test_a_payload_of_one_mebibyte_comes_back_byte_for_byte(claims: ClaimStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    name = claim_name("rejected", data, WHEN, "p0-s42")
    claims.put(name, data, {"records": "1"})
    assert claims.get(name) == data
    info = claims.info(name)
    assert (info.size, info.metadata["records"]) == (len(data), "1")


def test_the_same_payload_twice_is_one_blob(claims: ClaimStore) -> None:
    data = b'{"a": 1}'
    first = claim_name("poison", data, WHEN, "inc-1 r2")
    second = claim_name("poison", data, WHEN, "inc-1 r2")
    claims.put(first, data)
    claims.put(second, data)
    assert first == second
    assert [i.name for i in claims.list("poison/")] == [first]


def test_listing_filters_by_kind_prefix(claims: ClaimStore) -> None:
    claims.put(claim_name("rejected", b"r", WHEN), b"r")
    claims.put(claim_name("poison", b"p", WHEN), b"p")
    assert [i.name.split("/")[0] for i in claims.list("rejected/")] == ["rejected"]
    assert len(list(claims.list())) == 2


def test_metadata_is_merged_not_replaced(claims: ClaimStore) -> None:
    name = claim_name("rejected", b"x", WHEN)
    claims.put(name, b"x", {"records": "3"})
    claims.set_metadata(name, {"resentAt": "2026-11-28T00:00:00Z"})
    assert claims.info(name).metadata == {"records": "3", "resentAt": "2026-11-28T00:00:00Z"}


def test_a_missing_claim_is_named(claims: ClaimStore) -> None:
    with pytest.raises(ClaimMissing, match="rejected/2026/none"):
        claims.get("rejected/2026/none")


def test_listing_a_container_never_written_is_empty() -> None:
    assert list(MemoryClaims().list()) == []


@pytest.mark.azurite
def test_listing_an_absent_azure_container_is_empty(azurite: object) -> None:
    container = StorageClients.from_connection_string(azurite.connection_string).container("neverwritten")  # type: ignore[attr-defined]
    assert list(BlobClaims(container).list("rejected/")) == []


def test_claim_names_are_dated_safe_and_content_addressed() -> None:
    name = claim_name("rejected", b"body", WHEN, "partition 0/seq 7?#")
    kind, year, month, day, leaf = name.split("/")
    assert (kind, year, month, day) == ("rejected", "2026", "11", "28")
    assert leaf.startswith("partition_0_seq_7-")
    assert claim_name("rejected", b"other", WHEN, "partition 0/seq 7?#") != name
    with pytest.raises(ValueError, match="unknown claim kind"):
        claim_name("other", b"", WHEN)


def test_an_unreachable_blob_service_is_a_store_error() -> None:
    conn = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
        + base64.b64encode(b"k" * 64).decode()
        + ";BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    claims = BlobClaims(StorageClients.from_connection_string(conn).container("deadletters"))
    claims.client._config.retry_policy.total_retries = 0
    with pytest.raises(StoreError, match="claim-check blob deadletters/rejected/x"):
        claims.put("rejected/x", b"x")


def test_claim_ref_names_container_and_blob() -> None:
    assert claim_ref(MemoryClaims("dl"), "poison/a") == {"container": "dl", "blob": "poison/a"}


# -- the client factory ------------------------------------------------------------------------


@pytest.mark.azurite
def test_one_connection_string_builds_table_queue_and_blob_clients_on_azurite(azurite: object) -> None:
    clients = StorageClients.from_connection_string(azurite.connection_string)  # type: ignore[attr-defined]
    table = clients.table("factorytable")
    table.create_table()
    table.create_entity({"PartitionKey": "p", "RowKey": "r", "v": 1})
    assert table.get_entity("p", "r")["v"] == 1
    table.delete_table()
    queue = clients.queue("factory-queue", base64=True)
    queue.create_queue()
    queue.send_message('{"incidentId": "inc-1"}')
    raw = clients.queue("factory-queue").receive_message()
    assert base64.b64decode(raw.content) == b'{"incidentId": "inc-1"}'  # what a base64 queue trigger decodes
    queue.delete_queue()
    container = clients.container("factorycontainer")
    container.create_container()
    container.upload_blob("a", b"x")
    assert container.download_blob("a").readall() == b"x"
    container.delete_container()


def test_in_azure_each_client_uses_its_service_uri_and_the_managed_identity() -> None:
    settings = load_settings(
        {
            "ALERTS_EVENTHUB_NAME": "alerts",
            "STATE_STORAGE__tableServiceUri": "https://acct.table.core.windows.net",
            "STATE_STORAGE__queueServiceUri": "https://acct.queue.core.windows.net",
            "STATE_STORAGE__blobServiceUri": "https://acct.blob.core.windows.net",
            "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
        }
    )
    clients = StorageClients.from_settings(settings)
    from azure.identity import ManagedIdentityCredential

    assert isinstance(clients.credential(), ManagedIdentityCredential)
    assert clients.table("state").url.startswith("https://acct.table.core.windows.net")
    assert clients.queue("rejected-alerts").url == "https://acct.queue.core.windows.net/rejected-alerts"
    assert clients.container("deadletters").url == "https://acct.blob.core.windows.net/deadletters"
    assert clients.table("a").credential is clients.queue("b").credential  # one identity, built once


def test_identity_based_storage_needs_the_blob_uri_too() -> None:
    with pytest.raises(SettingsError, match="STATE_STORAGE__blobServiceUri"):
        load_settings(
            {
                "ALERTS_EVENTHUB_NAME": "alerts",
                "STATE_STORAGE__tableServiceUri": "https://acct.table.core.windows.net",
                "STATE_STORAGE__queueServiceUri": "https://acct.queue.core.windows.net",
            }
        )


def test_a_missing_service_uri_is_named() -> None:
    with pytest.raises(SettingsError, match="STATE_STORAGE__blobServiceUri"):
        StorageClients(table_uri="https://acct.table.core.windows.net").container("deadletters")


def test_the_dead_letter_container_defaults_and_is_validated() -> None:
    base = {"ALERTS_EVENTHUB_NAME": "a", "STATE_STORAGE_CONNECTION": "UseDevelopmentStorage=true"}
    assert load_settings(base).deadletter_container == "deadletters"
    with pytest.raises(SettingsError, match="DEADLETTER_CONTAINER"):
        load_settings({**base, "DEADLETTER_CONTAINER": "Bad_Name"})
