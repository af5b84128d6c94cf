"""Claim checks: payloads too big for a queue message (64 KiB) go to a blob container, and the
message carries ``{"container": ..., "blob": ...}`` pointing to them.

Blob names are ``<kind>/<yyyy>/<mm>/<dd>/<hint>-<digest of the content>``, so writing the same
payload twice (a retried batch) writes the same blob: puts are idempotent. Kinds in use:
``rejected`` (dead-lettered alert records) and ``poison`` (incident messages the forwarder gave up on).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .errors import CorrelatorError, StoreError

KINDS = ("rejected", "poison")
_HINT = re.compile(r"[^A-Za-z0-9._-]+")


class ClaimMissing(CorrelatorError):
    """A claim check points to a blob that does not exist (deleted, or another container)."""


@dataclass(frozen=True, slots=True)
class ClaimInfo:
    name: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


def claim_name(kind: str, data: bytes, when: datetime, hint: str = "") -> str:
    """Deterministic blob name for ``data``: same content, day and hint -> same name."""
    if kind not in KINDS:
        raise ValueError(f"unknown claim kind {kind!r}; expected one of {', '.join(KINDS)}")
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    safe = _HINT.sub("_", hint)[:80].strip("_")
    day = when.astimezone(timezone.utc).strftime("%Y/%m/%d")
    return f"{kind}/{day}/{safe + '-' if safe else ''}{digest}"


class ClaimStore(Protocol):
    """Where claim-checked payloads live. Implementations: :class:`BlobClaims`, :class:`MemoryClaims`."""

    container: str

    def put(self, name: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        """Write (or overwrite) blob ``name``. Raises: StoreError."""
        ...

    def get(self, name: str) -> bytes:
        """Raises: ClaimMissing when absent; StoreError when the service fails."""
        ...

    def info(self, name: str) -> ClaimInfo:
        """Raises: ClaimMissing when absent; StoreError when the service fails."""
        ...

    def set_metadata(self, name: str, metadata: Mapping[str, str]) -> None:
        """Merge ``metadata`` into the blob's. Raises: ClaimMissing, StoreError."""
        ...

    def list(self, prefix: str = "") -> Iterator[ClaimInfo]:
        """Blobs whose name starts with ``prefix``, in name order. Raises: StoreError."""
        ...


class BlobClaims:
    """Claim checks in an Azure blob container (``azure-storage-blob`` ``ContainerClient``),
    created on first write."""

    def __init__(self, container: Any) -> None:
        self.client = container
        self.container: str = container.container_name
        self._ready = False
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._ready:
            return
        from azure.core.exceptions import ResourceExistsError

        with self._lock:
            if not self._ready:
                with contextlib.suppress(ResourceExistsError):
                    self.client.create_container()
                self._ready = True

    def put(self, name: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        from azure.core.exceptions import AzureError

        try:
            self._ensure()
            self.client.upload_blob(name, data, overwrite=True, metadata=dict(metadata or {}))
        except AzureError as exc:
            raise StoreError(f"claim-check blob {self.container}/{name}: {type(exc).__name__}: {exc}") from exc

    def get(self, name: str) -> bytes:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            return bytes(self.client.download_blob(name).readall())
        except ResourceNotFoundError:
            raise ClaimMissing(f"claim-check blob {self.container}/{name} does not exist") from None
        except AzureError as exc:
            raise StoreError(f"claim-check blob {self.container}/{name}: {type(exc).__name__}: {exc}") from exc

    def info(self, name: str) -> ClaimInfo:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            props = self.client.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            raise ClaimMissing(f"claim-check blob {self.container}/{name} does not exist") from None
        except AzureError as exc:
            raise StoreError(f"claim-check blob {self.container}/{name}: {type(exc).__name__}: {exc}") from exc
        return ClaimInfo(name, int(props.size), dict(props.metadata or {}))

    def set_metadata(self, name: str, metadata: Mapping[str, str]) -> None:
        from azure.core.exceptions import AzureError

        merged = {**self.info(name).metadata, **metadata}
        try:
            self.client.get_blob_client(name).set_blob_metadata(merged)
        except AzureError as exc:
            raise StoreError(f"claim-check blob {self.container}/{name}: {type(exc).__name__}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ClaimInfo]:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            for blob in self.client.list_blobs(name_starts_with=prefix or None, include=["metadata"]):
                yield ClaimInfo(blob.name, int(blob.size), dict(blob.metadata or {}))
        except ResourceNotFoundError:
            return  # no container yet: nothing was ever claim-checked
        except AzureError as exc:
            raise StoreError(f"listing claim-check blobs in {self.container}: {type(exc).__name__}: {exc}") from exc


class MemoryClaims:
    """In-memory claim store (tests, local replay); behaves as :class:`BlobClaims`."""

    def __init__(self, container: str = "deadletters") -> None:
        self.container = container
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.puts = 0
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self.puts += 1
            self.blobs[name] = (bytes(data), dict(metadata or {}))

    def get(self, name: str) -> bytes:
        try:
            return self.blobs[name][0]
        except KeyError:
            raise ClaimMissing(f"claim-check blob {self.container}/{name} does not exist") from None

    def info(self, name: str) -> ClaimInfo:
        try:
            data, meta = self.blobs[name]
        except KeyError:
            raise ClaimMissing(f"claim-check blob {self.container}/{name} does not exist") from None
        return ClaimInfo(name, len(data), dict(meta))

    def set_metadata(self, name: str, metadata: Mapping[str, str]) -> None:
        data, meta = self.blobs[self.info(name).name]
        with self._lock:
            self.blobs[name] = (data, {**meta, **metadata})

    def list(self, prefix: str = "") -> Iterator[ClaimInfo]:
        for name in sorted(self.blobs):
            if name.startswith(prefix):
                data, meta = self.blobs[name]
                yield ClaimInfo(name, len(data), dict(meta))


def claim_ref(store: ClaimStore, name: str) -> dict[str, str]:
    """The pointer a queue message carries."""
    return {"container": store.container, "blob": name}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
