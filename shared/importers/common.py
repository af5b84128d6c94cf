"""What importers share: notes about what could not be carried over, and writing checked rule YAML."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RuleError, one_line
from ..lint import lint_rule
from ..rules import MAX_RULE_FILE_BYTES, parse_rule_text
from ..schema import MODELINE_PREFIX, default_schema_path

# MITRE ATT&CK Enterprise tactics (id, name, Sigma tag / short name).
TACTICS = (
    ("TA0043", "Reconnaissance", "reconnaissance"),
    ("TA0042", "Resource Development", "resource_development"),
    ("TA0001", "Initial Access", "initial_access"),
    ("TA0002", "Execution", "execution"),
    ("TA0003", "Persistence", "persistence"),
    ("TA0004", "Privilege Escalation", "privilege_escalation"),
    ("TA0005", "Defense Evasion", "defense_evasion"),
    ("TA0006", "Credential Access", "credential_access"),
    ("TA0007", "Discovery", "discovery"),
    ("TA0008", "Lateral Movement", "lateral_movement"),
    ("TA0009", "Collection", "collection"),
    ("TA0011", "Command and Control", "command_and_control"),
    ("TA0010", "Exfiltration", "exfiltration"),
    ("TA0040", "Impact", "impact"),
)
MAX_NOTE_CHARS = 500  # a note quoting a value of the export quotes at most this much of it
_TACTIC_KEYS = {k.lower().replace(" ", "").replace("_", ""): (i, n) for i, n, s in TACTICS for k in (i, n, s)}


def tactic(text: str) -> tuple[str, str] | None:
    """(id, name) of a tactic given its id, name or Sigma tag, in any case."""
    return _TACTIC_KEYS.get(text.strip().lower().replace(" ", "").replace("_", "").replace("-", ""))


def mitre_ref(ref_id: str, name: str | None = None) -> dict[str, str]:
    path = ref_id.replace(".", "/")
    kind = "tactics" if ref_id.startswith("TA") else "techniques"
    return {"id": ref_id, "name": name or ref_id, "url": f"https://attack.mitre.org/{kind}/{path}"}


def rule_id(text: str) -> str:
    """A rule id ([A-Za-z0-9_], at most 200 characters) made from any text."""
    cleaned = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    return (cleaned or "imported_rule")[:200]


@dataclass(frozen=True)
class Note:
    """Something an importer could not carry over, or guessed: which file, rule, element and why."""

    source: str
    rule: str
    element: str
    reason: str
    kind: str = "not carried over"  # | "reconstructed" | "unsupported" | "invalid" | "warning"

    def __str__(self) -> str:
        reason = self.reason if len(self.reason) <= MAX_NOTE_CHARS else self.reason[:MAX_NOTE_CHARS] + "..."
        return one_line(f"{self.source}: rule {self.rule}: {self.element}: {self.kind}: {reason}")


@dataclass
class Imported:
    """One converted rule (data in our YAML shape) and the notes about it."""

    source: str
    data: dict[str, Any]
    notes: list[Note] = field(default_factory=list)
    header: str = ""
    schema_ref: str = "../schema/rule.schema.json"

    @property
    def rule(self) -> str:
        return str(self.data.get("id", "?"))

    def note(self, element: str, reason: str, kind: str = "not carried over") -> None:
        self.notes.append(Note(self.source, self.rule, element, reason, kind))

    def reconstructed(self, field_path: str, note: str) -> None:
        """A guessed value: listed under ``source.reconstructed`` in the file and reported."""
        self.data.setdefault("source", {}).setdefault("reconstructed", []).append({"field": field_path, "note": note})
        self.note(field_path, note, "reconstructed")

    def text(self) -> str:
        tail = ("source", "tests")  # provenance and tests last, as in the shipped rules
        ordered = {k: v for k, v in self.data.items() if k not in tail}
        ordered.update({k: self.data[k] for k in tail if k in self.data})
        body = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=110)
        lines = [f"{MODELINE_PREFIX}{self.schema_ref}"] + [f"# {line}" for line in self.header.splitlines() if line]
        return "\n".join(lines) + "\n" + body


@dataclass(frozen=True)
class Written:
    path: Path
    imported: Imported
    valid: bool  # the rule loads as the engine would load it
    written: bool  # False: the file existed and --force was not given


def check(item: Imported, path: str) -> bool:
    """Load the generated text as the engine would; errors and lint warnings become notes."""
    text = item.text()
    if len(text.encode("utf-8")) > MAX_RULE_FILE_BYTES:
        item.note("rule", f"the imported rule does not load: larger than {MAX_RULE_FILE_BYTES} bytes", "invalid")
        return False
    try:
        rule = parse_rule_text(text, path)
    except RuleError as err:
        item.note(err.field or "rule", f"the imported rule does not load: {err.reason}", "invalid")
        return False
    for warning in lint_rule(rule):
        item.note(warning.field, warning.message, "warning")
    return True


def write_all(items: Iterable[Imported], out: Path, *, force: bool = False) -> list[Written]:
    """Write one file per rule (``<id>.yaml``); a file that exists is kept unless ``force``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Written] = []
    for item in items:
        path = out / f"{item.rule}.yaml"
        if not item.data.get("subpatterns"):
            item.note("rule", "nothing to match could be converted; no file written", "skipped")
            written.append(Written(path, item, False, False))
            continue
        size = len(json.dumps(item.data, ensure_ascii=False, default=str))  # cheap, before PyYAML's slow emitter
        if size > MAX_RULE_FILE_BYTES:
            item.note(
                "rule", f"about {size} bytes, over the {MAX_RULE_FILE_BYTES}-byte rule file limit; no file written", "invalid"
            )
            written.append(Written(path, item, False, False))
            continue
        item.schema_ref = os.path.relpath(default_schema_path(), out.resolve()).replace(os.sep, "/")
        valid = check(item, str(path))
        if path.exists() and not force:
            item.note("file", f"{path} exists (use --force to overwrite); not written", "skipped")
            written.append(Written(path, item, valid, False))
            continue
        path.write_text(item.text(), encoding="utf-8")
        written.append(Written(path, item, valid, True))
    return written
