"""Rule chaining: incidents fed back as events (eventType = rule id), with loop protection."""

from __future__ import annotations

import textwrap
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.chaining import MAX_CHAIN_DEPTH, consumed
from shared.engine import Engine
from shared.errors import StoreError
from shared.rules import Rule, parse_rule_text
from shared.state import MemoryStateStore

from .test_dispatch import condition_texts, make_rule, query_texts
from .test_sequence import CRED, PERSIST, T0, ev, rule


def simple(rule_id: str, query: str, group_by: str = "[tenantId, hostName]") -> Rule:
    text = textwrap.dedent(
        f"""\
        id: {rule_id}
        name: {rule_id}
        severity: 5
        category: Security
        timeWindow: 3600
        subpatterns:
          - name: sp
            query: '{query}'
            groupBy: {group_by}
            aggregateConstraint: COUNT(*) >= 1
        incidentAttributes:
          hostName: sp.hostName
          n: sp.COUNT(*)
        """
    )
    return parse_rule_text(text, f"{rule_id}.yaml")


def run(rules: list[Rule], *batches: list[Any]) -> list[list[dict[str, Any]]]:
    engine = Engine(rules, MemoryStateStore(), lambda: T0)
    return [engine.process(batch).incidents for batch in batches]


def test_a_rule_over_another_rules_incidents_fires_in_the_same_batch() -> None:
    over = simple("ON_SEQ_INCIDENTS", 'eventType = "SEQ_TEST" AND eventSeverity >= 8')
    [out] = run([rule(), over], [ev(PERSIST, 0), ev(CRED, 60)])
    assert [(s["ruleId"], s["groupBy"]["hostName"]) for s in out] == [("SEQ_TEST", "host-1"), ("ON_SEQ_INCIDENTS", "host-1")]
    [chained] = out[1]["triggerEvents"]
    assert chained["attributes"]["incidentId"] == out[0]["incidentId"] and chained["attributes"]["chainDepth"] == 1


def test_incidents_nobody_consumes_are_not_fed_back() -> None:
    engine = Engine([rule(), simple("OTHER", 'eventType = "x"')], MemoryStateStore(), lambda: T0)
    assert engine._chained == frozenset()
    assert len(engine.process([ev(PERSIST, 0), ev(CRED, 60)]).incidents) == 1


def test_a_rule_never_consumes_its_own_incidents() -> None:
    selfish = simple("SELFISH", 'eventType = "SELFISH" OR eventType = "x"')
    [out] = run([selfish], [ev("x", 0)])
    assert [(s["ruleId"], s["revision"]) for s in out] == [("SELFISH", 1)]


def test_a_cycle_between_two_rules_stops_at_the_depth_limit() -> None:
    a = simple("LOOP_A", 'eventType = "LOOP_B" OR eventType = "x"')
    b = simple("LOOP_B", 'eventType = "LOOP_A"')
    [out] = run([a, b], [ev("x", 0)])
    assert [s["ruleId"] for s in out] == ["LOOP_A", "LOOP_B", "LOOP_A", "LOOP_B"][: MAX_CHAIN_DEPTH + 1]
    assert max(s["revision"] for s in out if s["ruleId"] == "LOOP_A") == 2


def test_a_redelivered_batch_re_emits_the_chained_incidents_unchanged() -> None:
    over = simple("ON_SEQ_INCIDENTS", 'eventType = "SEQ_TEST"')
    batch = [ev(PERSIST, 0), ev(CRED, 60)]
    first, again = run([rule(), over], batch, batch)
    assert [(s["incidentId"], s["revision"], s["attributes"]) for s in again] == [
        (s["incidentId"], s["revision"], s["attributes"]) for s in first
    ]


def test_absences_fired_by_the_timer_are_chained_too() -> None:
    from datetime import timedelta

    over = simple("ON_UNATTENDED", 'eventType = "SEQ_TEST"')
    engine = Engine([rule("persist NOT FOLLOWED_BY cred", window=600), over], MemoryStateStore(), lambda: T0)
    engine.process([ev(PERSIST, 0)])
    fired = engine.fire_due(T0 + timedelta(seconds=601)).incidents
    assert [s["ruleId"] for s in fired] == ["SEQ_TEST", "ON_UNATTENDED"]


class FailOnce:
    """A store whose first save touching ``rule_id``'s groups fails before writing anything."""

    def __init__(self, inner: MemoryStateStore, rule_id: str | None) -> None:
        self.inner = inner
        self.rule_id = rule_id

    def save(self, changes: Any) -> None:
        if self.rule_id is not None and any(c.key.rule_id == self.rule_id for c in changes):
            self.rule_id = None
            raise StoreError("injected: save failed")
        self.inner.save(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("failure", ["none", "consumer-save", "send", "absence-save"])
def test_incidents_chained_from_a_timer_fired_absence_survive_a_failure_at_each_point(failure: str) -> None:
    from datetime import timedelta

    over = simple("ON_UNATTENDED", 'eventType = "SEQ_TEST"')
    over2 = simple("ON_ON_UNATTENDED", 'eventType = "ON_UNATTENDED"')  # a second chaining level
    fail_rule = {"consumer-save": "ON_UNATTENDED", "absence-save": "SEQ_TEST"}.get(failure)
    store = FailOnce(MemoryStateStore(), None)
    engine = Engine([rule("persist NOT FOLLOWED_BY cred", window=600), over, over2], store, lambda: T0)  # type: ignore[arg-type]
    engine.process([ev(PERSIST, 0)])
    store.rule_id = fail_rule
    queued: list[bytes] = []
    send_fails = [failure == "send"]

    def send(snaps: list[dict[str, Any]]) -> None:  # the incidents queue
        if send_fails[0]:
            send_fails[0] = False
            raise StoreError("injected: queue unreachable")
        queued.extend(orjson.dumps(s) for s in snaps)

    ticks = [T0 + timedelta(seconds=601 + i) for i in range(3)]
    if failure != "none":
        with pytest.raises(StoreError, match="injected"):
            engine.fire_due(ticks[0], emit=send)
    first = list(queued)
    engine.fire_due(ticks[1], emit=send)
    engine.fire_due(ticks[2], emit=send)  # everything saved: nothing more is sent
    latest = {(s["ruleId"], s["incidentId"], s["revision"]): s for s in map(orjson.loads, queued)}
    assert sorted((r, rev) for r, _, rev in latest) == [("ON_ON_UNATTENDED", 1), ("ON_UNATTENDED", 1), ("SEQ_TEST", 1)]
    assert len(queued) == len(first) + 3  # the failed tick's messages, then each incident once more
    assert set(first) <= set(queued)  # what a failed tick sent is sent again byte for byte (consumers drop it)


# Conditions on eventType naming rule ids (R0..R5, any case, parts of them) and on another attribute.
_TYPES = ["R0", "r1", "R2", "R", "1", "R10", "MS-Defender-Alert", ""]


_queries = query_texts(condition_texts(["eventType", "eventType", "alertName"], st.sampled_from(_TYPES)), max_leaves=4)


@given(st.lists(_queries, min_size=1, max_size=6))
@example(['eventType = "R1"', 'eventType CONTAIN "r"'])
@example(['eventType = "R0"', 'alertName = "x"'])
@example(['NOT (eventType = "R0")', 'eventType IN ("R0", "R1")'])
@settings(max_examples=150, deadline=None)
def test_the_rules_whose_incidents_are_chained_are_those_another_rule_could_match(texts: list[str]) -> None:
    """What ``consumed`` finds in one pass per distinct answer of the eventType conditions equals
    testing every pair of rules (a rule's own incidents never count)."""
    rules = [make_rule(i, q) for i, q in enumerate(texts)]
    brute = {r.id for r in rules if any(o.id != r.id and o.query.could_match({"eventType": r.id}) for o in rules)}
    assert consumed(rules) == brute
