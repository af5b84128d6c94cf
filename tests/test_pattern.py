from __future__ import annotations

import pytest

from shared.errors import RuleError
from shared.pattern import Absent, AllOf, AnyOf, Sub, Then, parse_pattern, pattern_text

NAMES = ("a", "b", "c")


def p(text: str) -> object:
    return parse_pattern(text, NAMES)


def test_followed_by_binds_tighter_than_and_which_binds_tighter_than_or() -> None:
    tree = p("a OR b AND a FOLLOWED_BY c")
    assert tree == AnyOf((Sub("a", 1), AllOf((Sub("b", 6), Then(Sub("a", 12), Sub("c", 26))))))


def test_followed_by_is_left_associative_and_may_be_written_with_a_space() -> None:
    assert p("a followed by b FOLLOWED_BY c") == Then(Then(Sub("a", 1), Sub("b", 15)), Sub("c", 29))


def test_parentheses_override_binding() -> None:
    assert p("(a OR b) FOLLOWED_BY c") == Then(AnyOf((Sub("a", 2), Sub("b", 7))), Sub("c", 22))


def test_not_followed_by_at_the_top() -> None:
    tree = p("(a AND b) NOT FOLLOWED_BY c")
    assert isinstance(tree, Absent) and tree.right == Sub("c", 27)


def test_canonical_text_parses_back_to_an_equal_tree_without_columns() -> None:
    for text in ("a OR b AND a FOLLOWED_BY c", "(a OR b) FOLLOWED_BY c", "a FOLLOWED_BY b NOT FOLLOWED_BY c", "a AND (b OR c)"):
        tree = p(text)
        again = p(pattern_text(tree))
        assert pattern_text(again) == pattern_text(tree)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a FOLLOWED_BY", r"column 14: unexpected end of pattern"),
        ("a THEN b", r"column 3: unexpected 'THEN'"),
        ("a FOLLOWED_BY d", r"column 15: unknown subpattern 'd' \(defined: a, b, c\)"),
        ("a AND b", r"subpattern\(s\) c defined but not used"),
        ("a AND (b NOT FOLLOWED_BY c)", r"NOT FOLLOWED_BY is supported once, at the top"),
        ("a NOT FOLLOWED_BY b NOT FOLLOWED_BY c", r"NOT FOLLOWED_BY is supported once"),
        ("", r"empty pattern"),
    ],
)
def test_bad_patterns_are_located(text: str, pattern: str) -> None:
    with pytest.raises(RuleError, match=pattern):
        p(text)
