"""The Functions app, with real func.EventHubEvent objects, the user functions called directly,
and Table/Queue behaviour on Azurite."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient
from azure.functions.meta import Datum
from azure.storage.queue import QueueClient

import function_app
from shared.claimcheck import BlobClaims
from shared.clients import StorageClients
from shared.deadletters import decode_letters
from shared.engine import Engine, fit_snapshot
from shared.errors import SettingsError, StoreError
from shared.functions import AlertBatchHandler, QueueDeadLetters, Runtime, set_runtime
from shared.rules import default_rules_dir, load_rules
from shared.settings import load_settings
from shared.state import Change, GroupKey, Loaded
from shared.table_store import TableStateStore

from .conftest import Azurite, app_functions

REPO = Path(__file__).resolve().parent.parent
RULES = load_rules([default_rules_dir()])
SEED = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"
T0 = datetime(2026, 11, 1, 10, 0, tzinfo=timezone.utc)


def graph_alert(alert_id: str, version: int, tenant: str = "tenant-a", technique: str = "T1053.005") -> dict[str, Any]:
    updated = (T0 + timedelta(seconds=version)).isoformat().replace("+00:00", "Z")
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": alert_id,
        "tenantId": tenant,
        "title": "Suspicious Task Scheduler activity",
        "category": "Persistence",
        "severity": "high",
        "serviceSource": "microsoftDefenderForEndpoint",
        "mitreTechniques": [technique],
        "createdDateTime": T0.isoformat(),
        "lastUpdateDateTime": updated,
    }


def hub_events(bodies: Sequence[bytes], partition: str = "0", first_seq: int = 100) -> list[func.EventHubEvent]:
    meta = {"PartitionContext": Datum(json.dumps({"PartitionId": partition}), "json")}
    return [
        func.EventHubEvent(body=b, trigger_metadata=meta, sequence_number=first_seq + i, enqueued_time=T0 + timedelta(seconds=i))
        for i, b in enumerate(bodies)
    ]


class Out:
    """A func.Out that records what the function set (or fails, to inject output errors)."""

    def __init__(self, fail: bool = False) -> None:
        self.value: list[str] | None = None
        self.fail = fail

    def set(self, value: list[str]) -> None:
        if self.fail:
            raise RuntimeError("output binding failed")
        self.value = value

    def get(self) -> list[str] | None:
        return self.value


class Storage:
    def __init__(self, azurite: Azurite, table_name: str) -> None:
        self.conn = azurite.connection_string
        self.table_name = table_name
        self.dlq = QueueClient.from_connection_string(self.conn, f"dlq{table_name[1:13]}")
        self.claims = BlobClaims(StorageClients.from_connection_string(self.conn).container(f"dl{table_name[1:13]}"))
        self.incidents = StorageClients.from_connection_string(self.conn).queue(f"inc{table_name[1:13]}", base64=True)

    def store(self, wrap: Callable[[TableStateStore], Any] | None = None) -> Any:
        s = TableStateStore(TableClient.from_connection_string(self.conn, self.table_name))
        s.ensure_table()
        return wrap(s) if wrap else s

    def runtime(self, store: Any = None) -> Runtime:
        st = store or self.store()
        handler = AlertBatchHandler(Engine(RULES, st), QueueDeadLetters(self.dlq), claims=self.claims)
        return Runtime(
            load_settings({"ALERTS_EVENTHUB_NAME": "alerts", "STATE_STORAGE_CONNECTION": self.conn}),
            RULES,
            st,
            handler,
            QueueDeadLetters(self.incidents),
        )

    def queued_incidents(self) -> list[dict[str, Any]]:
        """Every snapshot on the incidents queue (base64, as the queue trigger reads them), taken off it."""
        out = []
        with contextlib.suppress(ResourceNotFoundError):
            for m in self.incidents.receive_messages(max_messages=32):
                out.append(orjson.loads(m.content))
                self.incidents.delete_message(m)
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(m.content) for m in self.dlq.peek_messages(max_messages=32)]
        except Exception:
            return []

    def dead_letter_records(self) -> list[dict[str, Any]]:
        """Every dead-lettered record, read back through the claim checks of the queue messages."""
        return [r for m in self.dead_letters() for r in decode_letters(self.claims.get(m["claimCheck"]["blob"]))]


@pytest.fixture
def storage(azurite: Azurite, table_name: str) -> Iterator[Storage]:
    s = Storage(azurite, table_name)
    yield s
    set_runtime(None)


def call(events: list[func.EventHubEvent], out: Out | None = None) -> list[dict[str, Any]]:
    fn = function_app.correlate_alerts.build().get_user_function()
    out = out or Out()
    fn(events, out)
    return [json.loads(m) for m in out.get() or []]


def final(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for s in snapshots:
        if s["revision"] >= latest.get(s["incidentId"], {"revision": 0})["revision"]:
            latest[s["incidentId"]] = s
    return latest


# -- binding metadata --------------------------------------------------------------------------


def test_binding_metadata_of_every_function() -> None:
    functions: dict[str, Any] = app_functions()  # type: ignore[assignment]
    assert set(functions) == {
        "correlate_alerts",
        "purge_expired_state",
        "forward_incident",
        "poll_graph_alerts",
        "fire_due_absences",
    }
    correlate = json.loads(functions["correlate_alerts"].get_function_json())["bindings"]
    trigger = next(b for b in correlate if b["type"] == "eventHubTrigger")
    assert trigger == {
        "direction": "IN",
        "dataType": "BINARY",
        "type": "eventHubTrigger",
        "name": "events",
        "connection": "ALERTS_EVENTHUB",
        "eventHubName": "%ALERTS_EVENTHUB_NAME%",
        "cardinality": "MANY",
        "consumerGroup": "%ALERTS_CONSUMER_GROUP%",
    }
    output = next(b for b in correlate if b["type"] == "queue")
    assert output == {
        "direction": "OUT",
        "type": "queue",
        "name": "incidents",
        "queueName": "%INCIDENTS_QUEUE%",
        "connection": "AzureWebJobsStorage",
    }
    retry = functions["correlate_alerts"].get_settings_dict("retry_policy")
    assert retry is not None and retry["strategy"] == "exponential_backoff" and retry["max_retry_count"] == "-1"
    timer = json.loads(functions["purge_expired_state"].get_function_json())["bindings"]
    assert timer == [
        {
            "direction": "IN",
            "type": "timerTrigger",
            "name": "timer",
            "schedule": "%PURGE_SCHEDULE%",
            "runOnStartup": False,
            "useMonitor": True,
        }
    ]


def test_trigger_signature_uses_typing_list() -> None:
    annotation = function_app.correlate_alerts.build().get_user_function().__annotations__["events"]
    assert "typing.List" in str(annotation) or "List[" in str(annotation)


def test_host_json_sets_batching_retries_logging_and_bundle() -> None:
    host = json.loads((REPO / "host.json").read_text())
    eh = host["extensions"]["eventHubs"]
    assert eh["maxEventBatchSize"] == 100 and eh["prefetchCount"] == 300 and eh["batchCheckpointFrequency"] == 1
    assert host["extensions"]["queues"]["maxDequeueCount"] == 5
    assert host["logging"]["logLevel"]["Function"] == "Information"
    assert host["extensionBundle"] == {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.0.0, 5.0.0)"}


def test_settings_fail_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="ALERTS_EVENTHUB_NAME"):
        load_settings({"STATE_STORAGE_CONNECTION": "x"})
    with pytest.raises(SettingsError, match="STATE_STORAGE_CONNECTION"):
        load_settings({"ALERTS_EVENTHUB_NAME": "a"})
    with pytest.raises(SettingsError, match="app setting STATE_TABLE"):
        load_settings({"ALERTS_EVENTHUB_NAME": "a", "STATE_STORAGE_CONNECTION": "x", "STATE_TABLE": "bad-name!"})


def test_local_settings_example_sets_every_required_setting() -> None:
    values = json.loads((REPO / "local.settings.example.json").read_text())["Values"]
    settings = load_settings(values)
    assert settings.alerts_eventhub_name and settings.storage_connection == "UseDevelopmentStorage=true"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert "ALERTS_EVENTHUB__fullyQualifiedNamespace" in values or "ALERTS_EVENTHUB" in values


def test_oversized_snapshot_is_trimmed_with_a_marker() -> None:
    snap = {"attributes": {"a": "x"}, "triggerEvents": [{"raw": "y" * 30000} for _ in range(4)]}
    encoded = fit_snapshot(snap, 64 * 1024)
    decoded = json.loads(encoded)
    assert len(encoded) <= 64 * 1024
    assert decoded["triggerEventsTrimmed"] == 2 and len(decoded["triggerEvents"]) == 2


# -- behaviour on Azurite ------------------------------------------------------------------------


@pytest.mark.azurite
def test_envelope_array_and_single_record_bodies_produce_incidents(storage: Storage) -> None:
    set_runtime(storage.runtime())
    bodies = [
        orjson.dumps(graph_alert("da1", 1)),
        orjson.dumps([graph_alert("da2", 1), graph_alert("da3", 1, technique="T1059.001")]),
        orjson.dumps(
            {
                "records": [
                    {
                        "time": T0.isoformat(),
                        "tenantId": "tenant-a",
                        "category": "AdvancedHunting-AlertInfo",
                        "properties": {
                            "Timestamp": T0.isoformat(),
                            "AlertId": "da4",
                            "Title": "Task",
                            "Category": "Persistence",
                            "AttackTechniques": '["Scheduled Task (T1053.005)"]',
                        },
                    }
                ]
            }
        ),
    ]
    snaps = call(hub_events(bodies))
    seed = [s for s in snaps if s["ruleId"] == SEED]
    assert sorted(s["attributes"]["alertIdStr"] for s in seed) == ["da1", "da2", "da4"]
    assert all(s["action"] == "created" and s["revision"] == 1 for s in seed)


@pytest.mark.azurite
def test_bad_records_go_to_the_dead_letter_queue_and_good_ones_still_fire(storage: Storage) -> None:
    set_runtime(storage.runtime())
    bodies = [
        b"{not json",
        orjson.dumps(
            {"records": [{"category": "AdvancedHunting-AlertInfo", "properties": {"Title": "no id"}}, graph_alert("da9", 1)]}
        ),
        b'{"weird": true}',
        b"x" * (2 * 1024 * 1024),
    ]
    snaps = call(hub_events(bodies, partition="7"))
    assert [s["attributes"]["alertIdStr"] for s in snaps if s["ruleId"] == SEED] == ["da9"]
    [message] = storage.dead_letters()  # one message per batch, pointing to one blob
    assert (message["records"], message["partition"], message["firstSequenceNumber"]) == (4, "7", 100)
    assert message["claimCheck"]["blob"].startswith("rejected/")
    letters = storage.dead_letter_records()
    assert len(letters) == 4
    by_seq = {d["sequenceNumber"]: d for d in letters}
    assert "not JSON" in by_seq[100]["reason"] and by_seq[100]["partition"] == "7"
    assert by_seq[101]["field"] == "properties.AlertId" and by_seq[101]["position"] == "partition 7 seq 101#0"
    assert "no known format" in by_seq[102]["reason"]
    assert "exceeds" in by_seq[103]["reason"]
    assert base64.b64decode(by_seq[100]["raw"]) == b"{not json"
    assert base64.b64decode(by_seq[103]["raw"]) == bodies[3]  # whole, 2 MiB: re-drivable


@pytest.mark.azurite
def test_processing_the_same_batch_twice_gives_the_same_incident_revisions(storage: Storage) -> None:
    set_runtime(storage.runtime())
    events = hub_events([orjson.dumps(graph_alert(f"da{i % 3}", i)) for i in range(9)])
    first = call(events)
    second = call(events)
    assert {(s["incidentId"], s["revision"]) for s in second} <= {(s["incidentId"], s["revision"]) for s in first}
    assert sorted(s["attributes"]["incidentCount"] for s in final(first + second).values()) == [3, 3, 3]


class FailingStore:
    """Wraps a store and raises StoreError once at a chosen step."""

    def __init__(self, inner: TableStateStore, step: str) -> None:
        self.inner = inner
        self.step = step
        self.calls = inner.calls

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        if self.step == "before_load":
            raise StoreError("injected before load")
        result = self.inner.load(keys, now_ms)
        if self.step == "after_load":
            raise StoreError("injected after load")
        return result

    def save(self, changes: Sequence[Change]) -> None:
        self.inner.save(changes)
        if self.step == "after_save":
            raise StoreError("injected after save")

    def purge_expired(self, now_ms: int) -> int:
        return self.inner.purge_expired(now_ms)

    def __getattr__(self, name: str) -> Any:  # the rest of the StateStore interface, unfailing
        return getattr(self.inner, name)


@pytest.mark.azurite
@pytest.mark.parametrize("step", ["before_load", "after_load", "after_save", "output"])
def test_failure_at_any_step_then_retry_loses_nothing_and_counts_nothing_twice(storage: Storage, step: str) -> None:
    batch1 = hub_events([orjson.dumps(graph_alert(f"da{i % 2}", i)) for i in range(4)])
    batch2 = hub_events([orjson.dumps(graph_alert(f"da{i % 2}", i)) for i in range(4, 6)], first_seq=200)
    delivered: list[dict[str, Any]] = []
    set_runtime(storage.runtime())
    delivered += call(batch1)
    failing = storage.runtime(storage.store(lambda s: FailingStore(s, step if step != "output" else "none")))
    set_runtime(failing)
    with pytest.raises((StoreError, RuntimeError)):
        call(batch2, Out(fail=step == "output"))
    set_runtime(storage.runtime())  # the retry policy re-runs the whole batch on a healthy worker
    delivered += call(batch2)
    latest = final(delivered)
    assert sorted(s["attributes"]["incidentCount"] for s in latest.values()) == [3, 3]
    assert len(latest) == 2


@pytest.mark.azurite
def test_two_workers_on_the_same_groups_end_with_the_serial_counts(storage: Storage) -> None:
    barrier = threading.Barrier(2)

    class Racing:
        def __init__(self, inner: TableStateStore) -> None:
            self.inner, self.calls, self.first = inner, inner.calls, True

        def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
            result = self.inner.load(keys, now_ms)
            if self.first:  # both workers read the same ETags before either writes
                self.first = False
                barrier.wait(timeout=30)
            return result

        def save(self, changes: Sequence[Change]) -> None:
            self.inner.save(changes)

        def purge_expired(self, now_ms: int) -> int:
            return 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    workers = [storage.runtime(storage.store(Racing)) for _ in range(2)]
    batches = [
        hub_events([orjson.dumps(graph_alert(f"da{i % 3}", i)) for i in range(w, 30, 2)], partition=str(w)) for w in range(2)
    ]
    results: list[Any] = [None, None]

    def work(i: int) -> None:
        results[i] = workers[i].handler.handle(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    conflicts = sum(r.summary["etagConflicts"] for r in results)
    assert conflicts >= 1
    snaps = [json.loads(m) for r in results for m in r.incidents]
    counts = sorted(s["attributes"]["incidentCount"] for s in final(snaps).values() if s["ruleId"] == SEED)
    assert counts == [10, 10, 10]  # what one serial worker counts for 30 versions over 3 alerts


@pytest.mark.azurite
def test_storage_down_mid_run_raises_and_leaves_nothing_that_double_counts(private_azurite: Azurite, table_name: str) -> None:
    storage = Storage(private_azurite, table_name)
    set_runtime(storage.runtime())
    try:
        call(hub_events([orjson.dumps(graph_alert("da1", 1))]))
        private_azurite.stop()
        set_runtime(storage.runtime(TableStateStore(TableClient.from_connection_string(storage.conn, table_name, retry_total=0))))
        with pytest.raises(StoreError):
            call(hub_events([orjson.dumps(graph_alert("da1", 2))], first_seq=200))
        private_azurite.start()  # same data on disk: the state saved before the outage is back
        set_runtime(storage.runtime())
        again = call(hub_events([orjson.dumps(graph_alert("da1", 2))], first_seq=200))
        assert [(s["revision"], s["attributes"]["incidentCount"]) for s in again] == [(2, 2)]
        retried = call(hub_events([orjson.dumps(graph_alert("da1", 2))], first_seq=200))
        assert [(s["revision"], s["attributes"]["incidentCount"]) for s in retried] == [(2, 2)]
    finally:
        set_runtime(None)


@pytest.mark.azurite
def test_purge_function_deletes_expired_state(storage: Storage) -> None:
    runtime = storage.runtime()
    set_runtime(runtime)
    key = GroupKey("R", ("a",))
    from shared.state import GroupState

    runtime.store.save([Change(key, GroupState(key), None, 1)])
    fn = function_app.purge_expired_state.build().get_user_function()
    fn(None)
    assert runtime.store.load([key], 0)[key].state is None
    assert runtime.store.purge_expired(2) == 0


@pytest.mark.azurite
def test_absence_timer_emits_due_absences_to_the_incidents_queue(storage: Storage) -> None:
    from datetime import timedelta

    from shared.functions import ABSENCE_GRACE_S
    from shared.rules import parse_rule_text

    rule = parse_rule_text((REPO / "rules" / "MS_Defender_HighSev_Alert_Unattended.yaml").read_text(), "unattended.yaml")
    runtime = storage.runtime()
    engine = Engine([rule], runtime.store, lambda: datetime.now(timezone.utc))
    runtime.handler.engine = engine
    set_runtime(runtime)
    try:
        start = datetime.now(timezone.utc) - timedelta(hours=5)
        alert = graph_alert("da-unattended", 0) | {"severity": "high", "status": "new"}
        alert["createdDateTime"] = alert["lastUpdateDateTime"] = start.isoformat().replace("+00:00", "Z")
        assert call(hub_events([orjson.dumps(alert)])) == []
        timer_fn = function_app.fire_due_absences.build().get_user_function()
        timer_fn(None)
        assert storage.queued_incidents() == []  # partition 0's event time is still 5 h back: nothing is due yet
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        runtime.store.save_progress("0", now_ms - 60_000, now_ms)  # the partition caught up
        timer = json.loads(app_functions()["fire_due_absences"].get_function_json())["bindings"]  # type: ignore[index]
        assert {b["type"] for b in timer} == {"timerTrigger"}  # no output binding: queued before the save
        timer_fn(None)
        [snap] = storage.queued_incidents()
        assert (snap["ruleId"], snap["action"], snap["attributes"]["alertIdStr"]) == (rule.id, "created", "da-unattended")
        assert ABSENCE_GRACE_S < 3600  # the 4 h deadline passed an hour ago, grace included
        timer_fn(None)
        assert storage.queued_incidents() == []  # fired once
    finally:
        set_runtime(None)


def _feed_unattended_alert(alert_id: str) -> None:
    """A new high-severity alert created 5 hours ago, through the hub trigger."""
    start = datetime.now(timezone.utc) - timedelta(hours=5)
    alert = graph_alert(alert_id, 0) | {"severity": "high", "status": "new"}
    alert["createdDateTime"] = alert["lastUpdateDateTime"] = start.isoformat().replace("+00:00", "Z")
    assert call(hub_events([orjson.dumps(alert)])) == []


class SaveFailsOnce:
    """A store whose next save fails before writing anything (the timer's state did not move on)."""

    def __init__(self, inner: TableStateStore) -> None:
        self.inner = inner
        self.armed = True

    def save(self, changes: Sequence[Change]) -> None:
        if self.armed:
            self.armed = False
            raise StoreError("injected: save failed")
        self.inner.save(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class QueueFailsOnce:
    def __init__(self, inner: QueueDeadLetters) -> None:
        self.inner = inner
        self.armed = True

    def send(self, messages: Sequence[str]) -> None:
        if self.armed and messages:
            self.armed = False
            raise StoreError("injected: incidents queue unreachable")
        self.inner.send(messages)


@pytest.mark.azurite
@pytest.mark.parametrize("failure", ["save", "queue"])
def test_an_absence_survives_a_failed_timer_tick_and_is_queued_with_the_same_id_and_revision(
    storage: Storage, failure: str
) -> None:
    from shared.rules import parse_rule_text

    rule = parse_rule_text((REPO / "rules" / "MS_Defender_HighSev_Alert_Unattended.yaml").read_text(), "unattended.yaml")
    flaky = SaveFailsOnce(storage.store())
    runtime = storage.runtime(flaky)
    runtime.handler.engine = Engine([rule], flaky, lambda: datetime.now(timezone.utc))
    flaky.armed = False  # the alert's own batch saves normally
    if failure == "queue":
        runtime.incidents = QueueFailsOnce(QueueDeadLetters(storage.incidents))
    set_runtime(runtime)
    try:
        _feed_unattended_alert("da-tick")
        flaky.armed = failure == "save"
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        runtime.store.save_progress("0", now_ms - 60_000, now_ms)
        timer_fn = function_app.fire_due_absences.build().get_user_function()
        with pytest.raises(StoreError, match="injected"):
            timer_fn(None)
        first = storage.queued_incidents()
        # a failed save leaves the snapshot queued already; a failed queue send leaves nothing saved
        assert len(first) == (1 if failure == "save" else 0)
        timer_fn(None)  # the next tick
        second = storage.queued_incidents()
        [snap] = second
        assert (snap["ruleId"], snap["action"], snap["revision"]) == (rule.id, "created", 1)
        assert all((s["incidentId"], s["revision"]) == (snap["incidentId"], 1) for s in first)
        timer_fn(None)
        assert storage.queued_incidents() == []  # saved now: fired once
    finally:
        set_runtime(None)


class SaveFailsFor(SaveFailsOnce):
    """The first save touching a rule's groups fails before writing anything."""

    def __init__(self, inner: TableStateStore, rule_id: str) -> None:
        super().__init__(inner)
        self.rule_id = rule_id

    def save(self, changes: Sequence[Change]) -> None:
        if self.armed and any(c.key.rule_id == self.rule_id for c in changes):
            self.armed = False
            raise StoreError("injected: save failed")
        self.inner.save(changes)


@pytest.mark.azurite
@pytest.mark.parametrize("failure", ["consumer-save", "queue", "absence-save"])
def test_incidents_chained_from_a_timer_fired_absence_are_queued_despite_a_failed_tick(storage: Storage, failure: str) -> None:
    from shared.rules import parse_rule_text

    rule = parse_rule_text((REPO / "rules" / "MS_Defender_HighSev_Alert_Unattended.yaml").read_text(), "unattended.yaml")
    over = parse_rule_text(
        f"id: ON_UNATTENDED\nname: over\nseverity: 9\ncategory: Security\ntimeWindow: 3600\nsubpatterns:\n"
        f"  - {{name: s, query: 'eventType = \"{rule.id}\"', groupBy: [tenantId], aggregateConstraint: 'COUNT(*) >= 1'}}\n"
        "incidentAttributes: {n: s.COUNT(*)}\n",
        "over.yaml",
    )
    flaky = SaveFailsFor(storage.store(), {"absence-save": rule.id}.get(failure, over.id))
    flaky.armed = False  # the alert's own batch saves normally
    runtime = storage.runtime(flaky)
    runtime.handler.engine = Engine([rule, over], flaky, lambda: datetime.now(timezone.utc))
    if failure == "queue":
        runtime.incidents = QueueFailsOnce(QueueDeadLetters(storage.incidents))
    set_runtime(runtime)
    try:
        _feed_unattended_alert("da-chain")
        flaky.armed = failure != "queue"
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        runtime.store.save_progress("0", now_ms - 60_000, now_ms)
        timer_fn = function_app.fire_due_absences.build().get_user_function()
        with pytest.raises(StoreError, match="injected"):
            timer_fn(None)
        first = storage.queued_incidents()
        timer_fn(None)  # the next tick
        second = storage.queued_incidents()
        assert sorted((s["ruleId"], s["revision"]) for s in second) == sorted([(over.id, 1), (rule.id, 1)])
        assert {(s["incidentId"], s["revision"]) for s in first} <= {(s["incidentId"], s["revision"]) for s in second}
        timer_fn(None)
        assert storage.queued_incidents() == []  # saved now: each incident once
    finally:
        set_runtime(None)


@pytest.mark.azurite
def test_a_partition_working_through_a_backlog_holds_absences_back(storage: Storage) -> None:
    from shared.functions import ABSENCE_GRACE_S, PARTITION_IDLE_S

    runtime = storage.runtime()
    now = datetime.now(timezone.utc)
    wall = int(now.timestamp() * 1000)
    unreported = runtime.event_time_progress(now) - (now - timedelta(seconds=ABSENCE_GRACE_S))
    assert abs(unreported.total_seconds()) < 0.002  # no partition reported yet: the wall clock
    runtime.store.save_progress("0", wall - 3_600_000, wall - 1000)  # active, one hour behind
    runtime.store.save_progress("1", wall - 60_000, wall - 1000)
    runtime.store.save_progress("2", wall - 86_400_000, wall - (PARTITION_IDLE_S + 1) * 1000)  # idle: ignored
    behind = now - timedelta(hours=1, seconds=ABSENCE_GRACE_S)
    assert abs((runtime.event_time_progress(now) - behind).total_seconds()) < 0.002


@pytest.mark.azurite
def test_without_rules_that_wait_on_time_no_progress_is_written(storage: Storage) -> None:
    runtime = storage.runtime()
    runtime.handler.engine = Engine([r for r in RULES if not r.sequence], runtime.store)
    set_runtime(runtime)
    try:
        call(hub_events([orjson.dumps(graph_alert("da-q", 5))], partition="4"))
        assert runtime.store.load_progress() == {}
    finally:
        set_runtime(None)


@pytest.mark.azurite
def test_each_batch_records_its_partitions_event_time_progress(storage: Storage) -> None:
    runtime = storage.runtime()
    set_runtime(runtime)
    try:
        call(hub_events([orjson.dumps(graph_alert("da-p", 5))], partition="3"))
        [(event_ms, _)] = runtime.store.load_progress().values()
        assert event_ms == int((T0 + timedelta(seconds=5)).timestamp() * 1000)
        assert list(runtime.store.load_progress()) == ["3"]
    finally:
        set_runtime(None)
