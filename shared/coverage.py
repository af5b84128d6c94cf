"""ATT&CK coverage of the enabled rules: a text listing and a MITRE ATT&CK Navigator layer.

The layer follows the Navigator's layer format 4.5 (``versions.layer``): one ``techniques`` entry
per technique id named by an enabled rule, its score the number of rules, its comment their ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .rules import Rule

LAYER_VERSIONS = {"attack": "17", "navigator": "5.1.0", "layer": "4.5"}


def covered(rules: Iterable[Rule]) -> tuple[dict[str, tuple[str, list[str]]], dict[str, tuple[str, list[str]]]]:
    """(techniques, tactics): id -> (name, ids of the enabled rules naming it), sorted by id."""
    techniques: dict[str, tuple[str, list[str]]] = {}
    tactics: dict[str, tuple[str, list[str]]] = {}
    for rule in rules:
        if not rule.model.enabled:
            continue
        for target, refs in ((techniques, rule.model.techniques), (tactics, rule.model.tactics)):
            for ref in refs:
                _, ids = target.setdefault(ref.id, (ref.name, []))
                if rule.id not in ids:
                    ids.append(rule.id)
    return dict(sorted(techniques.items())), dict(sorted(tactics.items()))


def navigator_layer(rules: Iterable[Rule], name: str = "defender-correlator rules") -> dict[str, Any]:
    techniques, _ = covered(rules)
    top = max((len(ids) for _, ids in techniques.values()), default=1)
    return {
        "name": name,
        "versions": dict(LAYER_VERSIONS),
        "domain": "enterprise-attack",
        "description": "Techniques named by the enabled rules (score: number of rules).",
        "sorting": 3,
        "hideDisabled": False,
        "techniques": [
            {
                "techniqueID": tid,
                "score": len(ids),
                "comment": ", ".join(ids),
                "enabled": True,
                "showSubtechniques": True,
                "metadata": [{"name": "rule", "value": rid} for rid in ids],
            }
            for tid, (_, ids) in techniques.items()
        ],
        "gradient": {"colors": ["#d7f0ff", "#1f6fb2"], "minValue": 0, "maxValue": top},
        "legendItems": [],
        "showTacticRowBackground": False,
        "selectTechniquesAcrossTactics": True,
        "selectSubtechniquesWithParent": False,
    }


def coverage_lines(rules: list[Rule]) -> list[str]:
    techniques, tactics = covered(rules)
    enabled = sum(r.model.enabled for r in rules)
    lines = [f"{enabled} enabled rule(s): {len(tactics)} tactic(s), {len(techniques)} technique(s)", "tactics:"]
    lines += [f"  {tid} {name}: {', '.join(ids)}" for tid, (name, ids) in tactics.items()]
    lines.append("techniques:")
    lines += [f"  {tid} {name}: {', '.join(ids)}" for tid, (name, ids) in techniques.items()]
    return lines
