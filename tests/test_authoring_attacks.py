"""Rule authoring under attack: a bad day or a hostile rule file or FortiSIEM export.

Every input here is bad on purpose. What must hold for each: the CLI exits non-zero, prints one
located line per problem on stderr (file first, then the field or the YAML line), never a traceback,
and never hangs or grows without bound (caps in ``shared/rules.py``, ``shared/query.py``,
``shared/aggregates.py``). The good rules of a folder are still checked, and every bad one is reported.
"""

from __future__ import annotations

import contextlib
import io
import os
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.__main__ import main
from shared.aggregates import Constraint
from shared.errors import RuleError, one_line
from shared.query import MAX_QUERY_CHARS, MAX_QUERY_CONDITIONS, MAX_QUERY_DEPTH, Regexp, parse_correlation, parse_query
from shared.rules import MAX_GROUP_BY, MAX_RULE_FILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_rules, parse_rule_text

BASE: dict[str, Any] = {
    "id": "ATTACK_Base",
    "name": "Two credential alerts on one host",
    "severity": 7,
    "category": "Security",
    "timeWindow": 600,
    "subpatterns": [
        {
            "name": "cred",
            "query": 'eventType CONTAIN "Alert-CredentialAccess"',
            "groupBy": ["tenantId", "hostName"],
            "aggregateConstraint": "COUNT(*) >= 2",
        }
    ],
    "incidentAttributes": {"hostName": "cred.hostName", "alerts": "cred.COUNT(*)"},
}
SUMMARY_SUFFIXES = ("invalid rule file(s)", "warning(s)")


def rule_text(**changes: Any) -> str:
    data = {**BASE, **changes}
    return yaml.safe_dump(data, sort_keys=False, width=1 << 30, allow_unicode=True)


def sub_text(**changes: Any) -> str:
    return rule_text(subpatterns=[{**BASE["subpatterns"][0], **changes}])


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def problems(err: str) -> list[str]:
    """The problem lines of stderr: everything but the count at the end."""
    return [line for line in err.splitlines() if not line.endswith(SUMMARY_SUFFIXES)]


def assert_located_failure(code: int, err: str, path: Path, *expected: str) -> str:
    """Non-zero exit, no traceback, every problem line starts with the file and is printable."""
    assert code != 0, err
    assert "Traceback" not in err
    lines = problems(err)
    assert lines, err
    for line in lines:
        assert line.startswith(str(path)), line
        assert line.isprintable(), line
    joined = "\n".join(lines)
    for text in expected:
        assert text in joined, joined
    return joined


def validate(tmp_path: Path, text: str | bytes, *expected: str) -> str:
    path = tmp_path / "r.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    code, _, err = cli(["validate", str(path)])
    return assert_located_failure(code, err, path, *expected)


def billion_laughs(levels: int, width: int = 9) -> str:
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines)


# -- the YAML document ------------------------------------------------------------------------


def test_the_base_rule_of_these_attacks_loads() -> None:
    rule = parse_rule_text(rule_text(), "r.yaml")
    assert rule.id == "ATTACK_Base" and rule.window_s == 600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "a rule file must hold a mapping of rule fields"),
        ("# only a comment\n", "a rule file must hold a mapping of rule fields"),
        ("- a list\n- of things\n", "a rule file must hold a mapping of rule fields"),
        ("id: [unclosed\n", "invalid YAML at line 2, column 1"),
        ("id: x\nname: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML at line 2, column 7"),
        ("id: x\nid: y\n", "invalid YAML at line 2, column 1: key 'id' repeats (first at line 1)"),
        ("id: x\nseverity: \x1b[31m\n", "invalid YAML at line 2, column 11: character '\\x1b' is not allowed in YAML"),
        ("id: x\nname: \x85\u202e\n", "invalid YAML at line 4, column 1"),  # NEL is a YAML line break
        ("timeWindow: " + "9" * 5000 + "\n", "invalid YAML at line 1, column 13: integer of 5000 characters is too long"),
        ("a: " + "[" * 10_000 + "]" * 10_000 + "\n", f"nested deeper than {MAX_YAML_DEPTH} levels"),
        ("a: " + "{b: " * 10_000 + "c" + "}" * 10_000 + "\n", f"nested deeper than {MAX_YAML_DEPTH} levels"),
        ("a: &x [*x]\n", "invalid YAML at line 1, column 4: an alias refers to a node that contains it"),
        ("a: &x {b: *x}\n", "an alias refers to a node that contains it"),
        ("a: *nothing\n", "invalid YAML at line 1, column 4: found undefined alias 'nothing'"),
        (billion_laughs(9), f"more than {MAX_YAML_NODES} values once aliases are expanded"),
    ],
)
def test_a_bad_yaml_document_is_one_located_line(tmp_path: Path, text: str, expected: str) -> None:
    line = validate(tmp_path, text, expected)
    assert len(line.splitlines()) == 1


def test_a_duplicate_key_deep_in_the_rule_is_an_error_not_the_last_value_silently(tmp_path: Path) -> None:
    text = rule_text().replace("  aggregateConstraint: COUNT(*) >= 2\n", "  aggregateConstraint: COUNT(*) >= 2\n  query: x = 1\n")
    assert "query: x = 1" in text
    validate(tmp_path, text, "key 'query' repeats (first at line")


def test_billion_laughs_inside_a_rule_test_payload_is_refused_before_the_model_sees_it(tmp_path: Path) -> None:
    bomb = billion_laughs(8).replace("\n", "\n      ")
    text = (
        rule_text()
        + f"tests:\n  - name: bomb\n    events:\n    - at: 0\n      raw:\n      {bomb}\n    expect: {{incidents: 0}}\n"
    )
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for command in ("validate", "test-rules"):
        code, _, err = cli([command, str(path)])
        assert_located_failure(code, err, path, "values once aliases are expanded")


def test_aliases_within_the_cap_still_load() -> None:
    text = rule_text(impacts=["a"]).replace("impacts:\n- a\n", "impacts: &i\n- a\ndataSources: *i\n")
    rule = parse_rule_text(text, "r.yaml")
    assert rule.model.data_sources == ["a"] == rule.model.impacts


def test_a_merge_key_may_override_what_it_merges() -> None:
    """'<<' is how YAML reuses a mapping; overriding a merged key is not a repeated key."""
    text = rule_text() + "tests:\n  - &t {name: one, events: [], expect: {incidents: 0}}\n  - <<: *t\n    name: two\n"
    assert [t.name for t in parse_rule_text(text, "r.yaml").model.tests] == ["one", "two"]


def test_bom_and_crlf_are_read_as_the_same_rule(tmp_path: Path) -> None:
    text = rule_text()
    (tmp_path / "a.yaml").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (rule,) = load_rules([tmp_path / "a.yaml"])
    assert rule.model == parse_rule_text(text).model


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    validate(tmp_path, rule_text().encode() + b"# \xff\n", "not UTF-8 text (byte")


def test_a_file_over_the_size_cap_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    validate(tmp_path, rule_text() + "#" + "x" * MAX_RULE_FILE_BYTES + "\n", f"file larger than {MAX_RULE_FILE_BYTES} bytes")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_a_device_named_as_a_rule_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    code, _, err = cli(["validate", str(fifo)])
    assert_located_failure(code, err, fifo, "not a regular file")
    if Path("/dev/zero").exists():  # never ends: must not be read into memory
        code, _, err = cli(["validate", "/dev/zero"])
        assert_located_failure(code, err, Path("/dev/zero"), "not a regular file")


# -- field values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("timeWindow", float("nan"), "timeWindow: Input should be a valid integer"),
        ("timeWindow", float("inf"), "timeWindow: Input should be a valid integer"),
        ("timeWindow", -600, "timeWindow: Input should be greater than 0"),
        ("timeWindow", 0, "timeWindow: Input should be greater than 0"),
        ("timeWindow", 10**30, "timeWindow: Input should be less than or equal to 2592000"),
        ("timeWindow", "600", "timeWindow: Input should be a valid integer"),
        ("timeWindow", 600.5, "timeWindow: Input should be a valid integer"),
        ("severity", True, "severity: Input should be a valid integer"),
        ("severity", 11, "severity: Input should be less than or equal to 10"),
        ("incidentLifetime", 10**30, "incidentLifetime: Input should be less than or equal to 31536000"),
        ("incidentLifetime", 0, "incidentLifetime: Input should be greater than 0"),
        ("clear", {"after": float("inf")}, "clear.after: Input should be a valid integer"),
        ("clear", {"after": 10**12}, "clear.after: Input should be less than or equal to 2592000"),
        ("enabled", "yes please", "enabled: Input should be a valid boolean"),
        ("subpatterns", [], "subpatterns: List should have at least 1 item"),
        ("incidentAttributes", {"host\u200bName": "cred.hostName"}, "incidentAttributes.host\\u200bName"),
        ("incidentAttributes", {"a\nb": "cred.hostName"}, "incidentAttributes.a\\nb"),
        ("incidentAttributes", {"\x1b[2J": "cred.hostName"}, "incidentAttributes.\\x1b[2J"),
        ("name", {"nested": "mapping"}, "name: Input should be a valid string"),
    ],
)
def test_a_bad_field_value_names_the_field(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    validate(tmp_path, rule_text(**{field: value}), expected)


@pytest.mark.parametrize(
    "name",
    ["hostName\u200b", "host Name", "", "h\u043estName", "a\nb", "\u202ehostName", "x" * 201],
)
def test_a_group_by_attribute_no_event_can_carry_is_an_error(tmp_path: Path, name: str) -> None:
    """An invisible or confusable character would make the group-by silently never match."""
    validate(tmp_path, sub_text(groupBy=["tenantId", name]), "subpatterns[0].groupBy[1]: not an attribute name")


def test_more_group_by_attributes_than_a_group_key_can_hold_is_an_error(tmp_path: Path) -> None:
    """Past MAX_GROUP_BY the key budget (engine.MAX_KEY_BYTES) could no longer keep distinct groups apart."""
    names = ["hostName", *(f"a{i}" for i in range(MAX_GROUP_BY))]
    validate(tmp_path, sub_text(groupBy=names), "subpatterns[0].groupBy: List should have at most 64 items")
    assert parse_rule_text(sub_text(groupBy=names[:MAX_GROUP_BY])).group_by == tuple(names[:MAX_GROUP_BY])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ({"events": [{"at": float("nan"), "event": {}}]}, "tests[0].events[0].at: Input should be a finite number"),
        ({"events": [{"at": float("inf"), "event": {}}]}, "tests[0].events[0].at: Input should be a finite number"),
        ({"events": [{"at": 1e300, "event": {}}]}, "tests[0].events[0].at: Input should be less than or equal to"),
        ({"events": [], "until": 1e15}, "tests[0].until: Input should be less than or equal to"),
        ({"events": [], "until": float("-inf")}, "tests[0].until: Input should be a finite number"),
        ({"events": [], "start": "9999-12-31T23:59:59Z"}, "tests[0].start: Value error, must be between 1970-01-01"),
        ({"events": [], "start": "0001-01-01T00:00:00Z"}, "tests[0].start: Value error, must be between 1970-01-01"),
        ({"events": [], "expect": {"incidents": 1.5}}, "tests[0].expect.incidents: Input should be a valid integer"),
    ],
)
def test_rule_test_timelines_out_of_range_are_load_errors_not_overflows(
    tmp_path: Path, case: dict[str, Any], expected: str
) -> None:
    test = {"name": "t", "expect": {"incidents": 0}, **case}
    path = tmp_path / "r.yaml"
    path.write_text(rule_text(tests=[test]))
    for command in ("validate", "test-rules"):
        code, _, err = cli([command, str(path)])
        assert_located_failure(code, err, path, expected)


# -- query, constraint and correlation text ----------------------------------------------------

DEEP = MAX_QUERY_DEPTH + 1


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("NOT " * DEEP + 'eventType = "x"', f"nested more than {MAX_QUERY_DEPTH} levels"),
        ("NOT " * 200 + 'eventType = "x"', f"nested more than {MAX_QUERY_DEPTH} levels"),  # once a SyntaxError
        ("NOT " * 15_000 + 'eventType = "x"', f"nested more than {MAX_QUERY_DEPTH} levels"),
        ("".join(f"(a{i} = 1 {'AND' if i % 2 else 'OR'} " for i in range(300)) + "b = 1" + ")" * 300, "nested more than"),
        (" OR ".join(f'eventType = "x{i}"' for i in range(MAX_QUERY_CONDITIONS + 1)), "conditions (at most"),
        ("(" * 40_000 + 'eventType = "x"' + ")" * 40_000, f"characters (at most {MAX_QUERY_CHARS})"),
        ('eventType IN ("' + '", "'.join(str(i) for i in range(20_000)) + '")', f"at most {MAX_QUERY_CHARS}"),
        ("eventSeverity > " + "9" * 5000, "column 17: number of 5000 characters"),
        ("eventSeverity BETWEEN (1, 1" + "0" * 400 + ".5)", "number of 403 characters"),
        ("\u0435ventType = 'x'", "column 1: unexpected character '\u0435'"),  # Cyrillic e
        ("event\u200bType = 'x'", "column 6: unexpected character '\\u200b'"),
        ("eventType = 'x' AND user\x07 = 1", "unexpected character '\\x07'"),
        ('eventType REGEXP "(a"', "bad regular expression"),
        ("eventType =", "unexpected end of query"),
    ],
)
def test_a_hostile_query_is_one_located_line(tmp_path: Path, query: str, expected: str) -> None:
    line = validate(tmp_path, sub_text(query=query), "subpatterns[0].query: ", expected)
    assert len(line) < 2_000


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        ("COUNT(*) >= " + "9" * 5000, "aggregate constraint of 5012 characters"),
        ("COUNT(*) >= " + "9" * 400, "number of 400 characters"),
        ("".join(f"(COUNT(*) > {i} {'AND' if i % 2 else 'OR'} " for i in range(40)) + "COUNT(*) > 0" + ")" * 40, "nested more"),
        ("COUNT(*) >= 1\nAND x", "column 5: unexpected 'x'"),
        ("EVAL(*) >= 1", "unknown aggregate 'EVAL'"),
    ],
)
def test_a_hostile_constraint_is_one_located_line(tmp_path: Path, constraint: str, expected: str) -> None:
    validate(tmp_path, sub_text(aggregateConstraint=constraint), "subpatterns[0].aggregateConstraint: ", expected)


def test_a_hostile_correlation_is_a_located_error() -> None:
    with pytest.raises(RuleError, match="correlation condition of"):
        parse_correlation("a.x = b.x AND " * 10_000 + "a.y = b.y")
    with pytest.raises(RuleError, match="number of 5000 characters"):
        parse_correlation("a.x = " + "9" * 5000)


QUERY_WORDS = st.sampled_from(
    ["eventType", "user", "a.b", "=", "!=", "<", ">=", "AND", "OR", "NOT", "(", ")", "IN", "CONTAIN", "REGEXP",
     "BETWEEN", "IS", "NULL", ",", '"x"', "'y'", '"(a+)+$"', "5", "-1.5", "9" * 30, "10.0.0.1", "Group@nope",
     '"\\', "\x00", "\u202e", "\u200b", "\u0435", "\n", "$@", "1e5"]
)  # fmt: skip


@given(st.lists(QUERY_WORDS, max_size=30).map(" ".join))
@example('eventType IN ("a", Group@nope)')
@example("NOT " * 40 + "a = 1")
def test_any_query_text_parses_or_is_a_rule_error(text: str) -> None:
    try:
        parse_query(text)
    except RuleError as err:
        assert str(err).isprintable() and len(str(err)) < 2_000


@given(st.text(alphabet="COUNTDISMAXVG(*)<>=!0123456789. ANDOR\x00\u202e", max_size=60))
@example("COUNT(*) >= 99999999999999999999999999999999999999999999999999")
def test_any_constraint_text_parses_or_is_a_rule_error(text: str) -> None:
    try:
        Constraint.parse(text)
    except RuleError as err:
        assert str(err).isprintable()


# -- whole rule documents from hypothesis -------------------------------------------------------

KEYS = [*BASE, "pattern", "correlation", "exceptions", "clear", "tests", "incidentLifetime", "tactics", "x\u202e"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.printable + "\u200b\u202e\u0435\x85", max_size=30),
    st.sampled_from(["COUNT(*) >= 1", "cred.hostName", 'eventType = "x"', "cred", "2026-01-01T00:00:00Z"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from([*KEYS, "name", "query", "at"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=100)  # each example is a CLI run over a file
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8))
@example({"subpatterns": [{"name": "cred", "query": "NOT " * 200 + "a = 1", "groupBy": [], "aggregateConstraint": "x"}]})
@example({**BASE, "tests": [{"name": "t", "events": [{"at": float("inf"), "event": {}}], "expect": {"incidents": 0}}]})
def test_any_rule_document_validates_or_is_located_errors(
    tmp_path_factory: pytest.TempPathFactory, changes: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("doc") / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}, allow_unicode=True), encoding="utf-8")
    code, out, err = cli(["validate", str(path)])
    if code == 0:
        assert out.startswith(f"ok {path}")
    else:
        assert_located_failure(code, err, path)


# -- folders ------------------------------------------------------------------------------------


def test_a_folder_reports_every_bad_file_among_hundreds_and_checks_every_good_one(tmp_path: Path) -> None:
    for i in range(150):
        (tmp_path / f"good{i:03}.yaml").write_text(rule_text(id=f"GOOD_{i}"))
        (tmp_path / f"bad{i:03}.yaml").write_text(rule_text(id=f"BAD_{i}", timeWindow=-i))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)  # must not be walked forever
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "zdup.yaml").write_text(rule_text(id="GOOD_7"))
    code, _, err = cli(["validate", str(tmp_path)])
    lines = problems(err)
    assert_located_failure(code, err, tmp_path)
    assert sorted(line.split(":")[0] for line in lines) == sorted(
        [str(tmp_path / f"bad{i:03}.yaml") for i in range(150)] + [str(tmp_path / "dangling.yaml"), str(tmp_path / "zdup.yaml")]
    )
    assert "150 invalid rule file(s)" not in err and "152 invalid rule file(s)" in err
    assert "a symbolic link to" in err and "rule id 'GOOD_7' already defined" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_in_a_rules_folder_is_reported_not_silently_skipped(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(rule_text())
    os.mkfifo(tmp_path / "pipe.yaml")
    code, _, err = cli(["validate", str(tmp_path)])
    assert_located_failure(code, err, tmp_path / "pipe.yaml", "not a regular file")


def test_a_file_name_with_a_line_break_or_escape_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "evil\n\x1b[31mname.yaml"
    path.write_text("id: [\n")
    code, _, err = cli(["validate", str(path)])
    assert code == 1 and "Traceback" not in err
    (line,) = problems(err)
    assert line.startswith(one_line(str(path))) and "\\n\\x1b[31mname.yaml" in line


def test_one_line_escapes_what_would_break_or_restyle_a_terminal_line() -> None:
    assert one_line("ok: Grüße") == "ok: Grüße"
    assert one_line("a\nb\r\x1b[2J\u202e\u200b\x85") == "a\\nb\\r\\x1b[2J\\u202e\\u200b\\x85"
    assert str(RuleError("bad", file="f\n.yaml", text="x" * 5000)).count("\n") == 0
    assert len(str(RuleError("bad", text="x" * 5000))) < 300


# -- FortiSIEM XML ------------------------------------------------------------------------------

XML_RULE = (
    '<Rules><Rule id="X1"><Name>n</Name><IncidentDef severity="{severity}"><ArgList>hostName = a.hostName</ArgList>'
    '</IncidentDef><PatternClause window="{window}"><SubPattern name="a"><SingleEvtConstr>{query}</SingleEvtConstr>'
    "<GroupByAttr>hostName</GroupByAttr><GroupEvtConstr>COUNT(*) &gt;= 1</GroupEvtConstr></SubPattern>"
    "</PatternClause></Rule></Rules>"
)


def xml(**values: str) -> str:
    return XML_RULE.format(**{"severity": "7", "window": "300", "query": 'eventType = "x"', **values})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><Rules><Rule><Name>&c;</Name></Rule></Rules>',
            "not a readable XML rule export (EntitiesForbidden",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><Rules><Rule><Name>&x;</Name></Rule></Rules>',
            "not a readable XML rule export (EntitiesForbidden",
        ),
        ("<Rules><Rule", "not a readable XML rule export (unclosed token: line 1, column 7)"),
        ("", "not a readable XML rule export (no element found"),
        ("<Other/>", "no <Rule> element (root is <Other>)"),
    ],
)
def test_a_hostile_or_broken_export_is_one_error_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "in.xml"
    path.write_text(text)
    code, out, err = cli(["import", "fortisiem", str(path), "--out", str(tmp_path / "out")])
    assert code == 1 and "Traceback" not in err and out == ""
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {path}: {expected}") and line.isprintable()


@pytest.mark.parametrize(
    ("values", "note"),
    [
        ({"severity": "9" * 5000}, "severity: reconstructed: IncidentDef severity '99999"),
        ({"severity": "\u00b2"}, "severity: reconstructed: IncidentDef severity '²' is not 1-10"),
        ({"window": "\u0663\u0660\u0660"}, "timeWindow: reconstructed: PatternClause window '٣٠٠' is not a positive number"),
        ({"window": "9" * 5000}, "timeWindow: reconstructed"),
        ({"window": "99999999"}, "timeWindow: invalid: the imported rule does not load: Input should be less than or equal to"),
        ({"query": "NOT " * 200 + "a = 1"}, "subpatterns[0].query: invalid: the imported rule does not load: query nested"),
        ({"query": "a = 1 OR " * 150_000 + "a = 1"}, "rule: invalid: about"),
    ],
)
def test_hostile_values_in_an_export_become_notes_not_crashes(tmp_path: Path, values: dict[str, str], note: str) -> None:
    path = tmp_path / "in.xml"
    path.write_text(xml(**values))
    code, _, err = cli(["import", "fortisiem", str(path), "--out", str(tmp_path / "out"), "--force"])
    assert code in (0, 1) and "Traceback" not in err
    lines = err.splitlines()
    assert all(line.isprintable() and len(line) < 1_000 for line in lines)
    assert any(note in line for line in lines), err
    assert code == (1 if "invalid" in note else 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("title: t\n" + "#" * MAX_RULE_FILE_BYTES + "\n", f"file larger than {MAX_RULE_FILE_BYTES} bytes"),
        (
            "title: t\nlogsource: {product: windows}\ndetection:\n"
            + "".join(f"  {line}\n" for line in billion_laughs(8).splitlines()),
            "not a valid Sigma rule (YAML aliases expand to too many nodes",
        ),
        ("title: t\nx: " + "[" * 3000 + "]" * 3000 + "\n", "not a valid Sigma rule"),
    ],
)
def test_an_oversized_or_hostile_sigma_file_is_one_error_line(tmp_path: Path, text: str, expected: str) -> None:
    pytest.importorskip("sigma")
    path = tmp_path / "in.yml"
    path.write_text(text)
    code, _, err = cli(["import", "sigma", str(path), "--out", str(tmp_path / "out")])
    assert code == 1 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"error: {path}: {expected}") and line.isprintable()


def test_the_query_text_of_one_rule_is_capped_as_a_whole(tmp_path: Path) -> None:
    """Each exception under the per-query cap, 200 of them once took 12 s to load."""
    query = " OR ".join(["hostName = 'x'"] * 900)
    validate(
        tmp_path, rule_text(exceptions=[{"query": query}] * 200), "r.yaml: queries, exceptions, correlation and pattern hold"
    )


def test_a_pattern_longer_than_its_cap_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    subs = [{**BASE["subpatterns"][0], "name": n} for n in ("a", "b")]
    validate(
        tmp_path, rule_text(subpatterns=subs, pattern=" AND ".join(["a", "b"] * 1000)), "pattern: String should have at most 4096"
    )


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a*)*b", "(\\\\w+\\\\.)+x", "((a|b)+c)*", "(?=(a+)+)x", "(x(?:y+){2,})+"])
def test_a_regexp_that_repeats_a_repeating_group_is_refused(tmp_path: Path, pattern: str) -> None:
    """Python's re backtracks: '(a+)+$' on 30 a's and a b takes minutes, on every event it is tried on."""
    validate(
        tmp_path, sub_text(query=f'alertName REGEXP "{pattern}"'), "subpatterns[0].query: column 18: regular expression repeats"
    )


@pytest.mark.parametrize(
    "pattern", ["a+b+", ".*C:\\\\Perflogs\\\\.*", "(?:ab|c)+", "(a{1,5})+", "^.*foo.*$", "(?>a+)+", "(a++)+"]
)
def test_a_regexp_with_repeats_side_by_side_or_atomic_still_loads(pattern: str) -> None:
    if "(?>" in pattern or "++" in pattern:
        pytest.importorskip("re._parser", reason="atomic groups and possessive repeats need Python 3.11")
    rule = parse_rule_text(sub_text(query=f'alertName REGEXP "{pattern}"'), "r.yaml")
    assert isinstance(rule.query.tree, Regexp) and rule.query.tree.pattern == pattern


def test_every_schema_problem_of_a_file_is_its_own_located_line(tmp_path: Path) -> None:
    text = rule_text(severity=True, timeWindow=-1, incidentAttributes={"a b": "cred.hostName"}, timeWindw=5)
    lines = validate(tmp_path, text).splitlines()
    fields = [line.split(": ")[1] for line in lines]
    assert fields == ["timeWindw", "severity", "timeWindow", "incidentAttributes.a b.[key]"]  # unknown key first
    assert "did you mean 'timeWindow'?" in lines[0] and "1 invalid rule file(s)" in cli(["validate", str(tmp_path)])[2]


def test_the_problems_listed_for_one_file_are_capped_and_counted(tmp_path: Path) -> None:
    text = rule_text(impacts=[{"not": f"a string {i}"} for i in range(500)])
    lines = validate(tmp_path, text).splitlines()
    line_of_20th = text.splitlines().index("- not: a string 19") + 1
    assert len(lines) == 20 and lines[-1].endswith(
        f"impacts[19]: Input should be a valid string (and 480 more) (line {line_of_20th})"
    )
    with pytest.raises(RuleError, match=r"impacts\[0\]: Input should be a valid string \(and 499 more\) \(line \d+\)"):
        parse_rule_text(text, "r.yaml")


def test_an_error_names_the_line_of_its_field_in_the_file(tmp_path: Path) -> None:
    text = (
        rule_text(severity=11) + "tests:\n  - name: t\n    events:\n      - {at: .inf, event: {}}\n    expect: {incidents: 0}\n"
    )
    lines = validate(tmp_path, text).splitlines()
    assert lines[0].endswith("severity: Input should be less than or equal to 10 in '11' (line 3)")
    at_line = text.splitlines().index("      - {at: .inf, event: {}}") + 1
    assert lines[1].endswith(f"tests[0].events[0].at: Input should be a finite number in 'inf' (line {at_line})")
    query_error = validate(tmp_path, sub_text(query="eventType ="))
    assert query_error.endswith("subpatterns[0].query: column 12: unexpected end of query in 'eventType =' (line 8)")
    assert rule_text().splitlines()[7].startswith("  query: ")
