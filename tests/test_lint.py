"""validate: warnings for valid-but-wrong rules, --strict, empty folders, unknown keys with a suggestion."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from shared.__main__ import main
from shared.errors import RuleError
from shared.lint import lint_data, lint_rule, lint_rules, matching_event_types
from shared.query import parse_query
from shared.rules import default_groups, parse_rule_text

GROUP = next(iter(default_groups()))  # a shipped event-type group

RULE = textwrap.dedent(
    """\
    id: LINT_RULE
    name: lint
    severity: 5
    category: Security
    timeWindow: 60
    subpatterns:
      - name: sp
        query: QUERY
        groupBy: [GROUPBY]
        aggregateConstraint: COUNT(*) >= 1
    incidentAttributes:
      n: sp.COUNT(*)
    """
)


def rule_text(query: str, group_by: str = "hostName, tenantId", evidence: bool = False) -> str:
    return RULE.replace("QUERY", query).replace("GROUPBY", group_by) + ("alertEvidence: events\n" if evidence else "")


def codes(query: str, group_by: str = "hostName, tenantId", evidence: bool = False) -> list[str]:
    return [w.code for w in lint_rule(parse_rule_text(rule_text(query, group_by, evidence), "r.yaml"))]


@pytest.mark.parametrize(
    "query",
    [
        'eventType = "MS-Defender-Endpoint-Alert-Persistence"',
        'eventType CONTAIN "M365Defender-Alert"',
        'eventType = "MS-Defender-DeviceProcessEvents" AND FileName = "whoami.exe"',
        'eventType = "MS-Defender-SomeNewTable"',
        'eventType = "MS-Defender-Endpoint-Alert-BrandNewCategory"',
        'attackTechniqueId = "T1053"',
        'eventType REGEXP "^Microsoft-WinDefATP-Alert"',
        f"eventType IN (Group@{GROUP})",
    ],
)
def test_queries_that_can_match_a_produced_event_type_get_no_warning(query: str) -> None:
    assert "never-matches" not in codes(query)


def test_an_evidence_query_matches_when_the_rule_declares_alert_evidence_events() -> None:
    assert "never-matches" not in codes('eventType = "MS-Defender-Endpoint-AlertEvidence" AND EntityType = "File"', evidence=True)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ('eventType = "M365Defender-Incident-Closed"', "M365Defender-Incident-Closed"),
        ('eventType = "Win-Security-4698"', "Win-Security-4698"),
        ('eventType CONTAIN "Evidence"', "Evidence"),  # evidence rows reach only rules declaring alertEvidence: events
        ('eventType = "MS-Defender-Endpoint-Alert-Execution" AND eventType = "M365Defender-Alert"', "M365Defender-Alert"),
        ('eventType IN ("Win-Security-4624", "Win-Security-4625")', "Win-Security-4624"),
    ],
)
def test_a_query_no_produced_event_type_can_match_is_warned(query: str, named: str) -> None:
    warnings = lint_rule(parse_rule_text(rule_text(query), "r.yaml"))
    never = [w for w in warnings if w.code == "never-matches"]
    assert len(never) == 1
    assert str(never[0]).startswith("r.yaml: subpatterns[0].query: warning [never-matches]: ")
    assert repr(named) in never[0].message


def test_graph_incidents_are_a_produced_event_type_so_the_shipped_incident_rule_is_not_warned() -> None:
    assert "never-matches" not in codes('eventType CONTAIN "M365Defender-Incident" AND eventSeverityCat IN ("high")')


def test_evidence_columns_without_declaring_alert_evidence_events_are_warned() -> None:
    assert "evidence-only-attribute" in codes('EntityType = "File" AND SHA256 IS NOT NULL')
    assert "evidence-only-attribute" not in codes('EntityType = "File" AND SHA256 IS NOT NULL', evidence=True)


def multi(group_by_second: list[str], query: str = 'eventType CONTAIN "M365Defender-Alert"') -> dict[str, Any]:
    return {
        "subpatterns": [
            {"name": "a", "query": query, "groupBy": ["hostName", "tenantId"]},
            {"name": "b", "query": query, "groupBy": group_by_second},
        ],
        "pattern": "a FOLLOWED_BY b",
        "incidentAttributes": {"n": "a.COUNT(*)", "m": "b.COUNT(*)"},
    }


@pytest.mark.parametrize("group_by", [["hostName"], ["hostName", "tenantId"], []])
def test_no_rule_is_warned_for_its_group_by_because_the_engine_keys_every_group_by_tenant(group_by: list[str]) -> None:
    assert not [w for w in lint_data(multi(group_by), "m.yaml") if "tenant" in w.message.lower()]
    single = rule_text('eventType CONTAIN "M365Defender-Alert"', ", ".join(group_by) or "alertName")
    assert not [w for w in lint_rule(parse_rule_text(single, "r.yaml")) if "tenant" in w.message.lower()]


def test_candidates_follow_the_declared_evidence_gate() -> None:
    query = parse_query('eventType CONTAIN "MS-Defender"')
    assert "MS-Defender-Endpoint-AlertEvidence" not in matching_event_types(query)
    assert "MS-Defender-Endpoint-AlertEvidence" in matching_event_types(query, evidence=True)


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["validate", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_warnings_are_printed_and_strict_makes_them_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(rule_text('eventType = "Win-Security-4698"'))
    code, text = validate(capsys, str(tmp_path))
    assert code == 0
    assert "warning [never-matches]" in text and "1 rule(s) valid, 1 warning(s)" in text
    code, _ = validate(capsys, "--strict", str(tmp_path))
    assert code == 1


def test_an_empty_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a rule")
    code, text = validate(capsys, str(tmp_path))
    assert code == 1
    assert f"error: {tmp_path}: no rule files (*.yaml, *.yml) in this folder" in text


def test_a_missing_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = validate(capsys, str(tmp_path / "nope"))
    assert code == 1
    assert "no such file or folder" in text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("timeWindow: 60", "timeWindw: 60", "timeWindw: unknown key 'timeWindw'; did you mean 'timeWindow'?"),
        ("    groupBy:", "    groupby:", "subpatterns[0].groupby: unknown key 'groupby'; did you mean 'groupBy'?"),
        ("severity: 5", "severity: 5\nincidentAttribute: {}", "did you mean 'incidentAttributes'?"),
        ("severity: 5", "severity: 5\nzzz: 1", "unknown key 'zzz' (allowed: id, name, description"),
    ],
)
def test_unknown_keys_name_the_likely_key(old: str, new: str, message: str) -> None:
    text = rule_text('eventType = "x"').replace(old, new)
    with pytest.raises(RuleError) as info:
        parse_rule_text(text, "r.yaml")
    assert message in str(info.value)


def test_a_subpattern_neither_the_pattern_nor_an_attribute_uses_is_warned() -> None:
    sub = {"query": 'eventType CONTAIN "M365Defender-Alert"', "groupBy": ["hostName", "tenantId"]}
    data = {
        "subpatterns": [{**sub, "name": "persist"}, {**sub, "name": "cred"}, {**sub, "name": "spare"}],
        "pattern": "persist FOLLOWED_BY cred",
        "incidentAttributes": {"host": "persist.hostName"},
    }
    warnings = [w for w in lint_data(data, "m.yaml") if w.code == "unused-subpattern"]
    assert [(w.field, w.message) for w in warnings] == [
        ("subpatterns[2]", "subpattern 'spare' is used neither by 'pattern' nor by an incident attribute")
    ]
    data["incidentAttributes"] = {"host": "persist.hostName", "n": "spare.COUNT(*)"}
    assert not [w for w in lint_data(data, "m.yaml") if w.code == "unused-subpattern"]


def test_a_query_consuming_another_rules_incidents_is_not_warned() -> None:
    """Rule chaining: an incident is an event whose eventType is its rule's id."""
    chained = rule_text('eventType = "PH_RULE_SEED"').replace("LINT_RULE", "CHAINED")
    seed = rule_text('eventType CONTAIN "M365Defender-Alert"').replace("LINT_RULE", "PH_RULE_SEED")
    rules = [parse_rule_text(chained, "c.yaml"), parse_rule_text(seed, "s.yaml")]
    assert [w.code for w in lint_rules(rules)] == []
    assert [w.code for w in lint_rules(rules[:1])] == ["never-matches"]  # the consumed rule is not loaded
    self_only = rule_text('eventType = "LINT_RULE"')  # a rule never consumes its own incidents
    assert [w.code for w in lint_rules([parse_rule_text(self_only, "x.yaml")])] == ["never-matches"]
