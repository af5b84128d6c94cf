"""``test-rules``: selection, readable diffs with the test's line, JUnit/JSON output, --min-tests, exit codes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from shared.__main__ import main

RULE = textwrap.dedent(
    """\
    id: TWO_EVENTS
    name: two events on one host
    severity: 5
    category: Security
    timeWindow: 60
    subpatterns:
      - name: sp
        query: eventType = "x"
        groupBy: [hostName, tenantId]
        aggregateConstraint: COUNT(*) >= 2
    incidentAttributes:
      hostName: sp.hostName
      n: sp.COUNT(*)
    tests:
      - name: two events fire
        events:
          - {at: 0, event: {eventType: x, hostName: h1, tenantId: t}}
          - {at: 5, event: {eventType: x, hostName: h1, tenantId: t}}
        expect: {incidents: 1, attributes: [{hostName: h1, n: 2}]}
      - name: wrong count expected
        events:
          - {at: 0, event: {eventType: x, hostName: h1, tenantId: t}}
          - {at: 5, event: {eventType: x, hostName: h1, tenantId: t}}
        expect: {incidents: 1, attributes: [{hostName: h1, n: 3}]}
      - name: one event is not enough
        events:
          - {at: 0, event: {eventType: x, hostName: h1, tenantId: t}}
        expect: {incidents: 1}
    """
)


@pytest.fixture
def rule_file(tmp_path: Path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(RULE)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["test-rules", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_selecting_one_test_by_name_runs_only_that_test(rule_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(rule_file), "--rule", "TWO_*", "--test", "two events fire")
    assert code == 0
    assert out.splitlines() == ["PASS TWO_EVENTS :: two events fire", "1 passed, 0 failed"]


def test_a_selection_matching_nothing_exits_2(rule_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(rule_file), "--rule", "OTHER_RULE")
    assert code == 2
    assert "error: no rule test matched --rule/--test" in err


def test_a_failure_shows_the_test_line_and_an_expected_versus_actual_diff(
    rule_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(rule_file), "--test", "wrong count", "--color", "never")
    assert code == 1
    line = RULE.splitlines().index("  - name: wrong count expected") + 1
    assert f"  at {rule_file}:{line}\n" in out
    assert "    - n: 3\n    + n: 2\n" in out
    assert '      hostName: "h1"\n' in out  # equal values shown as context
    assert "\033[" not in out


def test_a_missing_incident_is_shown_as_expected_versus_actual_counts(
    rule_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, str(rule_file), "--test", "one event", "--color", "never")
    assert "  incidents:\n    - expected 1\n    + actual   0\n" in out


def test_colour_is_used_only_when_asked_or_on_a_terminal(rule_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, str(rule_file), "--test", "wrong count", "--color", "always")
    assert "\033[31m    - n: 3\033[0m" in out
    assert "\033[32m    + n: 2\033[0m" in out
    _, out, _ = run(capsys, str(rule_file), "--test", "wrong count")  # captured stdout is not a terminal
    assert "\033[" not in out


def test_junit_output_has_one_testcase_per_test_with_failures(
    rule_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit = tmp_path / "out" / "junit.xml"
    junit.parent.mkdir()
    code, _, _ = run(capsys, str(rule_file), "--junit", str(junit))
    assert code == 1
    root = ET.parse(junit).getroot()
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "3", "2")
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == ["two events fire", "wrong count expected", "one event is not enough"]
    assert all(c.get("classname") == "TWO_EVENTS" and c.get("file") == str(rule_file) for c in cases)
    failure = cases[1].find("failure")
    assert failure is not None and "- n: 3" in (failure.text or "")
    assert cases[0].find("failure") is None
    assert int(cases[1].get("line") or 0) == RULE.splitlines().index("  - name: wrong count expected") + 1


def test_json_output_is_machine_readable(rule_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(rule_file), "--json")
    assert code == 1
    doc = json.loads(out)
    assert (doc["passed"], doc["failed"]) == (1, 2)
    wrong = next(r for r in doc["results"] if r["test"] == "wrong count expected")
    assert wrong["rule"] == "TWO_EVENTS" and wrong["passed"] is False and wrong["file"] == str(rule_file)
    assert wrong["problems"][0]["expected"] == {"hostName": "h1", "n": 3}
    assert wrong["problems"][0]["actual"]["n"] == 2
    assert "1 passed, 2 failed" in err


def test_a_rule_with_fewer_tests_than_min_tests_fails(rule_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(rule_file), "--test", "two events fire", "--min-tests", "4", "--color", "never")
    assert code == 1
    assert "FAIL TWO_EVENTS :: (minimum number of tests)" in out
    assert "    - expected 4\n    + actual   3" in out
    code, _, _ = run(capsys, str(rule_file), "--test", "two events fire", "--min-tests", "3")
    assert code == 0


def test_a_rule_without_tests_is_warned_and_fails_with_min_tests_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(RULE.split("tests:")[0])
    (tmp_path / "s.yaml").write_text(RULE.replace("TWO_EVENTS", "OTHER"))
    code, _, err = run(capsys, str(tmp_path))
    assert code == 1  # OTHER's failing tests; TWO_EVENTS has none
    assert "rule TWO_EVENTS has no test cases" in err
    assert run(capsys, str(tmp_path / "r.yaml"), "--min-tests", "1")[0] == 1


def test_an_invalid_rule_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(RULE.replace("severity: 5", "severity: 0"))
    code, _, err = run(capsys, str(tmp_path))
    assert code == 2
    assert "r.yaml: severity" in err


def test_a_rule_the_engine_refuses_fails_its_tests_instead_of_crashing(
    rule_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.ruletests as rt
    from shared.errors import RuleError

    def refuse(*_: object, **__: object) -> None:
        raise RuleError("this rule shape is not wired into the engine", file=str(rule_file))

    monkeypatch.setattr(rt, "Engine", refuse)
    code, out, _ = run(capsys, str(rule_file), "--test", "two events fire")
    assert code == 1
    assert "FAIL TWO_EVENTS :: two events fire" in out
    assert "the engine cannot run this rule: this rule shape is not wired into the engine" in out
