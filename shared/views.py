"""Incident snapshots as an analyst reads them: who (host, user), where (tenant, portal link), what
(rule, observed techniques) and how much (alerts), as one table line per incident.

Pure: snapshots in, text out. The accessors fall back from the snapshot's ``entities`` to its
attributes, group-by values and trigger events, so snapshots written before ``entities`` existed
still read well. Used by ``replay --output table``, the HTML report, the receiver and the cards.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

MAX_KEPT_INCIDENTS = 5000  # incidents a replay keeps for its table/report; more are counted, not shown


# Control characters (C0, DEL, C1) and bidirectional overrides: from alert data they could move the
# cursor, retitle or clear a terminal, forge a line, or reorder what an analyst reads.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe for a terminal line: every control or bidi character shown as ``\\uXXXX``."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _events(snap: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    events = snap.get("triggerEvents")
    return [e for e in events if isinstance(e, Mapping)] if isinstance(events, list) else []


def _entity(snap: Mapping[str, Any], kind: str) -> list[Any]:
    entities = snap.get("entities")
    values = entities.get(kind) if isinstance(entities, Mapping) else None
    return values if isinstance(values, list) else []


def _attr(snap: Mapping[str, Any], name: str) -> str:
    """An attribute from the incident, its group-by values, else its newest trigger event."""
    for holder in (snap.get("attributes"), snap.get("groupBy")):
        if (type(holder) is dict or isinstance(holder, Mapping)) and holder.get(name) not in (None, ""):
            return _text(holder[name])
    events = snap.get("triggerEvents")
    for event in reversed(events) if isinstance(events, list) else ():
        if not (type(event) is dict or isinstance(event, Mapping)):
            continue
        attrs = event.get("attributes")
        if (type(attrs) is dict or isinstance(attrs, Mapping)) and attrs.get(name) not in (None, ""):
            return _text(attrs[name])
    return ""


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _names(snap: Mapping[str, Any], kind: str, attr: str) -> list[str]:
    """The entities of a kind, else the attribute as a one-name list (``[]`` when empty)."""
    found = [str(v) for v in _entity(snap, kind)]
    if found:
        return found
    value = _attr(snap, attr)
    return [value] if value else []


def hosts(snap: Mapping[str, Any]) -> list[str]:
    return _names(snap, "hosts", "hostName")


def users(snap: Mapping[str, Any]) -> list[str]:
    return _names(snap, "users", "user")


def host(snap: Mapping[str, Any]) -> str:
    found = hosts(snap)
    return found[0] if found else ""


def user(snap: Mapping[str, Any]) -> str:
    found = users(snap)
    return found[0] if found else ""


def links(snap: Mapping[str, Any]) -> list[str]:
    found = [str(u) for u in _entity(snap, "links") if str(u).startswith("https://")]
    if found:
        return found
    url = _attr(snap, "alertWebUrl")
    return [url] if url.startswith("https://") else []


def link(snap: Mapping[str, Any]) -> str:
    found = links(snap)
    return found[0] if found else ""


def tenant(snap: Mapping[str, Any]) -> str:
    value = snap.get("tenantId")
    return str(value) if isinstance(value, str) and value else _attr(snap, "tenantId")


def alert_name(snap: Mapping[str, Any]) -> str:
    return _attr(snap, "alertName") or _attr(snap, "attackName") or _attr(snap, "incidentTitle")


def alert_count(snap: Mapping[str, Any]) -> int:
    """The rule's ``incidentCount`` (COUNT(*) at the latest trigger) when mapped, else the trigger count."""
    attrs = snap.get("attributes")
    count = attrs.get("incidentCount") if isinstance(attrs, Mapping) else None
    if type(count) is int:
        return count
    triggers = snap.get("triggerCount")
    return triggers if type(triggers) is int else 0


def rule_techniques(snap: Mapping[str, Any]) -> list[str]:
    techniques = snap.get("techniques")
    if not isinstance(techniques, list):
        return []
    return [str(t.get("id")) for t in techniques if isinstance(t, Mapping) and t.get("id")]


def observed_techniques(snap: Mapping[str, Any]) -> list[str]:
    """Techniques Defender reported on the alerts (``T1053.005 Scheduled Task``), not the rule's own."""
    found = []
    for t in _entity(snap, "techniques"):
        if isinstance(t, Mapping) and t.get("id"):
            found.append(f"{t['id']} {t['name']}" if t.get("name") else str(t["id"]))
    if found:
        return found
    ids: dict[str, None] = {}
    for event in _events(snap):  # older snapshots: the normalized ids (parents included)
        attrs = event.get("attributes")
        values = attrs.get("attackTechniqueId") if isinstance(attrs, Mapping) else None
        for tid in [values] if isinstance(values, str) else values if isinstance(values, list) else []:
            ids[str(tid)] = None
    return list(ids)


def techniques_line(snap: Mapping[str, Any]) -> str:
    """``observed T1053.005 Scheduled Task; rule T1053.002``."""
    parts = []
    observed = observed_techniques(snap)
    if observed:
        parts.append("observed " + ", ".join(observed))
    rule = rule_techniques(snap)
    if rule:
        parts.append("rule " + ", ".join(rule))
    return "; ".join(parts)


def severity_band(severity: Any) -> str:
    """FortiSIEM's bands of a 1-10 rule severity."""
    if type(severity) is not int:
        return "?"
    return "HIGH" if severity >= 9 else "MEDIUM" if severity >= 5 else "LOW"


def short_rule_name(snap: Mapping[str, Any]) -> str:
    name = str(snap.get("ruleName") or snap.get("ruleId") or "")
    for prefix in ("MS 365 Defender: ", "MS Defender: "):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def when(snap: Mapping[str, Any]) -> str:
    """``firstSeen`` as ``2026-11-20 09:14:05`` (UTC)."""
    text = str(snap.get("firstSeen") or "")
    return text[:19].replace("T", " ")


def row(snap: Mapping[str, Any]) -> dict[str, str]:
    """One incident as the table's cells."""
    sev = snap.get("severity")
    return {
        "time": when(snap),
        "severity": f"{sev} {severity_band(sev)}" if sev is not None else "",
        "rule": short_rule_name(snap),
        "tenant": tenant(snap)[:8],
        "host": host(snap),
        "user": user(snap),
        "alerts": str(alert_count(snap)),
        "link": link(snap),
    }


COLUMNS = (  # key, heading, max width (0: never cut)
    ("time", "TIME (UTC)", 19),
    ("severity", "SEV", 9),
    ("rule", "RULE", 48),
    ("tenant", "TENANT", 8),
    ("host", "HOST", 30),
    ("user", "USER", 24),
    ("alerts", "ALERTS", 6),
    ("link", "LINK", 0),
)


def _fit_cell(text: str, width: int) -> str:
    text = printable(" ".join(text.split()))  # no newlines, tabs or terminal controls inside a cell
    if width <= 0 or len(text) <= width:
        return text
    return text[: max(1, width - 1)] + "\u2026"


def render_table(snapshots: Iterable[Mapping[str, Any]], width: int | None = None) -> str:
    """One line per incident (the latest revision of each, ordered by first sighting), with a header.

    ``width`` is the terminal width: the rule, host and user columns shrink to fit it; the link is
    never cut (terminals make it clickable), so a line may wrap there.
    """
    rows = [row(s) for s in latest(snapshots)]
    if not rows:
        return "no incidents\n"
    if width is None:
        width = shutil.get_terminal_size((160, 24)).columns
    widths: dict[str, int] = {}
    for key, heading, cap in COLUMNS:
        longest = max([len(heading)] + [len(" ".join(r[key].split())) for r in rows])
        widths[key] = min(longest, cap) if cap else longest
    # The link is last and never cut (terminals make it clickable): only the other columns must fit.
    excess = sum(widths[k] for k, _, _ in COLUMNS if k != "link") + 2 * (len(COLUMNS) - 1) - max(width, 80)
    for key, floor in (("rule", 24), ("host", 16), ("user", 12), ("rule", 12)):  # give back room, rule first
        if excess <= 0:
            break
        give = min(excess, max(0, widths[key] - floor))
        widths[key] -= give
        excess -= give
    lines = []
    header = [(key, heading) for key, heading, _ in COLUMNS]
    lines.append("  ".join(_fit_cell(h, widths[k]).ljust(widths[k]) if k != "link" else h for k, h in header).rstrip())
    for r in rows:
        cells = [_fit_cell(r[k], widths[k]).ljust(widths[k]) if k != "link" else printable(r[k]) for k, _, _ in COLUMNS]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def latest(snapshots: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The highest revision of each incident, ordered by first sighting then id."""
    best: dict[str, Mapping[str, Any]] = {}
    for snap in snapshots:
        key = str(snap.get("incidentId"))
        kept = best.get(key)
        if kept is None or _revision(snap) >= _revision(kept):
            best[key] = snap
    return sorted(best.values(), key=lambda s: (str(s.get("firstSeen") or ""), str(s.get("incidentId"))))


def _revision(snap: Mapping[str, Any]) -> int:
    rev = snap.get("revision")
    return rev if type(rev) is int else 0


def receiver_line(snap: Mapping[str, Any]) -> str:
    """The receiver's one-line summary of a delivered snapshot, entities first."""
    parts = [
        f"RECEIVED {snap.get('incidentId')} rev {snap.get('revision')} {snap.get('action')}",
        f"sev {snap.get('severity')} {snap.get('ruleId')}",
        f"host={host(snap) or '-'}",
        f"user={user(snap) or '-'}",
        f"tenant={tenant(snap) or '-'}",
        f"alerts={alert_count(snap)}",
    ]
    name = alert_name(snap)
    if name:
        parts.append(f"alert={name!r}")
    techniques = techniques_line(snap)
    if techniques:
        parts.append(f"techniques=[{techniques}]")
    url = link(snap)
    if url:
        parts.append(url)
    return printable(" ".join(parts))


def entity_lines(snap: Mapping[str, Any], indent: str = "    ") -> list[str]:
    """The rest of the entities, one kind per line (for the receiver)."""
    out = []
    more_hosts, more_users = hosts(snap)[1:], users(snap)[1:]
    if more_hosts:
        out.append(f"{indent}more hosts: {', '.join(more_hosts)}")
    if more_users:
        out.append(f"{indent}more users: {', '.join(more_users)}")
    for kind, label in (("ips", "ips"), ("mailboxes", "mailboxes"), ("urls", "urls")):
        values = [str(v) for v in _entity(snap, kind)]
        if values:
            out.append(f"{indent}{label}: {', '.join(values)}")
    for f in _entity(snap, "files"):
        if isinstance(f, Mapping):
            digest = f.get("sha256") or f.get("sha1") or f.get("md5") or ""
            out.append(f"{indent}file: {f.get('name', '?')}" + (f" {digest}" if digest else ""))
    for p in _entity(snap, "processes"):
        if isinstance(p, Mapping):
            out.append(f"{indent}process: {p.get('commandLine') or p.get('name')}")
    return [printable(line) for line in out]
