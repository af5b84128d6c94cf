from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.errors import RuleError, RuleSetError
from shared.rules import default_rules_dir, load_rules, parse_rule_text
from shared.ruletests import run_rule_tests

REPO = Path(__file__).resolve().parent.parent
SEED_ID = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"

MINIMAL = textwrap.dedent(
    """\
    id: TEST_RULE
    name: test
    severity: 5
    category: Security
    timeWindow: 60
    subpatterns:
      - name: sp
        query: eventType = "x"
        groupBy: [hostName]
        aggregateConstraint: COUNT(*) >= 2
    incidentAttributes:
      hostName: sp.hostName
      n: sp.COUNT(*)
    """
)


def with_change(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


def test_minimal_rule_compiles_with_defaults() -> None:
    rule = parse_rule_text(MINIMAL, "min.yaml")
    assert rule.id == "TEST_RULE"
    assert rule.group_by == ("hostName",)
    assert rule.lifetime_s == 86400
    assert rule.model.enabled is True
    assert [m.incident_attr for m in rule.mappings] == ["hostName", "n"]
    assert rule.window_attrs == ()


def test_seed_rule_carries_every_field_of_the_fortinet_page() -> None:
    rule = load_rules([default_rules_dir() / f"{SEED_ID}.yaml"])[0]
    m = rule.model
    assert m.name == "MS 365 Defender: Suspicious Task Scheduler activity - Persistence Alert"
    assert (m.severity, m.category, m.enabled, m.time_window) == (9, "Security", True, 300)
    assert [t.id for t in m.tactics] == ["TA0003"]
    assert [t.id for t in m.techniques] == ["T1053.002"]
    assert m.impacts == ["Network"]
    assert m.data_sources == ["MS 365 Defender via HTTPS_ADVANCED (Graph API)", "Azure Event Hub via AZURE_PYTHON_SDK"]
    assert m.detection == "Correlation"
    assert m.remediation.startswith("Investigate the alert")
    assert rule.subpattern == "ms_defender_alert"
    assert rule.group_by == ("alertName", "alertIdStr", "tenantId")
    assert rule.constraint.canonical == "COUNT(*) >= 1"
    assert list(m.incident_attributes) == ["alertName", "alertIdStr", "tenantId", "incidentCount"]
    assert 'attackTechniqueId = "T1053"' in " ".join(m.subpatterns[0].query.split())


def test_every_shipped_rule_loads_and_marks_its_source() -> None:
    rules = load_rules([default_rules_dir()])
    assert len(rules) == 10
    for rule in rules:
        assert rule.model.source is not None and rule.model.source.url, rule.id
        assert rule.model.tests, f"{rule.id} has no test cases"


def test_shipped_rule_tests_pass() -> None:
    results = run_rule_tests(load_rules([default_rules_dir()]))
    failed = [r.line() for r in results if not r.passed]
    assert not failed
    assert len(results) >= 20


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("severity: 5", "severity: 11", r"bad.yaml: severity: Input should be less than or equal to 10"),
        ("timeWindow: 60", "timeWindow: -1", r"bad.yaml: timeWindow: Input should be greater than 0"),
        (
            'query: eventType = "x"',
            'query: eventType = "x" AND',
            r"bad.yaml: subpatterns\[0\]\.query: column 20: unexpected end of query",
        ),
        ("COUNT(*) >= 2", "MEDIAN(x) >= 2", r"subpatterns\[0\]\.aggregateConstraint: column 1: unknown aggregate 'MEDIAN'"),
        ("hostName: sp.hostName", "user: sp.user", r"incidentAttributes\.user: attribute 'user' is neither a group-by"),
        ("n: sp.COUNT(*)", "n: other.COUNT(*)", r"incidentAttributes\.n: must be 'sp\.<attribute>'"),
        ("category: Security", "category: Security\nbogus: 1", r"bogus: unknown key 'bogus' \(allowed: id, name"),
        ("name: test", "name: [unclosed", r"bad.yaml: invalid YAML at line \d+, column \d+"),
    ],
)
def test_rule_errors_name_file_field_and_text(old: str, new: str, pattern: str) -> None:
    with pytest.raises(RuleError, match=pattern):
        parse_rule_text(with_change(old, new), "bad.yaml")


def test_several_subpatterns_are_rejected_as_not_supported_yet() -> None:
    text = MINIMAL + "  - name: sp2\n    query: a = 1\n    groupBy: [a]\n    aggregateConstraint: COUNT(*) >= 1\n"
    text = text.replace(
        "incidentAttributes:\n  hostName: sp.hostName\n  n: sp.COUNT(*)\n  - name: sp2",
        "incidentAttributes: {}\nx:\n  - name: sp2",
    )
    text = MINIMAL.replace(
        "incidentAttributes:",
        "  - name: sp2\n    query: a = 1\n    groupBy: [a]\n    aggregateConstraint: COUNT(*) >= 1\nincidentAttributes:",
    )
    with pytest.raises(RuleError, match=r"multi.yaml: subpatterns: 2 subpatterns: .*not supported yet"):
        parse_rule_text(text, "multi.yaml")


def test_loading_a_folder_reports_every_bad_file_and_loads_nothing(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(MINIMAL)
    (tmp_path / "bad1.yaml").write_text(with_change("severity: 5", "severity: 0"))
    (tmp_path / "bad2.yml").write_text(with_change('query: eventType = "x"', "query: eventType ="))
    (tmp_path / "dup.yaml").write_text(MINIMAL)
    with pytest.raises(RuleSetError) as info:
        load_rules([tmp_path])
    text = str(info.value)
    assert "bad1.yaml: severity" in text
    assert "bad2.yml: subpatterns[0].query" in text
    assert "already defined" in text
    assert len(info.value.errors) == 3


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuleSetError, match="no such file or folder"):
        load_rules([tmp_path / "nope"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_validate_command_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(with_change("severity: 5", "severity: 0"))
    (tmp_path / "b.yaml").write_text(with_change("COUNT(*) >= 2", "COUNT(*) >="))
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert "a.yaml: severity" in result.stderr
    assert "b.yaml: subpatterns[0].aggregateConstraint" in result.stderr
    assert run_cli("validate").returncode == 0


def test_test_rules_command_reports_failures_with_the_mismatch(tmp_path: Path) -> None:
    failing = MINIMAL + textwrap.dedent(
        """\
        tests:
          - name: needs two events
            events:
              - {at: 0, event: {eventType: x, hostName: h1}}
            expect: {incidents: 1}
          - name: two events fire
            events:
              - {at: 0, event: {eventType: x, hostName: h1}}
              - {at: 5, event: {eventType: x, hostName: H1}}
            expect: {incidents: 1, attributes: [{hostName: h1, n: 2}]}
        """
    )
    (tmp_path / "r.yaml").write_text(failing)
    result = run_cli("test-rules", str(tmp_path))
    assert result.returncode == 1
    assert "FAIL TEST_RULE :: needs two events\n" in result.stdout
    assert "  incidents:\n    - expected 1\n    + actual   0\n" in result.stdout
    assert "PASS TEST_RULE :: two events fire" in result.stdout
    assert "1 passed, 1 failed" in result.stdout
