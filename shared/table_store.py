"""Azure Table Storage state store (``azure-data-tables``): the production StateStore.

* One entity per (rule, group key). ``RowKey`` is a hash of the case-folded key (so no forbidden
  character or size limit can bite); the readable values stay as properties. ``PartitionKey`` holds
  the rule id, the tenant (when the rule groups by ``tenantId``) and a shard, so a tenant's groups
  spread over partitions but never mix with another tenant's.
* Optimistic concurrency: reads return the ETag; writes are ``create_entity`` (new group) or
  ``update_entity(..., match_condition=IfNotModified)``; never ``upsert_entity``.
* TTL: every entity carries ``expiresAt`` (Int64 epoch ms); reads ignore expired entities and
  ``purge_expired`` deletes them page by page, in per-partition transactions.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, TableClient, TableTransactionError, UpdateMode

from .errors import StoreError
from .state import Change, GroupKey, GroupState, KeysConflict, Loaded

log = logging.getLogger(__name__)

SHARDS = 16  # partitions per (rule, tenant): spreads load over Table's per-partition limit
MAX_KEY_PART = 200  # chars of a readable key part before it is hashed (keys are capped at 1 KiB)
MAX_READABLE_PROPERTY = 4000  # chars of the readable group values kept beside the state
TRANSACTION_LIMIT = 100  # entities per entity-group transaction
_FORBIDDEN = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f%]")


def _escape(part: str) -> str:
    """Percent-escape characters Table keys forbid; hash parts that are too long."""
    escaped = _FORBIDDEN.sub(lambda m: f"%{ord(m.group(0)):02X}", part)
    if len(escaped) > MAX_KEY_PART:
        return "h-" + hashlib.blake2b(part.encode(), digest_size=16).hexdigest()
    return escaped


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class TableStateStore:
    """StateStore on one Azure table. Failures of the service surface as :class:`StoreError`."""

    def __init__(self, table: TableClient, *, tenant_attr: str = "tenantId", group_by: dict[str, tuple[str, ...]] | None = None):
        self.table = table
        self.tenant_attr = tenant_attr
        self.group_by = group_by or {}  # rule id -> group-by attributes, to find the tenant value
        self.calls = {"load": 0, "save": 0, "purge": 0}

    @classmethod
    def from_connection_string(cls, conn: str, table_name: str, **kw: Any) -> TableStateStore:
        return cls(TableClient.from_connection_string(conn, table_name), **kw)

    def ensure_table(self) -> None:
        try:
            self.table.create_table()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise StoreError(f"cannot create table {self.table.table_name}: {exc}") from exc

    # -- keys ---------------------------------------------------------------------------------

    def _tenant(self, key: GroupKey) -> str:
        attrs = self.group_by.get(key.rule_id, ())
        for attr, value in zip(attrs, key.norm, strict=False):
            if attr == self.tenant_attr:
                return value
        return ""

    def keys_of(self, key: GroupKey) -> tuple[str, str]:
        row = _digest(key.text)
        shard = int(row[:4], 16) % SHARDS
        return f"{_escape(key.rule_id)}~{_escape(self._tenant(key))}~{shard:02d}", row

    # -- StateStore ---------------------------------------------------------------------------

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        self.calls["load"] += 1
        out: dict[GroupKey, Loaded] = {}
        for key in keys:
            pk, rk = self.keys_of(key)
            try:
                entity = self.table.get_entity(pk, rk)
            except ResourceNotFoundError:
                out[key] = Loaded(None, None)
                continue
            except AzureError as exc:
                raise StoreError(f"loading state of {key.rule_id}: {type(exc).__name__}: {exc}") from exc
            etag = entity.metadata["etag"]
            expires = _int(entity.get("expiresAt"))
            if expires <= now_ms:
                out[key] = Loaded(None, etag)
                continue
            out[key] = Loaded(GroupState.from_bytes(bytes(entity["state"])), etag)
        return out

    def save(self, changes: Sequence[Change]) -> None:
        self.calls["save"] += 1
        conflicts: list[GroupKey] = []
        for change in changes:
            pk, rk = self.keys_of(change.key)
            try:
                if change.state is None:
                    if change.token is not None:
                        self.table.delete_entity(pk, rk, etag=change.token, match_condition=MatchConditions.IfNotModified)
                    continue
                entity = self._entity(pk, rk, change)
                if change.token is None:
                    self.table.create_entity(entity)
                else:
                    self.table.update_entity(
                        entity, mode=UpdateMode.REPLACE, etag=change.token, match_condition=MatchConditions.IfNotModified
                    )
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                conflicts.append(change.key)
            except AzureError as exc:
                raise StoreError(f"saving state of {change.key.rule_id}: {type(exc).__name__}: {exc}") from exc
        if conflicts:
            raise KeysConflict(conflicts)

    def purge_expired(self, now_ms: int) -> int:
        """Delete expired entities, a page at a time, in per-partition transactions (ETag-guarded,
        so a group revived since the query is kept)."""
        self.calls["purge"] += 1
        deleted = 0
        try:
            pages = self.table.query_entities(
                "expiresAt le @now",
                parameters={"now": now_ms},
                select=["PartitionKey", "RowKey"],
                results_per_page=1000,
            ).by_page()
            for page in pages:
                by_partition: dict[str, list[Any]] = defaultdict(list)
                for entity in page:
                    by_partition[entity["PartitionKey"]].append(entity)
                for entities in by_partition.values():
                    for i in range(0, len(entities), TRANSACTION_LIMIT):
                        deleted += self._delete_chunk(entities[i : i + TRANSACTION_LIMIT])
        except AzureError as exc:
            raise StoreError(f"purging expired state: {type(exc).__name__}: {exc}") from exc
        return deleted

    def _delete_chunk(self, entities: list[Any]) -> int:
        ops: list[Any] = [
            ("delete", e, {"etag": e.metadata["etag"], "match_condition": MatchConditions.IfNotModified}) for e in entities
        ]
        try:
            self.table.submit_transaction(ops)
            return len(entities)
        except TableTransactionError:
            # One entity changed (or vanished) since the query: delete the rest one by one.
            count = 0
            for e in entities:
                try:
                    self.table.delete_entity(e, etag=e.metadata["etag"], match_condition=MatchConditions.IfNotModified)
                    count += 1
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
            return count

    @staticmethod
    def _entity(pk: str, rk: str, change: Change) -> dict[str, Any]:
        assert change.state is not None
        readable = "\x1f".join(change.state.key.values)
        return {
            "PartitionKey": pk,
            "RowKey": rk,
            "ruleId": change.key.rule_id,
            "groupValues": readable[:MAX_READABLE_PROPERTY],
            "state": change.state.to_bytes(),
            "expiresAt": EntityProperty(change.expires_at, EdmType.INT64),
        }


def _int(value: Any) -> int:
    if isinstance(value, EntityProperty):
        return int(value.value)
    return int(value) if value is not None else 0
