"""No write the product makes can exceed Azure Table's limits, whatever the rules and the events.

A write over a limit fails on every retry, so the Event Hub partition would stall. These tests try
hardest to make one: rules with many group-by attributes and mappings, incompressible and
escape-heavy values, sequence rules, chaining, many episodes per batch, huge snapshots. Every save is
checked against Table's limits (64 KiB per property, 1 MiB per entity, 255 properties) on the
in-memory store, and the same runs are written to Azure Table (Azurite, which enforces them). A
redelivered batch must re-emit byte for byte what it emitted, and a cut must be said in the snapshot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared import entities
from shared.engine import MAX_KEY_BYTES, Engine, _Outbox, _own, bounded_key
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import Rule, parse_rule_text
from shared.state import (
    ATTRIBUTE_CHARS,
    MAX_ATTRIBUTES_BYTES,
    MAX_RECORD_BYTES,
    MAX_STATE_BYTES,
    SURELY_SMALL_ATTRIBUTES,
    Change,
    GroupKey,
    GroupState,
    Incident,
    Loaded,
    MemoryStateStore,
    OutboxRecord,
    StateStore,
    packed_record,
)
from shared.table_store import TableStateStore

from .test_engine import FAILURE_POINTS, Flaky, deliver, fresh_table_store

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
_NORM = Normalizer(fmt="normalized")
TABLE_PROPERTY_BYTES = 64 * 1024
TABLE_ENTITY_BYTES = 1 << 20
TABLE_PROPERTIES = 255


# -- what Table accepts ----------------------------------------------------------------------------


def table_violations(entity: dict[str, Any]) -> list[str]:
    """What Azure Table would refuse in ``entity`` (sizes as its documentation counts them: strings in
    UTF-16, each property's name and 8 bytes beside its value)."""
    out, total = [], 4 + 2 * (len(entity["PartitionKey"]) + len(entity["RowKey"]))
    if len(entity) > TABLE_PROPERTIES:
        out.append(f"{len(entity)} properties")
    for name, value in entity.items():
        value = getattr(value, "value", value)
        if isinstance(value, bytes):
            size, extra = len(value), 4
        elif isinstance(value, str):
            size, extra = len(value.encode("utf-16-le")), 4
        else:
            size, extra = 8, 0
        if size > TABLE_PROPERTY_BYTES:
            out.append(f"property {name} of {size} bytes")
        total += 8 + 2 * len(name) + extra + size
    if total > TABLE_ENTITY_BYTES:
        out.append(f"entity of {total} bytes")
    return out


class Checked:
    """A store that checks every state it is given against Table's limits before passing it on."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.violations: list[str] = []
        self.largest = 0  # bytes of the largest encoded state written

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        return self.inner.load(keys, now_ms)

    def save(self, changes: Sequence[Change]) -> None:
        keys = TableStateStore(None)  # type: ignore[arg-type]  # only its key mapping and entity form are used
        for change in changes:
            if change.state is None:
                continue
            pk, rk = keys.keys_of(change.key)
            entity = TableStateStore._entity(pk, rk, change)
            self.largest = max(self.largest, len(entity["state"]))
            self.violations += [f"{change.key.rule_id}: {v}" for v in table_violations(entity)]
        self.inner.save(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- rules and events a user may write and send ------------------------------------------------------


def make_rule(group_by: int, mappings: int, rule_id: str = "W", query: str = 'eventType = "x"', value_of: str = "a") -> Rule:
    """A rule grouping by ``a0..`` and mapping ``mappings`` incident attributes (cycling over the group-by
    values, plus a count), in block YAML so that names of any length parse."""
    attrs = "".join(f"  m{i}_{'n' * 40}: s.{value_of}{i % group_by}\n" for i in range(mappings))
    return parse_rule_text(
        f"id: {rule_id}\nname: w\nseverity: 3\ncategory: Security\ntimeWindow: 60\nincidentLifetime: 600\n"
        f"subpatterns:\n  - name: s\n    query: '{query}'\n"
        f"    groupBy: [{', '.join(f'{value_of}{i}' for i in range(group_by))}]\n"
        "    aggregateConstraint: 'COUNT(*) >= 1'\n"
        f"incidentAttributes:\n  count: s.COUNT(*)\n{attrs}"
    )


def cjk(rnd: random.Random, n: int) -> str:
    """``n`` random CJK characters: 3 bytes each in UTF-8, and deflate cannot squeeze them much."""
    return "".join(chr(rnd.randint(0x4E00, 0x9FFF)) for _ in range(n))


def event(i: int, values: dict[str, Any], seconds: int | None = None, event_type: str = "x") -> NormalizedEvent:
    rec = {
        "eventType": event_type,
        "eventId": f"e{i}",
        "eventTime": (T0 + timedelta(seconds=i if seconds is None else seconds)).isoformat(),
        **values,
    }
    ev = _NORM.normalize(rec, "t", T0)
    assert isinstance(ev, NormalizedEvent)
    return ev


def run_twice(store: StateStore, rules: list[Rule], batches: list[list[NormalizedEvent]]) -> list[dict[str, Any]]:
    """Process each batch, then again (a retry after its save: the newest record is always kept); the
    retry must emit, byte for byte, what the first delivery did. Returns the snapshots emitted."""
    checked = Checked(store)
    engine = Engine(rules, checked, lambda: T0)
    first, again = [], []
    for batch in batches:
        first.append([orjson.dumps(s) for s in engine.process(batch).incidents])
        again.append([orjson.dumps(s) for s in engine.process(batch).incidents])
    assert checked.violations == []
    assert checked.largest <= TABLE_PROPERTY_BYTES
    assert again == first, "a redelivered batch re-emits exactly what it emitted"
    return [orjson.loads(s) for batch in first for s in batch]


STORES = ["memory", "packed", "azurite"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    if request.param == "packed":
        yield MemoryStateStore(live_limit=0)
        return
    with fresh_table_store(request.getfixturevalue("azurite")) as table:
        yield table


# -- attacks through the engine ------------------------------------------------------------------------


def test_thirty_group_by_values_of_incompressible_text_fit_one_table_property(store: StateStore) -> None:
    # 30 x 600 random CJK characters, twice (key and mapped attributes): 100 KiB deflated before the key budget
    rnd = random.Random(1)
    rule = make_rule(30, 30)
    values = {f"a{j}": cjk(rnd, 600) for j in range(30)}
    snaps = run_twice(store, [rule], [[event(i, values)] for i in range(3)])
    assert [s["revision"] for s in snaps] == [1, 2, 3]
    assert len(orjson.dumps(snaps[-1]["groupBy"])) <= MAX_KEY_BYTES
    assert all(v.endswith(tuple("0123456789abcdef")) and "...#" in v for k, v in snaps[-1]["groupBy"].items() if k != "tenantId")


def test_group_by_values_cut_for_the_key_budget_keep_distinct_groups_apart(store: StateStore) -> None:
    rnd = random.Random(2)
    rule = make_rule(30, 1)
    common = {f"a{j}": cjk(rnd, 600) for j in range(30)}
    other = {**common, "a29": common["a29"][:-1] + "x"}  # differs in its last character only
    snaps = run_twice(store, [rule], [[event(0, common), event(1, other)]])
    assert len({s["incidentId"] for s in snaps}) == 2


def test_hundreds_of_mappings_of_a_long_value_are_dropped_from_the_state_and_said(store: StateStore) -> None:
    rnd = random.Random(3)
    rule = make_rule(2, 200)  # 200 attributes of 600 random CJK characters: 360 KiB of JSON
    values = {"a0": cjk(rnd, 600), "a1": cjk(rnd, 600)}
    snaps = run_twice(store, [rule], [[event(i, values)] for i in range(3)])
    last = snaps[-1]
    assert last["attributesTrimmed"] is True
    assert 0 < len(last["attributes"]) < 201
    assert last["attributes"]["count"] == 3  # small attributes are the last to go


def test_a_state_cut_to_fit_is_said_in_every_snapshot_it_makes_and_only_then(store: StateStore) -> None:
    rule = make_rule(2, 200)
    snaps = run_twice(store, [rule], [[event(0, {"a0": "h", "a1": "u"})]])
    assert "attributesTrimmed" not in snaps[0] and len(snaps[0]["attributes"]) == 201


def test_control_characters_escaped_six_bytes_each_keep_the_state_within_its_property(store: StateStore) -> None:
    rule = make_rule(40, 40)
    values = {f"a{j}": "".join(chr(1 + (j + k) % 30) for k in range(600)) for j in range(40)}
    snaps = run_twice(store, [rule], [[event(i, values)] for i in range(2)])
    assert snaps[-1]["revision"] == 2


def test_a_sequence_rule_with_many_long_group_values_fits(store: StateStore) -> None:
    rnd = random.Random(4)
    n = 12
    group_by = ", ".join(f"a{i}" for i in range(n))
    attrs = "".join(f"  x{i}: first.a{i}\n  y{i}: then.a{i}\n" for i in range(n))
    rule = parse_rule_text(
        "id: SEQW\nname: w\nseverity: 3\ncategory: Security\ntimeWindow: 600\nincidentLifetime: 600\n"
        "subpatterns:\n"
        f"  - {{name: first, query: 'eventType = \"a\"', groupBy: [{group_by}], aggregateConstraint: 'COUNT(*) >= 1'}}\n"
        f"  - {{name: then, query: 'eventType = \"b\"', groupBy: [{group_by}], aggregateConstraint: 'COUNT(*) >= 1'}}\n"
        "pattern: first FOLLOWED_BY then\n"
        f"incidentAttributes:\n{attrs}"
    )
    values = {f"a{j}": cjk(rnd, 600) for j in range(n)}
    batches = [[event(2 * i, values, event_type="a"), event(2 * i + 1, values, event_type="b")] for i in range(4)]
    snaps = run_twice(store, [rule], batches)
    assert snaps and snaps[0]["action"] == "created"


def test_chained_incidents_with_many_long_attributes_fit(store: StateStore) -> None:
    rnd = random.Random(5)
    first = make_rule(20, 20, rule_id="FIRST")
    # the consumer groups by the first rule's 20 mapped attributes (each up to 600 characters)
    names = [f"m{i}_{'n' * 40}" for i in range(20)]
    consumer = parse_rule_text(
        "id: SECOND\nname: w\nseverity: 3\ncategory: Security\ntimeWindow: 600\nincidentLifetime: 600\n"
        "subpatterns:\n  - name: s\n    query: 'eventType = \"FIRST\"'\n"
        f"    groupBy: [{', '.join(names)}]\n    aggregateConstraint: 'COUNT(*) >= 1'\n"
        "incidentAttributes:\n" + "".join(f"  c{i}: s.{n}\n" for i, n in enumerate(names))
    )
    values = {f"a{j}": cjk(rnd, 600) for j in range(20)}
    snaps = run_twice(store, [first, consumer], [[event(i, values)] for i in range(3)])
    assert {s["ruleId"] for s in snaps} == {"FIRST", "SECOND"}


def test_a_backfill_of_many_episodes_with_huge_events_fits(store: StateStore) -> None:
    rnd = random.Random(6)
    rule = make_rule(1, 3)
    # one group, an episode every 700 s (lifetime 600 s): 300 snapshots, each with 5 KiB of noise
    batch = [event(i, {"a0": "host", "noise": rnd.randbytes(2500).hex()}, seconds=700 * i) for i in range(300)]
    snaps = run_twice(store, [rule], [batch])
    assert len(snaps) == 300


def test_streaming_alerts_of_long_values_counted_by_many_wide_rules_keep_every_state_writable(store: StateStore) -> None:
    """An AlertInfo row (streaming) of long incompressible values counted by 20 rules grouping by all of
    them and mapping 60 attributes of them, then 200 AlertEvidence rows: the groups, their enrichment
    and the alert's join state (20 links of long keys) all stay writable."""
    rnd = random.Random(8)
    known = ["alertIdStr", "alertName", "tenantId", "serviceSource", "detectionSource", "attackTactic"]
    rules = [
        parse_rule_text(
            f"id: J{n}\nname: j\nseverity: 3\ncategory: Security\ntimeWindow: 300\nsubpatterns:\n"
            f"  - {{name: s, query: 'eventType CONTAIN \"Alert\"', groupBy: [{', '.join(known)}], "
            "aggregateConstraint: 'COUNT(*) >= 1'}\n"
            "incidentAttributes:\n" + "".join(f"  x{i}: s.{known[i % 6]}\n" for i in range(60))
        )
        for n in range(20)
    ]
    texts = {name: cjk(rnd, 600) for name in ["AlertId", "Title", "ServiceSource", "DetectionSource", "Category", "t"]}
    props = {"Timestamp": "2026-07-18T14:00:00Z", "AlertId": texts["AlertId"], "Category": texts["Category"]}
    info = {
        "category": "AdvancedHunting-AlertInfo",
        "tenantId": texts["t"],
        "properties": {
            **props,
            "Title": texts["Title"],
            "ServiceSource": texts["ServiceSource"],
            "DetectionSource": texts["DetectionSource"],
        },
    }
    rows = [
        {
            "category": "AdvancedHunting-AlertEvidence",
            "tenantId": texts["t"],
            "properties": {**props, "EntityType": "User", "AccountName": cjk(rnd, 200), "DeviceName": cjk(rnd, 200)},
        }
        for _ in range(200)
    ]
    normalizer = Normalizer()
    events = [e for rec in [info, *rows] if isinstance(e := normalizer.normalize(rec, "p", T0), NormalizedEvent)]
    assert all(len(str(events[0].attrs[a])) >= 512 for a in known)
    snaps = run_twice(store, rules, [events[:1], events[1:]])
    assert {s["ruleId"] for s in snaps[:20]} == {f"J{n}" for n in range(20)}
    assert all(s["attributesTrimmed"] for s in snaps)
    assert any(s["entities"]["users"] for s in snaps[20:])  # the evidence enriched the groups it could link


# -- the guarantees themselves, property-tested ----------------------------------------------------------

texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), min_size=100, max_size=3000),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=100, max_size=3000),
)
values_any = st.one_of(
    texts,
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.lists(texts, max_size=30),
)
attributes = st.dictionaries(st.text(min_size=1, max_size=2000), values_any, max_size=60)


def _snapshot(attrs: dict[str, Any], events: int, noise: int, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    bag = entities.EntityBag()
    for i in range(40):
        bag.add({"hosts": [f"h{i}-{rnd.random()}"], "users": [cjk(rnd, 200)]})
    return {
        "incidentId": "inc-0123456789abcdef01234567",
        "revision": 3,
        "action": "updated",
        "ruleId": "W",
        "tenantId": "t",
        "ruleName": "w",
        "severity": 3,
        "category": "Security",
        "tactics": [],
        "techniques": [],
        "groupBy": {"a0": "h"},
        "attributes": attrs,
        "triggerCount": 1,
        "firstSeen": "2026-03-01T00:00:00Z",
        "lastSeen": "2026-03-01T00:00:01Z",
        "remediation": "",
        "triggerEvents": [{"eventType": "x", "raw": rnd.randbytes(noise).hex()} for _ in range(events)],
        "entities": bag.to_dict(),
    }


@given(attributes, st.integers(0, 5), st.integers(0, 40_000), st.integers(1, 3), st.integers(1, 4096))
@example({f"name{i}": cjk(random.Random(i), 2500) for i in range(160)}, 5, 40_000, 1, 4096)  # 1.1 MiB of attributes
@example({"n" * 2000 + str(i): i for i in range(300)}, 0, 0, 2, 4096)  # long names, small values
def test_any_record_fits_and_what_it_keeps_is_what_is_emitted(
    attrs: dict[str, Any], events: int, noise: int, copies: int, ids: int
) -> None:
    snaps = [_snapshot(attrs, events, noise, seed) for seed in range(copies)]
    fitting = len(packed_record(OutboxRecord(list(range(ids)), snaps).encode())) <= MAX_RECORD_BYTES - 4
    data, emitted = _Outbox.record(list(range(ids)), snaps)  # type: ignore[arg-type]
    assert len(packed_record(data)) <= MAX_RECORD_BYTES - 4
    kept = OutboxRecord.decode(data).snapshots
    assert kept and [orjson.dumps(k) for k in kept] == [orjson.dumps(_own(e)) for e in emitted[-len(kept) :]]
    if fitting:
        assert emitted == snaps  # what fits is left alone
    for before, after in zip(snaps, emitted, strict=True):
        if after["attributes"] != before["attributes"]:
            assert after["attributesTrimmed"] is True
        if after["triggerEvents"] != before["triggerEvents"]:
            assert after["triggerEventsTrimmed"] == len(before["triggerEvents"]) - len(after["triggerEvents"])
        if after["entities"] != before["entities"]:
            assert after["entitiesTrimmed"] is True


@given(attributes, st.lists(texts, min_size=1, max_size=40), st.booleans(), st.booleans())
@example({f"n{i}": cjk(random.Random(i), 3000) for i in range(60)}, ["h" * 3000] * 40, True, True)
def test_a_state_without_window_entries_always_shrinks_into_one_property(
    attrs: dict[str, Any], key_values: list[str], absence: bool, ents: bool
) -> None:
    key = GroupKey("W", tuple(bounded_key(key_values)), "t")
    state = GroupState(key, ext={"t": list(range(200))} if absence else None)
    entities_of = _snapshot({}, 0, 0, 1)["entities"] if ents else None
    state.incident = Incident("inc-0123456789abcdef01234567", 9, 1, 2, 2, 1, 1, dict(attrs), entities_of)
    state.pending = dict(entities_of) if ents else None
    if absence:
        assert state.ext is not None
        state.ext["p"] = [1, 2, {"0": {f"a{i}": v for i, v in enumerate(key.values)}}, dict(attrs)]
    twin = GroupState.from_bytes(state.to_bytes())
    dropped = state.shrink()
    assert len(state.to_bytes()) <= MAX_STATE_BYTES
    assert twin.shrink() == dropped and twin.to_bytes() == state.to_bytes()  # deterministic
    if dropped == 0 and state.incident is not None:
        assert state.incident.attributes == attrs


@given(st.lists(texts, min_size=1, max_size=712))
@example(["\x01" * 512] * 712)
def test_any_key_of_up_to_712_values_is_within_the_key_budget_and_short_keys_are_untouched(values: list[str]) -> None:
    cut = bounded_key(values)
    assert len(orjson.dumps(cut)) <= MAX_KEY_BYTES
    if len(orjson.dumps(values)) <= MAX_KEY_BYTES:
        assert cut == values
    cut_lengths = {len(c) for v, c in zip(values, cut, strict=True) if c != v}
    assert len(cut_lengths) <= 1  # one share for all
    for v, c in zip(values, cut, strict=True):
        if c != v:
            assert len(v) > len(c) and c[-20:-16] == "...#" and c[:-20] == v.lower()[: len(c) - 20]


def test_keys_cut_for_the_budget_differ_when_any_value_differs() -> None:
    base = ["\x02" * 512] * 40
    seen = {tuple(bounded_key(base))}
    for i in range(40):
        changed = list(base)
        changed[i] = "\x02" * 511 + "\x03"
        seen.add(tuple(bounded_key(changed)))
    assert len(seen) == 41


# -- rules and events drawn at random: every write fits, every retry re-emits what was emitted -------------

hostile_values = st.one_of(
    st.text(max_size=20),
    st.integers(0, 2**40).map(str),
    st.integers(0, 2**31).map(lambda seed: cjk(random.Random(seed), 600)),
    st.integers(1, 31).map(lambda c: chr(c) * 600),
    st.lists(st.text(max_size=300), max_size=20),
    st.floats(-1e300, 1e300),
)


@st.composite
def rule_texts(draw: st.DrawFn) -> tuple[str, list[str], str]:
    """A rule (as YAML) of any shape a user may write: classic or FOLLOWED_BY, 1-40 group-by
    attributes, 0-120 mappings of group values and aggregates; with its event types."""
    n = draw(st.sampled_from([40, 30, 12, 3, 1]))
    maps = draw(st.sampled_from([120, 30, 5, 0]))
    group_by = ", ".join(f"a{i}" for i in range(n))
    constraint = draw(st.sampled_from(["COUNT(*) >= 1", "COUNT(DISTINCT v) >= 1", "SUM(w) >= 0 OR COUNT(*) >= 2"]))
    sequence = draw(st.booleans())
    subs = ["s", "t"] if sequence else ["s"]
    values = [f"a{i % n}" for i in range(maps)]
    aggregates = ["COUNT(*)", "COUNT(DISTINCT v)", "MAX(w)"]
    sources = [aggregates[i % 3] if i % 4 == 3 else values[i] for i in range(maps)]
    lines = [
        f"  m{i}{'_' * draw(st.integers(0, 190)) if i < 3 else ''}: {subs[i % len(subs)]}.{sources[i]}\n" for i in range(maps)
    ]
    text = (
        "id: RND\nname: w\nseverity: 3\ncategory: Security\ntimeWindow: 600\nincidentLifetime: 900\nsubpatterns:\n"
        + "".join(
            f"  - {{name: {s}, query: 'eventType = \"{s}x\"', groupBy: [{group_by}], aggregateConstraint: '{constraint}'}}\n"
            for s in subs
        )
        + ("pattern: s FOLLOWED_BY t\n" if sequence else "")
        + "incidentAttributes:\n  c: s.COUNT(*)\n"
        + "".join(lines)
    )
    return text, [f"{s}x" for s in subs], "a0"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Rule, list[list[NormalizedEvent]]]:
    text, types, _ = draw(rule_texts())
    rule = parse_rule_text(text)
    n = len(rule.subs[0].group_by) if rule.subs else len(rule.group_by)
    kind = draw(st.sampled_from(["cjk", "control", "lists", "mixed"]))  # one kind for every value: the worst case
    seed = draw(st.integers(0, 2**16))
    long_values = {
        "cjk": lambda j: cjk(random.Random(seed + j), 600),
        "control": lambda j: chr(1 + (seed + j) % 31) * 600,
        "lists": lambda j: [cjk(random.Random(seed + j + k), 60) for k in range(12)],
        "mixed": lambda j: draw(hostile_values),
    }[kind]
    shared = {f"a{j}": long_values(j) for j in range(n)}
    events = []
    for i in range(draw(st.integers(1, 6))):
        own = draw(st.dictionaries(st.sampled_from([f"a{j}" for j in range(n)]), hostile_values, max_size=3))
        extra = {"v": draw(hostile_values), "w": draw(st.one_of(st.integers(0, 10**6), hostile_values))}
        events.append(event(i, {**shared, **own, **extra}, seconds=draw(st.integers(0, 1200)), event_type=types[i % len(types)]))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(events) - 1)), max_size=2))))
    batches = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True) if events[a:b]]
    return rule, batches


@settings(max_examples=60)
@given(scenarios())
def test_any_rule_and_events_make_only_writes_table_accepts(scenario: tuple[Rule, list[list[NormalizedEvent]]]) -> None:
    rule, batches = scenario
    run_twice(MemoryStateStore(live_limit=0), [rule], batches)


@pytest.mark.azurite
@settings(max_examples=8)
@given(scenarios())
def test_any_rule_and_events_make_only_writes_azure_table_accepts(
    azurite: Any, scenario: tuple[Rule, list[list[NormalizedEvent]]]
) -> None:
    rule, batches = scenario
    with fresh_table_store(azurite) as table:
        run_twice(table, [rule], batches)


class _TransactionLog:
    """A TableClient recording what each transaction met (everything else passes through)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failures: list[str] = []

    def submit_transaction(self, ops: Any, **kw: Any) -> Any:
        try:
            return self.inner.submit_transaction(ops, **kw)
        except Exception as exc:
            self.failures.append(type(exc).__name__)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.azurite
def test_a_burst_of_big_states_with_long_readable_values_splits_into_transactions_table_takes(azurite: Any) -> None:
    """60 groups of one partition, each with a state of 60 KiB and readable group values of 4,000
    characters outside the BMP (12 bytes each in the request's JSON): every transaction is within
    4 MiB, so none has to be redone entity by entity."""
    rnd = random.Random(9)
    with fresh_table_store(azurite) as table:
        keys: list[GroupKey] = []
        i = 0
        texts = ["".join(chr(rnd.randrange(0x10000, 0x10FFFF)) for _ in range(560)) for _ in range(7)]
        while len(keys) < 60:
            values = tuple(f"{i}-{text}" for text in texts)
            key = GroupKey("R", (*values, "t"), "t")
            if table.keys_of(key)[0].endswith("~00"):
                keys.append(key)
            i += 1
        changes = []
        for key in keys:
            state = GroupState(key)
            state.entries = [[j, j, cjk(rnd, 300)] for j in range(48)]
            assert len(state.to_bytes()) <= MAX_STATE_BYTES
            changes.append(Change(key, state, None, 2**50))
        log = _TransactionLog(table.table)
        table.table = log
        table.save(changes)
        assert log.failures == []
        assert all(v.state is not None for v in table.load(keys, 0).values())


def _absence_rule(mappings: int) -> Rule:
    group_by = ", ".join(f"a{i}" for i in range(8))
    return parse_rule_text(
        "id: ABS\nname: w\nseverity: 3\ncategory: Security\ntimeWindow: 600\nincidentLifetime: 600\nsubpatterns:\n"
        f"  - {{name: l, query: 'eventType = \"l\"', groupBy: [{group_by}], aggregateConstraint: 'COUNT(*) >= 1'}}\n"
        f"  - {{name: r, query: 'eventType = \"r\"', groupBy: [{group_by}], aggregateConstraint: 'COUNT(*) >= 1'}}\n"
        "pattern: l NOT FOLLOWED_BY r\nincidentAttributes:\n  n: l.COUNT(*)\n"
        + "".join(f"  x{i}: l.a{i % 8}\n" for i in range(mappings))
    )


def test_a_pending_absence_of_oversized_attributes_fires_them_cut_and_says_so(store: StateStore) -> None:
    rnd = random.Random(10)
    values = {f"a{j}": cjk(rnd, 600) for j in range(8)}
    snaps = run_twice(store, [_absence_rule(100)], [[event(0, values, event_type="l")], [event(1, values, 700, "l")]])
    [fired] = snaps
    assert fired["action"] == "created" and fired["attributesTrimmed"] is True
    assert fired["lastSeen"].startswith("2026-03-01T00:10:00")  # at the deadline: the absence fired
    assert len(orjson.dumps(fired["attributes"])) <= 16 * 1024


def test_the_timer_fires_an_oversized_absence_within_the_limits(store: StateStore) -> None:
    rnd = random.Random(11)
    values = {f"a{j}": cjk(rnd, 600) for j in range(8)}
    checked = Checked(store)
    engine = Engine([_absence_rule(100)], checked, lambda: T0)
    assert engine.process([event(0, values, event_type="l")]).incidents == []
    [fired] = engine.fire_due(T0 + timedelta(seconds=601)).incidents
    assert fired["attributesTrimmed"] is True and checked.violations == []


@pytest.mark.parametrize("point", FAILURE_POINTS)
def test_oversized_groups_retried_at_every_failure_point_deliver_what_a_clean_pass_does(point: str) -> None:
    rnd = random.Random(12)
    rule = make_rule(30, 120)
    groups = [{f"a{j}": cjk(rnd, 600) for j in range(30)} for _ in range(2)]
    batches = [[event(3 * b + i, groups[i % 2]) for i in range(3)] for b in range(3)]
    clean: list[bytes] = []
    reference = Engine([rule], MemoryStateStore(), lambda: T0)
    for b in batches:
        clean += [orjson.dumps(s) for s in reference.process(b).incidents]
    store = Checked(MemoryStateStore(live_limit=0))
    batch: list[NormalizedEvent] = []
    raced: list[bytes] = []
    other = Engine([rule], store, lambda: T0)
    flaky = Flaky(store, race=lambda: raced.extend(orjson.dumps(s) for s in other.process(batch).incidents))
    engine = Engine([rule], flaky, lambda: T0)
    delivered: list[bytes] = []
    for batch in batches:
        delivered += raced + [orjson.dumps(s) for s in deliver(engine, flaky, batch, [point])]
        raced.clear()
    assert store.violations == []
    assert sorted(set(delivered)) == sorted(set(clean))  # what a retry re-emits is byte for byte what was emitted
    assert all(orjson.loads(s)["attributesTrimmed"] for s in delivered)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=200),
        st.one_of(st.text(max_size=512), st.integers(-(2**63), 2**63 - 1), st.floats(), st.none()),
        max_size=SURELY_SMALL_ATTRIBUTES,
    )
)
@example({chr(0x7F + i) * 200: "\x01" * 512 for i in range(SURELY_SMALL_ATTRIBUTES)})
def test_the_attributes_judged_small_without_measuring_are_within_the_attribute_budget(attrs: dict[str, Any]) -> None:
    """Up to SURELY_SMALL_ATTRIBUTES mapped attributes (names of at most 200 characters, values group-by
    values of at most 512 characters or numbers) are not measured: they must fit MAX_ATTRIBUTES_BYTES."""
    assert len(orjson.dumps(attrs)) <= MAX_ATTRIBUTES_BYTES
    assert all(len(k) + (len(v) if isinstance(v, str) else 24) <= ATTRIBUTE_CHARS for k, v in attrs.items())
