"""The Azure Functions edge: turns Event Hub batches into engine batches, dead-letters bad input.

``function_app.py`` only wires bindings to :func:`get_runtime`; everything testable lives here.
Only infrastructure failures raise (so the trigger's retry policy re-runs the batch); bad records
go to the ``rejected-alerts`` queue with their reason and Event Hub coordinates.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
from azure.core.exceptions import AzureError, ResourceExistsError

from .engine import Clock, Engine, fit_snapshot, to_ms, utc_now
from .errors import StoreError
from .normalize import MAX_RECORD_BYTES, NormalizedEvent, Normalizer, Rejection, Skipped
from .rules import Rule, load_rules
from .settings import Settings, load_settings
from .state import StateStore

log = logging.getLogger("defender_correlator")

MAX_MESSAGE_BYTES = MAX_RECORD_BYTES + 64 * 1024  # Event Hub caps an event at 1 MiB; a little slack for envelopes
MAX_DEAD_LETTER_PREVIEW = 16 * 1024  # raw bytes kept in a dead letter (queue messages max 64 KiB)
MAX_QUEUE_MESSAGE_BYTES = 45 * 1024  # base64 of a queue message (64 KiB max) leaves 48 KiB of payload


class HubEvent(Protocol):
    """What the handler needs of ``func.EventHubEvent``."""

    def get_body(self) -> bytes: ...

    @property
    def sequence_number(self) -> int | None: ...

    @property
    def enqueued_time(self) -> datetime | None: ...

    @property
    def metadata(self) -> dict[str, Any] | None: ...


class DeadLetters(Protocol):
    def send(self, messages: Sequence[str]) -> None:
        """Raises: StoreError when the queue is unreachable."""
        ...


class QueueDeadLetters:
    """Dead letters on an Azure Storage queue (``azure-storage-queue``)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self._ready = False

    def send(self, messages: Sequence[str]) -> None:
        try:
            if not self._ready:
                with contextlib.suppress(ResourceExistsError):
                    self.queue.create_queue()
                self._ready = True
            for message in messages:
                self.queue.send_message(message)
        except AzureError as exc:
            raise StoreError(f"dead-letter queue unreachable: {type(exc).__name__}: {exc}") from exc


def partition_of(events: Sequence[HubEvent]) -> str:
    meta = (events[0].metadata or {}) if events else {}
    context = meta.get("PartitionContext") or {}
    pid = context.get("PartitionId") if isinstance(context, dict) else None
    return str(pid) if pid is not None else "?"


def dead_letter(rejection: Rejection, *, partition: str, sequence: int | None, enqueued: datetime | None) -> str:
    body = {
        "reason": rejection.reason,
        "position": rejection.position,
        "format": rejection.format,
        "field": rejection.field,
        "partition": partition,
        "sequenceNumber": sequence,
        "enqueuedTime": enqueued.isoformat() if enqueued else None,
        "rawPreview": base64.b64encode((rejection.raw or b"")[:MAX_DEAD_LETTER_PREVIEW]).decode(),
    }
    return orjson.dumps(body).decode()


@dataclass
class BatchOutcome:
    incidents: list[str]
    summary: dict[str, Any]


class AlertBatchHandler:
    """Normalize an Event Hub batch, dead-letter the bad records, correlate the rest."""

    def __init__(self, engine: Engine, dead_letters: DeadLetters, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.dead_letters = dead_letters
        self.clock = clock
        self.normalizer = Normalizer(prefilter=engine.could_match)

    def handle(self, events: Sequence[HubEvent]) -> BatchOutcome:
        """Raises: StoreError (infrastructure) so that the trigger's retry policy re-runs the batch."""
        started = time.monotonic()
        partition = partition_of(events)
        arrival = self.clock()
        good: list[NormalizedEvent] = []
        letters: list[str] = []
        records = skipped = 0
        for event in events:
            sequence = event.sequence_number
            position = f"partition {partition} seq {sequence}"
            body = event.get_body()
            items: Any
            if len(body) > MAX_MESSAGE_BYTES:
                items = [Rejection(position, f"event body of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}", raw=body[:256])]
            else:
                items = self.normalizer.from_bytes(body, position, arrival)
            for item in items:
                records += 1
                if type(item) is Skipped:
                    skipped += 1
                elif type(item) is Rejection:
                    letters.append(dead_letter(item, partition=partition, sequence=sequence, enqueued=event.enqueued_time))
                else:
                    good.append(item)
        if letters:
            self.dead_letters.send(letters)  # before any state changes: a failure here retries cleanly
        result = self.engine.process(good)
        counts = result.stats.counts
        summary = {
            "partition": partition,
            "events": len(events),
            "records": records,
            "rejected": len(letters),
            "skipped": skipped,
            "matched": counts["matched"],
            "late": counts["late"],
            "duplicates": counts["duplicates"],
            "groups": counts["groups"],
            "incidentsCreated": counts["incidents_created"],
            "incidentsUpdated": counts["incidents_updated"],
            "storageCalls": counts["storage_calls"],
            "etagConflicts": counts["etag_conflicts"],
            "evicted": counts["evicted"],
            "maxLagSeconds": _lag(events, arrival),
            "durationMs": round((time.monotonic() - started) * 1000, 1),
        }
        log.info("batch_summary %s", orjson.dumps(summary).decode(), extra={"custom_dimensions": summary})
        return BatchOutcome([fit_snapshot(s, MAX_QUEUE_MESSAGE_BYTES).decode() for s in result.incidents], summary)


def _lag(events: Sequence[HubEvent], now: datetime) -> float | None:
    times = [e.enqueued_time for e in events if e.enqueued_time is not None]
    if not times:
        return None
    oldest = min(times)
    if oldest.tzinfo is None:
        return None
    return round((to_ms(now) - to_ms(oldest)) / 1000, 3)


@dataclass
class Runtime:
    """Everything a function invocation needs, built once per worker process."""

    settings: Settings
    rules: list[Rule]
    store: StateStore
    handler: AlertBatchHandler

    def purge(self) -> int:
        deleted = self.store.purge_expired(to_ms(utc_now()))
        log.info("purge_summary %s", orjson.dumps({"deleted": deleted}).decode())
        return deleted


_runtime: Runtime | None = None
_lock = threading.Lock()


def build_runtime(settings: Settings) -> Runtime:
    """Build the Azure-backed runtime: Table state store and dead-letter queue."""
    from azure.data.tables import TableClient
    from azure.storage.queue import QueueClient

    from .table_store import TableStateStore

    rules = load_rules([settings.rules_path()])
    group_by = {r.id: r.group_by for r in rules}
    if settings.storage_connection:
        table = TableClient.from_connection_string(settings.storage_connection, settings.state_table)
        queue = QueueClient.from_connection_string(settings.storage_connection, settings.rejected_queue)
    else:
        from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

        credential: Any = (
            ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
            if settings.managed_identity_client_id
            else DefaultAzureCredential()
        )
        assert settings.table_service_uri and settings.queue_service_uri
        table = TableClient(settings.table_service_uri, settings.state_table, credential=credential)
        queue = QueueClient(settings.queue_service_uri, settings.rejected_queue, credential=credential)
    store = TableStateStore(table, group_by=group_by)
    store.ensure_table()
    engine = Engine(rules, store)
    return Runtime(settings, rules, store, AlertBatchHandler(engine, QueueDeadLetters(queue)))


def get_runtime() -> Runtime:
    """The process-wide runtime, built on first use from the app settings."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(load_settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime (tests, or a host that builds its own)."""
    global _runtime
    with _lock:
        _runtime = runtime


class QueuePoison:
    """Poison messages (with their reason) on an Azure Storage queue."""

    def __init__(self, queue: Any) -> None:
        self.letters = QueueDeadLetters(queue)

    def send(self, message: str) -> None:
        self.letters.send([message])


_forwarder: Any = None


def build_forwarder(env: dict[str, str] | None = None) -> Any:
    """The webhook forwarder from app settings: Table delivery records, poison queue."""
    from azure.data.tables import TableClient
    from azure.storage.queue import QueueClient

    from .settings import load_webhook_settings
    from .webhook import Forwarder, TableDeliveryLog

    hooks = load_webhook_settings(env)
    settings = load_settings(env)
    if settings.storage_connection:
        table = TableClient.from_connection_string(settings.storage_connection, hooks.delivery_table)
        queue = QueueClient.from_connection_string(settings.storage_connection, hooks.poison_queue)
    else:
        from azure.identity import ManagedIdentityCredential

        credential = ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
        assert settings.table_service_uri and settings.queue_service_uri
        table = TableClient(settings.table_service_uri, hooks.delivery_table, credential=credential)
        queue = QueueClient(settings.queue_service_uri, hooks.poison_queue, credential=credential)
    return Forwarder(
        list(hooks.targets), TableDeliveryLog(table), poison=QueuePoison(queue), max_dequeue_count=hooks.max_dequeue_count
    )


def get_forwarder() -> Any:
    global _forwarder
    with _lock:
        if _forwarder is None:
            _forwarder = build_forwarder()
        return _forwarder


def set_forwarder(forwarder: Any) -> None:
    global _forwarder
    with _lock:
        _forwarder = forwarder


_graph: Any = None


@dataclass
class GraphRuntime:
    poller: Any
    tenants: tuple[str, ...]
    close: Any

    def run(self) -> list[Any]:
        results = self.poller.poll_all(self.tenants)
        for r in results:
            log.info("graph_poll_summary %s", orjson.dumps({k: v for k, v in r.__dict__.items()}).decode())
        return list(results)


def build_graph_runtime(env: dict[str, str] | None = None) -> GraphRuntime | None:
    """The Graph poller from app settings, or None when ``GRAPH_TENANTS`` is not configured."""
    from azure.data.tables import TableClient
    from azure.eventhub import EventHubProducerClient

    from .graph import GraphPoller, TableCursorStore, eventhub_publisher
    from .settings import load_graph_settings

    graph = load_graph_settings(env)
    if not graph.tenants:
        return None
    settings = load_settings(env)
    from azure import identity

    def credential_for(tenant: str) -> Any:
        if graph.auth == "client_secret":
            assert graph.client_id and graph.client_secret
            return identity.ClientSecretCredential(tenant, graph.client_id, graph.client_secret.get_secret_value())
        if graph.auth == "certificate":
            assert graph.client_id and graph.certificate_path
            return identity.CertificateCredential(tenant, graph.client_id, certificate_path=graph.certificate_path)
        return identity.ManagedIdentityCredential(client_id=settings.managed_identity_client_id)

    credentials: dict[str, Any] = {}

    def cached(tenant: str) -> Any:
        if tenant not in credentials:
            credentials[tenant] = credential_for(tenant)
        return credentials[tenant]

    if settings.storage_connection:
        table = TableClient.from_connection_string(settings.storage_connection, graph.cursor_table)
    else:
        assert settings.table_service_uri
        table = TableClient(
            settings.table_service_uri,
            graph.cursor_table,
            credential=identity.ManagedIdentityCredential(client_id=settings.managed_identity_client_id),
        )
    if graph.eventhub_connection is not None and "Endpoint=" in graph.eventhub_connection.get_secret_value():
        producer = EventHubProducerClient.from_connection_string(
            graph.eventhub_connection.get_secret_value(), eventhub_name=graph.eventhub_name
        )
    else:
        assert graph.eventhub_namespace
        producer = EventHubProducerClient(
            fully_qualified_namespace=graph.eventhub_namespace,
            eventhub_name=graph.eventhub_name,
            credential=identity.ManagedIdentityCredential(client_id=settings.managed_identity_client_id),
        )
    poller = GraphPoller(cached, TableCursorStore(table), eventhub_publisher(producer), base_url=graph.base_url)
    return GraphRuntime(poller, graph.tenants, producer.close)


def get_graph_runtime() -> GraphRuntime | None:
    global _graph
    with _lock:
        if _graph is None:
            _graph = build_graph_runtime() or False
        return _graph or None
