from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import RuleError
from shared.query import (
    And,
    Between,
    Compare,
    Contain,
    InList,
    IsNull,
    Not,
    Or,
    Query,
    Regexp,
    parse_correlation,
    parse_query,
    to_text,
)

SEED = (
    '(eventType = "MS-Defender-Endpoint-Alert-Persistence" OR eventType CONTAIN "M365Defender-Alert") '
    'AND  attackTechniqueId = "T1053"'
)


def m(query: str, event: dict) -> bool:
    return Query.parse(query).matches(event)


class TestOperators:
    def test_equal_is_case_insensitive(self) -> None:
        assert m('eventType = "ms-defender-endpoint-alert-persistence"', {"eventType": "MS-Defender-Endpoint-Alert-Persistence"})
        assert not m('eventType = "MS-Defender-Endpoint-Alert"', {"eventType": "MS-Defender-Endpoint-Alert-Persistence"})

    def test_spaces_around_operators_are_optional(self) -> None:
        assert m('eventType="Win-Security-4698"', {"eventType": "win-security-4698"})
        assert m("count>=3", {"count": 3})

    def test_not_equal_and_its_alias(self) -> None:
        assert m('a != "x"', {"a": "y"})
        assert m('a <> "x"', {"a": "y"})
        assert not m('a != "x"', {"a": "X"})

    def test_numeric_comparisons_accept_numeric_strings(self) -> None:
        assert m("sev > 5", {"sev": "9"})
        assert m("sev <= 9", {"sev": 9.0})
        assert not m("sev < 5", {"sev": "high"})
        assert m("sev = 9", {"sev": "9.0"})

    def test_contain_matches_a_substring_in_any_position(self) -> None:
        assert m('eventType CONTAIN "dev_mon"', {"eventType": "PH_DEV_MON_CPU"})
        assert m('eventType CONTAINS "DEV_MON"', {"eventType": "PH_DEV_MON_CPU"})
        assert m('eventType NOT CONTAIN "x"', {"eventType": "abc"})

    def test_in_and_not_in(self) -> None:
        assert m('sevCat IN ("medium", "high")', {"sevCat": "HIGH"})
        assert not m('sevCat IN ("medium", "high")', {"sevCat": "LOW"})
        assert m('sevCat NOT IN ("medium", "high")', {"sevCat": "LOW"})
        assert m("port IN (80, 443)", {"port": "443"})

    def test_regexp_is_searched_case_insensitively(self) -> None:
        assert m('cmd REGEXP "schtasks(\\.exe)? /create"', {"cmd": "C:\\Windows\\SCHTASKS.EXE /create /tn x"})
        assert not m('cmd NOT REGEXP "schtasks"', {"cmd": "schtasks /create"})

    def test_regexp_keeps_backslash_escapes(self) -> None:
        assert m('task REGEXP ".*C:\\\\Perflogs\\\\.*"', {"task": "run C:\\Perflogs\\x.exe"})

    def test_between_numbers_and_ip_addresses(self) -> None:
        assert m("n BETWEEN (1, 10)", {"n": 10})
        assert not m("n BETWEEN (1, 10)", {"n": 11})
        assert m("n NOT BETWEEN (1, 10)", {"n": 11})
        assert m("srcIp BETWEEN (10.1.1.1, 10.1.1.255)", {"srcIp": "10.1.1.7"})
        assert not m('srcIp BETWEEN ("10.1.1.1", "10.1.1.255")', {"srcIp": "10.1.2.7"})

    def test_is_null_tests_absence_and_emptiness(self) -> None:
        assert m("user IS NULL", {})
        assert m("user IS NULL", {"user": ""})
        assert m("user IS NULL", {"user": []})
        assert m("user IS NOT NULL", {"user": "bob"})
        assert not m("user is not null", {"user": None})

    def test_keywords_are_case_insensitive(self) -> None:
        assert m('a = "1" and not b in ("x") or c is null', {"a": "1", "b": "y"})


class TestMultiValuedAndMissing:
    def test_positive_operator_holds_if_any_value_does(self) -> None:
        assert m('attackTechniqueId = "T1053"', {"attackTechniqueId": ["T1053.005", "T1053"]})
        assert m('attackTechniqueId CONTAIN "1053"', {"attackTechniqueId": ("T1059", "T1053.005")})

    def test_negation_holds_only_if_no_value_does(self) -> None:
        assert not m('attackTechniqueId != "T1053"', {"attackTechniqueId": ["T1059", "T1053"]})
        assert not m('attackTechniqueId NOT IN ("T1053")', {"attackTechniqueId": ["T1059", "T1053"]})
        assert m('attackTechniqueId NOT IN ("T1053")', {"attackTechniqueId": ["T1059"]})

    def test_missing_attribute_satisfies_no_positive_and_every_negated_operator(self) -> None:
        for positive in ('x = "a"', 'x CONTAIN "a"', 'x IN ("a")', 'x REGEXP "."', "x BETWEEN (1, 2)", "x > 1"):
            assert not m(positive, {}), positive
        for negated in ('x != "a"', 'x NOT CONTAIN "a"', 'x NOT IN ("a")', 'x NOT REGEXP "."', "x NOT BETWEEN (1, 2)"):
            assert m(negated, {}), negated


class TestStructure:
    def test_and_binds_tighter_than_or(self) -> None:
        tree = parse_query('a = "1" OR b = "2" AND c = "3"')
        assert isinstance(tree, Or)
        assert isinstance(tree.children[1], And)
        assert m('a = "1" OR b = "2" AND c = "3"', {"a": "1"})
        assert not m('(a = "1" OR b = "2") AND c = "3"', {"a": "1"})

    def test_not_applies_to_the_next_condition(self) -> None:
        assert parse_query('NOT a = "1" AND b = "2"') == And((Not(Compare("a", "=", "1")), Compare("b", "=", "2")))

    def test_string_escapes(self) -> None:
        assert parse_query('a = "say \\"hi\\" \\\\ done"') == Compare("a", "=", 'say "hi" \\ done')
        assert parse_query("a = 'it\\'s'") == Compare("a", "=", "it's")

    def test_seed_query_parses_and_matches_sub_technique_parents(self) -> None:
        q = Query.parse(SEED)
        assert q.matches({"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": ("T1053.005", "T1053")})
        assert not q.matches({"eventType": "M365Defender-Alert-Execution", "attackTechniqueId": ("T1059.001", "T1059")})
        assert not q.matches({"eventType": "MS-Defender-Endpoint-Alert-Execution", "attackTechniqueId": "T1053"})

    def test_event_type_prefilter_is_three_valued(self) -> None:
        q = Query.parse(SEED)
        assert not q.could_match({"eventType": "MS-Defender-DeviceProcessEvents"})
        assert q.could_match({"eventType": "M365Defender-Alert-Persistence"})
        assert Query.parse('NOT eventType = "x" OR y = "1"').could_match({"eventType": "x"})


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "pattern"),
        [
            ('a = "1" AND', r"column 12: unexpected end of query"),
            ('a = "1" b = "2"', r"column 9: unexpected 'b'"),
            ('a > "high"', r"column 5: operator > needs a number"),
            ('a REGEXP "("', r"column 10: bad regular expression"),
            ('a BETWEEN ("x", "y")', r"BETWEEN needs two numbers or two IP addresses"),
            ('a = "1" ; b', r"column 9: unexpected character ';'"),
            ("a", r"column 2: unexpected end of query"),
            ("", r"empty query"),
        ],
    )
    def test_errors_name_the_column_and_quote_the_text(self, text: str, pattern: str) -> None:
        with pytest.raises(RuleError, match=pattern):
            parse_query(text)


# -- property tests ----------------------------------------------------------------------------

attrs = st.sampled_from(["eventType", "alertName", "attackTechniqueId", "x.y", "_a1"])
text_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
numbers = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(lambda f: round(f, 3))
)
literals = st.one_of(text_values, numbers.filter(lambda n: not (isinstance(n, float) and n.is_integer())))
regexes = st.sampled_from(["^a", "T10\\d\\d", "x|y", "\\\\server\\\\", 'say "hi"', "[a-z]+$"])

leaves = st.one_of(
    st.builds(Compare, attrs, st.sampled_from(["=", "!="]), literals),
    st.builds(Compare, attrs, st.sampled_from(["<", "<=", ">", ">="]), numbers),
    st.builds(Contain, attrs, literals, st.booleans()),
    st.builds(InList, attrs, st.lists(literals, min_size=1, max_size=3).map(tuple), st.booleans()),
    st.builds(Regexp, attrs, regexes, st.booleans()),
    st.builds(Between, attrs, numbers, numbers, st.booleans()),
    st.builds(IsNull, attrs, st.booleans()),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.builds(Not, children),
        st.lists(children, min_size=2, max_size=3).map(lambda c: And(tuple(c))),
        st.lists(children, min_size=2, max_size=3).map(lambda c: Or(tuple(c))),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(trees)
def test_printed_query_parses_back_to_the_same_tree(tree) -> None:
    assert parse_query(to_text(tree)) == tree


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("abAND OR NOT()=!<>\"'\\,.0123456789IN REGEXP IS NULL CONTAIN BETWEEN")), max_size=40)
)
def test_random_text_never_crashes_the_parser_with_anything_but_rule_error(text: str) -> None:
    try:
        q = Query.parse(text)
    except RuleError as err:
        assert err.column is not None or "empty" in str(err) or "nested" in str(err), str(err)
    else:
        assert parse_query(to_text(q.tree)) == q.tree


GROUPS = {"PH_SYS_EVENT_SuspiciousLogon": ("Win-Security-4625", "Linux-Fail-Login")}


class TestEventTypeGroups:
    def test_group_reference_matches_its_members_and_the_listed_literals(self) -> None:
        q = Query.parse('eventType IN (Group@PH_SYS_EVENT_SuspiciousLogon, "Extra-Type")', GROUPS)
        assert q.matches({"eventType": "win-security-4625"})
        assert q.matches({"eventType": "extra-type"})
        assert not q.matches({"eventType": "Win-Security-4624"})

    def test_not_in_a_group_excludes_its_members(self) -> None:
        q = Query.parse("eventType NOT IN (Group@ph_sys_event_suspiciouslogon)", GROUPS)
        assert not q.matches({"eventType": "Linux-Fail-Login"})
        assert q.matches({"eventType": "Win-Security-4624"})

    def test_group_reference_prints_back_as_written_and_reparses_to_the_same_tree(self) -> None:
        tree = parse_query('eventType IN ("a", Group@PH_SYS_EVENT_SuspiciousLogon)', GROUPS)
        assert to_text(tree) == 'eventType IN ("a", Group@PH_SYS_EVENT_SuspiciousLogon)'
        assert parse_query(to_text(tree), GROUPS) == tree

    def test_unknown_group_is_a_located_error(self) -> None:
        with pytest.raises(
            RuleError, match=r"column 15: unknown event-type group 'Missing' \(known: PH_SYS_EVENT_SuspiciousLogon\)"
        ):
            parse_query("eventType IN (Group@Missing)", GROUPS)

    def test_an_attribute_may_still_contain_an_at_sign(self) -> None:
        assert m('mail@box = "x"', {"mail@box": "X"})


class TestCorrelationConditions:
    def test_conjunction_of_reference_and_literal_comparisons(self) -> None:
        conds = parse_correlation('a.hostName = b.deviceName AND (a.user != b.user AND b.severity >= 5) AND a.x = "y"')
        assert [c.text for c in conds] == ["a.hostName = b.deviceName", "a.user != b.user", "b.severity >= 5", 'a.x = "y"']

    def test_comparisons_are_case_insensitive_for_text_and_numeric_for_numbers(self) -> None:
        [eq] = parse_correlation("a.h = b.h")
        [ne] = parse_correlation("a.u != b.u")
        [gt] = parse_correlation("a.n > b.n")
        assert eq.holds("HOST1", "host1") and eq.holds("5", 5.0)
        assert not ne.holds("alice", "ALICE") and ne.holds("alice", "bob")
        assert gt.holds("10", 9) and not gt.holds("x", 1)

    def test_a_missing_value_satisfies_only_not_equal(self) -> None:
        [eq] = parse_correlation("a.h = b.h")
        [ne] = parse_correlation("a.h != b.h")
        assert not eq.holds(None, None) and not eq.holds("", "x")
        assert ne.holds("", "x") and not ne.holds(None, "")

    @pytest.mark.parametrize(
        ("text", "pattern"),
        [
            ("a.x = b.y OR a.z = 1", r"column 11: unexpected character 'O'"),
            ('a.x > "text"', r"column 7: operator > needs a number"),
            ("x = b.y", r"column 1: unexpected character 'x'"),
            ("", r"empty correlation condition"),
        ],
    )
    def test_bad_conditions_are_located(self, text: str, pattern: str) -> None:
        with pytest.raises(RuleError, match=pattern):
            parse_correlation(text)


# -- IN / NOT IN a list of texts: the written-out leaf against the general definition --------------

_attr_values = st.one_of(
    st.none(), st.booleans(), numbers, text_values, st.sampled_from(["T1053", "t1053", "TRUE", "1", "1.0", "1.5"])
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.one_of(text_values, st.sampled_from(["T1053", "true", "1", "1.5"])), min_size=1, max_size=3),
    negated=st.booleans(),
    value=st.one_of(_attr_values, st.lists(_attr_values, max_size=4), st.lists(_attr_values, max_size=4).map(tuple)),
)
def test_a_list_of_texts_matches_as_each_value_compared_as_text(values: list[str], negated: bool, value: object) -> None:
    from shared.query import _compile_leaf
    from shared.values import as_text

    node = InList("x", tuple(values), negated)
    texts = {as_text(v) for v in values}
    items = value if type(value) in (list, tuple) else [value]
    found = value is not None and any(as_text(v) in texts for v in items if v is not None)  # type: ignore[union-attr]
    event = {"x": value}
    assert _compile_leaf(node)(event) is (not found if negated else found)
    assert Query.parse(to_text(node)).matches(event) is (not found if negated else found)
