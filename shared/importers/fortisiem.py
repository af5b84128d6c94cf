"""FortiSIEM XML rule exports (``Rules`` > ``Rule``) to our rule YAML, one rule per file.

Carried over: ``Name``, ``Description``, ``active``, ``DetectionTechnology``, the ``Rule`` attributes
``id``, ``function`` (category), ``subFunction`` (tactic) and ``technique``, ``IncidentDef`` severity and
``ArgList`` (incident attributes), ``PatternClause`` window, ``SubPattern`` (``SingleEvtConstr``,
``GroupByAttr``, ``GroupEvtConstr``), ``Operator`` elements between subpatterns (the ``pattern``),
``GlobalConstr`` (``correlation``), ``CustomerScope groupByEachCustomer`` (``tenantId`` in the
group-by), ``Exception`` elements and ``ClearCondition``. Everything else is reported as a
:class:`~shared.importers.common.Note` naming the element, the rule and the reason; guessed values
are listed under ``source.reconstructed``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from ..errors import RuleImportError
from .common import Imported, mitre_ref, rule_id, tactic

MAX_XML_BYTES = 16 << 20
_OPERATORS = {
    "AND": "AND",
    "OR": "OR",
    "FOLLOWED_BY": "FOLLOWED_BY",
    "FOLLOWEDBY": "FOLLOWED_BY",
    "NOT_FOLLOWED_BY": "NOT FOLLOWED_BY",
    "NOTFOLLOWEDBY": "NOT FOLLOWED_BY",
    "NOT FOLLOWED_BY": "NOT FOLLOWED_BY",
    "NOT FOLLOWED BY": "NOT FOLLOWED_BY",
    "FOLLOWED BY": "FOLLOWED_BY",
}
# Elements with no counterpart in our rule format, and why.
_NOT_CARRIED = {
    "IncidentTitle": "incidents carry the rule name; there is no separate title field",
    "TriggerEventDisplay": "incident snapshots carry the triggering events' attributes as evidence",
    "SigmaFileName": "Sigma bookkeeping of Fortinet's converter",
    "SIGMAStatus": "Sigma bookkeeping of Fortinet's converter",
    "ignoreSIGMAUpdate": "Sigma bookkeeping of Fortinet's converter",
    "Notification": "notifications are webhook targets in the app settings, not rule fields",
    "userRoles": "access control lives in Azure, not in rule files",
}


def _parse_xml(data: bytes, name: str) -> Element:
    try:
        from defusedxml import ElementTree as SafeET  # type: ignore[import-untyped]  # no entity expansion
    except ImportError as exc:  # pragma: no cover - dev requirement
        raise RuleImportError("the FortiSIEM importer needs defusedxml: pip install -r requirements-dev.txt") from exc
    if len(data) > MAX_XML_BYTES:
        raise RuleImportError(f"{name}: larger than {MAX_XML_BYTES} bytes")
    try:
        root: Element = SafeET.fromstring(data)
    except Exception as exc:  # defusedxml raises ParseError or its own DefusedXmlException subclasses
        raise RuleImportError(f"{name}: not a readable XML rule export ({exc})") from None
    return root


def _whole_number(text: str | None) -> int | None:
    """``text`` as a non-negative integer if it is one written in ASCII digits (``str.isdigit`` also
    accepts '²' and Arabic-Indic digits, and ``int`` refuses numbers of more than 4,300 digits)."""
    if not text or len(text) > 18 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _text(el: Element | None) -> str:
    return " ".join((el.text or "").split()) if el is not None else ""


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _name(text: str, fallback: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", text.strip())
    if not cleaned or not re.match(r"[A-Za-z_]", cleaned):
        cleaned = f"{fallback}_{cleaned}".strip("_")
    return cleaned


def _subpattern(item: Imported, el: Element, index: int) -> dict[str, Any]:
    where = f"PatternClause/SubPattern[{index + 1}]"
    raw_name = el.get("name") or el.get("displayName") or ""
    name = _name(raw_name, f"sub{index + 1}")
    if name != raw_name:
        item.reconstructed(f"subpatterns[{index}].name", f"FortiSIEM name {raw_name!r} made an identifier")
    query = _text(el.find("SingleEvtConstr"))
    group_by = [g.strip() for g in _split_top(_text(el.find("GroupByAttr")))]
    constraint = _text(el.find("GroupEvtConstr"))
    if not query:
        item.note(f"{where}/SingleEvtConstr", "missing: the subpattern has no filter", "invalid")
    if not constraint:
        constraint = "COUNT(*) >= 1"
        item.reconstructed(f"subpatterns[{index}].aggregateConstraint", "no GroupEvtConstr in the export; COUNT(*) >= 1")
    for child in el:
        if child.tag not in ("SingleEvtConstr", "GroupByAttr", "GroupEvtConstr"):
            item.note(f"{where}/{child.tag}", "element of a subpattern we do not know")
    return {"name": name, "query": query, "groupBy": group_by, "aggregateConstraint": constraint}


def _pattern(item: Imported, clause: Element, names: list[str]) -> str | None:
    """The subpatterns and ``Operator`` elements, in document order, as a pattern expression."""
    if len(names) < 2:
        return None
    tokens: list[str] = []
    sub_index = 0
    for child in clause:
        if child.tag == "SubPattern":
            if tokens and tokens[-1] in names:
                tokens.append("AND")
                item.reconstructed("pattern", "two subpatterns without an Operator between them; AND assumed")
            tokens.append(names[sub_index])
            sub_index += 1
        elif child.tag == "Operator":
            kind = (child.get("type") or _text(child)).strip().upper()
            op = _OPERATORS.get(kind)
            if op is None:
                item.note("PatternClause/Operator", f"operator type {kind!r} is not one of AND, OR, FOLLOWED_BY, NOT_FOLLOWED_BY")
                op = "AND"
            tokens.append(op)
    return " ".join(tokens)


def _rename_refs(text: str, renamed: dict[str, str]) -> str:
    """``old name.attr`` -> ``new_name.attr`` for subpatterns whose names were made identifiers."""
    for old, new in sorted(renamed.items(), key=lambda p: -len(p[0])):
        text = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}\.", f"{new}.", text)
    return text


def _incident_attributes(item: Imported, text: str, names: list[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in _split_top(text):
        target, eq, ref = part.partition("=")
        target, ref = target.strip(), ref.strip()
        if not eq or not target or not ref:
            item.note("IncidentDef/ArgList", f"entry {part!r} is not 'incidentAttr = SubPattern.attr'")
            continue
        sub, dot, rest = ref.partition(".")
        if not dot or sub not in names:
            item.note("IncidentDef/ArgList", f"entry {part!r} does not name one of the subpatterns ({', '.join(names)})")
            continue
        attrs[target] = f"{sub}.{rest}"
    return attrs


def _clear(item: Imported, el: Element) -> dict[str, Any] | None:
    clear: dict[str, Any] = {}
    quiet = el.find("QuietPeriod")
    seconds = (quiet.get("seconds") or quiet.get("value") or _text(quiet)) if quiet is not None else el.get("quietPeriod")
    after = _whole_number(seconds)
    if after is not None:
        clear["after"] = after
    clause = el.find("PatternClause")
    if clause is not None:
        queries = [_text(s.find("SingleEvtConstr")) for s in clause.findall("SubPattern")]
        if len(queries) > 1:
            item.note("ClearCondition/PatternClause", "a clear pattern of several subpatterns; only the first is kept")
        if queries and queries[0]:
            clear["query"] = queries[0]
    constr = _text(el.find("ClearConstr"))
    if constr:
        item.note(
            "ClearCondition/ClearConstr",
            f"condition {constr!r} between the clear events and the incident: our clear query matches "
            "events with the incident's group-by values",
        )
    if not clear:
        item.note("ClearCondition", "neither a quiet period nor a clear pattern found")
        return None
    item.reconstructed("clear", f"from FortiSIEM ClearCondition (type {el.get('type') or '?'}, method {el.get('method') or '?'})")
    return clear


def convert_rule(el: Element, source: str, position: int) -> Imported:
    """One ``Rule`` element to our rule data, with notes."""
    item = Imported(source, {})
    data = item.data
    raw_id = el.get("id") or ""
    incident = el.find("IncidentDef")
    event_type = incident.get("eventType", "") if incident is not None else ""
    data["id"] = rule_id(raw_id or event_type or f"imported_{Path(source).stem}_{position}")
    data["name"] = _text(el.find("Name")) or data["id"]
    data["description"] = _text(el.find("Description"))
    active = _text(el.find("active")).lower()
    data["enabled"] = active != "false"
    if not raw_id:
        item.reconstructed("id", f"the export has no rule id (GUI exports omit it); made from {event_type or 'the file name'}")
    severity_text = incident.get("severity", "") if incident is not None else ""
    severity = _whole_number(severity_text) or 0
    if not 1 <= severity <= 10:
        item.reconstructed("severity", f"IncidentDef severity {severity_text!r} is not 1-10; 5 used")
        severity = 5
    data["severity"] = severity
    data["category"] = el.get("function") or el.get("phIncidentCategory") or "Security"
    if not el.get("function"):
        item.reconstructed("category", "no 'function' attribute; phIncidentCategory or Security used")
    if el.get("phIncidentCategory"):
        item.note("Rule@phIncidentCategory", f"incident category {el.get('phIncidentCategory')!r} has no field of its own")
    tactics = []
    for name in _split_top(el.get("subFunction") or ""):
        found = tactic(name)
        if found:
            tactics.append(mitre_ref(*found))
        else:
            item.note("Rule@subFunction", f"{name!r} is not a MITRE ATT&CK tactic name")
    techniques = []
    for tech in _split_top(el.get("technique") or ""):
        if re.fullmatch(r"T\d{4}(\.\d{3})?", tech.strip()):
            techniques.append(mitre_ref(tech.strip()))
        else:
            item.note("Rule@technique", f"{tech!r} is not a technique id")
    if techniques:
        item.reconstructed("techniques", "the export has technique ids only; names are the ids")
    data["tactics"], data["techniques"] = tactics, techniques
    data["detection"] = _text(el.find("DetectionTechnology")) or "Correlation"
    data["remediation"] = _text(el.find("Remediation")) or _text(el.find("RemediationNote"))

    clause = el.find("PatternClause")
    subs_el = clause.findall("SubPattern") if clause is not None else []
    window = clause.get("window", "") if clause is not None else ""
    seconds = _whole_number(window)
    if seconds:
        data["timeWindow"] = seconds
    else:
        data["timeWindow"] = 300
        item.reconstructed("timeWindow", f"PatternClause window {window!r} is not a positive number; 300 s used")
    subs = [_subpattern(item, s, i) for i, s in enumerate(subs_el)]
    if not subs:
        item.note("PatternClause", "no SubPattern: nothing to match", "invalid")
    names = [s["name"] for s in subs]
    renamed = {(s.get("name") or s.get("displayName") or ""): n for s, n in zip(subs_el, names, strict=True)}
    renamed = {old: new for old, new in renamed.items() if old and old != new}
    scope = el.find("CustomerScope")
    if scope is not None and scope.get("groupByEachCustomer", "").lower() == "true":
        for i, sub in enumerate(subs):
            if not any(g.lower() in ("tenantid", "phcustid") for g in sub["groupBy"]):
                sub["groupBy"].append("tenantId")
                item.reconstructed(f"subpatterns[{i}].groupBy", "CustomerScope groupByEachCustomer: tenantId added")
    if scope is not None:
        excluded = [x for x in scope.iter() if x.tag in ("Exclude", "Include") and (len(x) or _text(x))]
        if excluded:
            item.note("CustomerScope", "per-customer include/exclude lists: use 'exceptions' with 'tenants'")
    data["subpatterns"] = subs
    if clause is not None:
        pattern = _pattern(item, clause, names)
        if pattern:
            data["pattern"] = pattern
        global_constr = _text(clause.find("GlobalConstr"))
        if global_constr:
            data["correlation"] = _rename_refs(global_constr, renamed)
        for child in clause:
            if child.tag not in ("SubPattern", "Operator", "GlobalConstr"):
                item.note(f"PatternClause/{child.tag}", "element of a pattern clause we do not know")
    args = _text(incident.find("ArgList")) if incident is not None else ""
    data["incidentAttributes"] = _incident_attributes(item, _rename_refs(args, renamed), names)
    exceptions = []
    for exc in el.iter("Exception"):
        query = _text(exc.find("SingleEvtConstr")) or _text(exc.find("Constr")) or _text(exc)
        if query:
            exceptions.append({"query": query})
    if exceptions:
        data["exceptions"] = exceptions
        item.reconstructed("exceptions", "from FortiSIEM Exception elements (conditions over incident attributes)")
    clear_el = el.find("ClearCondition")
    if clear_el is not None:
        clear = _clear(item, clear_el)
        if clear:
            data["clear"] = clear
    data.setdefault("source", {})
    data["source"] = {"origin": "fortisiem-xml", **data["source"]}
    known = {"Name", "Description", "active", "DetectionTechnology", "IncidentDef", "PatternClause", "CustomerScope"}
    known |= {"Exceptions", "Exception", "ClearCondition", "Remediation", "RemediationNote"}
    for child in el:
        if child.tag in known:
            continue
        reason = _NOT_CARRIED.get(child.tag, "element we do not know")
        item.note(child.tag, reason)
    for attr, value in el.attrib.items():
        if attr not in ("id", "function", "subFunction", "technique", "phIncidentCategory"):
            item.note(f"Rule@{attr}", f"attribute {attr}={value!r} has no field in our rule format")
    if incident is not None:
        for child in incident:
            if child.tag != "ArgList":
                item.note(f"IncidentDef/{child.tag}", "element we do not know")
    item.header = f"Imported from FortiSIEM XML {Path(source).name} (rule {position}). Review the notes the importer printed."
    return item


def convert_file(path: Path) -> list[Imported]:
    """Every ``Rule`` of an export (a ``Rules`` document or a single ``Rule``).

    Raises:
        RuleImportError: the file is unreadable, too large, not XML, or holds no Rule element.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuleImportError(f"{path}: cannot read ({exc.strerror})") from None
    root = _parse_xml(data, str(path))
    rules = [root] if root.tag == "Rule" else root.findall(".//Rule")
    if not rules:
        raise RuleImportError(f"{path}: no <Rule> element (root is <{root.tag}>)")
    return [convert_rule(el, str(path), i + 1) for i, el in enumerate(rules)]
