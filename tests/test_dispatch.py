"""Indexed rule matching gives exactly the brute-force answer: the same rules, in the same order."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.dispatch import Dispatch, index_condition
from shared.query import parse_query
from shared.rules import Rule, default_rules_dir, load_rules, parse_rule_text

ATTRS = ["eventType", "attackTechniqueId", "alertName", "n"]
TEXTS = [
    "MS-Defender-Endpoint-Alert-Persistence",
    "ms-defender-endpoint-alert-persistence",
    "M365Defender-Alert",
    "T1053",
    "t1053",
    "T1053.005",
    "x",
    "",
    "5",
    "None",
    "true",
]


def _literal(value: Any) -> str:
    return orjson.dumps(value).decode() if isinstance(value, str) else str(value)


values = st.sampled_from(TEXTS) | st.integers(-2, 6)


def condition_texts(attrs: list[str], literals: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Query conditions on ``attrs`` with every operator, comparing with ``literals``."""

    @st.composite
    def condition(draw: st.DrawFn) -> str:
        attr = draw(st.sampled_from(attrs))
        op = draw(st.sampled_from(["=", "!=", "CONTAIN", "NOT CONTAIN", "IN", "NOT IN", "IS NULL", "IS NOT NULL"]))
        if op in ("IN", "NOT IN"):
            return f"{attr} {op} ({', '.join(_literal(v) for v in draw(st.lists(literals, min_size=1, max_size=3)))})"
        if op.startswith("IS"):
            return f"{attr} {op}"
        return f"{attr} {op} {_literal(draw(literals))}"

    return condition()


def query_texts(leaves: st.SearchStrategy[str], max_leaves: int = 5) -> st.SearchStrategy[str]:
    """Queries of ``leaves`` joined by AND, OR and NOT."""
    return st.recursive(
        leaves,
        lambda inner: (
            st.tuples(inner, st.sampled_from([" AND ", " OR "]), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})")
            | inner.map(lambda q: f"NOT ({q})")
        ),
        max_leaves=max_leaves,
    )


queries = query_texts(condition_texts(ATTRS, values))

scalars = st.none() | st.sampled_from(TEXTS) | st.integers(-2, 6) | st.booleans()
attribute_values = scalars | st.lists(scalars, max_size=3) | st.lists(scalars, max_size=3).map(tuple)
events = st.dictionaries(st.sampled_from(ATTRS), attribute_values, max_size=4)


def make_rule(i: int, query: str) -> Rule:
    rule = {
        "id": f"R{i}",
        "name": f"rule {i}",
        "severity": 5,
        "category": "Security",
        "timeWindow": 300,
        "subpatterns": [{"name": "s", "query": query, "groupBy": ["alertName"], "aggregateConstraint": "COUNT(*) >= 1"}],
        "incidentAttributes": {"alertName": "s.alertName"},
    }
    return parse_rule_text(orjson.dumps(rule).decode())


def brute_force(rules: list[Rule], attrs: dict[str, Any]) -> list[str]:
    return [r.id for r in rules if r.query.matches(attrs)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(queries, min_size=1, max_size=8), st.lists(events, min_size=1, max_size=8))
@example(['attackTechniqueId = "T1053" OR attackTechniqueId = "t1053.005"'], [{"attackTechniqueId": ("T1053.005", "T1053")}])
@example(['alertName IN ("x", 5)', 'alertName = "5"'], [{"alertName": 5}, {"alertName": "5"}])
@example(['attackTechniqueId = "None"'], [{"attackTechniqueId": [None]}])
@example(['attackTechniqueId = "t1053"', 'alertName IN ("X")'], [{"attackTechniqueId": "T1053", "alertName": "x"}])
def test_indexed_matching_equals_brute_force(texts: list[str], batch: list[dict[str, Any]]) -> None:
    rules = [make_rule(i, q) for i, q in enumerate(texts)]
    dispatch = Dispatch(rules)
    for attrs in batch + batch:  # twice: the per-event-type cache must not change the answer
        assert [r.id for r in dispatch.matching(attrs)] == brute_force(rules, attrs)


def test_the_default_rules_are_indexed_by_technique_and_event_type() -> None:
    rules = [r for r in load_rules([default_rules_dir()]) if not r.sequence]  # the single-subpattern ones
    seed = next(r for r in rules if r.id.endswith("TaskSchedulerActivity"))
    assert index_condition(seed.query.tree) == ("attackTechniqueId", frozenset({"t1053"}))
    dispatch = Dispatch(rules)
    persistence = {"eventType": "MS-Defender-Endpoint-Alert-Persistence", "attackTechniqueId": ("T1053.005", "T1053")}
    assert [r.id for r in dispatch.matching(persistence)] == brute_force(rules, persistence) == [seed.id]
    candidates = dispatch._by_type["MS-Defender-Endpoint-Alert-Persistence"]
    assert [r.id for _, r in candidates.always] == ["PH_RULE_MS_DefEndpoint_Alert_Generic"]  # NOT IN: not indexed
    assert "t1059.001" not in candidates.by_value["attackTechniqueId"]  # an Execution-only rule is not a candidate


def test_a_negated_or_mixed_condition_is_never_used_as_an_index() -> None:
    assert index_condition(parse_query('NOT a = "x"')) is None
    assert index_condition(parse_query('a = "x" OR b = "y"')) is None
    assert index_condition(parse_query("a = 5")) is None
    assert index_condition(parse_query('a IN ("x", 5)')) is None
    assert index_condition(parse_query('a = "x" AND (b = "y" OR b IN ("z", "w"))')) == ("a", frozenset({"x"}))
