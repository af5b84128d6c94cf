"""The one place that builds Azure Storage clients (Table, Queue, Blob) for the state account.

Locally (Azurite, tests) a connection string (``STATE_STORAGE_CONNECTION``); in Azure the service
URIs (``STATE_STORAGE__tableServiceUri`` / ``__queueServiceUri`` / ``__blobServiceUri``) with the
app's user-assigned managed identity (``AZURE_CLIENT_ID``). No key ever appears in a setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingsError
from .settings import Settings


@dataclass
class StorageClients:
    """Builds clients for named tables, queues and blob containers of one storage account."""

    connection: str | None = None
    table_uri: str | None = None
    queue_uri: str | None = None
    blob_uri: str | None = None
    client_id: str | None = None
    retry_total: int | None = None  # None: the SDK's default (10 retries with backoff); commands use fewer
    _credential: Any = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageClients:
        return cls(
            connection=settings.storage_connection,
            table_uri=settings.table_service_uri,
            queue_uri=settings.queue_service_uri,
            blob_uri=settings.blob_service_uri,
            client_id=settings.managed_identity_client_id,
        )

    @classmethod
    def from_connection_string(cls, connection: str) -> StorageClients:
        return cls(connection=connection)

    def credential(self) -> Any:
        """The managed identity (user-assigned when ``AZURE_CLIENT_ID`` is set), built once."""
        if self._credential is None:
            from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

            self._credential = ManagedIdentityCredential(client_id=self.client_id) if self.client_id else DefaultAzureCredential()
        return self._credential

    def _options(self, storage_retry: Any = None) -> dict[str, Any]:
        """Client options; ``storage_retry`` is the blob or queue SDK's ``ExponentialRetry`` class."""
        if self.retry_total is None:
            return {}
        if storage_retry is not None:  # those SDKs back off from 15 s by default: too slow for a waiting operator
            return {"retry_policy": storage_retry(initial_backoff=1, increment_base=2, retry_total=self.retry_total)}
        return {"retry_total": self.retry_total}

    def _uri(self, uri: str | None, setting: str) -> str:
        if not uri:
            raise SettingsError(f"app setting {setting} is missing (or set STATE_STORAGE_CONNECTION)")
        return uri

    def table(self, name: str) -> Any:
        """A ``TableClient`` for table ``name``."""
        from azure.data.tables import TableClient

        if self.connection:
            with _connection_string():
                return TableClient.from_connection_string(self.connection, name, **self._options())
        uri = self._uri(self.table_uri, "STATE_STORAGE__tableServiceUri")
        return TableClient(uri, name, credential=self.credential(), **self._options())

    def queue(self, name: str, *, base64: bool = False) -> Any:
        """A ``QueueClient`` for queue ``name``; ``base64=True`` encodes messages the way a queue
        trigger with ``messageEncoding: base64`` (our ``host.json``) expects them."""
        from azure.storage.queue import BinaryBase64DecodePolicy, ExponentialRetry, QueueClient, TextBase64EncodePolicy

        policies: dict[str, Any] = (
            {"message_encode_policy": TextBase64EncodePolicy(), "message_decode_policy": BinaryBase64DecodePolicy()}
            if base64
            else {}
        ) | self._options(ExponentialRetry)
        if self.connection:
            with _connection_string():
                return QueueClient.from_connection_string(self.connection, name, **policies)
        uri = self._uri(self.queue_uri, "STATE_STORAGE__queueServiceUri")
        return QueueClient(uri, name, credential=self.credential(), **policies)

    def container(self, name: str) -> Any:
        """A blob ``ContainerClient`` for container ``name``."""
        from azure.storage.blob import ContainerClient, ExponentialRetry

        if self.connection:
            with _connection_string():
                return ContainerClient.from_connection_string(self.connection, name, **self._options(ExponentialRetry))
        uri = self._uri(self.blob_uri, "STATE_STORAGE__blobServiceUri")
        return ContainerClient(uri, name, credential=self.credential(), **self._options(ExponentialRetry))


@contextlib.contextmanager
def _connection_string() -> Iterator[None]:
    """The SDKs raise a bare ValueError for a malformed connection string: name the setting instead
    (never its value, which holds the account key)."""
    try:
        yield
    except ValueError:
        raise SettingsError("app setting STATE_STORAGE_CONNECTION: not a storage connection string") from None
