"""Rules as data: the YAML rule file format, its pydantic model, and the compiled rule.

A rule file holds one FortiSIEM-style rule (every field of a FortiSIEM rule page) plus optional
test cases. ``load_rules`` loads a file or a folder, reports every bad file, and never returns a
half-loaded rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .aggregates import Aggregate, Constraint, needed_attrs, parse_aggregate
from .errors import RuleError, RuleSetError
from .query import Query
from .suggest import unknown_key_hint

DEFAULT_INCIDENT_LIFETIME_S = 24 * 3600  # FortiSIEM keeps an incident Active until cleared
MAX_RULE_FILE_BYTES = 1 << 20  # a rule file is configuration, not data
RULE_SUFFIXES = (".yaml", ".yml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class MitreRef(_Model):
    """A MITRE ATT&CK tactic or technique as shown on a FortiSIEM rule page."""

    id: str = Field(pattern=r"^(TA\d{4}|T\d{4}(\.\d{3})?)$")
    name: str
    url: str | None = None
    description: str | None = None


class SubpatternModel(_Model):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    query: str
    group_by: list[str] = Field(alias="groupBy", default_factory=list)
    constraint: str = Field(alias="aggregateConstraint")

    @field_validator("group_by")
    @classmethod
    def _unique_group_by(cls, value: list[str]) -> list[str]:
        if len({v.lower() for v in value}) != len(value):
            raise ValueError("group-by attributes repeat")
        return value


class Reconstructed(_Model):
    """A value that was not read from Fortinet's page (cut off or inferred), flagged for users."""

    field: str
    note: str


class RuleSource(_Model):
    origin: str  # e.g. "fortinet-catalogue", "user"
    url: str | None = None
    catalogue_version: str | None = Field(default=None, alias="catalogueVersion")
    reconstructed: list[Reconstructed] = Field(default_factory=list)


class TestEvent(_Model):
    """One event of a rule test timeline: normalized attributes or a raw Defender payload."""

    at: float = Field(ge=0, description="offset in seconds from the start of the timeline")
    event: dict[str, Any] | None = None
    raw: Any = None
    format: str = "auto"


class ExpectedIncidents(_Model):
    incidents: int = Field(ge=0, description="distinct incidents (incident ids) expected")
    attributes: list[dict[str, Any]] = Field(default_factory=list)
    revisions: int | None = Field(default=None, ge=0, description="snapshots expected, if checked")


class RuleTestCase(_Model):
    name: str
    description: str | None = None
    events: list[TestEvent]
    expect: ExpectedIncidents


class RuleModel(_Model):
    """Schema of a rule file (camelCase keys, as FortiSIEM names the fields)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=200)
    name: str
    description: str = ""
    enabled: bool = True
    severity: int = Field(ge=1, le=10)
    category: str
    tactics: list[MitreRef] = Field(default_factory=list)
    techniques: list[MitreRef] = Field(default_factory=list)
    impacts: list[str] = Field(default_factory=list)
    data_sources: list[str] = Field(alias="dataSources", default_factory=list)
    detection: str = "Correlation"
    remediation: str = ""
    time_window: int = Field(alias="timeWindow", gt=0, le=30 * 86400)
    incident_lifetime: int = Field(alias="incidentLifetime", default=DEFAULT_INCIDENT_LIFETIME_S, gt=0)
    subpatterns: list[SubpatternModel] = Field(min_length=1)
    incident_attributes: dict[str, str] = Field(alias="incidentAttributes")
    source: RuleSource | None = None
    tests: list[RuleTestCase] = Field(default_factory=list)


@dataclass(frozen=True)
class AttrMapping:
    """``incidentAttr = subpattern.attr`` (group-by value) or ``= subpattern.AGG(...)``."""

    incident_attr: str
    attr: str | None = None
    aggregate: Aggregate | None = None


@dataclass(frozen=True)
class Rule:
    """A loaded, validated and compiled rule (single subpattern)."""

    model: RuleModel
    path: str
    query: Query
    constraint: Constraint
    mappings: tuple[AttrMapping, ...]
    aggregates: tuple[Aggregate, ...] = field(default=())
    window_attrs: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def group_by(self) -> tuple[str, ...]:
        return tuple(self.model.subpatterns[0].group_by)

    @property
    def subpattern(self) -> str:
        return self.model.subpatterns[0].name

    @property
    def window_s(self) -> int:
        return self.model.time_window

    @property
    def lifetime_s(self) -> int:
        return self.model.incident_lifetime


def _loc_text(loc: Iterable[Union[int, str]]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def compile_rule(model: RuleModel, path: str = "<rule>") -> Rule:
    """Compile a validated model.

    Raises:
        RuleError: several subpatterns, a bad query or constraint, or a bad mapping.
    """
    if len(model.subpatterns) > 1:
        raise RuleError(
            f"{len(model.subpatterns)} subpatterns: rules with several subpatterns are not supported yet",
            file=path,
            field="subpatterns",
        )
    sub = model.subpatterns[0]
    try:
        query = Query.parse(sub.query)
    except RuleError as err:
        raise err.located(file=path, field="subpatterns[0].query") from None
    try:
        constraint = Constraint.parse(sub.constraint)
    except RuleError as err:
        raise err.located(file=path, field="subpatterns[0].aggregateConstraint") from None
    mappings = tuple(_compile_mapping(name, ref, sub, path) for name, ref in model.incident_attributes.items())
    aggregates = tuple(dict.fromkeys(list(constraint.aggregates) + [m.aggregate for m in mappings if m.aggregate]))
    return Rule(
        model=model,
        path=path,
        query=query,
        constraint=constraint,
        mappings=mappings,
        aggregates=aggregates,
        window_attrs=needed_attrs(aggregates),
    )


def _compile_mapping(name: str, ref: str, sub: SubpatternModel, path: str) -> AttrMapping:
    where = f"incidentAttributes.{name}"
    prefix, dot, rest = ref.strip().partition(".")
    if not dot or prefix != sub.name:
        raise RuleError(f"must be '{sub.name}.<attribute>' or '{sub.name}.<AGGREGATE>(...)'", file=path, field=where, text=ref)
    if "(" in rest:
        try:
            return AttrMapping(name, aggregate=parse_aggregate(rest))
        except RuleError as err:
            raise RuleError(err.reason, file=path, field=where, text=ref) from None
    group_by = {g.lower(): g for g in sub.group_by}
    if rest.lower() not in group_by:
        raise RuleError(
            f"attribute {rest!r} is neither a group-by attribute nor an aggregate "
            f"(group by: {', '.join(sub.group_by) or 'none'})",
            file=path,
            field=where,
            text=ref,
        )
    return AttrMapping(name, attr=group_by[rest.lower()])


def parse_rule_text(text: str, path: str = "<rule>") -> Rule:
    """Parse and compile one rule from YAML text.

    Raises:
        RuleError: the YAML, the schema, the query, the constraint or a mapping is invalid.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise RuleError(f"invalid YAML at {where}: {exc.problem}", file=path) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"invalid YAML: {exc}", file=path) from None
    if not isinstance(data, dict):
        raise RuleError("a rule file must hold a mapping of rule fields", file=path)
    try:
        model = RuleModel.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()  # an unknown key first: it often explains a "Field required" beside it
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        if first["type"] == "extra_forbidden":  # name the likely key instead of pydantic's wording
            first = {**first, "msg": unknown_key_hint(RuleModel, first["loc"])}
        bad = first.get("input")
        shown = None if isinstance(bad, (dict, list)) or bad is None else str(bad)[:120]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RuleError(first["msg"] + more, file=path, field=_loc_text(first["loc"]), text=shown) from None
    return compile_rule(model, path)


def load_rule_file(path: Path) -> Rule:
    """Raises: RuleError (also for an unreadable or oversized file)."""
    try:
        if path.stat().st_size > MAX_RULE_FILE_BYTES:
            raise RuleError(f"rule file larger than {MAX_RULE_FILE_BYTES} bytes", file=str(path))
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"cannot read rule file ({exc})", file=str(path)) from None
    return parse_rule_text(text, str(path))


def rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in RULE_SUFFIXES and p.is_file())
    return [path]


def load_rules(paths: Iterable[Path]) -> list[Rule]:
    """Load every rule file under ``paths`` (files or folders).

    Raises:
        RuleSetError: one or more files are invalid (all of them are listed), a path is missing,
            or two files share a rule id. Nothing is returned half-loaded.
    """
    rules: list[Rule] = []
    errors: list[RuleError] = []
    seen: dict[str, str] = {}
    for root in paths:
        if not root.exists():
            errors.append(RuleError("no such file or folder", file=str(root)))
            continue
        for file in rule_files(root):
            try:
                rule = load_rule_file(file)
            except RuleError as err:
                errors.append(err)
                continue
            if rule.id in seen:
                errors.append(RuleError(f"rule id {rule.id!r} already defined in {seen[rule.id]}", file=str(file), field="id"))
                continue
            seen[rule.id] = str(file)
            rules.append(rule)
    if errors:
        raise RuleSetError(errors)
    return rules


def default_rules_dir() -> Path:
    """The rules shipped with the product (``rules/`` beside the package)."""
    return Path(__file__).resolve().parent.parent / "rules"
