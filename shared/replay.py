"""``python -m shared replay``: run the rules over alert files with the in-memory store.

Snapshots go out as JSON lines as they are produced (``output="json"``), or are kept (the latest
revision of each incident, bounded) for a table at the end (``output="table"``) and/or an HTML
report. ``explain`` lists every skipped record, every alert no rule matched and every rejected
record with its reason. The summary says which rules matched which alerts on which hosts.
"""

from __future__ import annotations

import functools
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, ParamSpec, TypeVar

import orjson

from . import views
from .engine import Clock, Engine, Stats, utc_now
from .normalize import (
    ALERT,
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_SKEW_S,
    EVIDENCE,
    NormalizedEvent,
    Normalizer,
    Rejection,
    Skipped,
    iso,
    iter_paths,
)
from .rules import Rule
from .snapshot import Snapshot
from .state import MemoryStateStore, StateStore

REPLAY_BATCH = 1000  # events per engine batch: one load and one save per touched group per batch
# Group states a replay keeps in memory; less recently written ones wait in a temporary file (deleted
# when the replay's store is collected, at the latest at exit), so memory stays flat however long the input.
REPLAY_HOT_GROUPS = 50_000
MAX_EXPLAINED = 2000  # explain lines kept per kind of reason; further ones are counted
MAX_TIMELINE_ALERTS = 5000  # alert dots kept for the HTML timeline
MAX_NAMES_PER_RULE = 20  # alert names and hosts listed per rule in the summary


@dataclass
class RuleSummary:
    """What one rule matched: alert names (incidents created per name) and hosts, bounded."""

    alert_names: Counter[str] = field(default_factory=Counter)
    hosts: dict[str, None] = field(default_factory=dict)

    def add(self, snap: Snapshot) -> None:
        name = views.alert_name(snap) if snap.get("action") == "created" else ""
        if name and (name in self.alert_names or len(self.alert_names) < MAX_NAMES_PER_RULE):
            self.alert_names[name] += 1
        for h in views.hosts(snap) if len(self.hosts) < MAX_NAMES_PER_RULE else ():
            if len(self.hosts) < MAX_NAMES_PER_RULE:
                self.hosts[h] = None


@dataclass
class ReplaySummary:
    records: int = 0
    rejected: int = 0
    skipped: int = 0
    forwarded: int = 0
    forward_failed: int = 0  # incidents that did not reach every forwarding target
    stats: Stats = field(default_factory=Stats)
    rules: dict[str, RuleSummary] = field(default_factory=dict)
    rule_names: dict[str, str] = field(default_factory=dict)
    incidents: dict[str, Snapshot] = field(default_factory=dict)  # latest revision per incident (kept ones)
    incidents_omitted: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)  # timeline points
    alerts_omitted: int = 0
    alert_hosts: dict[str, str] = field(default_factory=dict)  # alert id -> host, from evidence rows
    explaining: bool = False
    alert_ids: set[str] = field(default_factory=set)  # alerts seen (only when explaining evidence rows)
    evidence_rows: dict[str, list[str]] = field(default_factory=dict)  # alert id -> positions of its evidence rows
    explained: dict[str, list[str]] = field(default_factory=dict)
    explained_omitted: Counter[str] = field(default_factory=Counter)
    skipped_types: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0

    def lines(self) -> list[str]:
        c = self.stats.counts
        hint = " (--explain lists them)" if (self.skipped or self.unmatched or self.rejected) and not self.explaining else ""
        skipped = ", ".join(f"{t} {n}" for t, n in self.skipped_types.most_common(5))
        out = [
            f"records read: {self.records}, rejected: {self.rejected}, skipped (no rule can match): {self.skipped}"
            + (f" [{skipped}]" if skipped else "")
            + hint,
            f"events matched: {c['matched']}, counted: {c['counted']}, duplicates: {c['duplicates']}, "
            f"late: {c['late']}, incidents created: {c['incidents_created']}, updated: {c['incidents_updated']}",
        ]
        if self.unmatched:
            out.append(f"alerts no rule matched: {self.unmatched}")
        if self.forwarded or self.forward_failed:
            out.append(f"incidents forwarded to the webhook: {self.forwarded}, failed: {self.forward_failed}")
        if self.stats.per_rule:
            out.append("rules that matched:")
        for rule_id, rc in sorted(self.stats.per_rule.items()):
            out.append(
                f"  {rule_id}: matched {rc['matched']}, late {rc['late']}, duplicates {rc['duplicates']}, "
                f"created {rc['incidents_created']}, updated {rc['incidents_updated']}"
            )
            rs = self.rules.get(rule_id)
            if rs is not None and rs.alert_names:
                names = ", ".join(f'"{n}" x{k}' for n, k in rs.alert_names.most_common())
                out.append(f"      alerts (incidents created): {names}")
            if rs is not None and rs.hosts:
                out.append(f"      hosts: {', '.join(rs.hosts)}")
        return [views.printable(line) for line in out]  # names and hosts come from alert data

    def explain_lines(self) -> list[str]:
        out = []
        for reason, lines in self.explained.items():
            more = self.explained_omitted.get(reason, 0)
            out.append(f"{reason}: {len(lines) + more}")
            out += [f"  {line}" for line in lines]
            if more:
                out.append(f"  ... {more} more")
        return [views.printable(line) for line in out]

    def explain(self, reason: str, line: str) -> None:
        kept = self.explained.setdefault(reason, [])
        if len(kept) < MAX_EXPLAINED:
            kept.append(line)
        else:
            self.explained_omitted[reason] += 1

    def keep(self, snap: Snapshot) -> None:
        """Keep the latest revision of each incident (bounded), for the table and the report."""
        key = str(snap.get("incidentId"))
        kept = self.incidents.get(key)
        if kept is None and len(self.incidents) >= views.MAX_KEPT_INCIDENTS:
            self.incidents_omitted += 1
            return
        if kept is None or snap.get("revision", 0) >= kept.get("revision", 0):
            self.incidents[key] = snap


@dataclass(frozen=True, slots=True)
class SkippedAt(Skipped):
    """A skipped record and where it was read (only built when explaining)."""

    position: str = ""


class _PositionedNormalizer(Normalizer):
    """Remembers where each skipped record came from (the plain normalizer does not pay for that)."""

    def normalize(self, rec: Any, position: str, arrival: datetime) -> Any:
        item = super().normalize(rec, position, arrival)
        if type(item) is Skipped:
            return SkippedAt(item.event_type, position=position)
        return item

    def line_filter(self) -> None:
        return None  # explaining lists every skipped record with its position: parse them all


_P = ParamSpec("_P")
_R = TypeVar("_R")
GC_EVERY_BATCHES = 100  # while replaying, the cyclic collector runs once per this many batches
GC_YOUNG_LIMIT = 100_000  # and, after a --forward delivery, on the young objects past this many net allocations


def _fewer_collections(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with the cyclic garbage collector paused (``replay`` collects every
    ``GC_EVERY_BATCHES`` batches itself); the collector's state is restored on return.

    The collector's cost grows with the objects alive, and a replay keeps many: a batch's 1,000 parsed
    records until it is processed, the store's most recently written states as objects. At CPython's
    thresholds it rescanned them every few records (a fifth of the CPU time of an alert-dense replay;
    a quarter of a seed-match one with 20,000 states kept as objects, even at a young threshold of
    50,000). The engine makes no reference cycles per record (everything it drops is freed by
    reference counting; tested), so the periodic collection has little to find."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


@_fewer_collections
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
    output: str = "json",
    explain: bool = False,
    keep: bool = False,
) -> ReplaySummary:
    """Stream every input through the engine.

    ``output="json"`` writes each snapshot to ``out`` as a JSON line when produced; ``"table"``
    writes nothing there (the caller renders ``summary.incidents``). ``keep`` keeps the latest
    snapshots and the alert timeline (for a table or an HTML report).
    """
    own_store = None
    if store is None:
        store = own_store = MemoryStateStore(hot_limit=REPLAY_HOT_GROUPS)
    engine = Engine(rules, store, clock)
    normalizer_cls = _PositionedNormalizer if explain else Normalizer
    normalizer = normalizer_cls(
        fmt=fmt,
        prefilter=engine.could_match,
        max_skew_s=DEFAULT_MAX_SKEW_S,
        max_age_s=DEFAULT_MAX_AGE_S,
        evidence_columns=bool(engine.evidence_rules),  # else AlertEvidence rows only feed the join
    )
    summary = ReplaySummary(rule_names={r.id: r.model.name for r in rules}, explaining=explain)
    keep = keep or output == "table"
    batch: list[NormalizedEvent] = []
    started = last_report = time.monotonic()

    event_progress: list[Any] = [None]  # newest event time replayed: the replay's event-time progress

    batches = [0]

    def flush() -> None:
        batches[0] += 1
        if batches[0] % GC_EVERY_BATCHES == 0:
            gc.collect()  # the engine and the normalizer make no reference cycles (tested): this is a backstop
        if keep or explain:
            _look_at_batch(engine, batch, summary, keep=keep, explain=explain)
        results = [engine.process(batch)]
        newest = max((e.event_time for e in batch), default=None)
        if newest is not None and (event_progress[0] is None or newest > event_progress[0]):
            event_progress[0] = newest
        if event_progress[0] is not None:  # absences and quiet clears whose deadline the replay has passed
            results.append(engine.fire_due(event_progress[0]))
        for result in results:
            summary.stats += result.stats
            for snap in result.incidents:
                summary.rules.setdefault(str(snap.get("ruleId")), RuleSummary()).add(snap)
                if keep:
                    summary.keep(snap)
                data = orjson.dumps(snap)
                if output == "json":
                    out.write(data + b"\n")
                if forward is not None:
                    _forward(forward, data, err, summary)
                    _collect_young_past_limit()  # a refused connection leaves ~170 objects in cycles
        batch.clear()

    next_report = 50000
    for item in iter_paths(normalizer, paths, clock):
        if isinstance(item, Skipped):
            summary.records += item.count
            summary.skipped += item.count
            summary.skipped_types[item.event_type] += item.count
            if explain:
                where = item.position if isinstance(item, SkippedAt) else "?"
                summary.explain(
                    "skipped: no enabled rule can match the event type",
                    f"{where}: {item.event_type}: no enabled rule's query can match this eventType",
                )
        elif type(item) is Rejection:
            summary.records += 1
            summary.rejected += 1
            err.write(f"{item}\n")
            if explain:
                summary.explain("rejected", str(item))
        else:
            summary.records += 1
            batch.append(item)  # type: ignore[arg-type]
            if len(batch) >= REPLAY_BATCH:
                flush()
        if progress and summary.records >= next_report and time.monotonic() - last_report > 1:
            next_report = summary.records + 50000
            last_report = time.monotonic()
            rate = summary.records / (last_report - started)
            err.write(f"\r{summary.records} records ({rate:,.0f}/s)")
            err.flush()
    if batch:
        flush()
    if progress and summary.records >= 50000:
        err.write("\n")
    for alert_id, positions in summary.evidence_rows.items():
        if alert_id not in summary.alert_ids:
            for where in positions:
                summary.explain(
                    "AlertEvidence rows whose alert was not in the input (held 1 hour for it in Azure)",
                    f"{where}: alert {alert_id}",
                )
    for alert in summary.alerts:  # AlertInfo rows have no host: their evidence rows (or other versions) do
        if not alert.get("host"):
            alert["host"] = summary.alert_hosts.get(str(alert.get("alertId")), "")
    out.flush()
    if own_store is not None:
        own_store.close()  # deletes its spill file now (after an error: when collected, at the latest at exit)
    return summary


def _collect_young_past_limit() -> None:
    """Collect the young generation once ``GC_YOUNG_LIMIT`` more objects were allocated than freed
    since the last collection: while the collector is paused, garbage in reference cycles (a failed
    webhook delivery's exception, traceback and frames) stays bounded. Survivors are scanned once."""
    if gc.get_count()[0] > GC_YOUNG_LIMIT:
        gc.collect(0)


def _look_at_batch(engine: Engine, batch: list[NormalizedEvent], summary: ReplaySummary, *, keep: bool, explain: bool) -> None:
    """Timeline points and explanations for the events of one batch (only when asked for)."""
    for event in batch:
        attrs = event.attrs
        alert_id = str(attrs.get("alertIdStr") or "")
        host = attrs.get("hostName")
        if alert_id and isinstance(host, str) and len(summary.alert_hosts) < 10 * MAX_TIMELINE_ALERTS:
            summary.alert_hosts.setdefault(alert_id, host)  # evidence rows, and other versions of the alert
        if explain and alert_id and len(summary.evidence_rows) < MAX_EXPLAINED:
            if event.kind == EVIDENCE:
                summary.evidence_rows.setdefault(alert_id.casefold(), []).append(event.position)
            elif event.kind == ALERT:
                summary.alert_ids.add(alert_id.casefold())
        if event.kind != ALERT:
            continue
        matched = any(r.query.matches(attrs) for r in engine.rules)
        if not matched:
            summary.unmatched += 1
            if explain:
                techniques = attrs.get("attackTechniqueId") or ()
                summary.explain(
                    "alerts no rule matched",
                    f"{event.position}: {attrs.get('eventType')} {alert_id} {attrs.get('alertName', '')!r}"
                    f" techniques [{', '.join(techniques) if not isinstance(techniques, str) else techniques}]:"
                    " no enabled rule's query matched",
                )
        if keep:
            if len(summary.alerts) >= MAX_TIMELINE_ALERTS:
                summary.alerts_omitted += 1
                continue
            summary.alerts.append(
                {
                    "time": iso(event.event_time),
                    "host": attrs.get("hostName") if isinstance(attrs.get("hostName"), str) else "",
                    "title": str(attrs.get("alertName") or ""),
                    "severity": str(attrs.get("eventSeverityCat") or "UNKNOWN"),
                    "alertId": alert_id,
                    "matched": matched,
                }
            )


def _forward(forwarder: Any, data: bytes, err: IO[str], summary: ReplaySummary) -> None:
    from .webhook import DeliveryError

    try:
        result = forwarder.handle(data, dequeue_count=forwarder.max_dequeue_count)
    except DeliveryError as exc:
        result = None
        err.write(f"webhook: {exc}\n")
    if result is not None and result.failed:
        err.write(f"webhook: {'; '.join(result.failed.values())}\n")
    if result is None or result.failed:
        summary.forward_failed += 1
    summary.forwarded += len(result.delivered) if result is not None else 0
