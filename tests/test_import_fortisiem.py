"""FortiSIEM importer: real FortiSIEM rule exports (tests/data/fortisiem, see PROVENANCE.md) to rule YAML.

Kept apart from the Sigma tests so it runs on every Python version (pySigma needs >= 3.11).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.__main__ import main
from shared.errors import RuleImportError
from shared.importers.common import Imported, check
from shared.importers.fortisiem import convert_file
from shared.rules import load_rules, parse_rule_text

FSM = Path(__file__).resolve().parent / "data" / "fortisiem"


def notes(item: Imported, kind: str | None = None) -> list[str]:
    return [f"{n.element}: {n.reason}" for n in item.notes if kind is None or n.kind == kind]


# -- FortiSIEM ------------------------------------------------------------------------------------


def test_fortinet_export_becomes_a_loadable_rule_with_every_field() -> None:
    (item,) = convert_file(FSM / "expectRule.xml")
    rule = parse_rule_text(item.text(), "x.yaml")
    m = rule.model
    assert (m.id, m.name, m.severity, m.category, m.enabled, m.time_window) == (
        "PH_Rule_SIGMA_1",
        "Windows: Title name",
        7,
        "Security",
        True,
        300,
    )
    assert [t.id for t in m.tactics] == ["TA0007"] and [t.id for t in m.techniques] == ["T1012"]
    sub = m.subpatterns[0]
    assert sub.name == "Filter" and sub.constraint == "COUNT(*) >= 1"
    assert sub.group_by[-1] == "tenantId"  # CustomerScope groupByEachCustomer="true"
    assert 'EventID IN ("4656", "4663")' in sub.query
    assert m.incident_attributes["hostName"] == "Filter.hostName"
    assert rule.query.matches({"ObjectContianAll": "x/owa/y/powershell", "ObjectRe": "ObjectRe", "EventID": "4663",
                               "ObjectEndWith": "aObjectEndWithStr", "ObjectSkipStar": "ObjectSkip*Star",
                               "ObjectStar": "ObjectABCStar", "ObjectStartwith": "ObjectstartswithStr!"})  # fmt: skip


def test_what_cannot_be_carried_over_is_reported_with_element_rule_and_reason() -> None:
    (item,) = convert_file(FSM / "expectRule.xml")
    text = "\n".join(str(n) for n in item.notes)
    assert f"{FSM / 'expectRule.xml'}: rule PH_Rule_SIGMA_1: TriggerEventDisplay: not carried over:" in text
    assert "rule PH_Rule_SIGMA_1: SigmaFileName: not carried over: Sigma bookkeeping" in text
    assert "Rule@phIncidentCategory: not carried over: incident category 'Server'" in text
    assert "Rule@group: not carried over: attribute group='PH_SYS_RULE_THREAT_HUNTING' has no field" in text
    reconstructed = yaml.safe_load(item.text())["source"]["reconstructed"]
    assert {"field": "subpatterns[0].groupBy", "note": "CustomerScope groupByEachCustomer: tenantId added"} in reconstructed


def test_a_gui_export_without_id_gets_one_from_the_incident_event_type() -> None:
    (item,) = convert_file(FSM / "expectRuleForFortiSIEMGUI.xml")
    assert item.rule == "PH_RULE_Title_name"
    assert any(n.element == "id" and n.kind == "reconstructed" for n in item.notes)


def test_a_windows_event_rule_is_imported_but_warned_as_never_matching_defender_data(tmp_path: Path) -> None:
    (item,) = convert_file(FSM / "expectRuleFromPipelineTest.xml")
    assert check(item, "x.yaml")
    assert any("Win-Security-4656" in n.reason for n in item.notes if n.kind == "warning")


def test_several_subpatterns_operators_exceptions_and_clear_give_the_expected_yaml() -> None:
    items = {i.rule: i for i in convert_file(FSM / "multi_subpattern_constructed.xml")}
    got = yaml.safe_load(items["PH_Rule_Persist_Then_CredAccess"].text())
    expected = yaml.safe_load((FSM / "expected" / "PH_Rule_Persist_Then_CredAccess.yaml").read_text())
    assert got == expected
    assert got["pattern"] == "persist FOLLOWED_BY cred_access"
    assert got["correlation"] == "persist.hostName = cred_access.hostName AND persist.user != cred_access.user"
    assert got["clear"] == {"after": 3600}
    assert "DashboardWidget: element we do not know" in notes(items["PH_Rule_Persist_Then_CredAccess"])


def test_bad_values_are_reported_and_replaced_not_dropped_silently() -> None:
    items = {i.rule: i for i in convert_file(FSM / "multi_subpattern_constructed.xml")}
    ors = items["PH_Rule_Two_Ors"]
    assert ors.data["severity"] == 5 and ors.data["enabled"] is False
    assert ors.data["pattern"] == "ps OR task"
    assert "severity: IncidentDef severity '12' is not 1-10; 5 used" in notes(ors, "reconstructed")
    assert any("'bogus = nowhere.tenantId' does not name one of the subpatterns" in n for n in notes(ors))
    assert ors.data["incidentAttributes"] == {"tenantId": "ps.tenantId"}


def test_imported_multi_subpattern_rules_load_through_the_model() -> None:
    for item in convert_file(FSM / "multi_subpattern_constructed.xml"):
        parse_rule_text(item.text(), f"{item.rule}.yaml")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"<Rules><Rule", "not a readable XML rule export"),
        (b"<Reports><Report/></Reports>", r"no <Rule> element \(root is <Reports>\)"),
        (b'<!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><Rules>&b;</Rules>', "not a readable XML rule export"),
        (b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><Rules>&x;</Rules>', "not a readable XML rule export"),
    ],
)
def test_files_that_are_not_rule_exports_are_refused_with_the_reason(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(content)
    with pytest.raises(RuleImportError, match=message):
        convert_file(path)


def test_import_command_writes_one_file_per_rule_and_keeps_existing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rules"
    assert (
        main(["import", "fortisiem", str(FSM / "expectRule.xml"), str(FSM / "expectRuleForFortiSIEMGUI.xml"), "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["PH_RULE_Title_name.yaml", "PH_Rule_SIGMA_1.yaml"]
    assert len(load_rules([out])) == 2
    first = (out / "PH_Rule_SIGMA_1.yaml").read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=") and (out / first.split("=", 1)[1]).resolve().is_file()
    capsys.readouterr()
    assert main(["import", "fortisiem", str(FSM / "expectRule.xml"), "--out", str(out)]) == 1
    assert "exists (use --force to overwrite); not written" in capsys.readouterr().err
    assert main(["import", "fortisiem", str(FSM / "expectRule.xml"), "--out", str(out), "--force"]) == 0


def test_an_imported_rule_that_does_not_load_is_written_reported_and_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = (FSM / "expectRule.xml").read_text().replace('EventID IN ("4656", "4663")', "EventID IN (")
    source = tmp_path / "broken.xml"
    source.write_text(xml)
    out = tmp_path / "out"
    assert main(["import", "fortisiem", str(source), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.xml: rule PH_Rule_SIGMA_1: subpatterns[0].query: invalid: the imported rule does not load:" in err
    assert (out / "PH_Rule_SIGMA_1.yaml").is_file()  # kept for the author to fix
