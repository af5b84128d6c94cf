"""``replay --html FILE``: one self-contained HTML page an analyst would rather look at than read.

The incidents table, a timeline of alerts and incidents per host (inline SVG), and each incident's
evidence (entities, observed vs. rule techniques, trigger events, raw records). No script, no
external stylesheet, font or image: a Content-Security-Policy of ``default-src 'none'`` makes the
page load nothing from the network when it is viewed (portal links are plain navigation).
Everything from the input is HTML-escaped; only ``https://`` portal links become links, evidence
URLs are shown as text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from . import views
from .normalize import parse_time

SEVERITY_COLOURS = {"HIGH": "#d32f2f", "MEDIUM": "#f57c00", "LOW": "#1976d2", "?": "#757575", "UNKNOWN": "#757575"}
MAX_TIMELINE_HOSTS = 40  # rows in the timeline; further hosts are counted below it
MAX_RAW_CHARS = 4096  # raw record shown per trigger event (the snapshot already caps it at 4 KiB)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1c1c1c;
background:#fafafa}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#cbd5e1}
section{padding:8px 24px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;
vertical-align:top}td:first-child{white-space:nowrap}th{background:#f1f5f9;font-weight:600}td.num{text-align:right}
.sev{display:inline-block;white-space:nowrap;min-width:70px;
padding:1px 6px;border-radius:3px;color:#fff;font-weight:600;text-align:center}
.sev-HIGH{background:#d32f2f}.sev-MEDIUM{background:#f57c00}.sev-LOW{background:#1976d2}.sev-UNKNOWN,.sev-\\?{background:#757575}
article.incident{background:#fff;border:1px solid #ddd;border-left:6px solid #757575;margin:12px 0;padding:8px 14px}
article.HIGH{border-left-color:#d32f2f}article.MEDIUM{border-left-color:#f57c00}article.LOW{border-left-color:#1976d2}
article h3{margin:4px 0 8px;font-size:15px}dl{display:grid;grid-template-columns:150px 1fr;gap:2px 12px;margin:0 0 8px}
dt{color:#555}dd{margin:0;word-break:break-all}code,pre{font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:320px;white-space:pre-wrap;word-break:break-all}
.muted{color:#666}.legend span{margin-right:16px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _link(url: str, text: str | None = None) -> str:
    if not url.startswith("https://"):
        return _e(text or url)
    return f'<a href="{_e(url)}" target="_blank" rel="noopener noreferrer">{_e(text or url)}</a>'


def _band(snap: Mapping[str, Any]) -> str:
    return views.severity_band(snap.get("severity"))


def _sev_badge(band: str, label: str) -> str:
    return f'<span class="sev sev-{_e(band)}">{_e(label)}</span>'


def _anchor(snap: Mapping[str, Any]) -> str:
    return "incident-" + "".join(c for c in str(snap.get("incidentId")) if c.isalnum() or c == "-")


def _incidents_table(incidents: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("Time (UTC)", "Severity", "Rule", "Tenant", "Host", "User", "Alerts", "Link"))
    rows = []
    for snap in incidents:
        r = views.row(snap)
        rows.append(
            '<tr class="incident-row">'
            f"<td>{_e(r['time'])}</td><td>{_sev_badge(_band(snap), r['severity'])}</td>"
            f'<td><a href="#{_anchor(snap)}">{_e(r["rule"])}</a></td><td title="{_e(views.tenant(snap))}">{_e(r["tenant"])}</td>'
            f"<td>{_e(r['host'])}</td><td>{_e(r['user'])}</td><td class=num>{_e(r['alerts'])}</td>"
            f"<td>{_link(r['link'], 'Defender portal') if r['link'] else ''}</td></tr>"
        )
    if not rows:
        return '<p class="muted" id="no-incidents">No incidents.</p>'
    return f'<table id="incidents-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _ts(value: Any) -> datetime | None:
    return parse_time(value) if isinstance(value, str) else None


def _timeline(incidents: Sequence[Mapping[str, Any]], alerts: Sequence[Mapping[str, Any]]) -> str:
    """Rows per host; alerts as dots coloured by their severity, incidents as bars from first to last sighting."""
    rows: dict[str, list[tuple[str, Any]]] = {}
    times: list[datetime] = []
    for alert in alerts:
        t = _ts(alert.get("time"))
        if t is None:
            continue
        rows.setdefault(str(alert.get("host") or "(no host)"), []).append(("alert", (t, alert)))
        times.append(t)
    for snap in incidents:
        start, end = _ts(snap.get("firstSeen")), _ts(snap.get("lastSeen"))
        if start is None:
            continue
        end = end or start
        for h in views.hosts(snap) or ["(no host)"]:
            rows.setdefault(h, []).append(("incident", (start, end, snap)))
        times += [start, end]
    if not times:
        return '<p class="muted">Nothing to draw.</p>'
    lo, hi = min(times), max(times)
    if hi - lo < timedelta(minutes=2):
        lo, hi = lo - timedelta(minutes=1), hi + timedelta(minutes=1)
    pad = (hi - lo) * 0.03
    lo, hi = lo - pad, hi + pad
    hosts = sorted(rows, key=lambda h: (h == "(no host)", h.casefold()))
    shown, hidden = hosts[:MAX_TIMELINE_HOSTS], len(hosts) - MAX_TIMELINE_HOSTS
    left, width, row_h, top = 230, 1150, 30, 28
    plot = width - left - 20
    height = top + row_h * len(shown) + 10

    def x(t: datetime) -> float:
        return left + plot * ((t - lo) / (hi - lo))

    parts = [
        f'<svg id="timeline-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="alerts and incidents per host over time">'
    ]
    for i in range(6):  # time axis
        t = lo + (hi - lo) * (i / 5)
        xi = x(t)
        parts.append(f'<line x1="{xi:.1f}" y1="{top - 6}" x2="{xi:.1f}" y2="{height - 8}" stroke="#e5e7eb"/>')
        anchor = "start" if i == 0 else "end" if i == 5 else "middle"  # the outer labels stay inside the picture
        parts.append(f'<text x="{xi:.1f}" y="{top - 10}" text-anchor="{anchor}">{_e(t.strftime("%m-%d %H:%M"))}</text>')
    for index, h in enumerate(shown):
        y = top + index * row_h
        if index % 2 == 0:
            parts.append(f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="#f8fafc"/>')
        label = h if len(h) <= 32 else h[:31] + "\u2026"
        parts.append(f'<text class="host-label" x="8" y="{y + row_h / 2 + 4}"><title>{_e(h)}</title>{_e(label)}</text>')
        for kind, item in rows[h]:
            if kind != "incident":
                continue
            start, end, snap = item
            colour = SEVERITY_COLOURS.get(_band(snap), "#757575")
            x0, x1 = x(start), max(x(end), x(start) + 10)
            span = f"{snap.get('firstSeen')} .. {snap.get('lastSeen')}"
            tip = f"incident {snap.get('incidentId')}: {views.short_rule_name(snap)} ({span})"
            parts.append(
                f'<a href="#{_anchor(snap)}"><rect class="incident-bar" x="{x0:.1f}" y="{y + 5}" width="{x1 - x0:.1f}" '
                f'height="{row_h - 10}" rx="3" fill="{colour}" fill-opacity="0.35" stroke="{colour}" stroke-width="2">'
                f"<title>{_e(tip)}</title></rect></a>"
            )
        for kind, item in rows[h]:
            if kind != "alert":
                continue
            t, alert = item
            colour = SEVERITY_COLOURS.get(str(alert.get("severity") or "?").upper(), "#757575")
            what = alert.get("title") or alert.get("alertId")
            tip = f"{alert.get('time')} {what} ({alert.get('severity') or 'severity unknown'})"
            opacity = "1" if alert.get("matched", True) else "0.45"
            parts.append(
                f'<circle class="alert-dot" cx="{x(t):.1f}" cy="{y + row_h / 2}" r="6" fill="{colour}" '
                f'fill-opacity="{opacity}" stroke="#fff" stroke-width="1.5"><title>{_e(tip)}</title></circle>'
            )
    parts.append("</svg>")
    legend = (
        '<p class="legend">'
        + "".join(
            f'<span><span class="dot" style="background:{c}"></span>{b.lower()} severity</span>'
            for b, c in SEVERITY_COLOURS.items()
            if b in ("HIGH", "MEDIUM", "LOW")
        )
        + "<span>dot: an alert (faded: matched no rule) &middot; bar: an incident, first to last sighting</span></p>"
    )
    more = f'<p class="muted">{hidden} more host(s) not drawn.</p>' if hidden > 0 else ""
    return "".join(parts) + legend + more


def _dl(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items if v) + "</dl>"


def _evidence(snap: Mapping[str, Any]) -> str:
    entities = snap.get("entities") if isinstance(snap.get("entities"), Mapping) else {}
    assert isinstance(entities, Mapping)

    def listing(values: Any) -> str:
        return ", ".join(f"<code>{_e(v)}</code>" for v in values) if isinstance(values, list) else ""

    files = []
    for f in entities.get("files") or []:
        if isinstance(f, Mapping):
            digests = " ".join(f"{k} <code>{_e(f[k])}</code>" for k in ("sha256", "sha1", "md5") if f.get(k))
            where = f" in <code>{_e(f['path'])}</code>" if f.get("path") else ""
            files.append(f"<code>{_e(f.get('name', '?'))}</code>{where} {digests}")
    processes = [
        f"<code>{_e(p.get('commandLine') or p.get('name'))}</code>"
        + (f" (pid {_e(p['pid'])})" if p.get("pid") is not None else "")
        for p in entities.get("processes") or []
        if isinstance(p, Mapping)
    ]
    observed = views.observed_techniques(snap)
    rule = views.rule_techniques(snap)
    items = [
        ("Hosts", listing(views.hosts(snap))),
        ("Users", listing(views.users(snap))),
        ("IP addresses", listing(entities.get("ips"))),
        ("Files", "<br>".join(files)),
        ("Processes", "<br>".join(processes)),
        ("Mailboxes", listing(entities.get("mailboxes"))),
        ("URLs (evidence)", listing(entities.get("urls"))),
        ("Portal links", "<br>".join(_link(u) for u in views.links(snap))),
        ("Observed techniques", listing(observed)),
        ("Rule techniques", listing(rule)),
        ("Tenant", f"<code>{_e(views.tenant(snap))}</code>" if views.tenant(snap) else ""),
        (
            "Incident",
            f"<code>{_e(snap.get('incidentId'))}</code> revision {_e(snap.get('revision'))} ({_e(snap.get('action'))}), "
            f"first seen {_e(snap.get('firstSeen'))}, last seen {_e(snap.get('lastSeen'))}, "
            f"triggers {_e(snap.get('triggerCount'))}",
        ),
        ("Attributes", f"<code>{_e(orjson.dumps(snap.get('attributes') or {}, option=orjson.OPT_SORT_KEYS).decode())}</code>"),
        ("Truncated", listing(entities.get("truncated"))),
    ]
    events = [e for e in snap.get("triggerEvents") or [] if isinstance(e, Mapping)]
    event_rows = []
    for ev in events:
        attrs = ev.get("attributes") if isinstance(ev.get("attributes"), Mapping) else {}
        assert isinstance(attrs, Mapping)
        raw = orjson.dumps(ev.get("raw"), option=orjson.OPT_INDENT_2, default=str).decode()[:MAX_RAW_CHARS]
        event_rows.append(
            f"<tr><td>{_e(ev.get('eventTime'))}</td><td>{_e(attrs.get('alertName') or attrs.get('eventType'))}</td>"
            f"<td>{_e(ev.get('format'))}</td><td><code>{_e(ev.get('position'))}</code></td>"
            f"<td><details><summary>raw record</summary><pre>{_e(raw)}</pre></details></td></tr>"
        )
    table = (
        "<table class=trigger-events><thead><tr><th>Event time</th><th>Alert</th><th>Format</th><th>Read from</th>"
        f"<th></th></tr></thead><tbody>{''.join(event_rows)}</tbody></table>"
        if event_rows
        else ""
    )
    band = _band(snap)
    label = f"{snap.get('severity')} {band}"
    title = f"{views.short_rule_name(snap)}" + (f": {views.alert_name(snap)}" if views.alert_name(snap) else "")
    return (
        f'<article class="incident {_e(band)}" id="{_anchor(snap)}"><h3>{_sev_badge(band, label)} '
        f"{_e(title)}</h3>{_dl(items)}{table}"
        f'<p class="muted">Remediation: {_e(snap.get("remediation") or "")}</p></article>'
    )


def render_html(
    incidents: Sequence[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]] = (),
    *,
    summary: Sequence[str] = (),
    explain: Sequence[str] = (),
    generated: datetime | None = None,
    omitted_incidents: int = 0,
) -> str:
    """The whole page. ``incidents``: snapshots (the latest revision of each is shown); ``alerts``:
    timeline points ``{time, host, title, severity, alertId, matched}``."""
    latest = views.latest(incidents)
    stamp = (generated or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC")
    hosts = {h for s in latest for h in views.hosts(s)}
    counts = f"{len(latest)} incident(s), {len(alerts)} alert(s), {len(hosts)} host(s)"
    omitted = (
        f'<p class="muted">{omitted_incidents} further incident(s) not kept in this report.</p>' if omitted_incidents else ""
    )
    summary_html = f"<pre id=summary-text>{_e(chr(10).join(summary))}</pre>" if summary else ""
    explain_html = (
        f"<h3>Skipped and rejected records</h3><pre id=explain-text>{_e(chr(10).join(explain))}</pre>" if explain else ""
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Defender correlator report: {_e(counts)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Defender correlator report</h1><p>{_e(counts)} &middot; generated {_e(stamp)}</p></header>"
        f'<section id="incidents"><h2>Incidents</h2>{_incidents_table(latest)}{omitted}</section>'
        f'<section id="timeline"><h2>Timeline per host</h2>{_timeline(latest, alerts)}</section>'
        f'<section id="evidence"><h2>Evidence per incident</h2>{"".join(_evidence(s) for s in latest)}</section>'
        f'<section id="summary"><h2>Summary</h2>{summary_html}{explain_html}</section>'
        "</body></html>\n"
    )
