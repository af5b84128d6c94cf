"""The multi-subpattern correlator: AND, OR, FOLLOWED_BY and NOT FOLLOWED_BY in event time.

Pure, like :func:`shared.engine.apply_events`: a correlation group's state and its new events in,
the new state and the incident snapshots out. The engine routes events here for rules whose
``sequence`` flag is set (several subpatterns, or a clear condition) and stores the state with the
same load-once / conditional-save-once per group and batch.

Semantics (``docs/correlation-semantics.md`` has the full text):

* A *correlation group* is the rule id plus the correlation key (equal group-by values that
  ``correlation`` ties across every subpattern). Inside it, a subpattern *instance* is one value of
  that subpattern's full group-by; it is satisfied at the earliest time its aggregate constraint
  holds over its events since the window start.
* The pattern is evaluated over windows ``[T - timeWindow, T]`` ending at event times ``T``:
  ``a AND b`` completes when both have; ``a OR b`` when either has; ``a FOLLOWED_BY b`` when ``b``
  completes using only events strictly later than ``a``'s completion (equal times are not "after").
  Cross-subpattern conditions must hold between the chosen instances.
* Every event time ``T`` whose window satisfies the pattern is a trigger (once per ``T``, whatever
  the arrival order): the first opens an incident, later ones update it, as for single subpatterns.
* ``L NOT FOLLOWED_BY R``: when ``L`` completes at ``a``, an absence is pending until
  ``a + timeWindow``; it fires (incident at event time ``a + timeWindow``) if no ``R`` completed in
  ``(a, a + timeWindow]``, once event time has passed the deadline: a later event of the same group,
  or the absence timer (:meth:`shared.engine.Engine.fire_due`) when the stream's event-time progress has.
* ``clear``: ``after`` closes the open incident (``action: cleared``) once event time passes its last
  trigger + ``after``; ``query`` closes it when a matching event of the same correlation key arrives.
"""

from __future__ import annotations

import itertools
import logging
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import entities
from .engine import (
    MAX_TRIGGER_EVENTS,
    TENANT_ATTR,
    Stats,
    _group_value,
    _Outbox,
    bounded_key,
    incident_id,
    json_copy,
    mapped_number,
    snapshot,
    to_ms,
)
from .normalize import NormalizedEvent
from .pattern import Absent, AllOf, AnyOf, PatternNode, Sub, Then
from .query import CrossCompare, Ref
from .rules import CompiledSub, Rule
from .snapshot import Snapshot
from .state import MAX_STATE_BYTES, SURELY_SMALL_ATTRIBUTES, GroupKey, GroupState, Incident, cut_attributes, identity_hash

log = logging.getLogger(__name__)

MAX_SEQUENCE_ENTRIES = 200  # events kept per correlation group (all subpatterns together)
MAX_COMBINATIONS = 256  # instance combinations tried per window (cross-subpattern conditions)
MAX_TRIGGER_TIMES = 200  # trigger times remembered per group (a trigger fires once per event time)

Entry = list[Any]  # [time_ms, identity_hash, subpattern index, [group-by values..., window values...]]


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def _value(event: NormalizedEvent, attr: str) -> str:
    return _group_value(event.attrs.get(attr))


def _key(rule: Rule, attrs: tuple[str, ...], event: NormalizedEvent) -> GroupKey:
    """As :func:`shared.engine.group_key`: the tenant is always part of the key."""
    values = [_value(event, a) for a in attrs]
    tenant = _value(event, TENANT_ATTR)
    if TENANT_ATTR not in rule.key_attrs:
        values.append(tenant)
    if len(values) > 5:  # as engine.group_key
        values = bounded_key(values)
    return GroupKey(rule.id, tuple(values), tenant)


def _sub_key(rule: Rule, sub: CompiledSub, event: NormalizedEvent) -> GroupKey:
    return _key(rule, sub.key_attrs, event)


def keys_for(rule: Rule, event: NormalizedEvent) -> list[GroupKey]:
    """The correlation groups an event belongs to (one per distinct key among the subpatterns it matches)."""
    keys = [_sub_key(rule, s, event) for s in rule.subs if s.query.matches(event.attrs)]
    if rule.clear is not None and rule.clear.query is not None and rule.clear.query.matches(event.attrs):
        keys.append(_key(rule, rule.key_attrs, event))
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """A satisfied pattern: its completion time and the instance chosen for each subpattern."""

    completion: int
    instances: dict[int, list[Entry]]  # subpattern index -> the instance's entries in the window


def _holds(sub: CompiledSub, entries: list[Entry]) -> bool:
    return sub.constraint.holds(_aggregate_values(sub, entries))


def _aggregate_values(sub: CompiledSub, entries: list[Entry]) -> dict[Any, Any]:
    values: dict[Any, Any] = {}
    offset = len(sub.group_by)
    for agg in sub.aggregates:
        column = None
        if agg.attr is not None:
            idx = offset + sub.window_attrs.index(agg.attr)
            column = [e[3][idx] for e in entries]
        values[agg] = agg.compute(column, len(entries))
    return values


def _leaf_done(sub: CompiledSub, entries: list[Entry] | None, lo: int, hi: int) -> int | None:
    """Earliest time in ``[lo, hi]`` at which the instance's events since ``lo`` satisfy the constraint."""
    if entries is None:
        return None
    acc: list[Entry] = []
    for e in entries:
        if e[0] < lo:
            continue
        if e[0] > hi:
            break
        acc.append(e)
        if _holds(sub, acc):
            return int(e[0])
    return None


def _done(rule: Rule, node: PatternNode, chosen: dict[int, list[Entry] | None], lo: int, hi: int) -> int | None:
    if isinstance(node, Sub):
        sub = _sub_named(rule, node.name)
        return _leaf_done(sub, chosen.get(sub.index), lo, hi)
    if isinstance(node, AllOf):
        times = [_done(rule, c, chosen, lo, hi) for c in node.children]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)
    if isinstance(node, AnyOf):
        found = [t for c in node.children if (t := _done(rule, c, chosen, lo, hi)) is not None]
        return min(found) if found else None
    if isinstance(node, Then):
        first = _done(rule, node.left, chosen, lo, hi)
        return None if first is None else _done(rule, node.right, chosen, first + 1, hi)
    raise AssertionError("NOT FOLLOWED_BY is evaluated by the absence logic")  # pragma: no cover


def _sub_named(rule: Rule, name: str) -> CompiledSub:
    return next(s for s in rule.subs if s.name == name)


def _subs_in(rule: Rule, node: PatternNode) -> list[int]:
    from .pattern import names

    return list(dict.fromkeys(_sub_named(rule, r.name).index for r in names(node)))


def _group_values(rule: Rule, index: int, entries: list[Entry] | None) -> dict[str, Any] | None:
    if not entries:
        return None
    sub = rule.subs[index]
    return {a.lower(): v for a, v in zip(sub.group_by, entries[0][3], strict=False)}


def _cross_ok(rule: Rule, conds: Sequence[CrossCompare], chosen: dict[int, dict[str, Any] | None]) -> bool:
    """Conditions between the chosen instances; one naming a subpattern that took no part is skipped."""
    index = {s.name: s.index for s in rule.subs}

    def value(ref: Ref) -> tuple[bool, Any]:
        vals = chosen.get(index[ref.sub])
        return (False, None) if vals is None else (True, vals.get(ref.attr.lower()))

    for cond in conds:
        ok_left, left = value(cond.left)
        if isinstance(cond.right, Ref):
            ok_right, right = value(cond.right)
        else:
            ok_right, right = True, cond.right
        if ok_left and ok_right and not cond.holds(left, right):
            return False
    return True


def _window(entries: list[Entry], lo: int, hi: int) -> list[Entry]:
    """The entries with ``lo <= time <= hi`` (entries are sorted by time)."""
    return entries[bisect_left(entries, lo, key=_time) : bisect_right(entries, hi, key=_time)]


def _time(e: Entry) -> int:
    return int(e[0])


def _possible(rule: Rule, node: PatternNode, present: set[int]) -> bool:
    """Whether the pattern could hold with only the subpatterns in ``present`` having events."""
    if isinstance(node, Sub):
        return _sub_named(rule, node.name).index in present
    if isinstance(node, AnyOf):
        return any(_possible(rule, c, present) for c in node.children)
    if isinstance(node, AllOf):
        return all(_possible(rule, c, present) for c in node.children)
    assert isinstance(node, Then)
    return _possible(rule, node.left, present) and _possible(rule, node.right, present)


def _instances(rule: Rule, window: list[Entry], subs: list[int], keys: dict[Any, Any]) -> dict[int, list[list[Entry]]]:
    out: dict[int, dict[tuple[str, ...], list[Entry]]] = {i: {} for i in subs}
    for e in window:
        if e[2] in out:
            gk = keys.get((e[1], e[2]))
            if gk is None:  # case-folded instance key, computed once per entry and call
                gk = keys[(e[1], e[2])] = tuple(str(v).lower() for v in e[3][: len(rule.subs[e[2]].group_by)])
            out[e[2]].setdefault(gk, []).append(e)
    return {i: list(groups.values()) for i, groups in out.items()}


def evaluate(
    rule: Rule,
    node: PatternNode,
    entries: list[Entry],
    lo: int,
    hi: int,
    fixed: dict[int, dict[str, Any] | None] | None = None,
    keys: dict[Any, Any] | None = None,
) -> Match | None:
    """The satisfying instance combination with the earliest completion in ``[lo, hi]``, if any.

    ``fixed`` holds group-by values of instances chosen earlier (the left side of an absence), so
    that cross-subpattern conditions relate them to this side. ``keys`` caches instance keys
    across calls on the same entries.
    """
    window = _window(entries, lo, hi)
    if not _possible(rule, node, {e[2] for e in window}):
        return None  # a subpattern the pattern needs has no event in the window
    subs = _subs_in(rule, node)
    inst = _instances(rule, window, subs, keys if keys is not None else {})
    options: list[list[list[Entry] | None]] = []
    for i in subs:
        usable: list[list[Entry] | None] = [g for g in inst[i] if _leaf_done(rule.subs[i], g, lo, hi) is not None]
        options.append(usable or [None])
    best: Match | None = None
    for combo in itertools.islice(itertools.product(*options), MAX_COMBINATIONS):
        chosen = dict(zip(subs, combo, strict=True))
        values = {**(fixed or {}), **{i: _group_values(rule, i, g) for i, g in chosen.items()}}
        if rule.cross and not _cross_ok(rule, rule.cross, values):
            continue
        done = _done(rule, node, chosen, lo, hi)
        if done is not None and (best is None or done < best.completion):
            best = Match(done, {i: g for i, g in chosen.items() if g is not None})
    return best


# ---------------------------------------------------------------------------------------------
# Incidents
# ---------------------------------------------------------------------------------------------


def _attributes(rule: Rule, match: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in rule.mappings:
        entries = match.instances.get(m.sub)
        if not entries:
            out[m.incident_attr] = None
            continue
        sub = rule.subs[m.sub]
        if m.aggregate is not None:
            v = _aggregate_values(sub, entries).get(m.aggregate)
            out[m.incident_attr] = mapped_number(v)
        else:
            vals = _group_values(rule, m.sub, entries) or {}
            out[m.incident_attr] = vals.get((m.attr or "").lower())
    return out


class _Run:
    """Mutable bookkeeping for one call: the state, its extra fields and what to emit."""

    def __init__(self, rule: Rule, st: GroupState, stats: Stats) -> None:
        self.rule = rule
        self.st = st
        self.stats = stats
        self.ext: dict[str, Any] = st.ext if st.ext is not None else {}
        self.touched: dict[str, tuple[Incident, str, list[NormalizedEvent]]] = {}
        self.window = rule.window_s * 1000
        self.keys: dict[Any, Any] = {}  # instance keys of entries, by (identity, subpattern), for this call

    def trigger(self, at: int, match: Match | None, attributes: dict[str, Any], evidence: list[NormalizedEvent]) -> None:
        rule, st = self.rule, self.st
        first = _first(match, at)
        inc = st.incident
        if inc is not None and at - inc.last_trigger > rule.lifetime_s * 1000:
            inc = None
        if inc is None:
            inc = Incident(incident_id(st.key, at), 1, first, at, at, at, 1, attributes, unannounced=bool(self.rule.exceptions))
            self.ext.pop("w", None)
            action = "created"
        else:
            inc.revision += 1
            self._count_window(inc, at)
            inc.first_seen = min(inc.first_seen, first)
            inc.last_seen = max(inc.last_seen, at)
            if at >= inc.last_trigger:  # the newest trigger in event time sets them, whatever the arrival order
                inc.attributes = attributes
            inc.last_trigger = max(inc.last_trigger, at)
            prior = self.touched.get(inc.incident_id)
            action = prior[1] if prior else "updated"
        inc.entities = entities.merge(inc.entities, events=evidence)  # the state keeps no payloads: triggering events only
        st.incident = inc
        prev = self.touched.get(inc.incident_id)
        kept = ((prev[2] if prev else []) + evidence)[-MAX_TRIGGER_EVENTS:]
        self.touched[inc.incident_id] = (inc, action, kept)
        self.stats.add("triggers", rule=rule.id)

    def _count_window(self, inc: Incident, at: int) -> None:
        """``triggerCount``: the distinct event windows of the incident's triggers, each window opened
        by the first trigger more than ``timeWindow`` after the previous window's start, over the
        triggers in event-time order whatever their arrival order. The window starts are kept (those
        a late trigger can still reach, see :func:`_trim`); a trigger arriving before a later start
        re-derives the starts after it from the trigger times held (``t``)."""
        starts: list[int] = list(self.ext.get("w") or [inc.window_start])
        before = len(starts)
        if at >= starts[-1]:
            if at - starts[-1] > self.window:
                starts.append(at)
        else:
            j = bisect_right(starts, at) - 1
            if j < 0 or at - starts[j] > self.window:  # a new start, and those after it may move
                tail = [at]
                for t in self.ext.get("t", []):
                    if t > tail[-1] + self.window:
                        tail.append(int(t))
                starts = starts[: j + 1] + tail
        inc.trigger_count += len(starts) - before
        inc.window_start = starts[-1]
        if len(starts) > 1:
            self.ext["w"] = starts
        else:  # the incident's window start says it all: no extra bytes
            self.ext.pop("w", None)

    def clear(self, at: int, evidence: list[NormalizedEvent]) -> None:
        inc = self.st.incident
        if inc is None:
            return
        inc.revision += 1
        inc.last_seen = max(inc.last_seen, at)
        self.touched[inc.incident_id] = (inc, "cleared", evidence[-MAX_TRIGGER_EVENTS:])
        self.st.incident = None
        self.ext["c"] = at  # events up to the clear belong to the closed incident: they open no new one
        self.stats.add("cleared", rule=self.rule.id)

    # -- time passing ---------------------------------------------------------------------

    def advance(self, progress: int) -> None:
        """Fire what is due once event time has reached ``progress``: absences, then quiet clears."""
        rule = self.rule
        pending = self.ext.get("p")
        while pending is not None and progress > pending[1]:
            a, deadline, fixed_raw, attrs = pending
            fixed = {int(k): v for k, v in fixed_raw.items()}
            assert isinstance(rule.pattern, Absent)
            follower = evaluate(rule, rule.pattern.right, self.st.entries, a + 1, deadline, fixed, self.keys)
            self.ext["f"] = a
            self.ext["p"] = None
            if follower is None:
                self.stats.add("absences_fired", rule=rule.id)
                self.trigger(deadline, None, attrs, [])
            else:
                self.stats.add("absences_cancelled", rule=rule.id)
            if self._find_pending() is not None:
                self.stats.add("absences_pending", rule=rule.id)
            pending = self.ext.get("p")
        inc = self.st.incident
        after = rule.clear.after_s if rule.clear is not None else None
        if after is not None and inc is not None and progress > inc.last_trigger + after * 1000:
            self.clear(inc.last_trigger + after * 1000, [])

    def _find_pending(self) -> int | None:
        """Start the next absence: the left side's earliest completion after the last resolved one
        (over every entry held, whatever order they arrived in); its completion time, if any."""
        floor = self._floor()
        ends = sorted({int(e[0]) for e in self.st.entries if floor is None or e[0] > floor})
        for end in ends:
            match = self._left(end, floor)
            if match is not None:
                self._pend(match)
                return match.completion
        return None

    def _floor(self) -> int | None:
        """Left-side events at or before this time belong to resolved absences or a closed incident."""
        floor = self.ext.get("f")
        if self.ext.get("c") is not None:
            floor = max(floor if floor is not None else self.ext["c"], self.ext["c"])
        return None if floor is None else int(floor)

    def _left(self, end: int, floor: int | None) -> Match | None:
        assert isinstance(self.rule.pattern, Absent)
        lo = end - self.window if floor is None else max(end - self.window, floor + 1)
        return evaluate(self.rule, self.rule.pattern.left, self.st.entries, lo, end, None, self.keys)

    def _pend(self, match: Match) -> None:
        fixed = {str(i): _group_values(self.rule, i, g) for i, g in match.instances.items()}
        self.ext["p"] = [match.completion, match.completion + self.window, fixed, _attributes(self.rule, match)]

    # -- new events -------------------------------------------------------------------------

    def on_event(self, t: int, event: NormalizedEvent) -> None:
        rule = self.rule
        if isinstance(rule.pattern, Absent):
            pending = self.ext.get("p")
            if pending is None or t <= pending[0]:
                # the pending absence is the left side's earliest completion after the floor, as in
                # event-time order: an event at or before it (a late one, or one tied with it that
                # arrived after it) can complete the left side earlier, or change what its window holds
                self.ext["p"] = None
                found = self._find_pending()
                if found is not None and (pending is None or found != pending[0]):
                    self.stats.add("absences_pending", rule=rule.id)
            return
        assert rule.pattern is not None
        triggered: list[int] = self.ext.setdefault("t", [])
        ends = sorted({t} | {int(e[0]) for e in self.st.entries if t < e[0] <= t + self.window})
        cleared = self.ext.get("c")
        fired: set[int] = set()
        for end in ends:
            if end in triggered or (cleared is not None and end <= cleared):
                continue
            match = self._match(end)
            if match is not None:
                triggered.append(end)
                triggered.sort()
                fired.add(end)
                self.trigger(end, match, _attributes(rule, match), [event])
        self._refresh(t, fired)

    def _refresh(self, t: int, fired: set[int]) -> None:
        """An event at or before the open incident's newest trigger, inside that trigger's window,
        can change what the newest trigger's window holds (an earlier event arriving late, or one at
        the trigger's own time arriving after it fired): its attributes are computed again, so the
        incident ends with the attributes of its newest trigger in event time whatever the arrival
        order or batching. An event older than the incident's ``firstSeen`` can be the earliest of a
        window that already triggered: those triggers' matches are found again and ``firstSeen``
        takes their earliest event, as in event-time order. A new revision if either changed and
        this event triggered nothing."""
        inc = self.st.incident
        if inc is None:
            return
        changed = False
        end = inc.last_trigger
        if end - self.window <= t <= end and end not in fired:  # fired: this event's own evaluation set them
            match = self._match(end)
            attributes = _attributes(self.rule, match) if match is not None else inc.attributes
            if attributes != inc.attributes:
                inc.attributes, changed = attributes, True
        if t < inc.first_seen:
            reach = [end for end in self.ext.get("t", []) if t <= end <= t + self.window and end not in fired]
            first = min((_first(m, end) for end in reach if (m := self._match(end)) is not None), default=inc.first_seen)
            if first < inc.first_seen:
                inc.first_seen, changed = first, True
        if not changed:
            return
        if not fired:  # one revision per event that changes the incident: a trigger of this event made it
            inc.revision += 1
        if inc.incident_id not in self.touched:
            self.touched[inc.incident_id] = (inc, "updated", [])

    def _match(self, end: int) -> Match | None:
        """The pattern's match in the window ending at ``end`` (not before the clear floor)."""
        assert self.rule.pattern is not None
        cleared = self.ext.get("c")
        lo = end - self.window if cleared is None else max(end - self.window, cleared + 1)
        return evaluate(self.rule, self.rule.pattern, self.st.entries, lo, end, None, self.keys)


def _first(match: Match | None, at: int) -> int:
    """The earliest event time of a match (``at`` for a match with no events: an absence)."""
    return min((int(e[0]) for g in (match.instances.values() if match else ()) for e in g), default=at)


def _migrate(st: GroupState) -> GroupState:
    """A state written by the single-subpattern path (the rule gained subpatterns): keep the open
    incident, drop window entries whose layout differs."""
    if st.ext is None:
        st.entries = []
        st.ext = {}
    return st


def _entry_values(sub: CompiledSub, event: NormalizedEvent) -> list[Any]:
    out: list[Any] = [_value(event, a) for a in sub.group_by]
    for attr in sub.window_attrs:
        v = event.attrs.get(attr)
        out.append(json_copy(v) if type(v) in (list, tuple, dict) else v)  # the state's own (see json_copy)
    return out


def _insert(entries: list[Entry], entry: Entry) -> None:
    i = len(entries)
    while i > 0 and (entries[i - 1][0], entries[i - 1][1]) > (entry[0], entry[1]):
        i -= 1
    entries.insert(i, entry)


def apply_events(
    rule: Rule, key: GroupKey, state: GroupState | None, events: Sequence[NormalizedEvent], stats: Stats
) -> tuple[GroupState, list[Snapshot]]:
    """Fold ``events`` (all of this rule and correlation group) into ``state``; see the module doc.

    Exactly once as on the classic path (:func:`shared.engine.apply_events`): an event the group
    already holds changes nothing, and the snapshots an earlier batch emitted for it are re-emitted
    byte for byte from the group's outbox.
    """
    st = _migrate(state) if state is not None else GroupState(key, ext={})
    if not st.key.tenant and key.tenant:
        st.key = GroupKey(st.key.rule_id, st.key.values, key.tenant)
    key = st.key
    run = _Run(rule, st, stats)
    window = run.window
    seen = {(e[1], e[2]) for e in st.entries}
    outbox = _Outbox(st.outbox)
    replay: set[int] = set()
    applied: list[int] = []
    for event in sorted(events, key=lambda e: e.event_time):  # stable: ties keep their delivery order
        t = to_ms(event.event_time)
        ident = identity_hash(event.identity)
        added = False
        for sub in rule.subs:
            if not sub.query.matches(event.attrs) or _sub_key(rule, sub, event) != key:
                continue
            late = st.newest is not None and t < st.newest - window
            # an entry evicted to fit (count or bytes) is no longer seen: its outbox record still knows it
            if (ident, sub.index) in seen or late or (st.evicted and outbox.find(ident) is not None):
                pos = outbox.find(ident)
                if pos is not None:
                    replay.add(pos)
                stats.add("late" if late and pos is None else "duplicates", rule=rule.id)
                continue
            seen.add((ident, sub.index))
            _insert(st.entries, [t, ident, sub.index, _entry_values(sub, event)])
            added = True
            stats.add("counted", rule=rule.id)
        clearing = rule.clear is not None and rule.clear.query is not None and rule.clear.query.matches(event.attrs)
        if clearing:
            pos = outbox.find(ident)
            if pos is not None:  # a clearing event already applied: its snapshot is in the outbox
                replay.add(pos)
                clearing = False
        if added or clearing:
            applied.append(ident)
        if added and (st.newest is None or t > st.newest):
            st.newest = t
        if st.newest is not None:
            run.advance(st.newest)  # an event of this group at a later time proves that time has passed
        if added:
            run.on_event(t, event)
        if clearing and st.incident is not None and t >= st.incident.first_seen:
            run.clear(t, [event])
        _trim(run)
    _fit_bytes(run)
    again = outbox.snapshots(replay, rule, key)
    stats.add("reemitted", len(again), rule=rule.id)
    fresh = _emit(rule, key, list(run.touched.values()), stats)
    if fresh:
        record, fresh = _Outbox.record(applied, fresh)
        st.add_record(record)
    return st, again + fresh


def advance(rule: Rule, state: GroupState, progress_ms: int, stats: Stats) -> tuple[GroupState, list[Snapshot]]:
    """Let event time reach ``progress_ms`` with no new event: fire due absences and quiet clears."""
    st = _migrate(state)
    run = _Run(rule, st, stats)
    run.advance(progress_ms)
    _trim(run)
    _fit_bytes(run)
    return st, _emit(rule, st.key, list(run.touched.values()), stats)


def timed(rule: Rule) -> bool:
    """Whether time passing alone can fire something for this rule (an absence, a quiet clear)."""
    after = rule.clear.after_s if rule.clear is not None else None
    return isinstance(rule.pattern, Absent) or after is not None


def due_at(rule: Rule, state: GroupState) -> int | None:
    """Event time (epoch ms) after which :func:`advance` has work for this group, if ever."""
    times = []
    pending = (state.ext or {}).get("p")
    if pending is not None:
        times.append(int(pending[1]))
    if rule.clear is not None and rule.clear.after_s is not None and state.incident is not None:
        times.append(state.incident.last_trigger + rule.clear.after_s * 1000)
    return min(times) if times else None


def _emit(rule: Rule, key: GroupKey, touched: list[tuple[Incident, str, list[NormalizedEvent]]], stats: Stats) -> list[Snapshot]:
    out: list[Snapshot] = []
    tenant = key.tenant or None
    for inc, action, evidence in touched:
        if rule.excepted(inc.attributes, tenant, inc.last_seen):
            stats.add("excepted", rule=rule.id)
            continue
        if inc.unannounced:  # every earlier revision was excepted: this is the first anyone sees
            action, inc.unannounced = "created", False
        stats.add("incidents_" + action, rule=rule.id)
        snap = snapshot(rule, key, inc, action, evidence)
        if len(inc.attributes) < len(rule.mappings):  # the state had to drop some (GroupState.shrink)
            snap["attributesTrimmed"] = True
        out.append(snap)
    return out


def _trim(run: _Run) -> None:
    """Keep what later windows can still use (two windows back: out-of-order events within one
    window open windows that reach one further back), the pending absence's span, and a bounded count."""
    st = run.st
    if st.newest is None:
        return
    horizon = st.newest - 2 * run.window
    pending = run.ext.get("p")
    if pending is not None:
        horizon = min(horizon, int(pending[0]) - run.window)
    if st.entries and st.entries[0][0] < horizon:
        st.entries = [e for e in st.entries if e[0] >= horizon]
    if "t" in run.ext:
        run.ext["t"] = [t for t in run.ext["t"] if t >= horizon][-MAX_TRIGGER_TIMES:]
    starts = run.ext.get("w")
    if starts and starts[0] < horizon:  # the last window start before the horizon still decides a late trigger's window
        kept = [w for w in starts if w >= horizon]
        run.ext["w"] = [max(w for w in starts if w < horizon), *kept]
    if len(st.entries) > MAX_SEQUENCE_ENTRIES:
        drop = len(st.entries) - MAX_SEQUENCE_ENTRIES
        del st.entries[:drop]
        st.evicted += drop
        run.stats.add("evicted", drop, rule=run.rule.id)


def _fit_bytes(run: _Run) -> None:
    """Once per call: cut the incident's and a pending absence's attributes to ``MAX_ATTRIBUTES_BYTES``,
    evict the oldest entries until the encoded state fits one Table property, and with none left let
    ``GroupState.shrink`` cut the rest."""
    st = run.st
    pending = run.ext.get("p")
    for attributes in (st.incident.attributes if st.incident else None, pending[3] if pending else None):
        if attributes and len(attributes) > SURELY_SMALL_ATTRIBUTES:  # first, whatever the window: it correlates
            cut_attributes(attributes)
    size = len(st.to_bytes())
    while st.entries and size > MAX_STATE_BYTES:
        drop = max(1, len(st.entries) // 10)
        del st.entries[:drop]
        st.evicted += drop
        run.stats.add("evicted", drop, rule=run.rule.id)
        size = len(st.to_bytes())
    if size > MAX_STATE_BYTES:
        st.shrink()
