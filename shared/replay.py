"""``python -m shared replay``: run the rules over alert files with the in-memory store."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from .engine import Clock, Engine, Stats, utc_now
from .normalize import DEFAULT_MAX_AGE_S, DEFAULT_MAX_SKEW_S, NormalizedEvent, Normalizer, Rejection, Skipped, iter_paths
from .rules import Rule
from .state import MemoryStateStore, StateStore

REPLAY_BATCH = 1000  # events per engine batch: one load and one save per touched group per batch


@dataclass
class ReplaySummary:
    records: int = 0
    rejected: int = 0
    skipped: int = 0
    forwarded: int = 0
    stats: Stats = field(default_factory=Stats)

    def lines(self) -> list[str]:
        c = self.stats.counts
        out = [
            f"records read: {self.records}, rejected: {self.rejected}, skipped (no rule can match): {self.skipped}",
            f"events matched: {c['matched']}, counted: {c['counted']}, duplicates: {c['duplicates']}, "
            f"late: {c['late']}, incidents created: {c['incidents_created']}, updated: {c['incidents_updated']}",
        ]
        if self.forwarded:
            out.append(f"incidents forwarded to the webhook: {self.forwarded}")
        for rule_id, rc in sorted(self.stats.per_rule.items()):
            out.append(
                f"  {rule_id}: matched {rc['matched']}, late {rc['late']}, duplicates {rc['duplicates']}, "
                f"created {rc['incidents_created']}, updated {rc['incidents_updated']}"
            )
        return out


def replay(
    paths: Iterable[str],
    rules: list[Rule],
    *,
    fmt: str = "auto",
    out: IO[bytes],
    err: IO[str],
    store: StateStore | None = None,
    clock: Clock = utc_now,
    progress: bool = False,
    forward: Any = None,
) -> ReplaySummary:
    """Stream every input through the engine; snapshots go to ``out`` as JSON lines."""
    engine = Engine(rules, store or MemoryStateStore(), clock)
    normalizer = Normalizer(fmt=fmt, prefilter=engine.could_match, max_skew_s=DEFAULT_MAX_SKEW_S, max_age_s=DEFAULT_MAX_AGE_S)
    summary = ReplaySummary()
    batch: list[NormalizedEvent] = []
    started = last_report = time.monotonic()

    def flush() -> None:
        result = engine.process(batch)
        summary.stats += result.stats
        for snap in result.incidents:
            data = orjson.dumps(snap)
            out.write(data + b"\n")
            if forward is not None:
                _forward(forward, data, err, summary)
        batch.clear()

    for item in iter_paths(normalizer, paths, clock):
        summary.records += 1
        if type(item) is Skipped:
            summary.skipped += 1
        elif type(item) is Rejection:
            summary.rejected += 1
            err.write(f"{item}\n")
        else:
            batch.append(item)  # type: ignore[arg-type]
            if len(batch) >= REPLAY_BATCH:
                flush()
        if progress and summary.records % 50000 == 0 and time.monotonic() - last_report > 1:
            last_report = time.monotonic()
            rate = summary.records / (last_report - started)
            err.write(f"\r{summary.records} records ({rate:,.0f}/s)")
            err.flush()
    if batch:
        flush()
    if progress and summary.records >= 50000:
        err.write("\n")
    out.flush()
    return summary


def _forward(forwarder: Any, data: bytes, err: IO[str], summary: ReplaySummary) -> None:
    from .webhook import DeliveryError

    try:
        result = forwarder.handle(data, dequeue_count=forwarder.max_dequeue_count)
    except DeliveryError as exc:
        result = None
        err.write(f"webhook: {exc}\n")
    if result is not None and result.failed:
        err.write(f"webhook: {'; '.join(result.failed.values())}\n")
    summary.forwarded += len(result.delivered) if result is not None else 0
