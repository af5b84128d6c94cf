"""The Azure Functions edge: turns Event Hub batches into engine batches, dead-letters bad input.

``function_app.py`` only wires bindings to :func:`get_runtime`; everything testable lives here.

The invariant: for any bytes in any event and any batch shape, :meth:`AlertBatchHandler.handle`
either completes or raises an infrastructure error (storage, network: the trigger's retry policy
re-runs the batch). Every record it does not count is dead-lettered, whole, with its reason. The
per-record boundary is :meth:`AlertBatchHandler._guarded` (parsers) and
:meth:`AlertBatchHandler._process` (engine): any other exception becomes that record's rejection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson
from azure.core.exceptions import AzureError, ResourceExistsError

from .claimcheck import ClaimStore, MemoryClaims, claim_name, claim_ref
from .deadletters import DeadLetterWriter, Origin, cap, letter
from .engine import BatchResult, Clock, Engine, Stats, fit_snapshot, to_ms, utc_now
from .errors import StoreError
from .normalize import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_SKEW_S,
    MAX_RECORD_BYTES,
    Item,
    NormalizedEvent,
    Normalizer,
    Rejection,
    Skipped,
    raw_json,
)
from .rules import Rule, load_rules
from .settings import Settings, load_settings
from .snapshot import Snapshot
from .state import StateStore

log = logging.getLogger("defender_correlator")

MAX_MESSAGE_BYTES = MAX_RECORD_BYTES  # Event Hub caps an event at 1 MiB; a bigger body is one record too many
ABSENCE_GRACE_S = 300  # event-time progress is held this far back (Defender's delivery delay)
PARTITION_IDLE_S = 300  # a hub partition silent this long no longer holds event-time progress back
MAX_QUEUE_MESSAGE_BYTES = 45 * 1024  # base64 of a queue message (64 KiB max) leaves 48 KiB of payload
# Failures a retry of the batch may fix. Everything else raised while handling a record is about
# that record (a bug in a parser or in per-event engine code) and becomes its rejection.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (StoreError, AzureError, OSError, MemoryError)


class HubEvent(Protocol):
    """What the handler needs of ``func.EventHubEvent``."""

    def get_body(self) -> bytes: ...

    @property
    def sequence_number(self) -> int | None: ...

    @property
    def enqueued_time(self) -> datetime | None: ...

    @property
    def metadata(self) -> Mapping[str, Any] | None: ...


class DeadLetters(Protocol):
    def send(self, messages: Sequence[str]) -> None:
        """Raises: StoreError when the queue is unreachable."""
        ...


class QueueDeadLetters:
    """Messages on an Azure Storage queue (``azure-storage-queue``), created on first use."""

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
            raise StoreError(f"queue {self.queue.queue_name} unreachable: {type(exc).__name__}: {exc}") from exc


def partition_of(events: Sequence[HubEvent]) -> str:
    meta = (events[0].metadata or {}) if events else {}
    context = meta.get("PartitionContext") or {}
    pid = context.get("PartitionId") if isinstance(context, dict) else None
    return str(pid) if pid is not None else "?"


@dataclass
class BatchOutcome:
    incidents: list[str]
    summary: dict[str, Any]


class AlertBatchHandler:
    """Normalize an Event Hub batch, correlate the good records, dead-letter the rest."""

    def __init__(
        self,
        engine: Engine,
        dead_letters: DeadLetters,
        clock: Clock = utc_now,
        *,
        claims: ClaimStore | None = None,
        max_skew_s: int | None = None,
        max_age_s: int | None = None,
    ) -> None:
        self.engine = engine
        self.writer = DeadLetterWriter(dead_letters, claims if claims is not None else MemoryClaims())
        self.clock = clock
        self.normalizer = Normalizer(
            prefilter=engine.could_match,
            max_skew_s=DEFAULT_MAX_SKEW_S if max_skew_s is None else max_skew_s,
            max_age_s=DEFAULT_MAX_AGE_S if max_age_s is None else max_age_s,
            evidence_columns=bool(engine.evidence_rules),  # else AlertEvidence rows only feed the join
        )

    def handle(self, events: Sequence[HubEvent]) -> BatchOutcome:
        """Raises: only infrastructure errors (StoreError, AzureError, OSError), so that the
        trigger's retry policy re-runs the batch; a retry is safe (counted events are recognised,
        dead-letter blobs are content-addressed)."""
        started = time.monotonic()
        partition = partition_of(events)
        arrival = self.clock()
        good: list[tuple[NormalizedEvent, Origin]] = []
        letters: list[dict[str, Any]] = []
        records = skipped = 0
        enqueued = [_as_utc(e.enqueued_time) for e in events]
        for event, enqueued_time in zip(events, enqueued, strict=True):
            sequence = event.sequence_number
            origin = Origin(partition, sequence, enqueued_time)
            position = f"partition {partition} seq {sequence}"
            body = event.get_body()
            for item in self._guarded(body, position, arrival):
                records += 1
                if type(item) is Skipped:
                    skipped += 1
                elif type(item) is Rejection:
                    letters.append(letter(item, origin))
                else:
                    good.append((item, origin))  # type: ignore[arg-type]
        parser_rejected = len(letters)
        result = self._process(good, letters)
        if good and self.engine.timed:  # this partition's event-time progress, for the absence timer
            newest = max(to_ms(e.event_time) for e, _ in good)
            self.engine.store.save_progress(partition, newest, to_ms(arrival))
        # after the engine: a failure re-runs an idempotent batch. The blob's day is the batch's first
        # enqueued time, part of the events themselves, so a retry after midnight names the same blob
        known = [t for t in enqueued if t is not None]
        self.writer.write(letters, when=min(known) if known else arrival)
        counts = result.stats.counts
        summary = {
            "partition": partition,
            "events": len(events),
            "records": records,
            "accepted": len(good) - (len(letters) - parser_rejected),  # records: accepted + rejected + skipped
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
            "maxLagSeconds": _lag(known, arrival),
            "durationMs": round((time.monotonic() - started) * 1000, 1),
        }
        log.info("batch_summary %s", orjson.dumps(summary).decode(), extra={"custom_dimensions": summary})
        return BatchOutcome([fit_snapshot(s, MAX_QUEUE_MESSAGE_BYTES).decode() for s in result.incidents], summary)

    def _guarded(self, body: bytes, position: str, arrival: datetime) -> Iterator[Item]:
        """The parser side of the per-record boundary: every item of one event body, and a
        rejection of the body's remainder (named after the exception) if the parser breaks."""
        if len(body) > MAX_MESSAGE_BYTES:
            yield Rejection(position, f"event body of {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte cap", raw=body)
            return
        try:
            yield from self.normalizer.from_bytes(body, position, arrival)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            log.exception("normalizer failed on %s", position)
            yield Rejection(position, f"normalizer failed ({type(exc).__name__}: {cap(str(exc), 200)})", raw=body)

    def _process(self, good: list[tuple[NormalizedEvent, Origin]], letters: list[dict[str, Any]]) -> BatchResult:
        """The engine side of the boundary: when processing fails for a reason other than the
        infrastructure, halve the batch until the records that fail it are found, and reject
        them (engine batches are retry-safe, so re-processing the halves is harmless)."""
        try:
            return self.engine.process([e for e, _ in good])
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            if len(good) == 1:
                event, origin = good[0]
                log.exception("engine failed on %s", event.position)
                reason = f"engine failed on this record ({type(exc).__name__}: {cap(str(exc), 200)})"
                letters.append(letter(Rejection(event.position, reason, event.format, raw=raw_json(event.raw)), origin))
                return BatchResult([], Stats())
        mid = len(good) // 2
        first, second = self._process(good[:mid], letters), self._process(good[mid:], letters)
        first.stats += second.stats
        return BatchResult(first.incidents + second.incidents, first.stats)


def _as_utc(ts: datetime | None) -> datetime | None:
    """An enqueued time as an aware UTC time: the Functions library gives a naive one for a host time
    without a zone (read as UTC) and an aware one otherwise, and one batch may hold both."""
    return ts.replace(tzinfo=timezone.utc) if ts is not None and ts.tzinfo is None else ts


def _lag(enqueued: Sequence[datetime], now: datetime) -> float | None:
    if not enqueued:
        return None
    return round((to_ms(now) - to_ms(min(enqueued))) / 1000, 3)


@dataclass
class Runtime:
    """Everything a function invocation needs, built once per worker process."""

    settings: Settings
    rules: list[Rule]
    store: StateStore
    handler: AlertBatchHandler
    incidents: DeadLetters | None = None  # the incidents queue, written directly by the absence timer

    def purge(self) -> int:
        deleted = self.store.purge_expired(to_ms(utc_now()))
        log.info("purge_summary %s", orjson.dumps({"deleted": deleted}).decode())
        return deleted

    def event_time_progress(self, now: datetime | None = None) -> datetime:
        """How far event time has surely got: the newest event time of every hub partition that
        delivered within ``PARTITION_IDLE_S`` (an idle partition holds nothing back), and never more
        than the wall clock, each minus ``ABSENCE_GRACE_S`` (Defender's delivery delay and the disorder
        within a partition). A partition working through a backlog holds absences back until its
        event time gets there."""
        wall = to_ms(now or utc_now())
        progress = wall
        for event_ms, wall_ms in self.store.load_progress().values():
            if wall - wall_ms <= PARTITION_IDLE_S * 1000:
                progress = min(progress, event_ms)
        return datetime.fromtimestamp((progress - ABSENCE_GRACE_S * 1000) / 1000, tz=timezone.utc)

    def fire_due(self, now: datetime | None = None) -> list[str]:
        """Fire NOT FOLLOWED_BY absences and quiet-period clears whose event-time deadline has passed
        (:meth:`event_time_progress`). An absence incident is emitted at most grace + timer period
        after its deadline once the partitions have caught up.

        The due snapshots and the incidents rule chaining derives from them go onto the incidents
        queue *before* the due groups are saved (a timer is not retried and an output-binding failure
        cannot be caught, so saving first could lose them); any failure makes the next tick send the
        same snapshots again (chained ones re-emitted from their consumers' outboxes), which consumers
        drop by ``(incidentId, revision)``. Returns what was sent for the saved groups. Raises:
        StoreError (the timer runs again at its next tick)."""
        progress = self.event_time_progress(now)
        if self.incidents is None:
            raise StoreError("the absence timer needs the incidents queue (Runtime.incidents)")
        queue = self.incidents

        def deliver(snapshots: list[Snapshot]) -> None:
            queue.send([fit_snapshot(s, MAX_QUEUE_MESSAGE_BYTES).decode() for s in snapshots])

        result = self.handler.engine.fire_due(progress, emit=deliver)
        summary = {
            "fired": len(result.incidents),
            "progress": progress.isoformat(),
            "etagConflicts": result.stats.counts["etag_conflicts"],
        }
        log.info("absence_summary %s", orjson.dumps(summary).decode(), extra={"custom_dimensions": summary})
        return [fit_snapshot(s, MAX_QUEUE_MESSAGE_BYTES).decode() for s in result.incidents]


_runtime: Runtime | None = None
_lock = threading.Lock()


def build_runtime(settings: Settings) -> Runtime:
    """Build the Azure-backed runtime: Table state store, dead-letter queue and claim-check blobs."""
    from .claimcheck import BlobClaims
    from .clients import StorageClients
    from .table_store import TableStateStore

    rules = load_rules([settings.rules_path()])
    clients = StorageClients.from_settings(settings)
    store = TableStateStore(clients.table(settings.state_table))
    store.ensure_table()
    handler = AlertBatchHandler(
        Engine(rules, store),
        QueueDeadLetters(clients.queue(settings.rejected_queue)),
        claims=BlobClaims(clients.container(settings.deadletter_container)),
        max_skew_s=settings.event_time_max_skew_s,
        max_age_s=settings.event_time_max_age_s,
    )
    return Runtime(settings, rules, store, handler, QueueDeadLetters(clients.queue(settings.incidents_queue, base64=True)))


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
    """Poison messages (with their reason) on an Azure Storage queue. A message that would not
    fit a queue message has its ``body`` claim-checked to ``poison/...`` in the dead-letter
    container (``body: null``, ``bodyBytes``, ``claimCheck``), so the body is always complete."""

    def __init__(self, queue: Any, claims: ClaimStore | None = None, clock: Clock = utc_now) -> None:
        self.letters = QueueDeadLetters(queue)
        self.claims = claims
        self.clock = clock

    def send(self, message: str) -> None:
        self.letters.send([fit_poison(message, self.claims, self.clock())])


def fit_poison(message: str, claims: ClaimStore | None, when: datetime) -> str:
    """``message`` if it fits a queue message, else the same with its body claim-checked.

    Raises: StoreError when the blob cannot be written (the queue trigger retries the message).
    """
    data = message.encode()
    if len(data) <= MAX_QUEUE_MESSAGE_BYTES:
        return message
    parsed = orjson.loads(data)
    body = str(parsed.get("body") or "").encode()
    parsed["bodyBytes"] = len(body)
    if claims is None:  # no container configured (tests): keep what fits, marked
        parsed["body"] = body[: MAX_QUEUE_MESSAGE_BYTES // 2].decode("utf-8", "ignore")
        parsed["bodyTruncated"] = True
    else:
        name = claim_name("poison", body, when, str(parsed.get("messageId") or "")) + ".json"
        claims.put(name, body, {"messageId": str(parsed.get("messageId") or "")})
        parsed["body"] = None
        parsed["claimCheck"] = claim_ref(claims, name)
    parsed["reason"] = cap(str(parsed.get("reason") or ""))
    return orjson.dumps(parsed).decode()


_forwarder: Any = None


def build_forwarder(env: dict[str, str] | None = None) -> Any:
    """The webhook forwarder from app settings: Table delivery records, poison queue."""
    from .claimcheck import BlobClaims
    from .clients import StorageClients
    from .settings import load_webhook_settings
    from .webhook import Forwarder, MemoryDeliveryLog, TableDeliveryLog

    hooks = load_webhook_settings(env, require_target=False)
    if not hooks.targets:
        # Forwarding is off (no WEBHOOK_URL / WEBHOOK_TARGETS): incidents are consumed and dropped
        # here instead of failing every dequeue into the poison queue.
        log.warning("no webhook target configured (WEBHOOK_URL / WEBHOOK_TARGETS): incidents are not forwarded")
        return Forwarder([], MemoryDeliveryLog())
    settings = load_settings(env)
    clients = StorageClients.from_settings(settings)
    claims = BlobClaims(clients.container(settings.deadletter_container))
    return Forwarder(
        list(hooks.targets),
        TableDeliveryLog(clients.table(hooks.delivery_table)),
        poison=QueuePoison(clients.queue(hooks.poison_queue), claims),
        max_dequeue_count=hooks.max_dequeue_count,
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

    from .clients import StorageClients

    table = StorageClients.from_settings(settings).table(graph.cursor_table)
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
    poller = GraphPoller(
        cached, TableCursorStore(table), eventhub_publisher(producer), base_url=graph.base_url, resources=graph.resources
    )
    return GraphRuntime(poller, graph.tenants, producer.close)


def get_graph_runtime() -> GraphRuntime | None:
    global _graph
    with _lock:
        if _graph is None:
            _graph = build_graph_runtime() or False
        return _graph or None
