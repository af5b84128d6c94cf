"""The in-memory store's tiers (states kept as objects, packed bytes, the spill file) answer alike.

``GroupState.copy`` (what a loaded live state is) must equal the JSON round trip a packed or
Table-stored state goes through, for every shape a state can take; and a store that keeps every
state as an object, one that packs every state, and one with a state in each tier must give the
same answer to every call of any sequence of calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.engine import Engine
from shared.entities import KINDS
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import default_rules_dir, parse_rule_text
from shared.state import LIVE_STATES, Change, GroupKey, GroupState, Incident, KeysConflict, Loaded, MemoryStateStore

from .test_engine import Timeline, alert, feed_and_scribble

NOW = 1_800_000_000_000

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)  # orjson refuses lone surrogates
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple) | st.dictionaries(texts, inner, max_size=3)
    ),
    max_leaves=8,
)
# every kind (empty or not), a kind no reader knows, a kind holding no list
entity_values = st.lists(texts | st.dictionaries(st.sampled_from(["id", "name", "path"]), texts, max_size=2), max_size=2)
entities = st.none() | st.dictionaries(
    st.sampled_from([*KINDS, "truncated", "unknownKind"]), entity_values | st.just("not a list"), max_size=4
)
ints = st.integers(0, 2**62)


@st.composite
def keys(draw: st.DrawFn) -> GroupKey:
    values = tuple(draw(st.lists(texts, max_size=3)))
    tenant = draw(st.sampled_from([values[-1] if values else "", "", "other-tenant"]))
    return GroupKey(draw(st.sampled_from(["R", "~evidence", "R2"])), values, tenant)


@st.composite
def states(draw: st.DrawFn, key: GroupKey | None = None) -> GroupState:
    key = key if key is not None else draw(keys())
    incident = None
    if draw(st.booleans()):
        revision, first, last, trigger, start, count = draw(st.tuples(ints, ints, ints, ints, ints, ints))
        incident = Incident(
            draw(texts),
            revision,
            first,
            last,
            trigger,
            start,
            count,
            attributes=draw(st.dictionaries(texts, json_values, max_size=3)),
            entities=draw(entities),
            unannounced=draw(st.booleans()),
        )
    entry = st.tuples(ints, st.integers(-(2**63), 2**63 - 1), st.lists(json_values, max_size=2))
    return GroupState(
        key,
        entries=[[t, h, *vals] for t, h, vals in draw(st.lists(entry, max_size=3))],
        newest=draw(st.none() | ints),
        incident=incident,
        evicted=draw(st.integers(0, 5)),
        mark=draw(st.none() | st.lists(ints, min_size=2, max_size=2)),
        outbox=draw(st.lists(st.binary(max_size=8), max_size=2)),
        ext=draw(st.none() | st.dictionaries(texts, json_values, max_size=3)),
        pending=draw(entities),
        links=draw(st.lists(st.tuples(texts, st.lists(texts, max_size=2), texts).map(list), max_size=2)),
    )


def _version_1(state: GroupState) -> GroupState:
    """``state`` as an older release stored it (no version, tenant, mark, outbox or optional keys)."""
    inc = state.incident.to_list() if state.incident else None
    doc = {"r": state.key.rule_id, "k": list(state.key.values), "e": state.entries, "n": state.newest, "i": inc}
    return GroupState.from_bytes(orjson.dumps(doc))


def _mutables(value: Any) -> Iterator[int]:
    """Ids of every list and dict inside ``value`` (a state's fields)."""
    if isinstance(value, (list, dict)):
        yield id(value)
        yield from (i for v in (value.values() if isinstance(value, dict) else value) for i in _mutables(v))


def _parts(state: GroupState) -> list[Any]:
    inc = state.incident
    fields = [state.entries, state.mark, state.outbox, state.ext, state.pending, state.links]
    return fields + ([inc.attributes, inc.entities] if inc is not None else [])


@settings(max_examples=80)
@given(states(), st.booleans())
def test_a_copied_state_equals_its_json_round_trip_and_shares_nothing(state: GroupState, old: bool) -> None:
    if old:
        state = _version_1(state)
    copy = state.copy()
    round_trip = GroupState.from_bytes(state.to_bytes(), state.outbox_bytes())
    assert copy == round_trip  # dataclass equality: a tuple where the round trip has a list differs
    assert (copy.key.values, copy.key.tenant) == (round_trip.key.values, round_trip.key.tenant)
    assert copy.to_bytes() == round_trip.to_bytes() and copy.outbox_bytes() == round_trip.outbox_bytes()
    assert not {i for p in _parts(copy) for i in _mutables(p)} & {i for p in _parts(state) for i in _mutables(p)}


# -- the tiers, call by call -------------------------------------------------------------------

POOL = [
    GroupKey("R", ("Host-A", "t1"), "t1"),
    GroupKey("R", ("host-b", "t1"), "t1"),
    GroupKey("R", ("Host-A", "t2"), "t2"),
    GroupKey("R2", ("x",), ""),
    GroupKey("~evidence", ("da1", "t1"), "t1"),
]
CASED = [GroupKey(k.rule_id, tuple(v.upper() for v in k.values), k.tenant) for k in POOL]  # the same groups
times = st.integers(-3, 3).map(lambda d: NOW + d * 1000)
expiries = st.sampled_from([NOW - 1000, NOW, NOW + 1000, NOW + 60_000, NOW + 60_000, NOW + 60_000])

changes = st.tuples(
    st.integers(0, 2),
    st.none() | st.integers(0, 2**32),  # a seed for the state's contents; None: delete
    st.sampled_from(["current", "current", "current", "none", "stale"]),
    expiries,
    st.none() | times,  # due time
)
calls = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.lists(changes, min_size=1, max_size=3, unique_by=lambda c: c[0])),
        st.tuples(st.just("load"), st.lists(st.integers(0, 2 * len(POOL) - 1), min_size=1, max_size=4), times),
        st.tuples(st.just("load"), st.just([0, 1, 2, 5]), st.just(NOW)),
        st.tuples(st.just("load_due"), times, times, st.integers(0, 4)),
        st.tuples(st.just("purge"), times),
        st.tuples(st.just("stored"), st.integers(0, len(POOL) - 1)),
        st.tuples(st.just("put_stored"), st.integers(0, 2), st.integers(0, 2**32), expiries),
    ),
    max_size=25,
)


def _state(key: GroupKey, seed: int) -> GroupState:
    """A state of ``key`` made anew from ``seed`` (each store is given its own object)."""
    st_ = GroupState(key, [[NOW + seed % 7, seed, ["v", seed % 3]]], NOW + seed % 7)
    st_.incident = Incident(f"inc-{seed}", 1 + seed % 4, NOW, NOW, NOW, NOW, 1, {"n": seed, "l": [seed, "x"]})
    st_.incident.entities = {"hosts": [f"h{seed % 5}"], "users": []} if seed % 2 else None
    st_.pending = {"files": [{"name": f"f{seed}"}]} if seed % 3 == 0 else None
    st_.ext = {"c": [seed % 11]} if seed % 5 == 0 else None
    st_.outbox = [seed.to_bytes(5, "big")]
    return st_


def _answer(loaded: dict[GroupKey, Loaded]) -> list[Any]:
    """What a load answers, in its order: key, state bytes, outbox, token."""
    out = []
    for key, got in loaded.items():
        state = got.state
        shown = None if state is None else (state.to_bytes(), state.outbox_bytes(), state.key.values, state.key.tenant)
        out.append((key.rule_id, key.norm, shown, got.token))
    return out


def _scribble(loaded: dict[GroupKey, Loaded]) -> None:
    """The engine changes what it loads in place: that must never show in any later answer."""
    for got in loaded.values():
        if got.state is not None:
            got.state.entries.append([0, 0])
            if got.state.incident is not None:
                got.state.incident.attributes["l"].append("scribbled")
                got.state.incident.revision += 100


def _run(store: MemoryStateStore, plan: list[Any]) -> list[Any]:
    answers: list[Any] = []
    tokens: dict[GroupKey, Any] = {}  # the token the caller last read, per group
    for call in plan:
        if call[0] == "save":
            batch = []
            for i, seed, token, expiry, due in call[1]:
                key = POOL[i]
                given_token = {"current": tokens.get(key), "none": None, "stale": (tokens.get(key) or 0) + 7}[token]
                batch.append(Change(key, None if seed is None else _state(key, seed), given_token, expiry, due))
            try:
                store.save(batch)
                answers.append(("saved",))
            except KeysConflict as conflict:
                answers.append(("conflict", sorted(k.text for k in conflict.keys)))
        elif call[0] == "load":
            wanted = [(POOL + CASED)[i] for i in call[1]]
            loaded = store.load(wanted, call[2])
            answers.append(_answer(loaded))
            tokens.update((POOL[POOL.index(k)], got.token) for k, got in loaded.items())
            _scribble(loaded)
        elif call[0] == "load_due":
            loaded = store.load_due(call[1], call[2], call[3])
            answers.append(_answer(loaded))
            _scribble(loaded)
        elif call[0] == "put_stored":  # a state written as is, bypassing the token check (tests' own call)
            key = POOL[call[1]]
            state = _state(key, call[2])
            store.put_stored(key, state.encode(), state.outbox_bytes(), call[2] % 5 + 1, call[3])
        elif call[0] == "purge":
            answers.append(("purged", store.purge_expired(call[1])))
        else:
            try:
                answers.append(("stored", store.stored(POOL[call[1]])))
            except KeyError:
                answers.append(("stored", None))
        answers.append(("len", len(store)))
    return answers


@settings(max_examples=150)
@given(calls)
@example([("save", [(0, 5, "current", NOW + 3000, None)]), ("load", [0], NOW), ("load", [0], NOW)])
@example(
    [("save", [(i, 1, "current", NOW + 60_000, NOW)]) for i in range(3)]
    + [("put_stored", 0, 7, NOW + 60_000), ("load_due", NOW, NOW, 4), ("purge", NOW + 10**9)]
)
def test_every_tier_of_the_memory_store_answers_every_call_alike(plan: list[Any]) -> None:
    """Objects only (the default), packed only (live_limit=0), and one object, one packed, the
    rest on disk (hot_limit=2, live_limit=1): the same answers to any sequence of saves (creates,
    updates, deletes, stale tokens), loads (keys in any case), due loads, purges and reads of the
    stored bytes."""
    stores = [MemoryStateStore(), MemoryStateStore(live_limit=0), MemoryStateStore(hot_limit=2, live_limit=1)]
    try:
        expected, *others = (_run(s, plan) for s in stores)
        for got in others:
            assert got == expected
    finally:
        for s in stores:
            s.close()


# -- what the engine hands out ------------------------------------------------------------------

LABELS_RULE = parse_rule_text(
    (default_rules_dir() / "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity.yaml")
    .read_text()
    .replace(
        "  incidentCount: ms_defender_alert.COUNT(*)",
        "  incidentCount: ms_defender_alert.COUNT(*)\n  labelCount: ms_defender_alert.COUNT(DISTINCT labels)",
    )
)


KILL_CHAIN = parse_rule_text((default_rules_dir() / "MS_Defender_KillChain_Progression.yaml").read_text())


@pytest.mark.parametrize("live_limit", [0, 1, LIVE_STATES])
@pytest.mark.parametrize(("rule", "attr"), [(LABELS_RULE, "labels"), (KILL_CHAIN, "attackTactic")])
def test_a_consumer_changing_a_list_in_an_emitted_trigger_event_never_changes_a_stored_window(
    live_limit: int, rule: Any, attr: str
) -> None:
    """A record in the normalized format may carry a list (or object) attribute that a rule's window
    keeps (COUNT(DISTINCT labels); a multi-subpattern rule's COUNT(DISTINCT attackTactic)). The
    snapshot's trigger events (attributes and raw record) showed that very list, which the store kept
    in the state object: a consumer appending to it changed the incident's later revisions."""
    assert attr in rule.window_attrs
    clean, scribbled = (Timeline([rule], MemoryStateStore(live_limit=n)) for n in (0, live_limit))
    for i, tactic in enumerate(["Execution", "Persistence", "CredentialAccess", "Discovery"]):
        event: dict[str, Any] = {attr: [tactic, {"k": ["v"]}], "hostName": "ws-1", "extra": {"o": {"p": [1]}}}
        feed_and_scribble(clean, scribbled, [alert(f"v{i}", at=10 * i, **event)])
    assert len(clean.snapshots) >= 2


# -- the engine's conflict retry -----------------------------------------------------------------


class _RacedOnce:
    """A store where another writer changes every group of rule ``rule_id`` just before the next save."""

    def __init__(self, inner: MemoryStateStore, rule_id: str) -> None:
        self.inner, self.rule_id, self.races = inner, rule_id, 0

    def save(self, changes: Any) -> None:
        if self.races:
            self.races -= 1
            for c in changes:
                if c.key.rule_id == self.rule_id:
                    current = self.inner.load([c.key], 0)[c.key]  # as it is, expired or not
                    self.inner.save([Change(c.key, current.state, current.token, c.expires_at)])
        self.inner.save(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_conflict_on_a_group_read_only_for_late_evidence_is_re_read_and_settles() -> None:
    """An AlertEvidence row whose alert a group counted in an earlier batch reads that group too. When
    another writer changed the group meanwhile, the next attempt listed it twice (as a lost key and
    again as late evidence's group): two changes of one group in one save, the second always
    conflicting, so the batch failed after five attempts instead of settling on the second."""
    rule = parse_rule_text(
        "id: BYNAME\nname: n\nseverity: 5\ncategory: Security\ntimeWindow: 300\nincidentLifetime: 3000\n"
        "subpatterns:\n  - {name: s, query: 'eventType CONTAIN \"Alert-Execution\"', groupBy: [alertName, tenantId],\n"
        "     aggregateConstraint: 'COUNT(*) >= 1'}\nincidentAttributes: {alertName: s.alertName}\n"
    )
    arrival = datetime(2026, 7, 18, 14, 5, tzinfo=timezone.utc)

    def row(category: str, **props: str) -> NormalizedEvent:
        base = {"Timestamp": "2026-07-18T14:00:00Z", "AlertId": "X", "Title": "Same name", "Category": "Execution"}
        rec = {"category": f"AdvancedHunting-{category}", "tenantId": "t", "properties": {**base, **props}}
        event = Normalizer().normalize(rec, "p", arrival)
        assert isinstance(event, NormalizedEvent)
        return event

    store = _RacedOnce(MemoryStateStore(), rule.id)
    engine = Engine([rule], store, lambda: arrival)
    [created] = engine.process([row("AlertInfo")]).incidents
    store.races = 1
    [enriched] = engine.process([row("AlertEvidence", EntityType="Machine", DeviceName="host-of-x")]).incidents
    assert (enriched["incidentId"], enriched["revision"]) == (created["incidentId"], 2)
    assert enriched["entities"]["hosts"] == ["host-of-x"]
