"""Sigma detection and correlation rules to our rule YAML, parsed with pySigma.

Detection rules of the Windows log sources that Defender's streaming export carries become single-
subpattern rules over the matching ``MS-Defender-<Table>`` event type, with Sigma's field names mapped
to the table's columns (:data:`LOGSOURCES`). Correlation rules: ``event_count`` and ``value_count``
become one subpattern with ``COUNT(*)`` / ``COUNT(DISTINCT field)``; ``temporal`` and
``temporal_ordered`` become one subpattern per referenced rule joined by ``AND`` / ``FOLLOWED_BY``
with the group-by fields equal across subpatterns. What cannot be expressed (a modifier, a field
with no column, a log source Defender does not stream) is reported as a note naming the rule, the
detection item (``selection.Field|modifier``) and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RuleError, RuleImportError
from ..rules import read_text_file
from .common import Imported, mitre_ref, rule_id, tactic

DEFAULT_WINDOW_S = 300
LEVEL_SEVERITY = {"informational": 1, "low": 3, "medium": 5, "high": 7, "critical": 9}


@dataclass(frozen=True)
class LogSource:
    event_type: str
    fields: dict[str, str]


_INITIATING = {
    "Image": "InitiatingProcessFolderPath",
    "CommandLine": "InitiatingProcessCommandLine",
    "User": "InitiatingProcessAccountName",
    "ProcessId": "InitiatingProcessId",
    "IntegrityLevel": "InitiatingProcessIntegrityLevel",
    "Computer": "DeviceName",
    "ComputerName": "DeviceName",
}
# Sigma Windows taxonomy -> Defender XDR streaming tables (columns as in the Advanced Hunting schema).
LOGSOURCES: dict[str, LogSource] = {
    "process_creation": LogSource(
        "MS-Defender-DeviceProcessEvents",
        {
            "Image": "FolderPath",
            "OriginalFileName": "ProcessVersionInfoOriginalFileName",
            "CommandLine": "ProcessCommandLine",
            "ParentImage": "InitiatingProcessFolderPath",
            "ParentCommandLine": "InitiatingProcessCommandLine",
            "User": "AccountName",
            "IntegrityLevel": "ProcessIntegrityLevel",
            "Company": "ProcessVersionInfoCompanyName",
            "Product": "ProcessVersionInfoProductName",
            "Description": "ProcessVersionInfoFileDescription",
            "ProcessId": "ProcessId",
            "ParentProcessId": "InitiatingProcessId",
            "LogonId": "LogonId",
            "sha1": "SHA1",
            "sha256": "SHA256",
            "md5": "MD5",
            "Computer": "DeviceName",
            "ComputerName": "DeviceName",
        },
    ),
    "network_connection": LogSource(
        "MS-Defender-DeviceNetworkEvents",
        {
            **_INITIATING,
            "DestinationIp": "RemoteIP",
            "DestinationPort": "RemotePort",
            "DestinationHostname": "RemoteUrl",
            "SourceIp": "LocalIP",
            "SourcePort": "LocalPort",
            "Protocol": "Protocol",
            "ParentImage": "InitiatingProcessParentFileName",
        },
    ),
    "file_event": LogSource(
        "MS-Defender-DeviceFileEvents",
        {**_INITIATING, "TargetFilename": "FolderPath", "ParentImage": "InitiatingProcessParentFileName"},
    ),
    "image_load": LogSource("MS-Defender-DeviceImageLoadEvents", {**_INITIATING, "ImageLoaded": "FolderPath"}),
    "registry_set": LogSource(
        "MS-Defender-DeviceRegistryEvents", {**_INITIATING, "TargetObject": "RegistryKey", "Details": "RegistryValueData"}
    ),
}
for _alias, _target in (("file_change", "file_event"), ("registry_event", "registry_set"), ("registry_add", "registry_set")):
    LOGSOURCES[_alias] = LOGSOURCES[_target]

# Modifiers our query language cannot express, and why.
UNSUPPORTED_MODIFIERS = {
    "cased": "string comparisons are case-insensitive in our query language",
    "fieldref": "our query language compares a field with literals, not with another field of the same event",
    "expand": "placeholders need values from a pipeline; our rules hold literals",
    "minute": "timestamp parts cannot be compared",
    "hour": "timestamp parts cannot be compared",
    "day": "timestamp parts cannot be compared",
    "week": "timestamp parts cannot be compared",
    "month": "timestamp parts cannot be compared",
    "year": "timestamp parts cannot be compared",
}


class _Unsupported(Exception):
    """One detection item cannot be expressed (the caller records the note)."""


def _sigma() -> Any:
    try:
        import sigma.collection
    except ImportError as exc:  # pragma: no cover - dev requirement
        raise RuleImportError("the Sigma importer needs pySigma (Python >= 3.11): pip install -r requirements-dev.txt") from exc
    import sigma

    return sigma


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _regex_literal(pattern: str) -> str:
    """REGEXP text: only the quote is escaped (backslashes stay regex escapes)."""
    return '"' + pattern.replace('"', '\\"') + '"'


class _Converter:
    """Turns one pySigma condition tree into our query text over one Defender table."""

    def __init__(self, item: Imported, source: LogSource | None, mod_names: dict[type, str], detections: dict[str, Any]) -> None:
        self.item = item
        self.detections = detections
        self.source = source
        self.mod_names = mod_names

    def field(self, name: str | None, where: str) -> str:
        if name is None:
            raise _Unsupported(f"{where}: keyword search (no field): Defender rows have no raw message to search")
        if self.source is None:
            return name
        mapped = self.source.fields.get(name)
        if mapped is None:
            raise _Unsupported(f"{where}: field {name!r} has no column in {self.source.event_type}")
        return mapped

    def value(self, attr: str, value: Any, where: str) -> str:
        from sigma import types as st

        if isinstance(value, st.SigmaCasedString):
            raise _Unsupported(f"{where}: modifier 'cased': {UNSUPPORTED_MODIFIERS['cased']}")
        if isinstance(value, st.SigmaExpansion):
            return "(" + " OR ".join(self.value(attr, v, where) for v in value.values) + ")"
        if isinstance(value, st.SigmaString):
            if value.contains_placeholder():
                raise _Unsupported(f"{where}: placeholder: {UNSUPPORTED_MODIFIERS['expand']}")
            if not value.contains_special():
                return f"{attr} = {_quote(str(value))}"
            parts = list(value.s)
            inner = parts[1:-1] if len(parts) >= 3 else []
            if (
                len(parts) == 3
                and parts[0] == st.SpecialChars.WILDCARD_MULTI
                and parts[-1] == st.SpecialChars.WILDCARD_MULTI
                and all(isinstance(p, str) for p in inner)
            ):
                return f"{attr} CONTAIN {_quote(str(inner[0]))}"
            pattern = "".join(
                re.escape(p) if isinstance(p, str) else (".*" if p == st.SpecialChars.WILDCARD_MULTI else ".") for p in parts
            )
            pattern = ("^" + pattern if not pattern.startswith(".*") else pattern[2:]) + (
                "$" if not pattern.endswith(".*") else ""
            )
            if pattern.endswith(".*"):
                pattern = pattern[:-2]
            return f"{attr} REGEXP {_regex_literal(pattern)}"
        if isinstance(value, st.SigmaNumber):
            return f"{attr} = {value.number}"
        if isinstance(value, st.SigmaBool):
            return f"{attr} = {_quote(str(value.boolean).lower())}"
        if isinstance(value, st.SigmaNull):
            return f"{attr} IS NULL"
        if isinstance(value, st.SigmaExists):
            return f"{attr} IS {'NOT ' if value.exists else ''}NULL"
        if isinstance(value, st.SigmaRegularExpression):
            flags = {f.name for f in (value.flags or set())}
            if "IGNORECASE" not in flags:
                self.item.note(
                    where, "'re' is case-sensitive in Sigma; our REGEXP is case-insensitive (may match more)", "warning"
                )
            return f"{attr} REGEXP {_regex_literal(str(value.regexp))}"
        if isinstance(value, st.SigmaCompareExpression):
            ops = {"LT": "<", "LTE": "<=", "GT": ">", "GTE": ">="}
            return f"{attr} {ops[value.op.name]} {value.number.number}"
        if isinstance(value, st.SigmaCIDRExpression):
            net = ipaddress.ip_network(str(value.network), strict=False)
            if net.version != 4:
                raise _Unsupported(f"{where}: modifier 'cidr' with an IPv6 network: BETWEEN compares IPv4 addresses only")
            return f"{attr} BETWEEN ({net.network_address}, {net.broadcast_address})"
        if isinstance(value, st.SigmaFieldReference):
            raise _Unsupported(f"{where}: modifier 'fieldref': {UNSUPPORTED_MODIFIERS['fieldref']}")
        if isinstance(value, st.SigmaTimestampPart):  # pragma: no cover - a SigmaNumber subclass, caught above
            raise _Unsupported(f"{where}: timestamp part")
        raise _Unsupported(f"{where}: value of type {type(value).__name__} has no counterpart")

    def node(self, node: Any) -> str:
        from sigma import conditions as sc

        if isinstance(node, (sc.ConditionAND, sc.ConditionOR)):
            joiner = " AND " if isinstance(node, sc.ConditionAND) else " OR "
            return "(" + joiner.join(self.node(a) for a in node.args) + ")"
        if isinstance(node, sc.ConditionNOT):
            return "NOT (" + self.node(node.args[0]) + ")"
        if isinstance(node, sc.ConditionFieldEqualsValueExpression):
            where = self.where(node)
            return self.value(self.field(node.field, where), node.value, where)
        if isinstance(node, sc.ConditionValueExpression):
            raise _Unsupported(f"{self.where(node)}: keyword search (no field): Defender rows have no raw message to search")
        raise _Unsupported(f"condition element {type(node).__name__} has no counterpart")

    def where(self, node: Any) -> str:
        """``detection.<selection>.<field>|<modifiers>`` of a condition leaf, for notes."""
        from sigma.rule import SigmaDetection, SigmaDetectionItem

        item, parent, selection = None, node.parent, None
        while parent is not None:
            if item is None and isinstance(parent, SigmaDetectionItem):
                item = parent
            if getattr(parent, "identifier", None):
                selection = parent.identifier
                break
            parent = getattr(parent, "parent", None)
        field = getattr(node, "field", None)
        if item is None and selection in self.detections:

            def find(det: Any) -> Any:
                for entry in det.detection_items:
                    found = find(entry) if isinstance(entry, SigmaDetection) else entry if entry.field == field else None
                    if found is not None:
                        return found
                return None

            item = find(self.detections[selection])
        mods = "".join(f"|{self.mod_names.get(m, m.__name__)}" for m in (item.modifiers if item else ()))
        return f"detection.{selection or '?'}.{field or '(keywords)'}{mods}"


def _modifier_names() -> dict[type, str]:
    from sigma.modifiers import modifier_mapping

    return {cls: name for name, cls in modifier_mapping.items()}


def _unsupported_modifiers(rule: Any, item: Imported, mod_names: dict[type, str]) -> bool:
    """Notes for every modifier we cannot express; True if there was one."""
    from sigma.rule import SigmaDetection, SigmaDetectionItem

    found = False

    def walk(name: str, det: Any) -> None:
        nonlocal found
        for entry in det.detection_items:
            if isinstance(entry, SigmaDetection):
                walk(name, entry)
            elif isinstance(entry, SigmaDetectionItem):
                for mod in entry.modifiers:
                    mod_name = mod_names.get(mod, mod.__name__)
                    if mod_name in UNSUPPORTED_MODIFIERS:
                        found = True
                        where = f"detection.{name}.{entry.field or '(keywords)'}|{mod_name}"
                        item.note(where, f"modifier {mod_name!r}: {UNSUPPORTED_MODIFIERS[mod_name]}", "unsupported")

    for name, det in rule.detection.detections.items():
        walk(name, det)
    return found


def _meta(item: Imported, rule: Any, fallback_id: str) -> None:
    data = item.data
    data["id"] = rule_id(f"SIGMA_{rule.name or fallback_id or rule.title}")
    data["name"] = rule.title
    data["description"] = (rule.description or "").strip()
    data["enabled"] = str(getattr(rule.status, "name", rule.status or "")).lower() not in ("deprecated", "unsupported")
    level = str(getattr(rule.level, "name", rule.level or "")).lower()
    data["severity"] = LEVEL_SEVERITY.get(level, 5)
    if level not in LEVEL_SEVERITY:
        item.reconstructed("severity", f"Sigma level {level or 'missing'!r}; 5 used")
    data["category"] = "Security"
    tactics, techniques = [], []
    for tag in rule.tags or []:
        if tag.namespace != "attack":
            continue
        if re.fullmatch(r"t\d{4}(\.\d{3})?", tag.name):
            techniques.append(mitre_ref(tag.name.upper()))
        elif tactic(tag.name):
            found = tactic(tag.name)
            assert found is not None
            tactics.append(mitre_ref(*found))
        else:
            item.note(f"tags.attack.{tag.name}", "not a MITRE ATT&CK Enterprise tactic or technique id we know")
    data["tactics"], data["techniques"] = tactics, techniques
    if techniques:
        item.reconstructed("techniques", "Sigma tags carry technique ids only; names are the ids")
    data["detection"] = "Sigma"
    falsepositives = [str(f) for f in (rule.falsepositives or [])]
    data["remediation"] = ("False positives: " + "; ".join(falsepositives)) if falsepositives else ""


def _source(rule: Any) -> LogSource | None:
    ls = rule.logsource
    if ls.product not in (None, "windows"):
        return None
    return LOGSOURCES.get(ls.category or "")


def _query(item: Imported, rule: Any, mod_names: dict[type, str]) -> tuple[str, LogSource] | None:
    source = _source(rule)
    if source is None:
        ls = rule.logsource
        item.note(
            "logsource",
            f"category {ls.category!r} product {ls.product!r} service {ls.service!r}: not a Windows log source "
            f"Defender streams (supported: {', '.join(sorted(LOGSOURCES))})",
            "unsupported",
        )
        return None
    if _unsupported_modifiers(rule, item, mod_names):
        return None
    converter = _Converter(item, source, mod_names, rule.detection.detections)
    parts = []
    try:
        for condition in rule.detection.parsed_condition:
            parts.append(converter.node(condition.parsed))
    except _Unsupported as exc:
        where, _, reason = str(exc).partition(": ")
        item.note(where, reason, "unsupported")
        return None
    body = parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
    return f'eventType = "{source.event_type}" AND {body}', source


def _detection(rule: Any, source_name: str, stem: str, mod_names: dict[type, str]) -> Imported:
    item = Imported(source_name, {})
    _meta(item, rule, stem)
    converted = _query(item, rule, mod_names)
    if converted is None:
        return item
    query, _ = converted
    item.data["timeWindow"] = DEFAULT_WINDOW_S
    item.data["subpatterns"] = [
        {"name": "sigma", "query": query, "groupBy": ["tenantId", "hostName"], "aggregateConstraint": "COUNT(*) >= 1"}
    ]
    item.data["incidentAttributes"] = {"tenantId": "sigma.tenantId", "hostName": "sigma.hostName", "eventCount": "sigma.COUNT(*)"}
    item.reconstructed("subpatterns[0].groupBy", "a Sigma detection rule matches single events; one incident per tenant and host")
    item.reconstructed("timeWindow", f"Sigma detection rules have no window; {DEFAULT_WINDOW_S} s")
    _finish(item, rule)
    return item


def _finish(item: Imported, rule: Any) -> None:
    sigma_id = str(rule.id) if rule.id else None
    item.data["source"] = {
        "origin": "sigma",
        **({"url": f"urn:uuid:{sigma_id}"} if sigma_id else {}),
        **item.data.get("source", {}),
    }
    refs = [str(r) for r in (rule.references or [])][:3]
    item.header = f"Converted from Sigma rule {rule.title!r} ({sigma_id or 'no id'}) by python -m shared import sigma." + (
        "\nReferences: " + ", ".join(refs) if refs else ""
    )
    if rule.author:
        item.header += f"\nSigma author: {rule.author}"
    if rule.license:
        item.header += f"\nLicence: {rule.license}"


def _field_for(source: LogSource | None, name: str) -> str | None:
    if name.lower() in ("tenantid",):
        return "tenantId"
    return source.fields.get(name) if source else None


def _correlation(corr: Any, source_name: str, stem: str, mod_names: dict[type, str]) -> Imported:
    from sigma.correlations import SigmaCorrelationType as T

    item = Imported(source_name, {})
    _meta(item, corr, stem)
    kind = corr.type
    window = int(corr.timespan.seconds)
    item.data["timeWindow"] = window
    refs = [r.rule for r in (corr.rules or [])]
    if kind not in (T.EVENT_COUNT, T.VALUE_COUNT, T.TEMPORAL, T.TEMPORAL_ORDERED, T.VALUE_SUM, T.VALUE_AVG):
        item.note(
            "type",
            f"correlation type {kind.name.lower()!r}: only event_count, value_count, value_sum, value_avg, "
            "temporal and temporal_ordered",
            "unsupported",
        )
        return item
    subs: list[dict[str, Any]] = []
    names = []
    for index, ref in enumerate(refs):
        words = re.findall(r"[A-Za-z0-9]+", ref.name or ref.title or "")[:3]
        name = "_".join(w.lower() for w in words) or f"rule{index + 1}"
        name = name if re.match(r"[A-Za-z_]", name) else f"r_{name}"
        name = name if name not in names else f"{name}_{index + 1}"
        converted = _query(item, ref, mod_names)
        if converted is None:
            item.note(f"rules[{index}]", f"referenced rule {ref.title!r} cannot be converted (see its notes)", "unsupported")
            return item
        query, source = converted
        group_by = ["tenantId"]
        for field in corr.group_by or []:
            alias = corr.aliases.aliases.get(field) if corr.aliases else None
            sigma_field = alias.mapping.get(ref.name) or alias.mapping.get(str(ref.id)) if alias else field
            mapped = _field_for(source, str(sigma_field)) if sigma_field else None
            if mapped is None:
                item.note(f"group-by.{field}", f"field {sigma_field!r} has no column in {source.event_type}", "unsupported")
                return item
            if mapped not in group_by:
                group_by.append(mapped)
        subs.append(
            {"name": name, "query": query, "groupBy": group_by, "aggregateConstraint": "COUNT(*) >= 1", "_source": source}
        )
        names.append(name)
    cond = corr.condition
    op = {"GT": ">", "GTE": ">=", "LT": "<", "LTE": "<=", "EQ": "=", "NEQ": "!="}.get(cond.op.name, ">=")
    if kind in (T.EVENT_COUNT, T.VALUE_COUNT, T.VALUE_SUM, T.VALUE_AVG):
        if len(subs) > 1:
            query = "(" + " OR ".join(s["query"] for s in subs) + ")"
            subs = [{**subs[0], "name": "sigma", "query": query}]
            item.reconstructed("subpatterns[0].query", "several referenced rules count together: their queries OR-ed")
        else:
            subs[0]["name"] = "sigma"
        if kind == T.EVENT_COUNT:
            agg = "COUNT(*)"
        else:
            fieldref = cond.fieldref if isinstance(cond.fieldref, str) else (cond.fieldref or [None])[0]
            mapped = _field_for(subs[0]["_source"], str(fieldref)) if fieldref else None
            if mapped is None:
                item.note(
                    "condition.field", f"field {fieldref!r} has no column in {subs[0]['_source'].event_type}", "unsupported"
                )
                return item
            agg = {T.VALUE_COUNT: "COUNT(DISTINCT {})", T.VALUE_SUM: "SUM({})", T.VALUE_AVG: "AVG({})"}[kind].format(mapped)
        subs[0]["aggregateConstraint"] = f"{agg} {op} {cond.count:g}"
        attrs = {g: f"sigma.{g}" for g in subs[0]["groupBy"]}
        attrs["eventCount"] = "sigma.COUNT(*)"
        if agg != "COUNT(*)":
            attrs["value"] = f"sigma.{agg}"
    else:
        if op != ">=" or cond.count not in (1, len(subs)):  # 1: no condition given (all rules)
            item.note(
                "condition",
                f"temporal condition '{op} {cond.count:g}' (rules that must match): all {len(subs)} are required here",
            )
        joiner = " FOLLOWED_BY " if kind == T.TEMPORAL_ORDERED else " AND "
        item.data["pattern"] = joiner.join(names)
        pairs = [f"{names[0]}.{g} = {n}.{g}" for n in names[1:] for g in subs[0]["groupBy"] if g in subs[-1]["groupBy"]]
        if pairs:
            item.data["correlation"] = " AND ".join(pairs)
        attrs = {g: f"{names[0]}.{g}" for g in subs[0]["groupBy"]}
        attrs.update({f"{n}Count": f"{n}.COUNT(*)" for n in names})
    for sub in subs:
        sub.pop("_source", None)
    item.data["subpatterns"] = subs
    item.data["incidentAttributes"] = attrs
    _finish(item, corr)
    return item


def convert_collection(paths: Iterable[Path]) -> list[Imported]:
    """Every rule of the given files; correlation rules resolve their references across all files.

    Raises:
        RuleImportError: a file is unreadable or not valid Sigma (pySigma's message, located).
    """
    sigma = _sigma()
    from sigma.correlations import SigmaCorrelationRule

    collections = []
    origin: dict[int, str] = {}
    for path in paths:
        try:
            text = read_text_file(path)  # a regular file of at most 1 MiB: PyYAML reads about 1 MB/s
        except RuleError as exc:
            raise RuleImportError(str(exc)) from None
        try:
            collection = sigma.collection.SigmaCollection.from_yaml(text, resolve_references=False)
        except Exception as exc:  # pySigma's SigmaError family and YAML errors
            raise RuleImportError(f"{path}: not a valid Sigma rule ({exc})") from None
        for rule in collection.rules:
            origin[id(rule)] = str(path)
        collections.append(collection)
    try:
        merged = sigma.collection.SigmaCollection.merge(collections)
    except Exception as exc:
        raise RuleImportError(f"cannot resolve the rules a correlation names ({exc})") from None
    mod_names = _modifier_names()
    referenced = {
        id(ref.rule)
        for rule in merged.rules
        if isinstance(rule, SigmaCorrelationRule) and not rule.generate
        for ref in (rule.rules or [])
    }
    out = []
    per_file: dict[str, int] = {}
    for rule in merged.rules:
        per_file[origin.get(id(rule), "")] = per_file.get(origin.get(id(rule), ""), 0) + 1
    for rule in merged.rules:
        source_name = origin.get(id(rule), "<sigma>")
        stem = Path(source_name).stem if per_file.get(source_name) == 1 else ""  # else the title names it
        if isinstance(rule, SigmaCorrelationRule):
            out.append(_correlation(rule, source_name, stem, mod_names))
        elif id(rule) not in referenced:
            out.append(_detection(rule, source_name, stem, mod_names))
    return out


def convert_sigma_file(path: Path) -> list[Imported]:
    return convert_collection([path])
