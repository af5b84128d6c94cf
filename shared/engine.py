"""The correlation engine: sliding windows per group key, triggers, incidents as snapshots.

The core (:func:`apply_events`) is pure: a group's state and its new events in, the new state and
the incident snapshots out. :class:`Engine` adds the batch mechanics around it: match events to rules,
group them, load every touched group once, apply, save every changed group once (retrying a group
whose state another writer changed), and only then hand back the snapshots. Time is injected.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, cast

import orjson

from . import entities
from .chaining import CHAIN_FORMAT, MAX_CHAIN_DEPTH, as_events, consumed
from .dispatch import Dispatch
from .errors import StoreError
from .normalize import ALERT, EVIDENCE, EVIDENCE_EVENT_TYPE, NormalizedEvent, iso, raw_evidence
from .rules import Rule
from .snapshot import RuleFields, Snapshot, TriggerEvent
from .state import (
    ATTRIBUTE_CHARS,
    MAX_ENTRY_BYTES,
    MAX_RECORD_BYTES,
    MAX_STATE_BYTES,
    MAX_WINDOW_ENTRIES,
    SIZE_CHECK_ENTRIES,
    SURELY_SMALL_ATTRIBUTES,
    Change,
    GroupKey,
    GroupState,
    Incident,
    KeysConflict,
    Loaded,
    OutboxRecord,
    StateStore,
    cut_attributes,
    identity_hash,
    packed_record,
    record_size_within,
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
    """``iso()`` of an epoch-ms time (already UTC, so without its conversion)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(ts: datetime) -> str:
    """``iso()``, skipping its conversion for a time that is already UTC (every normalized one)."""
    return ts.isoformat().replace("+00:00", "Z") if ts.tzinfo is timezone.utc else iso(ts)


class Counts(dict[str, int]):
    """Named counters; a name never counted reads 0 (as a ``Counter``, which costs more to make: one
    ``Stats`` is made per group and batch)."""

    def __missing__(self, name: str) -> int:
        return 0


@dataclass
class Stats:
    """Counters for one batch (or a whole replay); merged with ``+=``."""

    counts: Counts = field(default_factory=Counts)
    per_rule: dict[str, Counts] = field(default_factory=dict)

    def add(self, name: str, n: int = 1, rule: str | None = None) -> None:
        counts = self.counts
        counts[name] = counts.get(name, 0) + n
        if rule is not None:
            per = self.per_rule.get(rule)
            if per is None:
                per = self.per_rule[rule] = Counts()
            per[name] = per.get(name, 0) + n

    def __iadd__(self, other: Stats) -> Stats:
        counts = self.counts
        for name, n in other.counts.items():
            counts[name] = counts.get(name, 0) + n
        for rule, c in other.per_rule.items():
            per = self.per_rule.get(rule)
            if per is None:
                per = self.per_rule[rule] = Counts()
            for name, n in c.items():
                per[name] = per.get(name, 0) + n
        return self


MAX_GROUP_VALUE_CHARS = 512  # longer group-by values are cut and suffixed with a hash, so state stays small


_SHORTENED = re.compile(r"\.\.\.#[0-9a-fA-F]{16}\Z")


def _bounded(value: str) -> str:
    """A group-by value as stored: values up to ``MAX_GROUP_VALUE_CHARS`` unchanged; longer ones (and
    any value that looks like a shortened one, so none can pose as another) become the first 492
    characters of their lower-cased form + ``...#`` + BLAKE2b-64 of the whole lower-cased value.
    Grouping is case-insensitive (``str.lower``, as ``GroupKey`` compares), so values that differ
    only in case stay one group, long or short."""
    if len(value) <= MAX_GROUP_VALUE_CHARS and not (value[-20:-16] == "...#" and _SHORTENED.search(value)):
        return value
    folded = value.lower()
    digest = hashlib.blake2b(folded.encode(errors="surrogatepass"), digest_size=8).hexdigest()
    return f"{folded[: MAX_GROUP_VALUE_CHARS - 20]}...#{digest}"


MAX_KEY_BYTES = 16 * 1024  # a group key's values, JSON-encoded: the rest of a state's 60 KiB is its window and incident
_MAX_CHAR_BYTES = 6  # the most one character takes in JSON (a control character escaped as \u00XX)


def bounded_key(values: list[str]) -> list[str]:
    """Group-by values whose JSON takes at most ``MAX_KEY_BYTES`` (so the key leaves its state room):
    unchanged when they already do (every key of a rule with a handful of group-by attributes); else
    each value longer than an equal share is cut and hashed as ``_bounded`` does (hash-only, 20
    characters, for the smallest shares), so distinct values stay distinct. Holds for any rule with
    at most ``MAX_KEY_BYTES // 23`` (712) group-by attributes."""
    if sum(map(len, values)) * _MAX_CHAR_BYTES <= MAX_KEY_BYTES or len(orjson.dumps(values)) <= MAX_KEY_BYTES:
        return values
    share = max(20, (MAX_KEY_BYTES // len(values) - 3) // _MAX_CHAR_BYTES)
    return [v if len(v) <= share else _shortened(v, share) for v in values]


def _shortened(value: str, chars: int) -> str:
    """``value`` as ``chars`` characters: the start of its lower-cased form, ``...#`` and BLAKE2b-64 of it."""
    folded = value.lower()
    digest = hashlib.blake2b(folded.encode(errors="surrogatepass"), digest_size=8).hexdigest()
    return f"{folded[: chars - 20]}...#{digest}"


TENANT_ATTR = "tenantId"
MAX_RECORD_IDS = 4096  # identities one outbox record keeps (a group's new events in one batch)


def _group_value(v: Any) -> str:
    if v is None:
        return ""
    if type(v) in (list, tuple):
        return _bounded(",".join(str(x) for x in v))
    return _bounded(str(v))


def group_key(rule: Rule, event: NormalizedEvent) -> GroupKey:
    """Group-by values of an event; a missing value is an empty value, several values are joined.

    The tenant is always part of the key: when the rule does not group by ``tenantId`` its value is
    appended, so rules run per tenant whatever their author wrote (FortiSIEM's per-organization mode).
    Values longer than ``MAX_GROUP_VALUE_CHARS`` are cut and suffixed with a hash of the whole value:
    distinct values stay distinct, and no alert can make its group's state too big to store.
    """
    # Interned: alert names and tenants repeat across many groups, whose keys a store keeps.
    group_by = _static_fields(rule).group_by  # the property builds a new tuple per call
    attrs = event.attrs
    values = [sys.intern(_group_value(attrs.get(attr))) for attr in group_by]
    tenant = sys.intern(_group_value(attrs.get(TENANT_ATTR)))
    if TENANT_ATTR not in group_by:
        values.append(tenant)
    if len(values) > 5:  # up to five values of at most 512 characters are within MAX_KEY_BYTES
        values = bounded_key(values)
    return GroupKey(rule.id, tuple(values), tenant)


def incident_id(key: GroupKey, opened_ms: int) -> str:
    """``inc-`` + hex BLAKE2b-96 of ``key.text + "\\x1e" + str(opened_ms)``: the rule, the group (with its
    tenant, case-folded) and the event time in epoch ms of the event that opened the episode. No
    identity and no arrival order enters it, so events tied in time cannot make different ids."""
    digest = hashlib.blake2b(f"{key.text}\x1e{opened_ms}".encode(), digest_size=12).hexdigest()
    return f"inc-{digest}"


def _window_values(rule: Rule, event: NormalizedEvent) -> list[Any]:
    out = []
    for attr in rule.window_attrs:
        v = event.attrs.get(attr)
        out.append(json_copy(v) if type(v) in _CONTAINERS else v)
    return out


_CONTAINERS = frozenset((list, tuple, dict))


def json_copy(value: Any) -> Any:
    """``value`` with lists and dicts of its own, a tuple as a list (as JSON has it). A window entry
    keeps a copy of an event's list or object value: the state belongs to the store, which may keep
    the object (MemoryStateStore), while the same list is the event's, its raw record's and so the
    snapshot's trigger event's, which a consumer may change."""
    if type(value) is dict:
        return {k: json_copy(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if type(value) in (list, tuple):
        return [json_copy(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def _aggregate_values(rule: Rule, entries: list[list[Any]]) -> dict[Any, Any]:
    values: dict[Any, Any] = {}
    for agg in rule.aggregates:
        column = None
        if agg.attr is not None:
            idx = 2 + rule.window_attrs.index(agg.attr)
            column = [e[idx] for e in entries]
        values[agg] = agg.compute(column, len(entries))
    return values


def _event_summary(event: NormalizedEvent) -> TriggerEvent:
    return {
        "eventType": event.event_type,
        "eventTime": _iso(event.event_time),
        "timeFallback": event.time_fallback,
        "format": event.format,
        "position": event.position,
        "identity": event.identity,
        "attributes": {k: (list(v) if type(v) is tuple else v) for k, v in event.attrs.items()},
        "raw": raw_evidence(event.raw),
    }


SNAPSHOT_ORDER = (
    "incidentId",
    "revision",
    "action",
    "ruleId",
    "tenantId",
    "ruleName",
    "severity",
    "category",
    "tactics",
    "techniques",
    "groupBy",
    "attributes",
    "triggerCount",
    "firstSeen",
    "lastSeen",
    "remediation",
    "triggerEvents",
)


MAX_RULE_FIELDS_CACHE = 4096  # rules whose dumped fields are remembered (a rule set holds hundreds)


class _RuleStatic(NamedTuple):
    rule_id: str
    name: str
    severity: int
    category: str
    tactics: list[dict[str, Any]]
    techniques: list[dict[str, Any]]
    group_by: tuple[str, ...]
    remediation: str


_RULE_CACHE: dict[int, tuple[Rule, _RuleStatic]] = {}


def _static_fields(rule: Rule) -> _RuleStatic:
    """What a rule fixes in every snapshot, dumped once per rule object (rules are immutable)."""
    hit = _RULE_CACHE.get(id(rule))
    if hit is None or hit[0] is not rule:
        model = rule.model
        fields = _RuleStatic(
            rule.id,
            model.name,
            model.severity,
            model.category,
            [t.model_dump(exclude_none=True) for t in model.tactics],
            [t.model_dump(exclude_none=True) for t in model.techniques],
            rule.group_by,
            model.remediation,
        )
        if len(_RULE_CACHE) >= MAX_RULE_FIELDS_CACHE:
            _RULE_CACHE.clear()
        hit = _RULE_CACHE[id(rule)] = (rule, fields)
    return hit[1]


def rule_fields(rule: Rule, key: GroupKey) -> RuleFields:
    """The parts of a snapshot that the rule and the group key fix (not recorded in the outbox).
    Every call returns its own dicts and lists (snapshots never share them)."""
    rule_id, name, severity, category, tactics, techniques, group_by, remediation = _static_fields(rule)
    return {
        "ruleId": rule_id,
        "tenantId": key.tenant,
        "ruleName": name,
        "severity": severity,
        "category": category,
        "tactics": [dict(t) for t in tactics],
        "techniques": [dict(t) for t in techniques],
        "groupBy": dict(zip(group_by, key.values, strict=False)),
        "remediation": remediation,
    }


def assemble(fixed: RuleFields, own: Mapping[str, Any]) -> Snapshot:
    """A snapshot from its rule fields and its own fields, in ``SNAPSHOT_ORDER`` (then any extra
    own fields, such as ``triggerEventsTrimmed``), so a rebuilt snapshot encodes byte for byte alike."""
    rule_part: Mapping[str, Any] = fixed
    out = {k: rule_part[k] if k in rule_part else own[k] for k in SNAPSHOT_ORDER}
    out.update((k, v) for k, v in own.items() if k not in out)
    if "entities" in out:  # recorded compact (see _own)
        out["entities"] = entities.expand(out["entities"])
    return cast(Snapshot, out)


def own_fields(incident: Incident, action: str, trigger_events: list[NormalizedEvent]) -> dict[str, Any]:
    """A snapshot's own fields as its outbox record keeps them (entities compact): exactly
    ``_own(snapshot(...))``, without assembling the snapshot first."""
    return {
        "incidentId": incident.incident_id,
        "revision": incident.revision,
        "action": action,
        # copies: a saved state belongs to its store, which may keep the object (MemoryStateStore)
        "attributes": {k: list(v) if type(v) is list else v for k, v in incident.attributes.items()},
        "triggerCount": incident.trigger_count,
        "firstSeen": (first := from_ms(incident.first_seen)),
        "lastSeen": first if incident.last_seen == incident.first_seen else from_ms(incident.last_seen),
        "triggerEvents": [_event_summary(e) for e in trigger_events[-MAX_TRIGGER_EVENTS:]],
        "entities": entities.copied(incident.entities),
    }


def snapshot(rule: Rule, key: GroupKey, incident: Incident, action: str, trigger_events: list[NormalizedEvent]) -> Snapshot:
    """The incident message: a full snapshot; consumers keep the highest revision per incidentId."""
    return assemble(rule_fields(rule, key), own_fields(incident, action, trigger_events))


def fit_snapshot(snapshot: Mapping[str, Any], limit: int) -> bytes:
    """Encode a snapshot within ``limit`` bytes: its oldest trigger events are dropped first, and
    ``triggerEventsTrimmed`` says how many; then long attribute values are cut to 1 KiB; then its
    entities are dropped (``entitiesTrimmed``)."""
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
    if len(data) > limit and trimmed.get("entities"):
        trimmed["entities"] = entities.empty()
        trimmed["entitiesTrimmed"] = True
        data = orjson.dumps(trimmed)
    return data


class _Outbox:
    """A group's outbox records, decoded only when a batch holds events the group already knows.

    A record keeps each snapshot without its rule fields; they are put back from the rule, so a
    re-emitted snapshot is byte-identical as long as the rule file did not change in between."""

    def __init__(self, encoded: list[bytes]) -> None:
        self.encoded = encoded
        self._where: dict[int, int] | None = None
        self._records: list[OutboxRecord] = []

    def find(self, ident: int) -> int | None:
        """Position of the record whose batch applied the event ``ident``, if still kept."""
        if self._where is None:
            self._records = [OutboxRecord.decode(r) for r in self.encoded]
            self._where = {i: pos for pos, rec in enumerate(self._records) for i in rec.ids}
        return self._where.get(ident)

    def snapshots(self, positions: set[int], rule: Rule, key: GroupKey) -> list[Snapshot]:
        if not positions:
            return []
        fixed = rule_fields(rule, key)
        return [assemble(fixed, own) for pos in sorted(positions) for own in self._records[pos].snapshots]

    @staticmethod
    def record_own(ids: list[int], owns: list[dict[str, Any]], rule: Rule, key: GroupKey) -> tuple[bytes, list[Snapshot]]:
        """:meth:`record` of the snapshots whose own fields are ``owns`` (see :func:`own_fields`):
        the same record and snapshots, without taking the snapshots apart again when they fit."""
        mapped = len(rule.mappings)
        for own in owns:
            if len(own["attributes"]) < mapped:  # the state had to drop some (GroupState.shrink)
                own["attributesTrimmed"] = True
        data = OutboxRecord(ids[-MAX_RECORD_IDS:], owns).encode()
        fixed = rule_fields(rule, key)
        snapshots = [assemble(fixed, own) for own in owns]
        if record_size_within(data, MAX_RECORD_BYTES - 4):
            return data, snapshots
        return _Outbox.record(ids, snapshots)

    @staticmethod
    def record(ids: list[int], snapshots: list[Snapshot]) -> tuple[bytes, list[Snapshot]]:
        """The outbox record of a batch, within ``MAX_RECORD_BYTES``; returns it with the snapshots to
        emit, which are exactly the recorded ones (trimmed by ``fit_snapshot`` if they had to be). When
        one group opens hundreds of episodes in one batch, the record keeps the newest snapshots that
        fit (all are emitted): the write must never exceed Table's 64 KiB property."""
        ids = ids[-MAX_RECORD_IDS:]
        data = OutboxRecord(ids, [_own(s) for s in snapshots]).encode()
        if record_size_within(data, MAX_RECORD_BYTES - 4):
            return data, snapshots
        share = (MAX_RECORD_BYTES - 4 - 24 * len(ids) - 64) // len(snapshots)
        snapshots = [cast(Snapshot, orjson.loads(fit_snapshot(s, share))) for s in snapshots]
        # sizes as stored: packed (the limit is on what a table property holds)
        data, kept = packed_record(OutboxRecord(ids, [_own(s) for s in snapshots]).encode()), len(snapshots)
        while len(data) > MAX_RECORD_BYTES - 4 and kept > 1:  # hundreds of episodes: keep the newest that fit
            kept = max(1, min(kept - 1, kept * (MAX_RECORD_BYTES - 4) // len(data)))
            data = packed_record(OutboxRecord(ids, [_own(s) for s in snapshots[-kept:]]).encode())
        if len(data) > MAX_RECORD_BYTES - 4:  # one snapshot too big even trimmed: the last resort
            room = MAX_RECORD_BYTES - 4 - 64 - 16 - len(orjson.dumps(ids)) * 1001 // 1000  # 16: the record's brackets
            snapshots[-1] = _last_resort(snapshots[-1], room)
            data = packed_record(OutboxRecord(ids, [_own(snapshots[-1])]).encode())
        return data, snapshots


def _last_resort(snapshot: Snapshot, room: int) -> Snapshot:
    """``snapshot`` with its own fields (what a record keeps) within ``room`` bytes of JSON, by deflate's
    bound (so packed, too): no trigger events, no entities (``entitiesTrimmed``), then its attributes
    dropped largest first (``attributesTrimmed``). What is left (id, revision, action, counts, times,
    the markers) takes a few hundred bytes, so it always fits a record (``MAX_RECORD_BYTES`` less
    ``MAX_RECORD_IDS`` identities leaves 350 KiB)."""
    out = cast(dict[str, Any], dict(snapshot))
    dropped = len(out.get("triggerEvents", []))
    out["triggerEvents"] = []
    if dropped:
        out["triggerEventsTrimmed"] = out.get("triggerEventsTrimmed", 0) + dropped
    if out.get("entities"):
        out["entities"] = entities.empty()
        out["entitiesTrimmed"] = True
    attributes = dict(out.get("attributes", {}))
    out["attributes"] = attributes
    size = len(orjson.dumps(_own(cast(Snapshot, out)))) + 24  # 24: room for the marker
    for cost, name in sorted(((len(orjson.dumps([k, v])), k) for k, v in attributes.items()), key=lambda c: (-c[0], c[1])):
        if size + size // 1000 <= room:
            break
        del attributes[name]
        out["attributesTrimmed"] = True
        size -= cost - 2  # '["k",v]' is one byte longer than '"k":v,' and two longer than a last '"k":v'
    return cast(Snapshot, out)


def _own(snapshot: Snapshot) -> dict[str, Any]:
    own: dict[str, Any] = {k: v for k, v in snapshot.items() if k not in _RULE_FIELDS}
    if "entities" in own:  # empty kinds are not recorded; assemble() puts them back
        own["entities"] = entities.compact(own["entities"])
    return own


_RULE_FIELDS = frozenset(
    ("ruleId", "tenantId", "ruleName", "severity", "category", "tactics", "techniques", "groupBy", "remediation")
)


def apply_events(
    rule: Rule,
    key: GroupKey,
    state: GroupState | None,
    events: Sequence[NormalizedEvent],
    stats: Stats,
    alert_evidence: Mapping[GroupKey, Mapping[str, Any]] | None = None,
    joined: Sequence[NormalizedEvent] = (),
) -> tuple[GroupState, list[Snapshot]]:
    """Pure core: fold ``events`` (all of this rule and group) into ``state``.

    Events are folded in event-time order (a stable sort: events with the same time keep their
    delivery order). Returns the new state and the snapshots to emit: first, byte for byte, those
    that earlier batches emitted for any event redelivered here (the outbox), then one per incident
    changed by the new events (its final revision in this batch), which the new state records.
    An event the group already holds, or one at or below its eviction mark, changes nothing.

    Entities: each counted event's entities (plus ``alert_evidence[evidence_key(event)]``, from the
    AlertEvidence rows known for its alert id in its tenant) gather in ``pending`` until a trigger
    folds them into the incident.
    ``joined`` are AlertEvidence rows of alerts this group counted in earlier batches: what they add
    to the open incident's entities makes a new revision (``updated``), recorded in the outbox like
    any other, so a redelivered row re-emits it byte for byte.
    """
    st = state if state is not None else GroupState(key)
    if not st.key.tenant and key.tenant:  # a version 1 state did not record its tenant
        st.key = GroupKey(st.key.rule_id, st.key.values, key.tenant)
    key = st.key  # the group's values keep the case of its first event
    window_ms = rule.window_s * 1000
    lifetime_ms = rule.lifetime_s * 1000
    known = {e[1] for e in st.entries}
    outbox = _Outbox(st.outbox)
    replay: set[int] = set()  # outbox records to re-emit
    applied: list[int] = []  # identities this batch applies (its outbox record)
    evicted = 0
    touched: dict[str, tuple[Incident, str, list[NormalizedEvent]]] = {}
    bag = entities.EntityBag()
    bag.add(st.pending)
    sized = bool(rule.window_attrs)  # entries carry values: their bytes are capped after every event
    entry_bytes = sum(map(_entry_size, st.entries)) if sized else 0
    for event in sorted(events, key=lambda e: e.event_time):
        t = to_ms(event.event_time)
        ident = identity_hash(event.identity)
        late = st.newest is not None and t < st.newest - window_ms
        if ident in known or late or (st.mark is not None and [t, ident] <= st.mark):
            pos = outbox.find(ident)
            if pos is not None:
                replay.add(pos)
            if pos is not None or not late:
                stats.add("duplicates", rule=rule.id)
                continue
            stats.add("late", rule=rule.id)
            known.add(ident)
            applied.append(ident)
            continue
        known.add(ident)
        applied.append(ident)
        entry = [t, ident, *_window_values(rule, event)]
        _insert_sorted(st.entries, entry)
        entry_bytes += _entry_size(entry) if sized else 0
        if st.newest is None or t > st.newest:
            st.newest = t
        cutoff = st.newest - window_ms
        while st.entries and st.entries[0][0] < cutoff:
            gone = st.entries.pop(0)
            entry_bytes -= _entry_size(gone) if sized else 0
        if len(st.entries) > MAX_WINDOW_ENTRIES:
            over = len(st.entries) - MAX_WINDOW_ENTRIES
            entry_bytes -= sum(map(_entry_size, st.entries[:over])) if sized else 0
            evicted += _evict(st, over)
        while entry_bytes > MAX_ENTRY_BYTES and len(st.entries) > 1:  # the byte cap, like the count cap
            entry_bytes -= _entry_size(st.entries[0])
            evicted += _evict(st, 1)
        stats.add("counted", rule=rule.id)
        entities.collect(bag, event)
        if alert_evidence and (ekey := evidence_key(event)) is not None:  # never another tenant's alert
            bag.add(alert_evidence.get(ekey))
        values = _aggregate_values(rule, st.entries)
        if not rule.constraint.holds(values):
            continue
        attributes = _map_attributes(rule, key, values)
        inc = st.incident
        if inc is not None and t - inc.last_trigger > lifetime_ms:
            inc = None  # closed: the lifetime passed with no trigger
        if inc is None:
            inc = Incident(
                incident_id=incident_id(key, t),
                revision=1,
                first_seen=t,
                last_seen=t,
                last_trigger=t,
                window_start=t,
                trigger_count=1,
                attributes=attributes,
                entities=bag.to_dict(copy=False),  # the bag is replaced below
                unannounced=bool(rule.exceptions),  # until a revision passes the rule's exceptions
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
            inc.entities = entities.merge(inc.entities, bag.to_dict(copy=False))
            prior = touched.get(inc.incident_id)
            action = prior[1] if prior else "updated"
        st.incident = inc
        prev = touched.get(inc.incident_id)
        evidence = (prev[2] if prev else []) + [event]
        touched[inc.incident_id] = (inc, action, evidence[-MAX_TRIGGER_EVENTS:])
        bag = entities.EntityBag()  # the trigger took what was pending
    st.pending = bag.to_dict(copy=False) if any(bag.values.values()) else None
    _join(st, joined, outbox, replay, applied, touched, (window_ms, lifetime_ms), stats, rule.id)
    evicted += _fit(st)
    if evicted:
        stats.add("evicted", evicted, rule=rule.id)
        group = "|".join(key.values)[:200]
        log.warning("rule %s group %s over its window cap: evicted %d oldest entries in this batch", rule.id, group, evicted)
    snapshots = outbox.snapshots(replay, rule, key)
    stats.add("reemitted", len(snapshots), rule=rule.id)
    owns = []
    for inc, action, evidence in touched.values():
        if rule.exceptions:  # decided before the outbox records, so a re-emission is what was emitted
            if rule.excepted(inc.attributes, key.tenant, inc.last_seen):
                stats.add("excepted", rule=rule.id)
                continue
            if inc.unannounced:  # every earlier revision was excepted: this is the first anyone sees
                action, inc.unannounced = "created", False
        stats.add("incidents_" + action, rule=rule.id)
        owns.append(own_fields(inc, action, evidence))
    if not owns:
        return st, snapshots
    record, fresh = _Outbox.record_own(applied, owns, rule, key)
    st.add_record(record)
    return st, snapshots + fresh


def _join(
    st: GroupState,
    rows: Sequence[NormalizedEvent],
    outbox: _Outbox,
    replay: set[int],
    applied: list[int],
    touched: dict[str, tuple[Incident, str, list[NormalizedEvent]]],
    spans: tuple[int, int],
    stats: Stats,
    rule_id: str,
) -> None:
    """Fold AlertEvidence rows that arrived after their alert into the group's open incident, only
    when the row's alert belongs to that incident's episode: a row carries its alert's time, and an
    alert of an earlier episode is older than the open one's start by more than the window (episodes
    are separated by the incident lifetime), so it never enriches a later incident of the group."""
    if not rows:
        return
    window_ms, lifetime_ms = spans
    inc = st.incident
    bag = entities.EntityBag()
    new_ids = []
    for row in rows:
        ident = identity_hash(row.identity)
        pos = outbox.find(ident)
        if pos is not None:  # this row already enriched the incident: re-emit that snapshot
            replay.add(pos)
            continue
        t = to_ms(row.event_time)
        if inc is None or t - inc.last_trigger > lifetime_ms or t < inc.first_seen - window_ms:
            continue  # no open incident to enrich, or the alert was counted in an earlier episode
        entities.collect(bag, row)
        new_ids.append(ident)
    if inc is None or not new_ids:
        return
    merged = entities.merge(inc.entities, bag.to_dict(copy=False))
    if merged == (inc.entities or entities.empty()):
        return  # nothing new: no revision
    inc.entities = merged
    applied.extend(new_ids)
    stats.add("enriched", rule=rule_id)
    prior = touched.get(inc.incident_id)
    if prior is None:
        inc.revision += 1
    touched[inc.incident_id] = (inc, prior[1] if prior else "updated", prior[2] if prior else [])


def _evict(st: GroupState, n: int) -> int:
    """Drop the ``n`` oldest entries and raise the eviction mark to the newest of them."""
    newest = max(e[:2] for e in st.entries[:n])
    st.mark = newest if st.mark is None or newest > st.mark else st.mark
    del st.entries[:n]
    st.evicted += n
    return n


def _entry_size(entry: list[Any]) -> int:
    return len(orjson.dumps(entry)) + 1


def _fit(st: GroupState) -> int:
    """Evict the oldest entries until the encoded state fits one Table property (never fail a write);
    with none left, ``GroupState.shrink`` cuts what the incident holds. Skipped when the state surely
    fits: few COUNT(*) entries (~45 bytes each), and key values and attributes of under 4,096
    characters (6 bytes each at most) beside entities of 8 KiB at most (incident and pending). An
    incident's attributes are first cut to ``MAX_ATTRIBUTES_BYTES`` (``cut_attributes``): only dozens
    of mappings of long values take that much, and a window is worth more than what they display."""
    inc = st.incident
    mapped = len(inc.attributes) if inc is not None else 0
    if inc is not None and mapped > SURELY_SMALL_ATTRIBUTES:  # first, whatever the window: it correlates
        cut_attributes(inc.attributes)
    chars = sum(len(v) for v in st.key.values) + ATTRIBUTE_CHARS * mapped
    small_values = chars < 4096 and all(len(e) == 2 for e in st.entries[-1:])
    if len(st.entries) < SIZE_CHECK_ENTRIES and small_values:
        return 0
    evicted = 0
    size = len(st.to_bytes())
    while size > MAX_STATE_BYTES and st.entries:
        evicted += _evict(st, max(1, len(st.entries) // 10))
        size = len(st.to_bytes())
    if size > MAX_STATE_BYTES:
        st.shrink()
    return evicted


def _insert_sorted(entries: list[list[Any]], entry: list[Any]) -> None:
    i = len(entries)
    while i > 0 and entries[i - 1][:2] > entry[:2]:
        i -= 1
    entries.insert(i, entry)


def mapped_number(value: Any) -> Any:
    """An aggregate as an incident attribute: a whole float as an int, but only within JSON's 64-bit
    integers (``MAX(riskScore)`` of an alert saying ``1e20`` stays a float: an int that large cannot be
    encoded, and the batch would fail on every retry)."""
    if isinstance(value, float) and value.is_integer() and -(2**63) <= value < 2**63:
        return int(value)
    return value


def _map_attributes(rule: Rule, key: GroupKey, values: dict[Any, Any]) -> dict[str, Any]:
    by_attr = dict(zip(_static_fields(rule).group_by, key.values, strict=False))
    out: dict[str, Any] = {}
    for m in rule.mappings:
        if m.aggregate is not None:
            v = values.get(m.aggregate)
            out[m.incident_attr] = mapped_number(v)
        else:
            out[m.incident_attr] = by_attr.get(m.attr or "", "")
    return out


def expires_at(rule: Rule, now_ms: int) -> int:
    """Wall-clock time after which an idle group can be purged: neither its window nor its
    incident can change any more once both the window and the incident lifetime have passed."""
    return now_ms + max(rule.window_s, rule.lifetime_s) * 1000


JOIN_RULE_ID = "~evidence"  # state of one alert's AlertEvidence rows; rule ids are [A-Za-z0-9_], so no rule has it
JOIN_HOLD_S = 3600  # evidence and its alert are joined if they arrive within this (processing time) of each other
MAX_JOIN_ROWS = 1000  # evidence row identities kept per alert (a real alert has a few dozen rows)
MAX_JOIN_LINKS = 16  # groups one alert is linked to (one per rule that counted it)


def evidence_key(event: NormalizedEvent) -> GroupKey | None:
    """The key of the alert an AlertInfo or AlertEvidence row belongs to: its alert id and tenant."""
    alert_id = event.attrs.get("alertIdStr")
    if not isinstance(alert_id, str) or not alert_id:
        return None
    tenant = _group_value(event.attrs.get(TENANT_ATTR))
    return GroupKey(JOIN_RULE_ID, (_bounded(alert_id), tenant), tenant)


def link_keys(st: GroupState) -> list[GroupKey]:
    return [GroupKey(str(rule_id), tuple(values), str(tenant)) for rule_id, values, tenant in st.links]


def apply_evidence(
    key: GroupKey, state: GroupState | None, rows: Sequence[NormalizedEvent], links: Sequence[GroupKey]
) -> tuple[GroupState, bool]:
    """Pure: fold one alert's new AlertEvidence rows (entities, identities) and the groups that
    counted the alert into its evidence state. Returns the state and whether it changed."""
    st = state if state is not None else GroupState(key)
    changed = state is None
    known = {e[1] for e in st.entries}
    bag = entities.EntityBag()
    bag.add(st.pending)
    for row in sorted(rows, key=lambda r: r.event_time):
        ident = identity_hash(row.identity)
        if ident in known:
            continue
        known.add(ident)
        _insert_sorted(st.entries, [to_ms(row.event_time), ident])
        entities.collect(bag, row)
        changed = True
    if len(st.entries) > MAX_JOIN_ROWS:
        del st.entries[: len(st.entries) - MAX_JOIN_ROWS]
    if changed and bag.values:  # no rows yet (an alert seen first): no entities to hold
        st.pending = bag.to_dict(copy=False)  # the bag is dropped here: its lists need no copy
    stored = {(r, tuple(v), t) for r, v, t in st.links}
    for link in links:
        if (link.rule_id, link.values, link.tenant) not in stored and len(st.links) < MAX_JOIN_LINKS:
            st.links.append([link.rule_id, list(link.values), link.tenant])
            if not _surely_small(st) and len(st.to_bytes()) > MAX_STATE_BYTES:  # long group values: stay writable
                st.links.pop()  # this group gets no later evidence; its alert's state never fails a write
                break
            changed = True
    return st, changed


def _surely_small(st: GroupState) -> bool:
    """Whether ``st.to_bytes()`` is surely within ``MAX_STATE_BYTES`` without encoding it: a state with
    neither entries nor entities, whose texts (at most 6 bytes per character escaped, 4 per character
    in UTF-8) and fixed parts are far below the limit."""
    if st.entries or st.pending or st.incident is not None or st.ext is not None or st.mark is not None:
        return False
    chars = sum(len(v) + 3 for v in st.key.values) + len(st.key.rule_id) + len(st.key.tenant)
    chars += sum(len(r) + len(t) + 10 + sum(len(v) + 3 for v in values) for r, values, t in st.links)
    return 6 * chars + 256 < MAX_STATE_BYTES


@dataclass
class BatchResult:
    incidents: list[Snapshot]
    stats: Stats


class Engine:
    """Runs every enabled rule over batches of normalized events against a state store."""

    def __init__(self, rules: Sequence[Rule], store: StateStore, clock: Clock = utc_now) -> None:
        from . import sequence  # multi-subpattern rules (imports this module, hence imported here)

        self._sequence = sequence
        self.rules = [r for r in rules if r.model.enabled]
        self.rules_by_id = {r.id: r for r in self.rules}
        self.timed = any(r.sequence and sequence.timed(r) for r in self.rules)  # needs event-time progress
        # Rules whose incidents some other rule consumes (eventType = rule id): fed back, see shared/chaining.py.
        self._chained = consumed(self.rules)
        # Alert evidence rows are not alerts: only rules that declare `alertEvidence: events` see them.
        self.evidence_rules = [r for r in self.rules if r.evidence_events]
        self._dispatch, self._evidence_dispatch = Dispatch(self.rules), Dispatch(self.evidence_rules)
        self.store = store
        self.clock = clock
        self._wanted: dict[str, bool] = {}

    def could_match(self, event_type: str) -> bool:
        """Prefilter for the normalizer: can any rule match an event of this type?"""
        if event_type == EVIDENCE_EVENT_TYPE and self.rules:
            return True  # AlertEvidence rows enrich the incidents of their alerts (the join)
        hit = self._wanted.get(event_type)
        if hit is None:
            rules = self.evidence_rules if event_type == EVIDENCE_EVENT_TYPE else self.rules
            hit = any(r.query.could_match({"eventType": event_type}) for r in rules)
            if len(self._wanted) >= MAX_PREFILTER_CACHE:
                self._wanted.clear()  # event types are input: the cache must not grow with them
            self._wanted[event_type] = hit
        return hit

    def process(self, events: Sequence[NormalizedEvent]) -> BatchResult:
        """Process one batch, then feed the incidents that other rules consume back as events, up to
        ``MAX_CHAIN_DEPTH`` levels (rule chaining, :mod:`shared.chaining`).

        Raises:
            StoreError: as :meth:`_process_batch`; a retry of the whole batch is safe.
        """
        return self._chain(self._process_batch(events))

    def _chain(self, result: BatchResult, level: list[Snapshot] | None = None) -> BatchResult:
        """Add to ``result`` what chaining makes of ``level`` (default: ``result``'s own incidents)."""
        level = result.incidents if level is None else level
        for depth in range(1, MAX_CHAIN_DEPTH + 1):
            fed = as_events(level, self._chained, depth) if self._chained else []
            if not fed:
                break
            more = self._process_batch(fed)
            result.incidents.extend(more.incidents)
            result.stats += more.stats
            level = more.incidents
        return result

    def _process_batch(self, events: Sequence[NormalizedEvent]) -> BatchResult:
        """Process one batch.

        Raises:
            StoreError: the store failed or conflicts did not settle; nothing was emitted, and a
                retry of the whole batch is safe (already-counted events are recognised).
        """
        stats = Stats()
        groups: dict[GroupKey, tuple[Rule, list[NormalizedEvent]]] = {}
        rows: dict[GroupKey, list[NormalizedEvent]] = {}  # AlertEvidence rows per alert
        links: dict[GroupKey, dict[GroupKey, None]] = {}  # alert -> the groups that counted it
        for event in events:
            ekey = evidence_key(event) if event.kind == EVIDENCE or event.format == "streaming" else None  # once per event
            if event.kind == EVIDENCE:
                if ekey is not None:
                    rows.setdefault(ekey, []).append(event)
                if not self.evidence_rules:
                    continue  # no rule matches evidence rows as events: they only feed the join
            dispatch = self._evidence_dispatch if event.kind == EVIDENCE else self._dispatch
            for rule in dispatch.matching(event.attrs):  # indexed: the same rules as testing every one
                if event.format == CHAIN_FORMAT and event.attrs.get("ruleId") == rule.id:
                    continue  # loop protection: a rule never consumes its own incidents
                stats.add("matched", rule=rule.id)
                if rule.sequence:
                    for key in self._sequence.keys_for(rule, event):
                        groups.setdefault(key, (rule, []))[1].append(event)
                    continue
                key = group_key(rule, event)
                groups.setdefault(key, (rule, []))[1].append(event)
                if event.kind == ALERT and ekey is not None:  # streaming AlertInfo: its entities come apart
                    links.setdefault(ekey, {})[key] = None
        stats.add("groups", len(groups))
        if not groups and not rows:
            return BatchResult([], stats)
        pending = [*groups, *{**rows, **links}]
        joined: dict[GroupKey, dict[str, NormalizedEvent]] = {}  # evidence rows for the groups of their alert
        done: set[GroupKey] = set()  # saved in an earlier attempt
        alert_evidence: dict[GroupKey, dict[str, Any]] = {}
        incidents: list[Snapshot] = []
        for attempt in range(1, MAX_SAVE_ATTEMPTS + 1):
            now_ms = to_ms(self.clock())
            loaded: dict[GroupKey, Loaded] = self.store.load(pending, now_ms)
            stats.add("storage_calls")
            changes: list[Change] = []
            produced: dict[GroupKey, tuple[list[Snapshot], Stats]] = {}
            for ekey in [k for k in pending if k.rule_id == JOIN_RULE_ID]:
                current = loaded.get(ekey, Loaded(None, None))
                new_state, changed = apply_evidence(ekey, current.state, rows.get(ekey, ()), list(links.get(ekey, {})))
                if new_state.pending:
                    alert_evidence[ekey] = new_state.pending
                for target in link_keys(new_state) if ekey in rows else ():
                    joined.setdefault(target, {}).update((r.identity, r) for r in rows[ekey])
                if changed:  # a join state emits nothing: it has no entry in ``produced``
                    changes.append(Change(ekey, new_state, current.token, now_ms + JOIN_HOLD_S * 1000))
            again = set(pending)  # a late-evidence group lost to a conflict is re-read as pending, not twice
            late_only = [
                k for k in joined if k not in groups and k not in done and k not in again and k.rule_id in self.rules_by_id
            ]
            if late_only:  # evidence for alerts counted in earlier batches: read their groups too
                loaded.update(self.store.load(late_only, now_ms))
                stats.add("storage_calls")
            targets = [k for k in pending if k.rule_id != JOIN_RULE_ID] + late_only
            for key in targets:
                rule, group_events = groups.get(key) or (self.rules_by_id[key.rule_id], [])
                current = loaded.get(key, Loaded(None, None))
                if current.state is None and not group_events:
                    continue  # the alert's group has expired: nothing to enrich
                group_stats = Stats()
                if rule.sequence:
                    new_state, snaps = self._sequence.apply_events(rule, key, current.state, group_events, group_stats)
                elif alert_evidence or key in joined:
                    rows_here = list(joined.get(key, {}).values())
                    new_state, snaps = apply_events(
                        rule, key, current.state, group_events, group_stats, alert_evidence=alert_evidence, joined=rows_here
                    )
                else:  # no AlertEvidence in play: the plain core
                    new_state, snaps = apply_events(rule, key, current.state, group_events, group_stats)
                # a group read only for late evidence may have nothing new; exceptions were decided in the
                # core (apply_events, sequence), before the outbox recorded what is emitted
                changed = bool(group_events or snaps or group_stats.counts.get("excepted"))
                if changed:
                    due = self._sequence.due_at(rule, new_state) if rule.sequence else None
                    changes.append(Change(key, new_state, current.token, expires_at(rule, now_ms), due))
                produced[key] = (snaps, group_stats)
            saved, lost = _save(self.store, changes, produced, stats)
            incidents.extend(saved)
            done.update(k for k in produced if k not in lost)
            if not lost:
                return BatchResult(incidents, stats)
            pending = [k for k in [*pending, *late_only] if k in lost]
            log.info("state conflict on %d group(s), attempt %d: re-reading", len(pending), attempt)
        raise StoreError(f"state of {len(pending)} group(s) kept changing under us after {MAX_SAVE_ATTEMPTS} attempts")

    def fire_due(
        self, progress: datetime, limit: int = 1000, emit: Callable[[list[Snapshot]], None] | None = None
    ) -> BatchResult:
        """Let event time reach ``progress`` for groups that wait on time alone (NOT FOLLOWED_BY
        absences, quiet-period clears): fire what is due, one load of the due groups and one
        conditional save. A group another writer changed meanwhile is left for the next call.

        Exactly once, like a batch, though a timer has no retry and no event to key an outbox by:
        the due snapshots are first fed to rule chaining (whose consumer groups record them in their
        outboxes, keyed by ``incident:<id>:<revision>``), then ``emit``, if given, receives the due
        snapshots *and* the chained incidents, and only then are the due groups saved. A failure at
        any point leaves the due groups unsaved, so the next call produces the same due snapshots
        (same ids and revisions) and the consumers re-emit their chained incidents byte for byte
        from their outboxes: nothing is lost, and what was sent twice consumers drop by
        ``(incidentId, revision)``.
        The returned result holds the saved groups' snapshots and what rule chaining made of them.

        Raises:
            StoreError: the store failed; the due groups were not saved and a later call retries.
        """
        stats = Stats()
        by_id = {r.id: r for r in self.rules if r.sequence}
        if not by_id:
            return BatchResult([], stats)
        now_ms = to_ms(self.clock())
        progress_ms = to_ms(progress)
        loaded = self.store.load_due(progress_ms, now_ms, limit)
        stats.add("storage_calls")
        changes: list[Change] = []
        produced: dict[GroupKey, tuple[list[Snapshot], Stats]] = {}
        for key, current in loaded.items():
            rule = by_id.get(key.rule_id)
            if rule is None or current.state is None:
                continue
            group_stats = Stats()
            new_state, snaps = self._sequence.advance(rule, current.state, progress_ms, group_stats)
            changes.append(
                Change(key, new_state, current.token, expires_at(rule, now_ms), self._sequence.due_at(rule, new_state))
            )
            produced[key] = (snaps, group_stats)
        if not changes:
            return BatchResult([], stats)
        due = [s for snaps, _ in produced.values() for s in snaps]
        chained = self._chain(BatchResult([], Stats()), due)  # consumers saved, with their outboxes
        if emit is not None:
            emit(due + chained.incidents)
        incidents, _ = _save(self.store, changes, produced, stats)
        stats += chained.stats
        return BatchResult(incidents + chained.incidents, stats)


def _save(
    store: StateStore, changes: list[Change], produced: dict[GroupKey, tuple[list[Snapshot], Stats]], stats: Stats
) -> tuple[list[Snapshot], set[GroupKey]]:
    """Write ``changes`` in one conditional save; return the snapshots of the groups that were
    written (their stats merged into ``stats``) and the keys another writer changed meanwhile."""
    lost: set[GroupKey] = set()
    try:
        store.save(changes)
    except KeysConflict as conflict:
        lost = set(conflict.keys)
        stats.add("etag_conflicts", len(lost))
    stats.add("storage_calls")
    incidents: list[Snapshot] = []
    for key, (snaps, group_stats) in produced.items():
        if key not in lost:
            incidents.extend(snaps)
            stats += group_stats
    return incidents, lost
