"""Sigma importer: real SigmaHQ rules (tests/data/sigma, see PROVENANCE.md) to rule YAML, through pySigma."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from shared.__main__ import main
from shared.engine import Engine
from shared.errors import RuleImportError
from shared.importers.common import Imported
from shared.importers.sigma import convert_collection
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import parse_rule_text
from shared.state import MemoryStateStore

DATA = Path(__file__).resolve().parent / "data"
SIGMA = DATA / "sigma"


def notes(item: Imported, kind: str | None = None) -> list[str]:
    return [f"{n.element}: {n.reason}" for n in item.notes if kind is None or n.kind == kind]


# -- Sigma ----------------------------------------------------------------------------------------


def sigma_items(*names: str) -> dict[str, Imported]:
    return {i.rule: i for i in convert_collection(SIGMA / n for n in names)}


def process_event(**props: str) -> NormalizedEvent:
    record = {
        "time": "2026-11-01T10:00:00Z",
        "tenantId": "t1",
        "category": "AdvancedHunting-DeviceProcessEvents",
        "properties": {"Timestamp": "2026-11-01T10:00:00Z", "DeviceName": "pc1", **props},
    }
    event = Normalizer().normalize(record, "test", datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert isinstance(event, NormalizedEvent)
    return event


def test_sigmahq_process_creation_rule_fires_on_a_defender_process_event() -> None:
    item = sigma_items("proc_creation_win_certutil_download.yml")["SIGMA_proc_creation_win_certutil_download"]
    rule = parse_rule_text(item.text(), "x.yaml")
    assert rule.model.severity == 5 and [t.id for t in rule.model.techniques] == ["T1027", "T1105"]
    hit = process_event(FolderPath=r"C:\Windows\System32\certutil.exe",
                        ProcessCommandLine="certutil.exe -urlcache -split -f http://x/a.exe a.exe")  # fmt: skip
    miss = process_event(FolderPath=r"C:\Windows\System32\certutil.exe", ProcessCommandLine="certutil -hashfile a.exe")
    assert rule.query.matches(hit.attrs) and not rule.query.matches(miss.attrs)
    now = datetime(2026, 11, 1, 10, tzinfo=timezone.utc)
    result = Engine([rule], MemoryStateStore(), lambda: now).process([hit, miss])
    assert [s["attributes"]["hostName"] for s in result.incidents] == ["pc1"]


def test_sigma_wildcards_and_modifiers_become_our_operators() -> None:
    items = sigma_items("proc_creation_win_schtasks_creation.yml", "registry_event_runonce_persistence.yml",
                        "file_event_win_office_startup_persistence.yml")  # fmt: skip
    query = items["SIGMA_proc_creation_win_schtasks_creation"].data["subpatterns"][0]["query"]
    assert query.startswith('eventType = "MS-Defender-DeviceProcessEvents" AND ')
    assert 'FolderPath REGEXP "\\\\schtasks\\.exe$"' in query  # endswith -> anchored regex, escapes kept
    assert 'ProcessCommandLine CONTAIN " /create "' in query  # contains -> CONTAIN
    assert "NOT (" in query  # filters
    reg = items["SIGMA_registry_event_runonce_persistence"].data["subpatterns"][0]["query"]
    assert reg.startswith('eventType = "MS-Defender-DeviceRegistryEvents"') and "RegistryKey" in reg
    for item in items.values():
        parse_rule_text(item.text(), "x.yaml")


def test_unsupported_modifiers_fields_and_types_are_reported_precisely() -> None:
    items = sigma_items(
        "proc_creation_win_susp_cross_user_process_spawn.yml", "net_connection_win_certutil_initiated_connection.yml"
    )
    spawn = items["SIGMA_proc_creation_win_susp_cross_user_process_spawn"]
    assert notes(spawn, "unsupported") == [
        "detection.filter_main_same_user.User|fieldref: modifier 'fieldref': our query language compares a field "
        "with literals, not with another field of the same event"
    ]
    assert "subpatterns" not in spawn.data
    net = items["SIGMA_net_connection_win_certutil_initiated_connection"]
    assert notes(net, "unsupported") == [
        "detection.selection.Initiated: field 'Initiated' has no column in MS-Defender-DeviceNetworkEvents"
    ]


def test_sigma_correlations_become_counting_and_sequence_rules() -> None:
    items = sigma_items("proc_creation_win_certutil_download.yml", "proc_creation_win_schtasks_creation.yml",
                        "correlations_written_for_tests.yml")  # fmt: skip
    assert "SIGMA_proc_creation_win_certutil_download" not in items  # referenced, generate: false
    count = items["SIGMA_Repeated_certutil_downloads_on_one_host"].data
    assert count["timeWindow"] == 600
    assert count["subpatterns"][0]["groupBy"] == ["tenantId", "DeviceName"]
    assert count["subpatterns"][0]["aggregateConstraint"] == "COUNT(*) >= 3"
    values = items["SIGMA_Scheduled_tasks_created_by_one_user_on_several_hosts"].data
    assert values["subpatterns"][0]["aggregateConstraint"] == "COUNT(DISTINCT DeviceName) >= 3"
    assert values["subpatterns"][0]["groupBy"] == ["tenantId", "AccountName"]
    for rid in ("SIGMA_Repeated_certutil_downloads_on_one_host", "SIGMA_Scheduled_tasks_created_by_one_user_on_several_hosts"):
        parse_rule_text(items[rid].text(), "x.yaml")
    ordered = items["SIGMA_Scheduled_task_created_then_certutil_downloads_on_one_host"].data
    names = [s["name"] for s in ordered["subpatterns"]]
    assert ordered["pattern"] == f"{names[0]} FOLLOWED_BY {names[1]}" and ordered["timeWindow"] == 900
    assert (
        ordered["correlation"] == f"{names[0]}.tenantId = {names[1]}.tenantId AND {names[0]}.DeviceName = {names[1]}.DeviceName"
    )
    anyorder = items["SIGMA_Scheduled_task_and_certutil_download_on_one_host_any_order"].data
    assert " AND " in anyorder["pattern"]
    median = items["SIGMA_Median_of_something_a_type_we_do_not_convert"]
    assert notes(median, "unsupported") == [
        "type: correlation type 'value_median': only event_count, value_count, value_sum, value_avg, "
        "temporal and temporal_ordered"
    ]


def test_sigma_temporal_correlations_load_through_the_model() -> None:
    items = sigma_items("proc_creation_win_certutil_download.yml", "proc_creation_win_schtasks_creation.yml",
                        "correlations_written_for_tests.yml")  # fmt: skip
    for item in items.values():
        if item.data.get("subpatterns"):
            parse_rule_text(item.text(), f"{item.rule}.yaml")


def test_invalid_sigma_is_refused_with_the_file_and_pysigma_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("title: x\nlogsource: {category: process_creation}\ndetection: {condition: nothing}\n")
    with pytest.raises(RuleImportError, match=r"bad.yml: not a valid Sigma rule"):
        convert_collection([path])


def test_sigma_import_command_exit_status_reports_unconvertible_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = ["import", "sigma", str(SIGMA / "proc_creation_win_certutil_download.yml"), "--out", str(tmp_path)]
    assert main(ok) == 0
    assert (tmp_path / "SIGMA_proc_creation_win_certutil_download.yaml").is_file()
    bad = ["import", "sigma", str(SIGMA / "proc_creation_win_susp_cross_user_process_spawn.yml"), "--out", str(tmp_path)]
    assert main(bad) == 1
    assert "User|fieldref: unsupported: modifier 'fieldref'" in capsys.readouterr().err


def _process_record(at: str, **props: str) -> dict[str, object]:
    return {
        "time": at,
        "tenantId": "t1",
        "category": "AdvancedHunting-DeviceProcessEvents",
        "properties": {"Timestamp": at, "DeviceName": "pc1", **props},
    }


def test_an_imported_sigma_sequence_fires_only_in_order() -> None:
    """temporal_ordered end to end: schtasks then certutil on one host fires, the reverse order does not."""
    from shared.ruletests import run_rule_tests

    items = sigma_items("proc_creation_win_certutil_download.yml", "proc_creation_win_schtasks_creation.yml",
                        "correlations_written_for_tests.yml")  # fmt: skip
    item = items["SIGMA_Scheduled_task_created_then_certutil_downloads_on_one_host"]
    task = _process_record("2026-11-01T10:00:00Z", FolderPath=r"C:\Windows\System32\schtasks.exe",
                           ProcessCommandLine="schtasks /create /tn x /tr y", AccountName="bob")  # fmt: skip
    download = _process_record("2026-11-01T10:01:00Z", FolderPath=r"C:\Windows\System32\certutil.exe",
                               ProcessCommandLine="certutil -urlcache -f http://x/a a")  # fmt: skip
    item.data["tests"] = [
        {"name": "in order", "events": [{"at": 0, "raw": task}, {"at": 60, "raw": download}], "expect": {"incidents": 1}},
        {"name": "reversed", "events": [{"at": 0, "raw": download}, {"at": 60, "raw": task}], "expect": {"incidents": 0}},
    ]
    rule = parse_rule_text(item.text(), "seq.yaml")
    results = run_rule_tests([rule])
    assert [(r.case, r.passed, r.detail) for r in results] == [("in order", True, ""), ("reversed", True, "")]
