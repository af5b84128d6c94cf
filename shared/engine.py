"""The correlation engine: sliding windows per group key, triggers, incidents as snapshots.

The core (:func:`apply_events`) is pure: a group's state and its new events in, the new state and
the incident snapshots out. :class:`Engine` adds the batch mechanics around it: match events to rules,
group them, load every touched group once, apply, save every changed group once (retrying a group
whose state another writer changed), and only then hand back the snapshots. Time is injected.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from .errors import RuleError, StoreError
from .normalize import EVIDENCE, EVIDENCE_EVENT_TYPE, NormalizedEvent, iso, raw_evidence
from .query import mentions
from .rules import Rule
from .state import (
    MAX_STATE_BYTES,
    MAX_WINDOW_ENTRIES,
    SIZE_CHECK_ENTRIES,
    Change,
    GroupKey,
    GroupState,
    Incident,
    KeysConflict,
    Loaded,
    StateStore,
    identity_hash,
)

log = logging.getLogger(__name__)

MAX_TRIGGER_EVENTS = 5  # evidence events carried by one snapshot
MAX_PREFILTER_CACHE = 4096  # event types remembered by the prefilter (real feeds have a few dozen)
MAX_SAVE_ATTEMPTS = 5  # optimistic-concurrency retries per batch before giving up (infrastructure error)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def from_ms(ms: int) -> str:
    return iso(datetime.fromtimestamp(ms / 1000, tz=timezone.utc))


@dataclass
class Stats:
    """Counters for one batch (or a whole replay); merged with ``+=``."""

    counts: Counter[str] = field(default_factory=Counter)
    per_rule: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, name: str, n: int = 1, rule: str | None = None) -> None:
        self.counts[name] += n
        if rule is not None:
            self.per_rule[rule][name] += n

    def __iadd__(self, other: Stats) -> Stats:
        self.counts.update(other.counts)
        for rule, c in other.per_rule.items():
            self.per_rule[rule].update(c)
        return self


MAX_GROUP_VALUE_CHARS = 512  # longer group-by values are cut and suffixed with a hash, so state stays small


def _bounded(value: str) -> str:
    if len(value) <= MAX_GROUP_VALUE_CHARS:
        return value
    digest = hashlib.blake2b(value.encode(), digest_size=8).hexdigest()
    return f"{value[: MAX_GROUP_VALUE_CHARS - 20]}...#{digest}"


def group_key(rule: Rule, event: NormalizedEvent) -> GroupKey:
    """Group-by values of an event; a missing value is an empty value, several values are joined.

    Values longer than ``MAX_GROUP_VALUE_CHARS`` are cut and suffixed with a hash of the whole value:
    distinct values stay distinct, and no alert can make its group's state too big to store.
    """
    values = []
    for attr in rule.group_by:
        v = event.attrs.get(attr)
        if v is None:
            values.append("")
        elif type(v) in (list, tuple):
            values.append(_bounded(",".join(str(x) for x in v)))
        else:
            values.append(_bounded(str(v)))
    return GroupKey(rule.id, tuple(values))


def incident_id(key: GroupKey, first_identity: str) -> str:
    digest = hashlib.blake2b(f"{key.text}\x1e{first_identity}".encode(), digest_size=12).hexdigest()
    return f"inc-{digest}"


def _window_values(rule: Rule, event: NormalizedEvent) -> list[Any]:
    out = []
    for attr in rule.window_attrs:
        v = event.attrs.get(attr)
        out.append(list(v) if type(v) is tuple else v)
    return out


def _aggregate_values(rule: Rule, entries: list[list[Any]]) -> dict[Any, Any]:
    values: dict[Any, Any] = {}
    for agg in rule.aggregates:
        column = None
        if agg.attr is not None:
            idx = 2 + rule.window_attrs.index(agg.attr)
            column = [e[idx] for e in entries]
        values[agg] = agg.compute(column, len(entries))
    return values


def _event_summary(event: NormalizedEvent) -> dict[str, Any]:
    return {
        "eventType": event.event_type,
        "eventTime": iso(event.event_time),
        "timeFallback": event.time_fallback,
        "format": event.format,
        "position": event.position,
        "identity": event.identity,
        "attributes": {k: (list(v) if type(v) is tuple else v) for k, v in event.attrs.items()},
        "raw": raw_evidence(event.raw),
    }


def snapshot(rule: Rule, key: GroupKey, incident: Incident, action: str, trigger_events: list[NormalizedEvent]) -> dict[str, Any]:
    """The incident message: a full snapshot; consumers keep the highest revision per incidentId."""
    model = rule.model
    return {
        "incidentId": incident.incident_id,
        "revision": incident.revision,
        "action": action,
        "ruleId": rule.id,
        "ruleName": model.name,
        "severity": model.severity,
        "category": model.category,
        "tactics": [t.model_dump(exclude_none=True) for t in model.tactics],
        "techniques": [t.model_dump(exclude_none=True) for t in model.techniques],
        "groupBy": dict(zip(rule.group_by, key.values, strict=False)),
        "attributes": dict(incident.attributes),
        "triggerCount": incident.trigger_count,
        "firstSeen": from_ms(incident.first_seen),
        "lastSeen": from_ms(incident.last_seen),
        "remediation": model.remediation,
        "triggerEvents": [_event_summary(e) for e in trigger_events[-MAX_TRIGGER_EVENTS:]],
    }


def fit_snapshot(snapshot: dict[str, Any], limit: int) -> bytes:
    """Encode a snapshot within ``limit`` bytes: its oldest trigger events are dropped first, and
    ``triggerEventsTrimmed`` says how many; then long attribute values are cut to 1 KiB."""
    data = orjson.dumps(snapshot)
    if len(data) <= limit:
        return data
    trimmed = dict(snapshot)
    events = list(trimmed.get("triggerEvents", []))
    dropped = 0
    while events and len(data) > limit:
        events.pop(0)
        dropped += 1
        trimmed["triggerEvents"] = events
        trimmed["triggerEventsTrimmed"] = dropped
        data = orjson.dumps(trimmed)
    if len(data) > limit:
        trimmed["attributes"] = {k: (v[:1024] if isinstance(v, str) else v) for k, v in trimmed.get("attributes", {}).items()}
        trimmed["attributesTrimmed"] = True
        data = orjson.dumps(trimmed)
    return data


def apply_events(
    rule: Rule, key: GroupKey, state: GroupState | None, events: Sequence[NormalizedEvent], stats: Stats
) -> tuple[GroupState, list[dict[str, Any]]]:
    """Pure core: fold ``events`` (all of this rule and group) into ``state``.

    Returns the new state and one snapshot per incident changed by these events (its final
    revision in this batch). Events whose identity the window already holds change nothing.
    """
    st = state if state is not None else GroupState(key)
    key = st.key  # the group's values keep the case of its first event
    window_ms = rule.window_s * 1000
    lifetime_ms = rule.lifetime_s * 1000
    seen = {e[1] for e in st.entries}
    touched: dict[str, tuple[Incident, str, list[NormalizedEvent]]] = {}
    ordered = sorted(events, key=lambda e: (e.event_time, e.identity))
    for event in ordered:
        t = to_ms(event.event_time)
        ident = identity_hash(event.identity)
        if ident in seen:
            stats.add("duplicates", rule=rule.id)
            continue
        if st.newest is not None and t < st.newest - window_ms:
            stats.add("late", rule=rule.id)
            continue
        seen.add(ident)
        entry = [t, ident, *_window_values(rule, event)]
        _insert_sorted(st.entries, entry)
        if st.newest is None or t > st.newest:
            st.newest = t
        cutoff = st.newest - window_ms
        while st.entries and st.entries[0][0] < cutoff:
            st.entries.pop(0)
        if len(st.entries) > MAX_WINDOW_ENTRIES:
            drop = len(st.entries) - MAX_WINDOW_ENTRIES
            del st.entries[:drop]
            st.evicted += drop
            stats.add("evicted", drop, rule=rule.id)
            log.warning("window of %s over %d entries: evicted %d oldest", key.text, MAX_WINDOW_ENTRIES, drop)
        stats.add("counted", rule=rule.id)
        values = _aggregate_values(rule, st.entries)
        if not rule.constraint.holds(values):
            continue
        attributes = _map_attributes(rule, key, values)
        inc = st.incident
        if inc is not None and t - inc.last_trigger > lifetime_ms:
            inc = None  # closed: the lifetime passed with no trigger
        if inc is None:
            inc = Incident(
                incident_id=incident_id(key, event.identity),
                revision=1,
                first_seen=t,
                last_seen=t,
                last_trigger=t,
                window_start=t,
                trigger_count=1,
                attributes=attributes,
            )
            action = "created"
        else:
            inc.revision += 1
            if t - inc.window_start > window_ms:  # a distinct event window: FortiSIEM's incident count
                inc.trigger_count += 1
                inc.window_start = t
            inc.last_seen = max(inc.last_seen, t)
            inc.last_trigger = max(inc.last_trigger, t)
            inc.attributes = attributes
            prior = touched.get(inc.incident_id)
            action = prior[1] if prior else "updated"
        st.incident = inc
        prev = touched.get(inc.incident_id)
        evidence = (prev[2] if prev else []) + [event]
        touched[inc.incident_id] = (inc, action, evidence[-MAX_TRIGGER_EVENTS:])
    if not touched and st.incident is not None and ordered and _all_known(st, ordered):
        # Only already-counted events: re-emit the current snapshot (same revision) so that a batch
        # retried after its state was saved but before its output was delivered loses nothing.
        stats.add("reemitted", rule=rule.id)
        return st, [snapshot(rule, key, st.incident, "updated" if st.incident.revision > 1 else "created", list(ordered))]
    _fit(st, stats, rule.id)
    snapshots = []
    for inc, action, evidence in touched.values():
        stats.add("incidents_" + action, rule=rule.id)
        snapshots.append(snapshot(rule, key, inc, action, evidence))
    return st, snapshots


def _fit(st: GroupState, stats: Stats, rule_id: str) -> None:
    """Evict the oldest entries until the encoded state fits one Table property (never fail a write)."""
    small_values = sum(len(v) for v in st.key.values) < 4096 and all(len(e) == 2 for e in st.entries[-1:])
    if len(st.entries) < SIZE_CHECK_ENTRIES and small_values:
        return
    size = len(st.to_bytes())
    while size > MAX_STATE_BYTES and st.entries:
        drop = max(1, len(st.entries) // 10)
        del st.entries[:drop]
        st.evicted += drop
        stats.add("evicted", drop, rule=rule_id)
        log.warning("state of %s over %d bytes: evicted %d oldest window entries", st.key.text[:200], MAX_STATE_BYTES, drop)
        size = len(st.to_bytes())


def _all_known(st: GroupState, events: Sequence[NormalizedEvent]) -> bool:
    known = {e[1] for e in st.entries}
    return all(identity_hash(e.identity) in known for e in events)


def _insert_sorted(entries: list[list[Any]], entry: list[Any]) -> None:
    i = len(entries)
    while i > 0 and entries[i - 1][0] > entry[0]:
        i -= 1
    entries.insert(i, entry)


def _map_attributes(rule: Rule, key: GroupKey, values: dict[Any, Any]) -> dict[str, Any]:
    by_attr = dict(zip(rule.group_by, key.values, strict=False))
    out: dict[str, Any] = {}
    for m in rule.mappings:
        if m.aggregate is not None:
            v = values.get(m.aggregate)
            out[m.incident_attr] = int(v) if isinstance(v, float) and v.is_integer() else v
        else:
            out[m.incident_attr] = by_attr.get(m.attr or "", "")
    return out


def expires_at(rule: Rule, now_ms: int) -> int:
    """Wall-clock time after which an idle group can be purged: neither its window nor its
    incident can change any more once both the window and the incident lifetime have passed."""
    return now_ms + max(rule.window_s, rule.lifetime_s) * 1000


@dataclass
class BatchResult:
    incidents: list[dict[str, Any]]
    stats: Stats


class Engine:
    """Runs every enabled rule over batches of normalized events against a state store."""

    def __init__(self, rules: Sequence[Rule], store: StateStore, clock: Clock = utc_now) -> None:
        self.rules = [r for r in rules if r.model.enabled]
        for r in self.rules:
            if r.sequence:  # the multi-subpattern correlator (shared/sequence.py) is wired in next
                raise RuleError("multi-subpattern rules and clear conditions are not wired into the engine yet", file=r.path)
        # Alert evidence rows are not alerts: only rules that name the evidence type see them.
        self.evidence_rules = [r for r in self.rules if mentions(r.query.tree, "eventType", "AlertEvidence")]
        self.store = store
        self.clock = clock
        self._wanted: dict[str, bool] = {}

    def could_match(self, event_type: str) -> bool:
        """Prefilter for the normalizer: can any rule match an event of this type?"""
        hit = self._wanted.get(event_type)
        if hit is None:
            rules = self.evidence_rules if event_type == EVIDENCE_EVENT_TYPE else self.rules
            hit = any(r.query.could_match({"eventType": event_type}) for r in rules)
            if len(self._wanted) >= MAX_PREFILTER_CACHE:
                self._wanted.clear()  # event types are input: the cache must not grow with them
            self._wanted[event_type] = hit
        return hit

    def process(self, events: Sequence[NormalizedEvent]) -> BatchResult:
        """Process one batch.

        Raises:
            StoreError: the store failed or conflicts did not settle; nothing was emitted, and a
                retry of the whole batch is safe (already-counted events are recognised).
        """
        stats = Stats()
        groups: dict[GroupKey, tuple[Rule, list[NormalizedEvent]]] = {}
        for event in events:
            for rule in self.evidence_rules if event.kind == EVIDENCE else self.rules:
                if rule.query.matches(event.attrs):
                    stats.add("matched", rule=rule.id)
                    key = group_key(rule, event)
                    groups.setdefault(key, (rule, []))[1].append(event)
        stats.add("groups", len(groups))
        if not groups:
            return BatchResult([], stats)
        pending = list(groups)
        incidents: list[dict[str, Any]] = []
        for attempt in range(1, MAX_SAVE_ATTEMPTS + 1):
            now_ms = to_ms(self.clock())
            loaded: dict[GroupKey, Loaded] = self.store.load(pending, now_ms)
            stats.add("storage_calls")
            changes: list[Change] = []
            produced: dict[GroupKey, tuple[list[dict[str, Any]], Stats]] = {}
            for key in pending:
                rule, group_events = groups[key]
                current = loaded.get(key, Loaded(None, None))
                group_stats = Stats()
                new_state, snaps = apply_events(rule, key, current.state, group_events, group_stats)
                changes.append(Change(key, new_state, current.token, expires_at(rule, now_ms)))
                produced[key] = (snaps, group_stats)
            lost: set[GroupKey] = set()
            try:
                self.store.save(changes)
            except KeysConflict as conflict:
                lost = set(conflict.keys)
                stats.add("etag_conflicts", len(lost))
            stats.add("storage_calls")
            for key in pending:
                if key not in lost:
                    incidents.extend(produced[key][0])
                    stats += produced[key][1]
            if not lost:
                return BatchResult(incidents, stats)
            pending = [k for k in pending if k in lost]
            log.info("state conflict on %d group(s), attempt %d: re-reading", len(pending), attempt)
        raise StoreError(f"state of {len(pending)} group(s) kept changing under us after {MAX_SAVE_ATTEMPTS} attempts")
