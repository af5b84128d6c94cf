"""Readable output: the incidents table, the receiver's lines and the self-contained HTML report
(checked in a real headless Chromium: its DOM and a screenshot)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from shared import views
from shared.html_report import SEVERITY_COLOURS, render_html
from shared.replay import ReplaySummary, RuleSummary


def snap(
    incident: str = "inc-1",
    revision: int = 1,
    *,
    host: str = "fin-ws-017.contoso.local",
    user: str = "CONTOSO\\j.doe",
    severity: int = 9,
    first: str = "2026-11-20T09:14:05Z",
    last: str | None = None,
    link: str = "https://security.microsoft.com/alerts/da1?tid=t1",
) -> dict[str, Any]:
    return {
        "incidentId": incident,
        "revision": revision,
        "action": "created" if revision == 1 else "updated",
        "ruleId": "PH_RULE_X",
        "ruleName": "MS 365 Defender: Suspicious Task Scheduler activity - Persistence Alert",
        "severity": severity,
        "techniques": [{"id": "T1053.002", "name": "At"}],
        "groupBy": {"tenantId": "0b1f6c2e-5a3d"},
        "attributes": {"alertName": "Suspicious Task Scheduler activity", "incidentCount": revision, "tenantId": "0b1f6c2e-5a3d"},
        "triggerCount": 1,
        "firstSeen": first,
        "lastSeen": last or first,
        "remediation": "Investigate.",
        "entities": {
            "hosts": [host] if host else [],
            "users": [user] if user else [],
            "ips": ["10.0.0.4"],
            "files": [{"name": "upd.exe", "sha256": "ab" * 32}],
            "processes": [{"commandLine": "schtasks /create /tn x /tr upd.exe"}],
            "mailboxes": [],
            "urls": ["http://evil.example/x"],
            "links": [link] if link else [],
            "techniques": [{"id": "T1053.005", "name": "Scheduled Task"}],
            "truncated": [],
        },
        "triggerEvents": [
            {
                "eventTime": first,
                "format": "graph",
                "position": "f.json#0",
                "attributes": {"alertName": "Suspicious Task Scheduler activity", "eventSeverityCat": "HIGH"},
                "raw": {"id": "da1"},
            }
        ],
    }


# -- table -----------------------------------------------------------------------------------------


def test_table_has_one_line_per_incident_with_its_latest_revision() -> None:
    text = views.render_table([snap("inc-1", 1), snap("inc-2", 1, host="srv-db-02"), snap("inc-1", 3)], width=200)
    lines = text.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "SEV", "RULE", "TENANT", "HOST", "USER", "ALERTS", "LINK"]
    assert len(lines) == 3
    assert "fin-ws-017.contoso.local" in lines[1] and " 3 " in lines[1]  # incidentCount of revision 3
    assert "srv-db-02" in lines[2]
    assert lines[1].endswith("https://security.microsoft.com/alerts/da1?tid=t1")


def test_a_narrow_terminal_cuts_rule_host_and_user_but_never_the_link() -> None:
    link = "https://security.microsoft.com/alerts/" + "a" * 80
    text = views.render_table([snap(host="h" * 60, user="u" * 60, link=link)], width=100)
    line = text.splitlines()[1]
    assert line.endswith(link)
    assert len(line[: line.index(link)]) <= 100
    assert "\u2026" in line


def test_cells_never_break_a_line_whatever_the_input_holds() -> None:
    hostile = snap(host="evil\nhost\r\tname", user="a\x0bb")
    lines = views.render_table([hostile], width=200).splitlines()
    assert len(lines) == 2 and "evil host name" in lines[1]


def test_alert_data_cannot_drive_the_terminal_or_forge_a_line_in_the_table_or_the_receiver() -> None:
    hostile = snap(host="evil\x1b]0;pwned\x07\x1b[2J", user="\u202eresu", link="https://x/\x1b[8m\nRECEIVED inc-fake")
    hostile["entities"]["processes"] = [{"commandLine": "cmd\nRECEIVED inc-forged rev 1 created sev 10\x1b[1A\x9b2K"}]
    table = views.render_table([hostile], width=200)
    lines = [views.receiver_line(hostile), *views.entity_lines(hostile)]
    for text in [table, *lines]:
        assert not any(ch in text for ch in "\x1b\x07\x9b\u202e")
    assert len(table.splitlines()) == 2
    assert all("\n" not in line for line in lines) and not any(line.startswith("RECEIVED inc-f") for line in lines)
    assert "evil\\u001b]0;pwned" in lines[0] and "cmd\\u000aRECEIVED inc-forged" in "".join(lines)
    summary = ReplaySummary(explaining=True)
    summary.stats.add("matched", rule="PH_RULE_X")
    summary.rules["PH_RULE_X"] = RuleSummary()
    summary.rules["PH_RULE_X"].add(hostile)
    summary.explain("rejected", "f.json:1: bad \x1b[2J record")
    for line in summary.lines() + summary.explain_lines():
        assert "\x1b" not in line and "\n" not in line


def test_snapshots_without_entities_fall_back_to_attributes_and_trigger_events() -> None:
    old = snap()
    del old["entities"]
    old["attributes"]["hostName"] = "legacy-host"
    old["triggerEvents"][0]["attributes"].update(user="b.jones", alertWebUrl="https://security.microsoft.com/alert/x")
    row = views.row(old)
    assert (row["host"], row["user"], row["link"]) == ("legacy-host", "b.jones", "https://security.microsoft.com/alert/x")


def test_observed_techniques_are_shown_next_to_the_rule_techniques() -> None:
    assert views.techniques_line(snap()) == "observed T1053.005 Scheduled Task; rule T1053.002"


def test_receiver_line_names_host_user_tenant_and_link_then_the_other_entities() -> None:
    s = snap()
    line = views.receiver_line(s)
    assert line.startswith("RECEIVED inc-1 rev 1 created sev 9 PH_RULE_X host=fin-ws-017.contoso.local user=CONTOSO\\j.doe")
    assert "tenant=0b1f6c2e-5a3d" in line and line.endswith("https://security.microsoft.com/alerts/da1?tid=t1")
    more = "\n".join(views.entity_lines(s))
    assert "ips: 10.0.0.4" in more and "schtasks /create" in more and "ab" * 32 in more


# -- HTML ------------------------------------------------------------------------------------------


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def report(**kw: Any) -> str:
    incidents = [
        snap("inc-1", 2, first="2026-11-20T09:14:05Z", last="2026-11-20T09:40:00Z"),
        snap("inc-2", 1, host="srv-db-02", user="svc_backup", severity=6, first="2026-11-20T10:01:58Z"),
        snap("inc-3", 1, host="hr-laptop-22", user="", severity=3, first="2026-11-20T11:30:00Z", link=""),
    ]
    alerts = [
        {"time": "2026-11-20T09:14:05Z", "host": "fin-ws-017.contoso.local", "title": "A", "severity": "HIGH", "alertId": "a1"},
        {"time": "2026-11-20T10:01:58Z", "host": "srv-db-02", "title": "B", "severity": "MEDIUM", "alertId": "a2"},
        {"time": "2026-11-20T11:30:00Z", "host": "", "title": "C", "severity": "LOW", "alertId": "a3", "matched": False},
    ]
    return render_html(
        incidents, alerts, summary=["records read: 3"], generated=datetime(2026, 11, 20, tzinfo=timezone.utc), **kw
    )


def test_report_loads_nothing_from_the_network() -> None:
    page = report()
    doc = parse(page)
    csp = [a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0] or "")
    assert not [t for t, _ in doc.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for tag, attrs in doc.tags:
        if tag == "a":
            href = attrs.get("href") or ""
            assert href.startswith(("#", "https://")), href
        assert "src" not in attrs
    assert "url(" not in page and "@import" not in page


def test_report_escapes_everything_that_came_from_an_alert() -> None:
    evil = snap(host='<script>alert("h")</script>', user="<img src=x onerror=alert(1)>")
    evil["attributes"]["alertName"] = "</title><script>x</script>"
    evil["entities"]["urls"] = ["javascript:alert(1)"]
    evil["entities"]["links"] = ["javascript:alert(2)"]
    evil["triggerEvents"][0]["raw"] = {"x": "</pre><script>y</script>"}
    page = render_html([evil], [{"time": "2026-11-20T09:14:05Z", "host": "<b>h</b>", "title": "<i>", "severity": "HIGH"}])
    doc = parse(page)
    assert not [t for t, _ in doc.tags if t in ("script", "img", "b", "i")]
    assert not [a for t, a in doc.tags if t == "a" and "javascript" in (a.get("href") or "")]
    assert '<script>alert("h")</script>' in "".join(doc.text)  # shown as text, not run


def test_report_has_the_table_the_timeline_and_each_incidents_evidence() -> None:
    doc = parse(report())
    ids = {a.get("id") for _, a in doc.tags}
    assert {"incidents-table", "timeline-svg", "incident-inc-1", "incident-inc-2", "incident-inc-3", "summary-text"} <= ids
    rows = [a for t, a in doc.tags if t == "tr" and a.get("class") == "incident-row"]
    assert len(rows) == 3
    assert len([a for t, a in doc.tags if t == "circle" and a.get("class") == "alert-dot"]) == 3
    assert len([a for t, a in doc.tags if t == "rect" and a.get("class") == "incident-bar"]) == 3
    labels = [a for t, a in doc.tags if t == "text" and a.get("class") == "host-label"]
    assert len(labels) == 4  # three hosts and "(no host)"
    text = "".join(doc.text)
    assert "T1053.005 Scheduled Task" in text and "T1053.002" in text and "schtasks /create" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs Debian's chromium)")
def test_report_renders_in_headless_chromium_with_table_timeline_and_severity_colours(tmp_path: Path) -> None:
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(report(), encoding="utf-8")
    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = parse(dom.stdout)
    assert len([a for t, a in doc.tags if t == "tr" and a.get("class") == "incident-row"]) == 3
    assert len([a for t, a in doc.tags if t == "circle"]) == 3 and "timeline-svg" in dom.stdout

    shot = tmp_path / "shot.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1400)
    width, height = image.size
    pixels = image.load()
    assert pixels is not None

    def near(colour: str, box: tuple[int, int, int, int]) -> int:
        r0, g0, b0 = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
        return sum(
            1
            for x in range(box[0], box[2], 2)
            for y in range(box[1], box[3], 2)
            if abs(pixels[x, y][0] - r0) + abs(pixels[x, y][1] - g0) + abs(pixels[x, y][2] - b0) < 40
        )

    header = near("#1f2937", (0, 0, width, 60))
    assert header > 1000, "the dark page header is drawn"
    top = (0, 60, width, height)
    for band in ("HIGH", "MEDIUM", "LOW"):  # badges, timeline dots and bars in their severity colours
        assert near(SEVERITY_COLOURS[band], top) > 30, band
    white = near("#ffffff", top)
    assert white > (width * (height - 60) // 4) // 4, "a light page, not a blank or error screen"
