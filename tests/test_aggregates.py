from __future__ import annotations

import pytest

from shared.aggregates import Aggregate, Constraint, needed_attrs, parse_aggregate
from shared.errors import RuleError


def values(constraint: Constraint, rows: list[dict]) -> dict:
    out = {}
    for agg in constraint.aggregates:
        column = None if agg.attr is None else [r.get(agg.attr) for r in rows]
        out[agg] = agg.compute(column, len(rows))
    return out


def holds(text: str, rows: list[dict]) -> bool:
    c = Constraint.parse(text)
    return c.holds(values(c, rows))


def test_count_star_needs_no_per_event_values() -> None:
    c = Constraint.parse("COUNT(*) >= 1")
    assert needed_attrs(c.aggregates) == ()
    assert c.holds({Aggregate("COUNT"): 1})
    assert not c.holds({Aggregate("COUNT"): 0})


def test_count_attr_counts_events_that_have_the_attribute() -> None:
    rows = [{"user": "a"}, {"user": ""}, {}, {"user": "b"}]
    assert holds("COUNT(user) = 2", rows)


def test_count_distinct_is_case_insensitive_and_flattens_lists() -> None:
    rows = [{"host": "A"}, {"host": "a"}, {"host": ["b", "c"]}]
    assert holds("COUNT(DISTINCT host) = 3", rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SUM(bytes) = 60", True),
        ("AVG(bytes) = 20", True),
        ("MIN(bytes) = 10", True),
        ("MAX(bytes) > 29", True),
        ("MAX(bytes) > 30", False),
    ],
)
def test_numeric_aggregates_use_numeric_strings(text: str, expected: bool) -> None:
    assert holds(text, [{"bytes": 10}, {"bytes": "20"}, {"bytes": 30.0}, {"bytes": "n/a"}]) is expected


def test_numeric_aggregate_over_no_numbers_makes_its_comparison_false() -> None:
    assert not holds("SUM(bytes) >= 0", [{"bytes": "x"}])


def test_and_or_and_parentheses_combine_comparisons() -> None:
    rows = [{"u": "a"}, {"u": "b"}]
    assert holds("COUNT(*) >= 2 AND (COUNT(DISTINCT u) = 5 OR COUNT(u) = 2)", rows)
    assert not holds("COUNT(*) >= 3 OR COUNT(DISTINCT u) > 2", rows)


def test_canonical_text_round_trips() -> None:
    c = Constraint.parse("count(distinct h) > 2 and (sum(b) > 10 or avg(x) < 3)")
    assert c.canonical == "COUNT(DISTINCT h) > 2 AND (SUM(b) > 10 OR AVG(x) < 3)"
    assert Constraint.parse(c.canonical).tree == c.tree


def test_needed_attrs_are_the_union_over_aggregates() -> None:
    c = Constraint.parse("COUNT(DISTINCT host) > 1 AND SUM(bytes) > 1 AND COUNT(*) > 0")
    assert needed_attrs(c.aggregates) == ("bytes", "host")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("MEDIAN(x) > 1", r"column 1: unknown aggregate 'MEDIAN'"),
        ("SUM(*) > 1", r"only COUNT takes \*"),
        ("SUM(DISTINCT x) > 1", r"only COUNT takes DISTINCT"),
        ("COUNT(*) >=", r"unexpected end of text"),
        ("COUNT(*) >= x", r"column 13: unexpected"),
        ("", r"empty aggregate constraint"),
    ],
)
def test_constraint_errors_are_located(text: str, pattern: str) -> None:
    with pytest.raises(RuleError, match=pattern):
        Constraint.parse(text)


def test_parse_single_aggregate_for_mappings() -> None:
    assert parse_aggregate("COUNT(*)") == Aggregate("COUNT")
    assert parse_aggregate("count(distinct user)") == Aggregate("COUNT", "user", True)
