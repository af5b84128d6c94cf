"""Rule lint: valid rules that are probably wrong (``python -m shared validate`` warnings).

Checks (each a :class:`Warning` naming the file, the field and the reason):

* ``never-matches``: no event type the normalizer produces satisfies a subpattern's query;
  AlertEvidence rows reach only rules declaring ``alertEvidence: events``;
* ``evidence-only-attribute``: a query reads a column only AlertEvidence rows carry but the rule
  does not declare ``alertEvidence: events``, so it never sees those rows;
* ``unused-subpattern``: a subpattern that neither the ``pattern`` nor an incident attribute uses;

There is no group-by-tenant check: the engine appends the tenant to every group and correlation key
(``shared.engine.group_key``), so no rule can mix tenants whatever it groups by.

Works on the rule's data (``model_dump``), so fields added to the model later are seen as they come.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import RuleError, one_line
from .normalize import EVIDENCE_EVENT_TYPE, INCIDENT_EVENT_TYPE
from .query import Node, parse_query, partial_eval
from .rules import Rule, default_groups

# Event types the normalizer produces (README "Event types"); `<x>` parts are open-ended.
PRODUCED_PATTERNS = (
    re.compile(r"^M365Defender-Alert(-[A-Za-z0-9]+)?$"),
    re.compile(r"^MS-Defender-Endpoint-Alert(-[A-Za-z0-9]+)?$"),
    re.compile(r"^Microsoft-WinDefATP-Alert(-[A-Za-z0-9]+)?$"),
    re.compile(r"^MS-Defender-[A-Za-z]+$"),
)
ALERT_CATEGORIES = (
    "InitialAccess",
    "Execution",
    "Persistence",
    "PrivilegeEscalation",
    "DefenseEvasion",
    "CredentialAccess",
    "Discovery",
    "LateralMovement",
    "Collection",
    "CommandAndControl",
    "Exfiltration",
    "Impact",
    "SuspiciousActivity",
    "Malware",
    "Ransomware",
    "UnwantedSoftware",
    "Exploit",
)
STREAMING_TABLES = (
    "DeviceProcessEvents",
    "DeviceNetworkEvents",
    "DeviceFileEvents",
    "DeviceRegistryEvents",
    "DeviceLogonEvents",
    "DeviceImageLoadEvents",
    "DeviceEvents",
    "DeviceInfo",
    "DeviceNetworkInfo",
    "DeviceFileCertificateInfo",
    "EmailEvents",
    "EmailAttachmentInfo",
    "EmailUrlInfo",
    "EmailPostDeliveryEvents",
    "IdentityLogonEvents",
    "IdentityQueryEvents",
    "IdentityDirectoryEvents",
    "CloudAppEvents",
    "UrlClickEvents",
    "BehaviorInfo",
    "BehaviorEntities",
)
SAMPLE_EVENT_TYPES = tuple(
    [f"{prefix}{suffix}" for prefix in ("M365Defender-Alert", "MS-Defender-Endpoint-Alert", "Microsoft-WinDefATP-Alert")
     for suffix in ("", *(f"-{c}" for c in ALERT_CATEGORIES))]
    + [f"MS-Defender-{t}" for t in STREAMING_TABLES]
    + [INCIDENT_EVENT_TYPE]  # Graph security/incidents (GRAPH_RESOURCES)
)  # fmt: skip
EVIDENCE_ONLY_ATTRS = ("EntityType", "EvidenceRole", "EvidenceDirection")


@dataclass(frozen=True)
class Warning:
    file: str
    field: str
    code: str
    message: str

    def __str__(self) -> str:
        return one_line(f"{self.file}: {self.field}: warning [{self.code}]: {self.message}")


def produced(event_type: str) -> bool:
    return any(p.match(event_type) for p in PRODUCED_PATTERNS)


def _event_type_literals(node: Node) -> list[str]:
    """String values the query compares eventType with (positive and negative)."""
    children = getattr(node, "children", None)
    if children is not None:
        return [v for c in children for v in _event_type_literals(c)]
    child = getattr(node, "child", None)
    if child is not None:
        return _event_type_literals(child)
    if getattr(node, "attr", None) != "eventType":
        return []
    values = (*(getattr(node, "values", None) or (getattr(node, "value", None),)), *getattr(node, "members", ()))
    return [v for v in values if isinstance(v, str)]


def matching_event_types(tree: Node, rule_ids: Iterable[str] = (), evidence: bool = False) -> list[str]:
    """Produced event types (samples, the query's own literals, other rules' ids) the query may accept.

    ``rule_ids``: the ids of the other loaded rules, whose incidents are fed back as events of that
    type (rule chaining, :mod:`shared.chaining`). ``evidence``: the rule declares
    ``alertEvidence: events`` (AlertEvidence rows reach it).
    """
    names_evidence = evidence
    candidates = list(SAMPLE_EVENT_TYPES) + [v for v in _event_type_literals(tree) if produced(v)] + list(rule_ids)
    if names_evidence:
        candidates.append(EVIDENCE_EVENT_TYPE)
    seen = dict.fromkeys(c for c in candidates if c != EVIDENCE_EVENT_TYPE or names_evidence)
    return [c for c in seen if partial_eval(tree, {"eventType": c}) is not False]


def _attrs(node: Node) -> set[str]:
    children = getattr(node, "children", None)
    if children is not None:
        return {a for c in children for a in _attrs(c)}
    child = getattr(node, "child", None)
    if child is not None:
        return _attrs(child)
    return {str(getattr(node, "attr", ""))}


def _subpatterns(data: dict[str, Any]) -> list[dict[str, Any]]:
    subs = data.get("subpatterns") or []
    return [s for s in subs if isinstance(s, dict)]


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text or ""))


def lint_rule(rule: Rule, rule_ids: Iterable[str] = ()) -> list[Warning]:
    return lint_data(rule.model.model_dump(by_alias=True), rule.path, rule_ids)


def lint_data(data: dict[str, Any], path: str, rule_ids: Iterable[str] = ()) -> list[Warning]:
    """Lint a rule's data (the model dumped with its aliases, or a rule file's mapping).

    ``rule_ids``: ids of the other loaded rules (their incidents are events a query may consume).
    """
    others = [i for i in rule_ids if i != data.get("id")]
    warnings: list[Warning] = []
    subs = _subpatterns(data)
    for index, sub in enumerate(subs):
        where = f"subpatterns[{index}].query"
        try:
            tree = parse_query(str(sub.get("query", "")), default_groups())
        except RuleError:
            continue  # a load error already
        evidence = data.get("alertEvidence") == "events"
        types = matching_event_types(tree, others, evidence)
        if not types:
            named = sorted(set(_event_type_literals(tree)))
            hint = f" (it names {', '.join(repr(n) for n in named)})" if named else ""
            warnings.append(
                Warning(
                    path,
                    where,
                    "never-matches",
                    f"no event type the normalizer produces can match this query{hint}; produced types are "
                    "M365Defender-Alert-<Category>, MS-Defender-Endpoint-Alert-<Category>, "
                    "Microsoft-WinDefATP-Alert-<Category>, M365Defender-Incident (Graph incidents), "
                    "MS-Defender-Endpoint-AlertEvidence (only for rules "
                    "declaring alertEvidence: events), MS-Defender-<Table> and the ids of the other loaded rules "
                    "(chained incidents)",
                )
            )
        evidence_attrs = sorted(a for a in _attrs(tree) if a in EVIDENCE_ONLY_ATTRS)
        if evidence_attrs and not evidence:
            warnings.append(
                Warning(
                    path,
                    where,
                    "evidence-only-attribute",
                    f"{', '.join(evidence_attrs)} exist only on AlertEvidence rows, which reach only rules declaring "
                    "'alertEvidence: events' (and a query that accepts eventType MS-Defender-Endpoint-AlertEvidence)",
                )
            )
    if len(subs) > 1:
        used = _names_in(str(data.get("pattern") or ""))
        used |= {str(v).split(".", 1)[0].strip() for v in (data.get("incidentAttributes") or {}).values()}
        for index, sub in enumerate(subs):
            if sub.get("name") not in used:
                warnings.append(
                    Warning(
                        path,
                        f"subpatterns[{index}]",
                        "unused-subpattern",
                        f"subpattern {sub.get('name')!r} is used neither by 'pattern' nor by an incident attribute",
                    )
                )
    return warnings


def lint_rules(rules: list[Rule]) -> list[Warning]:
    """Lint every rule; a query may consume the incidents of any other enabled rule (rule chaining)."""
    ids = [r.id for r in rules if r.model.enabled]
    return [w for rule in rules for w in lint_rule(rule, ids)]
