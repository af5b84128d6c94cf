"""Azure Table Storage state store (``azure-data-tables``): the production StateStore.

* One entity per (rule, tenant, group key). ``RowKey`` is a hash of the case-folded key (so no
  forbidden character or size limit can bite); the readable values stay as properties.
  ``PartitionKey`` holds the rule id, the tenant (every key carries one) and a shard, so a tenant's
  groups spread over partitions but never mix with another tenant's.
* The entity holds the group state (``state``, at most 60 KiB) and its outbox (``outbox``, the
  snapshots its recent batches emitted: 56 KiB of earlier batches plus the newest batch's record,
  spread over ``outbox``, ``outbox1``, ... up to 8 properties of 63 KiB): all in one conditional write,
  so what a batch emits is recorded exactly when its state is. ``version`` is the state encoding version.
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, TableClient, TableTransactionError, UpdateMode

from .errors import StoreError
from .state import OUTBOX_PROPERTIES, OUTBOX_PROPERTY_BYTES, STATE_VERSION, Change, GroupKey, GroupState, KeysConflict, Loaded

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SHARDS = 16  # partitions per (rule, tenant): spreads load over Table's per-partition limit
PROGRESS_PARTITION = "~progress"  # hub partitions' event-time progress (rule ids never start with "~")
MAX_KEY_PART = 200  # chars of a readable key part before it is hashed (keys are capped at 1 KiB)
MAX_READABLE_PROPERTY = 4000  # chars of the readable group values kept beside the state
TRANSACTION_LIMIT = 100  # entities per entity-group transaction
MAX_TRANSACTION_BYTES = 3 << 20  # a transaction's payload is capped at 4 MiB; room left for the envelope
MAX_CONCURRENCY = 16  # requests in flight per store (point reads, one transaction per partition)
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

    def __init__(self, table: TableClient, *, concurrency: int = MAX_CONCURRENCY, transactions: bool = True):
        """``concurrency=1, transactions=False`` is the one-call-at-a-time baseline the benchmark
        compares against."""
        self.table = table
        self.calls = {"load": 0, "save": 0, "purge": 0}
        self._pool: ThreadPoolExecutor | None = None
        self.concurrency = concurrency
        self.transactions = transactions

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

    def keys_of(self, key: GroupKey) -> tuple[str, str]:
        row = _digest(key.text)
        shard = int(row[:4], 16) % SHARDS
        return f"{_escape(key.rule_id)}~{_escape(key.tenant.lower())}~{shard:02d}", row

    # -- StateStore ---------------------------------------------------------------------------

    def _parallel(self, jobs: Sequence[Callable[[], _T]]) -> list[_T]:
        """Run ``jobs`` with at most ``MAX_CONCURRENCY`` in flight; the first exception propagates."""
        if len(jobs) <= 1 or self.concurrency <= 1:
            return [job() for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="table-store")
        return list(self._pool.map(lambda job: job(), jobs))

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        """Point reads, ``MAX_CONCURRENCY`` at a time (a burst of new groups is a few round trips
        of latency, not one per group)."""
        self.calls["load"] += 1
        loaded = self._parallel([lambda key=key: self._load_one(key, now_ms) for key in keys])  # type: ignore[misc]
        return dict(zip(keys, loaded, strict=True))

    def _load_one(self, key: GroupKey, now_ms: int) -> Loaded:
        pk, rk = self.keys_of(key)
        try:
            entity = self.table.get_entity(pk, rk)
        except ResourceNotFoundError:
            return Loaded(None, None)
        except AzureError as exc:
            raise StoreError(f"loading state of {key.rule_id}: {type(exc).__name__}: {exc}") from exc
        etag = entity.metadata["etag"]
        expires = _int(entity.get("expiresAt"))
        if expires <= now_ms:
            return Loaded(None, etag)
        return Loaded(GroupState.decode(bytes(entity["state"]), _outbox(entity)), etag)

    def save(self, changes: Sequence[Change]) -> None:
        """Conditional writes grouped into one entity-group transaction per partition key (up to
        ``TRANSACTION_LIMIT`` entities / ``MAX_TRANSACTION_BYTES``), partitions written
        concurrently. A transaction is atomic: when one of its writes loses its ETag (or its
        create finds the entity), none is applied and that chunk is redone entity by entity, so
        exactly the changed keys are reported as conflicts."""
        self.calls["save"] += 1
        ops: dict[str, list[tuple[Change, Any]]] = defaultdict(list)
        for change in changes:
            pk, rk = self.keys_of(change.key)
            if change.state is None:
                if change.token is not None:
                    ops[pk].append((change, ("delete", {"PartitionKey": pk, "RowKey": rk}, _if_match(change.token))))
            elif change.token is None:
                ops[pk].append((change, ("create", self._entity(pk, rk, change))))
            else:
                ops[pk].append(
                    (change, ("update", self._entity(pk, rk, change), {"mode": UpdateMode.REPLACE, **_if_match(change.token)}))
                )
        chunks = [chunk for partition in ops.values() for chunk in _chunks(partition)]
        results = self._parallel([lambda chunk=chunk: self._write_chunk(chunk) for chunk in chunks])  # type: ignore[misc]
        conflicts = [key for lost in results for key in lost]
        if conflicts:
            raise KeysConflict(conflicts)

    def _write_chunk(self, chunk: list[tuple[Change, Any]]) -> list[GroupKey]:
        """Write one partition's chunk; returns the keys that lost to another writer."""
        if len(chunk) > 1 and self.transactions:
            try:
                self.table.submit_transaction([op for _, op in chunk])
                return []
            except TableTransactionError:
                pass  # atomic: nothing was written; find the conflicting entities one by one
            except AzureError as exc:
                raise StoreError(f"saving state of {chunk[0][0].key.rule_id}: {type(exc).__name__}: {exc}") from exc
        lost: list[GroupKey] = []
        for change, op in chunk:
            try:
                if op[0] == "delete":
                    self.table.delete_entity(op[1]["PartitionKey"], op[1]["RowKey"], **op[2])
                elif op[0] == "create":
                    self.table.create_entity(op[1])
                else:
                    self.table.update_entity(op[1], **op[2])
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                lost.append(change.key)
            except AzureError as exc:
                raise StoreError(f"saving state of {change.key.rule_id}: {type(exc).__name__}: {exc}") from exc
        return lost

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
        entity = {
            "PartitionKey": pk,
            "RowKey": rk,
            "ruleId": change.key.rule_id,
            "groupValues": readable[:MAX_READABLE_PROPERTY],
            "version": STATE_VERSION,
            "state": change.state.encode(),
            "expiresAt": EntityProperty(change.expires_at, EdmType.INT64),
        }
        entity.update(_outbox_properties(change.state.outbox_bytes()))
        if change.due_at is not None:  # absent otherwise, so the due query never lists the group
            entity["dueAt"] = EntityProperty(change.due_at, EdmType.INT64)
        return entity

    def load_due(self, progress_ms: int, now_ms: int, limit: int) -> dict[GroupKey, Loaded]:
        """States with ``dueAt <= progress_ms`` (a filtered query over the table; only groups with a
        pending absence or quiet-period clear carry ``dueAt``)."""
        self.calls["load"] += 1
        out: dict[GroupKey, Loaded] = {}
        try:
            entities = self.table.query_entities(
                "dueAt le @progress and expiresAt gt @now",
                parameters={"progress": progress_ms, "now": now_ms},
                select=["state", *OUTBOX_NAMES],
                results_per_page=min(limit, 1000),
            )
            for entity in entities:
                state = GroupState.decode(bytes(entity["state"]), _outbox(entity))
                out[state.key] = Loaded(state, entity.metadata["etag"])
                if len(out) >= limit:
                    break
        except AzureError as exc:
            raise StoreError(f"loading due state: {type(exc).__name__}: {exc}") from exc
        return out

    def save_progress(self, partition: str, event_ms: int, wall_ms: int) -> None:
        """One small entity per hub partition (``PartitionKey`` ``~progress``), outside every rule's
        partitions; it has no ``expiresAt`` or ``dueAt``, so purge and the due query never see it."""
        entity = {
            "PartitionKey": PROGRESS_PARTITION,
            "RowKey": _escape(partition),
            "partition": partition,
            "eventMs": EntityProperty(event_ms, EdmType.INT64),
            "wallMs": EntityProperty(wall_ms, EdmType.INT64),
        }
        try:
            self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)
        except AzureError as exc:
            raise StoreError(f"saving partition progress: {type(exc).__name__}: {exc}") from exc

    def load_progress(self) -> dict[str, tuple[int, int]]:
        try:
            entities = self.table.query_entities("PartitionKey eq @pk", parameters={"pk": PROGRESS_PARTITION})
            return {str(e["partition"]): (_int(e.get("eventMs")), _int(e.get("wallMs"))) for e in entities}
        except AzureError as exc:
            raise StoreError(f"loading partition progress: {type(exc).__name__}: {exc}") from exc


OUTBOX_NAMES = ["outbox", *(f"outbox{i}" for i in range(1, OUTBOX_PROPERTIES))]


def _outbox_properties(outbox: bytes) -> dict[str, bytes]:
    """The outbox over as many binary properties as it needs (``outbox``, ``outbox1``, ...), each within
    Table's 64 KiB; a write replaces the entity, so properties a shorter outbox leaves unused vanish."""
    if len(outbox) > OUTBOX_PROPERTIES * OUTBOX_PROPERTY_BYTES:  # add_record and the engine keep it within
        raise ValueError(f"outbox of {len(outbox)} bytes exceeds {OUTBOX_PROPERTIES} properties")
    return {
        OUTBOX_NAMES[i // OUTBOX_PROPERTY_BYTES]: outbox[i : i + OUTBOX_PROPERTY_BYTES]
        for i in range(0, len(outbox), OUTBOX_PROPERTY_BYTES)
    }


def _outbox(entity: Any) -> bytes:
    return b"".join(bytes(entity[name]) for name in OUTBOX_NAMES if entity.get(name))


def _if_match(token: Any) -> dict[str, Any]:
    return {"etag": token, "match_condition": MatchConditions.IfNotModified}


def _chunks(ops: list[tuple[Change, Any]]) -> Iterator[list[tuple[Change, Any]]]:
    """Split one partition's writes into transactions within Table's count and size limits."""
    chunk: list[tuple[Change, Any]] = []
    size = 0
    for item in ops:
        entity = item[1][1]
        binary = len(entity.get("state", b"")) + sum(len(entity.get(name, b"")) for name in OUTBOX_NAMES)
        # binary goes as base64; text as JSON with every non-ASCII character escaped (12 bytes outside the BMP)
        item_size = binary * 4 // 3 + len(entity.get("groupValues", "")) * 12 + 1024
        if chunk and (len(chunk) >= TRANSACTION_LIMIT or size + item_size > MAX_TRANSACTION_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


def _int(value: Any) -> int:
    if isinstance(value, EntityProperty):
        return int(value.value)
    return int(value) if value is not None else 0
