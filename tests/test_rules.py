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
    assert len(rules) == 14
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


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        (
            'query: eventType = "x"',
            'query: eventType = "MS-Defender-Endpoint-AlertEvidence"',
            r"bad.yaml: subpatterns\[0\]\.query: the query names AlertEvidence rows, which reach a rule only when it "
            r"declares 'alertEvidence: events'",
        ),
        (
            "timeWindow: 60",
            "timeWindow: 60\nalertEvidence: events",
            r"bad.yaml: alertEvidence: 'events' declares .* no subpattern query can match eventType "
            r"'MS-Defender-Endpoint-AlertEvidence'",
        ),
        (
            "timeWindow: 60",
            "timeWindow: 60\nalertEvidence: always",
            r"bad.yaml: alertEvidence: Input should be 'join' or 'events'",
        ),
    ],
)
def test_alert_evidence_declarations_the_queries_contradict_are_located_errors(old: str, new: str, pattern: str) -> None:
    with pytest.raises(RuleError, match=pattern):
        parse_rule_text(with_change(old, new), "bad.yaml")


def test_alert_evidence_is_a_declared_rule_property_not_a_search_of_the_query_text() -> None:
    plain = parse_rule_text(MINIMAL, "r.yaml")
    assert plain.model.alert_evidence == "join" and not plain.evidence_events
    text = with_change('query: eventType = "x"', 'query: eventType CONTAIN "Alert"') + "alertEvidence: events\n"
    declared = parse_rule_text(text, "r.yaml")  # the query never names AlertEvidence, the declaration decides
    assert declared.evidence_events


MULTI = textwrap.dedent(
    """\
    id: TEST_MULTI
    name: multi
    severity: 7
    category: Security
    timeWindow: 3600
    subpatterns:
      - name: persist
        query: eventType IN (Group@PH_SYS_EVENT_MS_Defender_Alert_Persistence)
        groupBy: [tenantId, hostName, user]
        aggregateConstraint: COUNT(*) >= 1
      - name: cred
        query: eventType IN (Group@PH_SYS_EVENT_MS_Defender_Alert_CredentialAccess)
        groupBy: [tenantId, deviceName, user]
        aggregateConstraint: COUNT(*) >= 2
    pattern: persist FOLLOWED_BY cred
    correlation: persist.hostName = cred.deviceName AND persist.user != cred.user
    incidentAttributes:
      hostName: persist.hostName
      credUser: cred.user
      credAlerts: cred.COUNT(*)
    exceptions:
      - query: hostName = "lab-host"
        tenants: [tenant-a]
    clear:
      after: 600
    """
)


def test_multi_subpattern_rule_compiles_its_key_pattern_and_remaining_conditions() -> None:
    rule = parse_rule_text(MULTI, "multi.yaml")
    assert rule.sequence
    assert rule.key_attrs == ("tenantId", "hostName")
    assert [s.key_attrs for s in rule.subs] == [("tenantId", "hostName"), ("tenantId", "deviceName")]
    assert [c.text for c in rule.cross] == ["persist.user != cred.user"]
    assert rule.group_by == ("tenantId", "hostName")
    assert [(m.incident_attr, m.sub) for m in rule.mappings] == [("hostName", 0), ("credUser", 1), ("credAlerts", 1)]
    assert rule.clear is not None and rule.clear.after_s == 600
    # the rule's prefilter query matches what either subpattern matches, and nothing else
    assert rule.query.matches({"eventType": "M365Defender-Alert-Persistence"})
    assert rule.query.matches({"eventType": "MS-Defender-Endpoint-Alert-CredentialAccess"})
    assert not rule.query.matches({"eventType": "M365Defender-Alert-Execution"})


def test_exceptions_apply_per_tenant_on_incident_attributes() -> None:
    rule = parse_rule_text(MULTI, "multi.yaml")
    assert rule.excepted({"hostName": "LAB-HOST"}, "Tenant-A", 0)
    assert not rule.excepted({"hostName": "lab-host"}, "tenant-b", 0)
    assert not rule.excepted({"hostName": "prod"}, "tenant-a", 0)


def test_without_correlation_the_key_is_the_group_by_attributes_every_subpattern_shares() -> None:
    text = MULTI.replace("correlation: persist.hostName = cred.deviceName AND persist.user != cred.user\n", "")
    rule = parse_rule_text(text, "multi.yaml")
    assert rule.key_attrs == ("tenantId", "user")
    assert rule.cross == ()


def test_single_subpattern_rule_without_new_fields_keeps_the_classic_path() -> None:
    rule = parse_rule_text(MINIMAL, "min.yaml")
    assert not rule.sequence and rule.subs == () and rule.pattern is None


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("pattern: persist FOLLOWED_BY cred\n", "", r"multi.yaml: pattern: 2 subpatterns need a 'pattern'"),
        ("persist FOLLOWED_BY cred", "persist FOLLOWED_BY credd", r"multi.yaml: pattern: column 21: unknown subpattern 'credd'"),
        ("persist FOLLOWED_BY cred", "persist FOLLOWED_BY", r"multi.yaml: pattern: column \d+: unexpected end of pattern"),
        ("persist FOLLOWED_BY cred", "persist", r"multi.yaml: pattern: subpattern\(s\) cred defined but not used"),
        (
            "persist FOLLOWED_BY cred",
            "persist AND (persist NOT FOLLOWED_BY cred)",
            r"multi.yaml: pattern: NOT FOLLOWED_BY is supported once, at the top",
        ),
        (
            "persist.user != cred.user",
            "persist.usr != cred.user",
            r"multi.yaml: correlation: column 40: 'usr' is not a group-by attribute of persist",
        ),
        (
            "persist.user != cred.user",
            "persist.user != crd.user",
            r"multi.yaml: correlation: column 56: unknown subpattern 'crd'",
        ),
        (
            "persist.user != cred.user",
            "persist.user OR cred.user",
            r"multi.yaml: correlation: column 53: unexpected character 'O'",
        ),
        (
            "Group@PH_SYS_EVENT_MS_Defender_Alert_Persistence",
            "Group@Nope",
            r"subpatterns\[0\]\.query: column 15: unknown event-type group 'Nope'",
        ),
        (
            "credUser: cred.user",
            "credUser: cred.hostName",
            r"incidentAttributes\.credUser: attribute 'hostName' is neither a group-by attribute of cred",
        ),
        (
            'query: hostName = "lab-host"',
            'query: host = "lab-host"',
            r"exceptions\[0\]\.query: 'host' is not an incident attribute",
        ),
        (  # matching is case-sensitive: an exception on 'hostname' would silently never hold
            'query: hostName = "lab-host"',
            'query: hostname = "lab-host"',
            r"exceptions\[0\]\.query: 'hostname' is not an incident attribute \(names are case-sensitive",
        ),
        ("  after: 600", "  after: 0", r"clear\.after: Input should be greater than 0"),
        ("clear:\n  after: 600\n", "clear: {}\n", r"multi.yaml: clear: a clear condition needs 'after'"),
        ("- name: cred", "- name: persist", r"subpatterns\[1\]\.name: subpattern name 'persist' repeats"),
    ],
)
def test_multi_subpattern_errors_name_file_field_and_column(old: str, new: str, pattern: str) -> None:
    assert old in MULTI
    with pytest.raises(RuleError, match=pattern):
        parse_rule_text(MULTI.replace(old, new), "multi.yaml")


def test_event_type_groups_load_from_a_groups_folder_beside_the_rules(tmp_path: Path) -> None:
    (tmp_path / "groups").mkdir()
    (tmp_path / "groups" / "mine.yaml").write_text("groups:\n  - name: My_Group\n    eventTypes: [a-type, b-type]\n")
    (tmp_path / "r.yaml").write_text(with_change('query: eventType = "x"', "query: eventType IN (Group@my_group)"))
    [rule] = load_rules([tmp_path])  # the group file is not read as a rule
    assert rule.query.matches({"eventType": "B-TYPE"})
    assert not rule.query.matches({"eventType": "c-type"})


def test_a_bad_group_file_is_reported_with_its_field(tmp_path: Path) -> None:
    (tmp_path / "groups").mkdir()
    (tmp_path / "groups" / "bad.yaml").write_text("groups:\n  - name: G\n    eventTypes: []\n")
    (tmp_path / "r.yaml").write_text(MINIMAL)
    with pytest.raises(RuleSetError, match=r"bad.yaml: groups\[0\]\.eventTypes: List should have at least 1 item"):
        load_rules([tmp_path])


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


def test_validate_and_test_rules_understand_exception_periods_and_the_evidence_declaration(tmp_path: Path) -> None:
    exception = '\nexceptions:\n  - {query: hostName = "lab", periods: [{days: [Sat, Sun], from: "00:00", to: "24:00"}]}\n'
    bad = with_change("timeWindow: 60", "timeWindow: 60\nalertEvidence: events") + exception.replace('"00:00"', '"0:00"')
    (tmp_path / "bad.yaml").write_text(bad)
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert "bad.yaml: alertEvidence: 'events' declares" in result.stderr
    (tmp_path / "bad.yaml").write_text(MINIMAL + exception.lstrip("\n").replace('"00:00"', '"0:00"'))
    assert "bad.yaml: exceptions[0].periods[0].from: '0:00' is not a time of day" in run_cli("validate", str(tmp_path)).stderr
    tests = (
        "tests:\n"
        "  - {name: weekend, start: '2026-05-02T09:00:00Z', events: [{at: 0, event: {eventType: x, hostName: lab}},"
        " {at: 1, event: {eventType: x, hostName: lab}}], expect: {incidents: 0}}\n"
        "  - {name: weekday, start: '2026-05-01T09:00:00Z', events: [{at: 0, event: {eventType: x, hostName: lab}},"
        " {at: 1, event: {eventType: x, hostName: lab}}], expect: {incidents: 1}}\n"
    )
    (tmp_path / "bad.yaml").write_text(MINIMAL + exception.lstrip("\n") + tests)
    ran = run_cli("test-rules", str(tmp_path))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "PASS TEST_RULE :: weekend" in ran.stdout and "2 passed, 0 failed" in ran.stdout


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
