"""``replay --output table|json``, ``--explain``, ``--html`` and the summary lines, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
DEMO = sorted(str(p) for p in (REPO / "samples" / "demo").glob("*.json*"))


def replay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared", "replay", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_piped_output_is_json_lines_by_default() -> None:
    result = replay(*DEMO)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(json.loads(line)["incidentId"].startswith("inc-") for line in lines)


def test_table_output_has_one_line_per_incident_with_host_user_and_link() -> None:
    result = replay("--output", "table", *DEMO, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("TIME (UTC)") and len(lines) == 1 + 6
    first = lines[1]
    assert "fin-ws-017.contoso.local" in first and "j.doe" in first
    assert "https://security.microsoft.com/alerts/da638700000000000001_-1111111111?tid=" in first
    assert not any(line.startswith("{") for line in lines)


def test_a_terminal_gets_the_table_without_asking(tmp_path: Path) -> None:
    """``script`` gives the command a real terminal as stdout."""
    out = tmp_path / "typescript"
    cmd = f"{sys.executable} -m shared replay {' '.join(DEMO)} 2>/dev/null"
    result = subprocess.run(["script", "-qec", cmd, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "TIME (UTC)" in text and "fin-ws-017" in text and '"incidentId"' not in text


def test_explain_lists_each_skipped_record_and_unmatched_alert_with_position_and_reason(tmp_path: Path) -> None:
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(
        orjson.dumps(
            {"eventType": "M365Defender-Incident-Test", "alertIdStr": "zz", "alertName": "Odd", "eventSeverityCat": "low"}
        )
        + b"\n{broken\n"
    )
    result = replay("--explain", *DEMO, str(odd))
    assert result.returncode == 1  # the broken line is rejected; everything else is processed
    err = result.stderr
    assert "skipped: no enabled rule can match the event type: 1" in err
    assert "samples/demo/streaming-eventhub-message.json#2: MS-Defender-DeviceProcessEvents: no enabled rule's query" in err
    assert "alerts no rule matched: 1" in err and f"{odd}:1: M365Defender-Incident-Test zz 'Odd'" in err
    assert f"rejected: 1\n  {odd}:2: not JSON" in err
    assert "(--explain lists them)" not in err and "(--explain lists them)" in replay(*DEMO).stderr


def test_summary_says_which_rules_matched_which_alerts_on_which_hosts() -> None:
    err = replay(*DEMO).stderr
    assert "rules that matched:" in err
    seed = err[err.index("  PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity:") :]
    assert '"Suspicious Task Scheduler activity" x3' in seed.splitlines()[1]
    assert "fin-ws-017.contoso.local" in seed.splitlines()[2]


def test_html_report_is_written_beside_any_output_mode(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = replay("--html", str(page), *DEMO)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 6  # still JSON lines on stdout
    text = page.read_text(encoding="utf-8")
    assert text.count('class="incident-row"') == 6 and 'id="timeline-svg"' in text
    assert text.count('class="alert-dot"') == 7  # every alert record the rules looked at, matched or not
    assert "srv-db-02" in text  # the streaming AlertInfo alert placed on its evidence row's host
    assert text.count("(no host)") == 1 + 1  # the row label and its tooltip: only the PowerShell alert has no host


def test_explain_lists_alert_evidence_rows_whose_alert_never_came(samples: Path) -> None:
    """Elastic's capture: its AlertEvidence row names an AlertId that none of its AlertInfo rows has."""
    path = samples / "streaming-api__elastic-integrations__m365_defender-event-test-alert.log"
    err = replay("--explain", str(path)).stderr
    heading = "AlertEvidence rows whose alert was not in the input (held 1 hour for it in Azure): 1"
    assert f"{heading}\n  {path}:1: alert da638034938542195558_2006612345" in err
