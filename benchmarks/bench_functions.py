"""Benchmark of the Event Hub handler with the Table store on Azurite (printed figures, not a test).

Run: bash scripts/bench.sh functions   (starts Azurite)   or, with Azurite already running,
     AZURITE_CONNECTION_STRING=... .venv/bin/python benchmarks/bench_functions.py

Reports, side by side in one run:
  * the worst-case batches of issue 11, with the ratio to the figures measured before the fix
    (``bash scripts/bench.sh worst`` runs only these): one 1 MiB event of tiny invalid records (all
    dead-lettered: one claim-check blob + one queue message), and 100 events of 100 distinct new
    groups (state reads 16 at a time, one transaction per partition key);
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

from shared.claimcheck import BlobClaims
from shared.clients import StorageClients
from shared.engine import Engine
from shared.functions import AlertBatchHandler, QueueDeadLetters
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

    def __getattr__(self, name: str) -> Any:  # the rest of the StateStore interface
        return getattr(self.inner, name)


def record(i: int, matching: bool, alert_id: str | None = None) -> bytes:
    ts = (T0 + timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z")
    props: dict[str, Any]
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


OLD_DEAD_LETTERS_PER_S = 610  # before the fix: one queue call per dead letter (issue 11, item 3)
OLD_NEW_GROUPS_PER_S = 260  # before the fix: one get + one create per group, in sequence


def worst_case(conn: str, rules: list[Any], stamp: int) -> dict[str, Any]:
    """The two worst-case batches, timed on Azurite with the production paths, each next to the
    old one-call-at-a-time way measured in the same run (the machine's load varies a lot)."""
    clients = StorageClients.from_connection_string(conn)
    figures: dict[str, Any] = {}
    body = b"[" + b",".join([b"1"] * 500_000) + b"]"  # ~1 MiB: 500,000 records of no known format
    handler = AlertBatchHandler(
        Engine(rules, MemoryStateStore()),
        QueueDeadLetters(clients.queue(f"benchdl{stamp}")),
        claims=BlobClaims(clients.container(f"benchdl{stamp}")),
    )
    handler.handle(batch(0, 1))  # warm up: create the queue and the container
    start = time.perf_counter()
    summary = handler.handle([func.EventHubEvent(body=body, trigger_metadata=META, sequence_number=1, enqueued_time=T0)]).summary
    seconds = time.perf_counter() - start
    rate_dl = summary["rejected"] / seconds
    old_queue = QueueDeadLetters(clients.queue(f"benchdlold{stamp}"))
    sample = ['{"reason": "record of no known format (keys: int)", "rawPreview": "MQ=="}'] * 1000
    start = time.perf_counter()
    old_queue.send(sample)  # the old path: one queue call per dead letter
    rate_old = len(sample) / (time.perf_counter() - start)
    figures["worst_dead_letters"] = {"records": summary["rejected"], "bodyBytes": len(body), "seconds": round(seconds, 2)}
    figures["worst_dead_letters_per_s"] = round(rate_dl)
    figures["old_dead_letters_per_s_this_run"] = round(rate_old)
    print(
        f"{'worst case: 1 MiB of invalid records':38s}: {summary['rejected']} dead letters in {seconds:.2f} s = "
        f"{rate_dl:,.0f}/s; one queue call each (old path, this run): {rate_old:,.0f}/s, x{rate_dl / rate_old:,.0f}; "
        f"issue figure ~{OLD_DEAD_LETTERS_PER_S}/s, x{rate_dl / OLD_DEAD_LETTERS_PER_S:,.0f}",
        flush=True,
    )
    timings: dict[str, list[float]] = {"new": [], "old": []}
    for b in range(5):  # batches of 100 events, each event a new group (new alert id); old and new interleaved
        for mode in ("old", "new"):
            store = table_store(conn, f"benchnew{mode}{b}x{stamp}", rules)
            if mode == "old":
                store.concurrency, store.transactions = 1, False  # one get + one create per group, in sequence
            engine_handler = AlertBatchHandler(Engine(rules, store), NullDeadLetters())
            events = [
                func.EventHubEvent(body=record(i, True, alert_id=f"new{b}-{i}"), trigger_metadata=META, sequence_number=i)
                for i in range(100)
            ]
            start = time.perf_counter()
            groups = engine_handler.handle(events).summary["groups"]  # 100 seed-rule groups, plus other rules'
            timings[mode].append(time.perf_counter() - start)
            assert groups >= 100, groups
    new_s, old_s = (sorted(timings[m])[len(timings[m]) // 2] for m in ("new", "old"))
    figures["worst_new_groups"] = {
        "groupsPerBatch": groups,
        "medianBatchSeconds": round(new_s, 3),
        "oldMedianSeconds": round(old_s, 3),
    }
    figures["worst_new_groups_per_s"] = round(groups / new_s)
    figures["old_new_groups_per_s_this_run"] = round(groups / old_s)
    print(
        f"{'worst case: 100 events, 100 new groups':38s}: {new_s:.3f} s per batch = {groups / new_s:,.0f} groups/s "
        f"({groups} groups: 100 of the seed rule, the rest of other rules); sequential (old path, this run): "
        f"{groups / old_s:,.0f}/s, x{old_s / new_s:.1f}; issue figure ~{OLD_NEW_GROUPS_PER_S}/s, "
        f"x{groups / new_s / OLD_NEW_GROUPS_PER_S:.1f}",
        flush=True,
    )
    return figures


def main() -> None:
    conn = os.environ.get("AZURITE_CONNECTION_STRING")
    if not conn:
        sys.exit("set AZURITE_CONNECTION_STRING (bash scripts/bench.sh functions starts Azurite for you)")
    rules = load_rules([default_rules_dir()])
    stamp = int(time.time())
    figures: dict[str, Any] = worst_case(conn, rules, stamp)
    if os.environ.get("BENCH_ONLY_WORST"):
        print(orjson.dumps(figures).decode())
        return

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
