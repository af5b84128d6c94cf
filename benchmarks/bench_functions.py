"""Benchmark of the Event Hub handler with the Table store on Azurite (printed figures, not a test).

Run: bash scripts/bench.sh functions   (starts Azurite)   or, with Azurite already running,
     AZURITE_CONNECTION_STRING=... .venv/bin/python benchmarks/bench_functions.py

Reports, side by side in one run:
  * storage round trips per batch: a batch with no matching event, and a batch with matches
    (at most one read and one write per touched group);
  * records/s through AlertBatchHandler for batches of 100 and 1000 Event Hub events with 1% matching
    alerts, with the Table store on Azurite and with the in-memory store;
  * process memory (RSS) while 100,000 distinct groups are opened through the Table store (the
    store is the state, so the process stays flat).
The last line is JSON with the figures.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
from azure.data.tables import TableClient
from azure.functions.meta import Datum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.engine import Engine
from shared.functions import AlertBatchHandler
from shared.rules import default_rules_dir, load_rules
from shared.state import MemoryStateStore
from shared.table_store import TableStateStore

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
META = {"PartitionContext": Datum(json.dumps({"PartitionId": "0"}), "json")}


class NullDeadLetters:
    def send(self, messages: Sequence[str]) -> None:
        pass


class CountingStore:
    """Counts entity-level round trips (one get/create/update per group)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = self.writes = 0

    def load(self, keys: Any, now_ms: int) -> Any:
        self.reads += len(keys)
        return self.inner.load(keys, now_ms)

    def save(self, changes: Any) -> None:
        self.writes += len(changes)
        self.inner.save(changes)

    def purge_expired(self, now_ms: int) -> int:
        return int(self.inner.purge_expired(now_ms))


def record(i: int, matching: bool, alert_id: str | None = None) -> bytes:
    ts = (T0 + timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z")
    if matching:
        props = {
            "Timestamp": ts,
            "AlertId": alert_id or f"da{i}",
            "Title": "Suspicious Task Scheduler activity",
            "Category": "Persistence",
            "Severity": "High",
            "AttackTechniques": '["Scheduled Task/Job (T1053)"]',
        }
        return orjson.dumps({"time": ts, "tenantId": f"t{i % 7}", "category": "AdvancedHunting-AlertInfo", "properties": props})
    props = {
        "Timestamp": ts,
        "DeviceName": f"host-{i % 500}",
        "FileName": "svchost.exe",
        "ProcessCommandLine": "svchost.exe -k netsvcs",
        "AccountName": "system",
        "ReportId": i,
    }
    return orjson.dumps(
        {"time": ts, "tenantId": f"t{i % 7}", "category": "AdvancedHunting-DeviceProcessEvents", "properties": props}
    )


def batch(start: int, size: int, match_every: int = 100) -> list[func.EventHubEvent]:
    return [
        func.EventHubEvent(body=record(i, i % match_every == 0), trigger_metadata=META, sequence_number=i, enqueued_time=T0)
        for i in range(start, start + size)
    ]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def table_store(conn: str, name: str, rules: list[Any]) -> TableStateStore:
    store = TableStateStore(TableClient.from_connection_string(conn, name))
    store.ensure_table()
    return store


def rate(handler: AlertBatchHandler, size: int, batches: int, offset: int) -> float:
    prepared = [batch(offset + b * size, size) for b in range(batches)]
    start = time.perf_counter()
    for events in prepared:
        handler.handle(events)
    return size * batches / (time.perf_counter() - start)


def main() -> None:
    conn = os.environ.get("AZURITE_CONNECTION_STRING")
    if not conn:
        sys.exit("set AZURITE_CONNECTION_STRING (bash scripts/bench.sh functions starts Azurite for you)")
    rules = load_rules([default_rules_dir()])
    stamp = int(time.time())
    figures: dict[str, Any] = {}

    counting = CountingStore(table_store(conn, f"benchrt{stamp}", rules))
    handler = AlertBatchHandler(Engine(rules, counting), NullDeadLetters())
    handler.handle(batch(1, 99, match_every=10**9))  # no matching event at all
    figures["roundtrips_no_match"] = {"reads": counting.reads, "writes": counting.writes}
    counting.reads = counting.writes = 0
    matching = [
        func.EventHubEvent(body=record(i, True, alert_id=f"da{i % 5}"), trigger_metadata=META, sequence_number=i)
        for i in range(50)
    ]
    summary = handler.handle(matching).summary
    figures["roundtrips_50_matching_events"] = {"reads": counting.reads, "writes": counting.writes, "groups": summary["groups"]}

    for size, batches in ((100, 20), (1000, 4)):
        mem = AlertBatchHandler(Engine(rules, MemoryStateStore()), NullDeadLetters())
        tab = AlertBatchHandler(Engine(rules, table_store(conn, f"benchr{size}x{stamp}", rules)), NullDeadLetters())
        figures[f"records_per_s_batch{size}_memory"] = round(rate(mem, size, batches, 10_000))
        figures[f"records_per_s_batch{size}_table"] = round(rate(tab, size, batches, 10_000))

    for key, value in figures.items():
        print(f"{key:38s}: {value}", flush=True)

    # 100,000 distinct open groups through the Table store: process memory stays flat (RSS samples).
    store = table_store(conn, f"benchmem{stamp}", rules)
    handler = AlertBatchHandler(Engine(rules, store), NullDeadLetters())
    n_groups = int(os.environ.get("BENCH_GROUPS", "100000"))
    gc.collect()
    samples: list[float] = []
    start = time.perf_counter()
    for b in range(0, n_groups, 1000):
        events = [
            func.EventHubEvent(body=record(b + i, True, alert_id=f"g{b + i}"), trigger_metadata=META, sequence_number=b + i)
            for i in range(1000)
        ]
        handler.handle(events)
        if b % 10_000 == 0:
            gc.collect()
            samples.append(rss_mb())
            print(f"  {b + 1000:>7} groups opened, RSS {samples[-1]:.1f} MB", flush=True)
    gc.collect()
    samples.append(rss_mb())
    figures["groups_opened"] = n_groups
    figures["groups_per_s"] = round(n_groups / (time.perf_counter() - start))
    figures["rss_mb_samples"] = samples
    figures["rss_growth_mb"] = round(samples[-1] - samples[0], 1)
    print(f"{'groups_opened':38s}: {n_groups} ({figures['groups_per_s']} groups/s), RSS growth {figures['rss_growth_mb']} MB")
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
