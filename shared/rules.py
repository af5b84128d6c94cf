"""Rules as data: the YAML rule file format, its pydantic model, and the compiled rule.

A rule file holds one FortiSIEM-style rule (every field of a FortiSIEM rule page) plus optional
test cases. ``load_rules`` loads a file or a folder, reports every bad file, and never returns a
half-loaded rule.

A rule has one or more named subpatterns. With several, ``pattern`` combines them (AND, OR,
FOLLOWED_BY, NOT FOLLOWED_BY) and ``correlation`` relates their group-by attributes; such rules,
and rules with a ``clear`` condition, run in :mod:`shared.sequence`. Single-subpattern rules without
``clear`` keep the classic engine path unchanged. Event-type groups (``Group@NAME``) are data in
``groups/*.yaml`` beside the rules.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .aggregates import Aggregate, Constraint, needed_attrs, parse_aggregate
from .errors import RuleError, RuleSetError
from .normalize import EVIDENCE_EVENT_TYPE
from .pattern import PatternNode, Sub, parse_pattern
from .periods import DAYS, Day, Period, parse_clock, zone
from .query import MAX_QUERY_CHARS, CrossCompare, Groups, Leaf, Node, Query, Ref, mentions, parse_correlation
from .suggest import unknown_key_hint

DEFAULT_INCIDENT_LIFETIME_S = 24 * 3600  # FortiSIEM keeps an incident Active until cleared
MAX_WINDOW_S = 30 * 86400  # time windows and quiet periods: a month of state per group at most
MAX_INCIDENT_LIFETIME_S = 365 * 86400  # epoch milliseconds plus a lifetime stay far inside INT64
MAX_TEST_OFFSET_S = 10 * 365 * 86400  # rule-test offsets: a decade, so start + offset is a datetime
MAX_PROBLEMS_PER_FILE = 20  # schema problems listed for one file; the last line counts the rest
MAX_PATTERN_CHARS = 4_096  # a pattern names a rule's few subpatterns
MAX_RULE_QUERY_CHARS = 131_072  # all query, correlation and pattern text of one rule: about 1 s of parsing
ATTRIBUTE_NAME_HINT = (
    "not an attribute name (a letter, '_', '$' or '@', then letters, digits, '_', '.', '$', '@'; at most 200; "
    "no spaces or invisible characters)"
)
ATTRIBUTE_NAME = r"^[A-Za-z_$@][A-Za-z0-9_.$@]{0,199}$"  # as the query language reads attribute names
MAX_RULE_FILE_BYTES = 1 << 20  # a rule file is configuration, not data
MAX_GROUP_BY = 64  # group-by attributes of a subpattern: a group key must fit its budget (engine.MAX_KEY_BYTES)
MAX_YAML_DEPTH = 64  # PyYAML composes and constructs recursively; Defender payloads nest about 10 deep
MAX_YAML_NODES = 250_000  # values once aliases are expanded: no "billion laughs" reaches the model
RULE_SUFFIXES = (".yaml", ".yml")
GROUPS_DIR = "groups"  # event-type groups beside the rules


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LAST_START = datetime(9000, 1, 1, tzinfo=timezone.utc)


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
    group_by: list[Annotated[str, Field(pattern=ATTRIBUTE_NAME)]] = Field(
        alias="groupBy", default_factory=list, max_length=MAX_GROUP_BY
    )
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

    at: float = Field(
        ge=0, le=MAX_TEST_OFFSET_S, allow_inf_nan=False, description="offset in seconds from the start of the timeline"
    )
    event: dict[str, Any] | None = None
    raw: Any = None
    format: str = "auto"


class ExpectedIncidents(_Model):
    incidents: int = Field(ge=0, strict=True, description="distinct incidents (incident ids) expected")
    attributes: list[dict[str, Any]] = Field(default_factory=list)
    revisions: int | None = Field(default=None, ge=0, strict=True, description="snapshots expected, if checked")


class RuleTestCase(_Model):
    name: str
    description: str | None = None
    events: list[TestEvent]
    start: AwareDatetime | None = Field(
        default=None, description="event time of offset 0 (default 2026-01-01T00:00:00Z, a Thursday), years 1970 to 9000"
    )
    until: float | None = Field(
        default=None,
        ge=0,
        le=MAX_TEST_OFFSET_S,
        allow_inf_nan=False,
        description="offset to let event time reach after the events (fires due absences and quiet clears)",
    )
    expect: ExpectedIncidents

    @field_validator("start")
    @classmethod
    def _start_in_range(cls, value: datetime | None) -> datetime | None:
        if value is not None and not _EPOCH <= value <= _LAST_START:
            raise ValueError("must be between 1970-01-01 and 9000-01-01 (offsets are added to it)")
        return value


class PeriodModel(_Model):
    """An effective time period of an exception, on the incident's event time (``lastSeen``)."""

    days: list[Day] = Field(
        default_factory=lambda: list(DAYS), min_length=1, description="weekdays the daily span starts on (default: every day)"
    )
    from_: str | None = Field(default=None, alias="from", description="daily span start 'HH:MM' (local time in timezone)")
    to: str | None = Field(default=None, description="daily span end 'HH:MM', exclusive; before 'from': runs over midnight")
    timezone: str = Field(default="UTC", description="IANA zone name of 'from'/'to'/'days', e.g. Europe/Berlin")
    start: AwareDatetime | None = Field(default=None, description="single period: in effect from (ISO 8601 with offset)")
    end: AwareDatetime | None = Field(default=None, description="single period: in effect until, exclusive")


class RuleExceptionModel(_Model):
    """FortiSIEM rule exception: incidents whose attributes match ``query`` are not emitted."""

    query: str = Field(description="condition over the incident attributes (and tenantId), in the subpattern query language")
    tenants: list[str] = Field(default_factory=list, description="only for these tenants (empty: every tenant)")
    periods: list[PeriodModel] = Field(
        default_factory=list, description="in effect only when the incident's event time is in one of these (empty: always)"
    )
    note: str | None = None


class ClearModel(_Model):
    """FortiSIEM clear condition: an open incident is closed with an ``action: cleared`` snapshot."""

    after: int | None = Field(
        default=None,
        gt=0,
        le=MAX_WINDOW_S,
        strict=True,
        description="seconds without a trigger (FortiSIEM 'Original Rule Does Not Trigger')",
    )
    query: str | None = Field(
        default=None, description="an event matching this query, with the incident's group-by values, clears it"
    )


class RuleModel(_Model):
    """Schema of a rule file (camelCase keys, as FortiSIEM names the fields)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=200)
    name: str
    description: str = ""
    enabled: bool = True
    severity: int = Field(ge=1, le=10, strict=True)
    category: str
    tactics: list[MitreRef] = Field(default_factory=list)
    techniques: list[MitreRef] = Field(default_factory=list)
    impacts: list[str] = Field(default_factory=list)
    data_sources: list[str] = Field(alias="dataSources", default_factory=list)
    detection: str = "Correlation"
    remediation: str = ""
    time_window: int = Field(alias="timeWindow", gt=0, le=MAX_WINDOW_S, strict=True)
    incident_lifetime: int = Field(
        alias="incidentLifetime", default=DEFAULT_INCIDENT_LIFETIME_S, gt=0, le=MAX_INCIDENT_LIFETIME_S, strict=True
    )
    subpatterns: list[SubpatternModel] = Field(min_length=1)
    pattern: str | None = Field(
        default=None, max_length=MAX_PATTERN_CHARS, description="how subpatterns combine; required with several subpatterns"
    )
    correlation: str | None = Field(
        default=None, description="conditions between subpatterns, e.g. 'a.hostName = b.hostName AND a.user != b.user'"
    )
    incident_attributes: dict[Annotated[str, Field(pattern=ATTRIBUTE_NAME)], str] = Field(alias="incidentAttributes")
    alert_evidence: Literal["join", "events"] = Field(
        default="join",
        alias="alertEvidence",
        description="join: Defender AlertEvidence rows only add entities to the incidents of alerts this rule counted; "
        "events: the rows are also events the subpattern queries match (eventType MS-Defender-Endpoint-AlertEvidence)",
    )
    exceptions: list[RuleExceptionModel] = Field(default_factory=list)
    clear: ClearModel | None = None
    source: RuleSource | None = None
    tests: list[RuleTestCase] = Field(default_factory=list)


@dataclass(frozen=True)
class AttrMapping:
    """``incidentAttr = subpattern.attr`` (group-by value) or ``= subpattern.AGG(...)``."""

    incident_attr: str
    attr: str | None = None
    aggregate: Aggregate | None = None
    sub: int = 0  # index of the subpattern the value comes from


@dataclass(frozen=True)
class CompiledSub:
    """One subpattern of a multi-subpattern rule, compiled."""

    index: int
    name: str
    query: Query
    constraint: Constraint
    group_by: tuple[str, ...]
    key_attrs: tuple[str, ...]  # this subpattern's attribute for each component of the correlation key
    aggregates: tuple[Aggregate, ...]
    window_attrs: tuple[str, ...]  # per-event values its window keeps (after the group-by values)


@dataclass(frozen=True)
class CompiledException:
    query: Query
    tenants: frozenset[str]
    periods: tuple[Period, ...] = ()

    def in_effect(self, at_ms: int) -> bool:
        return not self.periods or any(p.contains(at_ms) for p in self.periods)


@dataclass(frozen=True)
class CompiledClear:
    after_s: int | None
    query: Query | None


@dataclass(frozen=True)
class Rule:
    """A loaded, validated and compiled rule.

    ``query``/``constraint``/``aggregates``/``window_attrs`` describe the first subpattern (the
    classic single-subpattern path); for a multi-subpattern rule ``query`` matches what any
    subpattern matches (the engine's prefilter) and ``subs``/``pattern``/``cross`` hold the rest.
    """

    model: RuleModel
    path: str
    query: Query
    constraint: Constraint
    mappings: tuple[AttrMapping, ...]
    aggregates: tuple[Aggregate, ...] = field(default=())
    window_attrs: tuple[str, ...] = field(default=())
    subs: tuple[CompiledSub, ...] = field(default=())
    pattern: PatternNode | None = None  # None: the classic single-subpattern path
    cross: tuple[CrossCompare, ...] = field(default=())  # conditions the correlation key does not settle
    key_attrs: tuple[str, ...] = field(default=())  # names of the correlation key's components
    exceptions: tuple[CompiledException, ...] = field(default=())
    clear: CompiledClear | None = None

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def evidence_events(self) -> bool:
        """Whether AlertEvidence rows are events this rule matches (declared ``alertEvidence: events``)."""
        return self.model.alert_evidence == "events"

    @property
    def sequence(self) -> bool:
        """Whether the rule runs in the multi-subpattern correlator (:mod:`shared.sequence`)."""
        return self.pattern is not None

    @property
    def group_by(self) -> tuple[str, ...]:
        if self.pattern is not None:
            return self.key_attrs
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

    def excepted(self, attributes: dict[str, Any], tenant: str | None, at_ms: int) -> bool:
        """Whether an incident with these attributes, at event time ``at_ms`` (its ``lastSeen``, epoch
        ms), matches one of the rule's exceptions in effect then."""
        if not self.exceptions:
            return False
        view = {**attributes, "tenantId": attributes.get("tenantId", tenant)} if tenant is not None else attributes
        for exc in self.exceptions:
            if exc.tenants and (tenant is None or tenant.lower() not in exc.tenants):
                continue
            if exc.in_effect(at_ms) and exc.query.matches(view):
                return True
        return False


def _loc_text(loc: Iterable[Union[int, str]]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def compile_rule(model: RuleModel, path: str = "<rule>", groups: Groups | None = None) -> Rule:
    """Compile a validated model; ``groups`` resolves ``Group@NAME`` (default: the shipped groups).

    Raises:
        RuleError: a bad query, constraint, pattern, correlation, mapping, exception or clear
            condition; located by file, field and (for text) column.
    """
    if groups is None:
        groups = default_groups()
    _check_query_budget(model, path)
    subs_model = model.subpatterns
    names = [sp.name for sp in subs_model]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RuleError(f"subpattern name {name!r} repeats", file=path, field=f"subpatterns[{i}].name")
    queries: list[Query] = []
    constraints: list[Constraint] = []
    for i, sp in enumerate(subs_model):
        try:
            queries.append(Query.parse(sp.query, groups))
        except RuleError as err:
            raise err.located(file=path, field=f"subpatterns[{i}].query") from None
        try:
            constraints.append(Constraint.parse(sp.constraint))
        except RuleError as err:
            raise err.located(file=path, field=f"subpatterns[{i}].aggregateConstraint") from None
    _check_alert_evidence(model, queries, path)
    multi = len(subs_model) > 1
    if multi and not model.pattern:
        raise RuleError(
            f"{len(subs_model)} subpatterns need a 'pattern' combining them (e.g. '{names[0]} FOLLOWED_BY {names[1]}')",
            file=path,
            field="pattern",
        )
    if not multi and model.correlation:
        raise RuleError("conditions between subpatterns need at least two subpatterns", file=path, field="correlation")
    pattern: PatternNode | None = None
    if model.pattern:
        try:
            pattern = parse_pattern(model.pattern, tuple(names))
        except RuleError as err:
            raise err.located(file=path, field="pattern") from None
    elif model.clear is not None:
        pattern = Sub(names[0])  # a cleared incident needs the correlator's state
    mappings = tuple(_compile_mapping(name, ref, subs_model, path) for name, ref in model.incident_attributes.items())
    exceptions = tuple(_compile_exception(i, e, model, groups, path) for i, e in enumerate(model.exceptions))
    clear = _compile_clear(model.clear, groups, path) if model.clear is not None else None
    if pattern is None:
        constraint = constraints[0]
        aggregates = tuple(dict.fromkeys(list(constraint.aggregates) + [m.aggregate for m in mappings if m.aggregate]))
        return Rule(
            model=model,
            path=path,
            query=queries[0],
            constraint=constraint,
            mappings=mappings,
            aggregates=aggregates,
            window_attrs=needed_attrs(aggregates),
            exceptions=exceptions,
        )
    try:
        cross = parse_correlation(model.correlation) if model.correlation else ()
        key_attrs, per_sub_key, residual = _correlation_key(cross, subs_model)
    except RuleError as err:
        raise err.located(file=path, field="correlation") from None
    subs = []
    for i, sp in enumerate(subs_model):
        aggs = tuple(
            dict.fromkeys(list(constraints[i].aggregates) + [m.aggregate for m in mappings if m.aggregate and m.sub == i])
        )
        subs.append(
            CompiledSub(
                index=i,
                name=sp.name,
                query=queries[i],
                constraint=constraints[i],
                group_by=tuple(sp.group_by),
                key_attrs=per_sub_key[i],
                aggregates=aggs,
                window_attrs=needed_attrs(aggs),
            )
        )
    return Rule(
        model=model,
        path=path,
        query=Query.any_of(queries + ([clear.query] if clear is not None and clear.query is not None else [])),
        constraint=constraints[0],
        mappings=mappings,
        aggregates=subs[0].aggregates,
        window_attrs=subs[0].window_attrs,
        subs=tuple(subs),
        pattern=pattern,
        cross=residual,
        key_attrs=key_attrs,
        exceptions=exceptions,
        clear=clear,
    )


def _check_query_budget(model: RuleModel, path: str) -> None:
    """All query text of a rule, within ``MAX_RULE_QUERY_CHARS``, checked before any is parsed (a text
    over its own cap is left to the located error of its field)."""
    texts = [sp.query for sp in model.subpatterns] + [e.query for e in model.exceptions]
    texts += [t for t in (model.pattern, model.correlation, model.clear.query if model.clear else None) if t]
    lengths = [len(t) for t in texts if t]
    total = sum(lengths)
    if total > MAX_RULE_QUERY_CHARS and max(lengths) <= MAX_QUERY_CHARS:
        raise RuleError(
            f"queries, exceptions, correlation and pattern hold {total} characters together (at most {MAX_RULE_QUERY_CHARS})",
            file=path,
        )


def _check_alert_evidence(model: RuleModel, queries: list[Query], path: str) -> None:
    """``alertEvidence`` decides whether AlertEvidence rows reach the rule's queries; a declaration
    the queries contradict is a load error, so no rule silently never sees the rows it names."""
    if model.alert_evidence == "events":
        if not any(q.could_match({"eventType": EVIDENCE_EVENT_TYPE}) for q in queries):
            raise RuleError(
                f"'events' declares that AlertEvidence rows are events of this rule, but no subpattern query can match "
                f"eventType {EVIDENCE_EVENT_TYPE!r}",
                file=path,
                field="alertEvidence",
            )
        return
    for i, q in enumerate(queries):
        if mentions(q.tree, "eventType", "AlertEvidence") and q.could_match({"eventType": EVIDENCE_EVENT_TYPE}):
            raise RuleError(
                "the query names AlertEvidence rows, which reach a rule only when it declares 'alertEvidence: events' "
                "(without it they only add entities to the incidents of their alerts)",
                file=path,
                field=f"subpatterns[{i}].query",
            )


def _correlation_key(
    cross: tuple[CrossCompare, ...], subs: list[SubpatternModel]
) -> tuple[tuple[str, ...], list[tuple[str, ...]], tuple[CrossCompare, ...]]:
    """Split cross-subpattern conditions into the correlation key and the remaining conditions.

    Equalities chain attributes into classes; a class holding exactly one group-by attribute of every
    subpattern becomes a component of the key (the state's partition). Without ``correlation``,
    the attributes every subpattern groups by (same name) form the key. ``tenantId``, when every
    subpattern groups by it, is always part of the key.
    """
    by_name = {sp.name: sp for sp in subs}
    for cmp in cross:
        for ref in cmp.refs():
            sp = by_name.get(ref.sub)
            if sp is None:
                raise RuleError(
                    f"unknown subpattern {ref.sub!r} (defined: {', '.join(by_name)})", column=ref.column, text=ref.text
                )
            if ref.attr.lower() not in {g.lower() for g in sp.group_by}:
                raise RuleError(
                    f"{ref.attr!r} is not a group-by attribute of {ref.sub} (group by: {', '.join(sp.group_by) or 'none'});"
                    " conditions between subpatterns compare group-by values",
                    column=ref.column,
                    text=ref.text,
                )
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    def canon(ref: Ref) -> tuple[str, str]:
        attr = next(g for g in by_name[ref.sub].group_by if g.lower() == ref.attr.lower())
        return (ref.sub, attr)

    order: list[tuple[str, str]] = []
    for cmp in cross:
        if cmp.op == "=" and isinstance(cmp.right, Ref) and cmp.left.sub != cmp.right.sub:
            a, b = canon(cmp.left), canon(cmp.right)
            order.extend([a, b])
            parent[find(a)] = find(b)
    if not cross:  # same-named group-by attributes of every subpattern
        common = [g for g in subs[0].group_by if all(g.lower() in {h.lower() for h in sp.group_by} for sp in subs[1:])]
        for g in common:
            members = [(sp.name, next(h for h in sp.group_by if h.lower() == g.lower())) for sp in subs]
            order.extend(members)
            for m in members[1:]:
                parent[find(m)] = find(members[0])
    classes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for node in dict.fromkeys(order):
        classes.setdefault(find(node), []).append(node)
    components: list[dict[str, str]] = []
    for members in classes.values():
        per_sub: dict[str, str] = {}
        for sub, attr in members:
            if sub in per_sub:
                break
            per_sub[sub] = attr
        else:
            if len(per_sub) == len(subs):
                components.append(per_sub)
    if all(any(g.lower() == "tenantid" for g in sp.group_by) for sp in subs) and not any(
        all(a.lower() == "tenantid" for a in c.values()) for c in components
    ):
        components.insert(0, {sp.name: next(g for g in sp.group_by if g.lower() == "tenantid") for sp in subs})
    key_attrs = tuple(c[subs[0].name] for c in components)
    per_sub_key = [tuple(c[sp.name] for c in components) for sp in subs]
    keyed = {frozenset((sub, attr.lower()) for sub, attr in c.items()) for c in components}
    residual = tuple(
        cmp
        for cmp in cross
        if not (
            cmp.op == "="
            and isinstance(cmp.right, Ref)
            and any({(cmp.left.sub, cmp.left.attr.lower()), (cmp.right.sub, cmp.right.attr.lower())} <= set(k) for k in keyed)
        )
    )
    return key_attrs, per_sub_key, residual


def _compile_exception(index: int, exc: RuleExceptionModel, model: RuleModel, groups: Groups, path: str) -> CompiledException:
    where = f"exceptions[{index}].query"
    try:
        query = Query.parse(exc.query, groups)
    except RuleError as err:
        raise err.located(file=path, field=where) from None
    known = {*model.incident_attributes, "tenantId"}  # exactly as matched: attribute names are case-sensitive
    for attr in _attrs(query.tree):
        if attr not in known:
            raise RuleError(
                f"{attr!r} is not an incident attribute (names are case-sensitive; known: "
                f"{', '.join([*model.incident_attributes, 'tenantId'])})",
                file=path,
                field=where,
                text=exc.query,
            )
    periods = tuple(_compile_period(p, f"exceptions[{index}].periods[{i}]", path) for i, p in enumerate(exc.periods))
    return CompiledException(query, frozenset(t.lower() for t in exc.tenants), periods)


def _compile_period(period: PeriodModel, where: str, path: str) -> Period:
    try:
        tz = zone(period.timezone)
    except ValueError as err:
        raise RuleError(str(err), file=path, field=f"{where}.timezone") from None
    daily = None
    if (period.from_ is None) != (period.to is None):
        missing = "to" if period.to is None else "from"
        raise RuleError("a daily span needs both 'from' and 'to'", file=path, field=f"{where}.{missing}")
    if period.from_ is not None and period.to is not None:
        bounds = []
        for name, text in (("from", period.from_), ("to", period.to)):
            try:
                bounds.append(parse_clock(text))
            except ValueError as err:
                raise RuleError(str(err), file=path, field=f"{where}.{name}", text=text) from None
        if bounds[0] == bounds[1] or bounds[0] == 24 * 60:
            raise RuleError(
                "'from' must differ from 'to' and be before 24:00 (for a whole day write 00:00 to 24:00)",
                file=path,
                field=f"{where}.from",
            )
        daily = (bounds[0], bounds[1])
    if daily is None and period.days != list(DAYS):
        raise RuleError("'days' needs a daily span ('from' and 'to')", file=path, field=f"{where}.days")
    if daily is None and period.start is None and period.end is None:
        raise RuleError(
            "a period needs a daily span ('from', 'to', optional 'days') or a single period ('start', 'end'), or both",
            file=path,
            field=where,
        )
    if period.start is not None and period.end is not None and period.end <= period.start:
        raise RuleError("'end' must be after 'start'", file=path, field=f"{where}.end")
    return Period(
        tz=tz,
        days=frozenset(DAYS.index(d) for d in period.days),
        daily=daily,
        start_ms=_epoch_ms(period.start),
        end_ms=_epoch_ms(period.end),
    )


def _epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def _compile_clear(clear: ClearModel, groups: Groups, path: str) -> CompiledClear:
    if clear.after is None and clear.query is None:
        raise RuleError(
            "a clear condition needs 'after' (seconds without a trigger) or 'query' (a clearing event)", file=path, field="clear"
        )
    query = None
    if clear.query is not None:
        try:
            query = Query.parse(clear.query, groups)
        except RuleError as err:
            raise err.located(file=path, field="clear.query") from None
    return CompiledClear(clear.after, query)


def _attrs(node: Node) -> list[str]:
    children = getattr(node, "children", None)
    if children is not None:
        return [a for c in children for a in _attrs(c)]
    child = getattr(node, "child", None)
    if child is not None:
        return _attrs(child)
    leaf: Leaf = node  # type: ignore[assignment]
    return [leaf.attr]


def _compile_mapping(name: str, ref: str, subs: list[SubpatternModel], path: str) -> AttrMapping:
    where = f"incidentAttributes.{name}"
    prefix, dot, rest = ref.strip().partition(".")
    index = next((i for i, sp in enumerate(subs) if sp.name == prefix), None)
    if not dot or index is None:
        shown = " or ".join(f"'{sp.name}.<attribute>'" for sp in subs)
        raise RuleError(f"must be {shown} or '<subpattern>.<AGGREGATE>(...)'", file=path, field=where, text=ref)
    sub = subs[index]
    if "(" in rest:
        try:
            return AttrMapping(name, aggregate=parse_aggregate(rest), sub=index)
        except RuleError as err:
            raise RuleError(err.reason, file=path, field=where, text=ref) from None
    group_by = {g.lower(): g for g in sub.group_by}
    if rest.lower() not in group_by:
        raise RuleError(
            f"attribute {rest!r} is neither a group-by attribute of {sub.name} nor an aggregate "
            f"(group by: {', '.join(sub.group_by) or 'none'})",
            file=path,
            field=where,
            text=ref,
        )
    return AttrMapping(name, attr=group_by[rest.lower()], sub=index)


def parse_rule_text(text: str, path: str = "<rule>", groups: Groups | None = None) -> Rule:
    """Parse and compile one rule from YAML text.

    Raises:
        RuleError: the YAML, the schema, the query, the constraint or a mapping is invalid.
    """
    data, root = _yaml_mapping_located(text, path, "a rule file must hold a mapping of rule fields")
    try:
        return compile_rule(_validate(RuleModel, data, path), path, groups)
    except RuleError as err:
        raise _with_lines(err, root) from None


def _with_lines(err: RuleError, root: yaml.Node) -> RuleError:
    """``err`` (or each problem of a :class:`SchemaErrors`) naming the line of its field."""
    if isinstance(err, SchemaErrors):
        return SchemaErrors([p.at_line(_field_line(root, p.field)) for p in err.problems], err.total)
    return err.at_line(_field_line(root, err.field))


_FIELD_STEP = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def _field_line(root: yaml.Node, field: str | None) -> int | None:
    """The 1-based line of ``field`` (``subpatterns[0].query``) in the document; as deep as its steps go
    (a key holding a dot stops at its mapping)."""
    if not field:
        return None
    node, line = root, None
    for index, key in _FIELD_STEP.findall(field):
        if index and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            node = node.value[int(index)]
            line = node.start_mark.line + 1
        elif key and isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        else:
            break
    return line


def _yaml_mapping_located(text: str, path: str, what: str) -> tuple[dict[str, Any], yaml.Node]:
    data, root = _load_yaml_nodes(text, path)
    if not isinstance(data, dict) or root is None:
        raise RuleError(what, file=path)
    return data, root


class _RuleYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a silent reading would hide a mistake or cost unbounded work:
    a key that repeats is an error (PyYAML keeps the last), nesting deeper than ``MAX_YAML_DEPTH`` is an
    error (the composer recurses), and an integer too long for Python is a located error."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged from an anchor may be overridden: that is what '<<' is for
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error names it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} repeats (first at line {first.start_mark.line + 1})", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(str(node.value))} characters is too long", node.start_mark
            ) from None


_RuleYamlLoader.add_constructor("tag:yaml.org,2002:int", _RuleYamlLoader.construct_yaml_int)


def _expanded_size(root: yaml.Node, path: str) -> int:
    """Nodes the document holds once every alias is expanded (each use of an anchor counts again),
    computed without expanding; an alias inside the node it names (a cycle) is an error."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            children = _children(node)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            mark = node.start_mark
            raise RuleError(
                f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: an alias refers to a node that contains it",
                file=path,
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, path: str) -> Any:
    """One YAML document of a rule or group file, read safely (no Python tags) and within bounds.

    Raises:
        RuleError: not YAML, a key that repeats, nesting deeper than ``MAX_YAML_DEPTH``, more than
            ``MAX_YAML_NODES`` values once aliases are expanded, or an alias cycle; located by line and column.
    """
    return _load_yaml_nodes(text, path)[0]


def _load_yaml_nodes(text: str, path: str) -> tuple[Any, yaml.Node | None]:
    """The document's values and its node tree (for the lines of fields); see :func:`load_yaml`."""
    loader: _RuleYamlLoader | None = None
    try:
        loader = _RuleYamlLoader(text)  # the reader checks every character here
        node = loader.get_single_node()
        if node is None:
            return None, None
        if _expanded_size(node, path) > MAX_YAML_NODES:
            raise RuleError(
                f"more than {MAX_YAML_NODES} values once aliases are expanded (a rule file is configuration)", file=path
            )
        return loader.construct_document(node), node
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise RuleError(f"invalid YAML at {where}: {exc.problem}", file=path) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise RuleError(
            f"invalid YAML at line {line}, column {column}: character {chr(exc.character)!r} is not allowed in YAML",
            file=path,
        ) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"invalid YAML: {exc}", file=path) from None
    except RecursionError:
        raise RuleError(f"invalid YAML: nested too deeply (at most {MAX_YAML_DEPTH} levels)", file=path) from None
    finally:
        if loader is not None:
            loader.dispose()


_M = TypeVar("_M", bound=BaseModel)


class SchemaErrors(RuleError):
    """Every schema problem of one file: reads as the first with a count of the others (the message a
    single-error caller shows); ``problems`` holds each located on its own (``load_rules`` lists them)."""

    def __init__(self, problems: list[RuleError], total: int) -> None:
        first = problems[0]
        more = f" (and {total - 1} more)" if total > 1 else ""
        super().__init__(first.reason + more, file=first.file, field=first.field, text=first.text, line=first.line)
        self.problems = problems
        self.total = total


def _validate(model: type[_M], data: dict[str, Any], path: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()  # unknown keys first: one often explains a "Field required" beside it
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        problems = [_schema_problem(model, e, path) for e in errors[:MAX_PROBLEMS_PER_FILE]]
        if len(errors) > MAX_PROBLEMS_PER_FILE:
            last = problems[-1]
            extra = len(errors) - MAX_PROBLEMS_PER_FILE
            problems[-1] = RuleError(f"{last.reason} (and {extra} more)", file=path, field=last.field, text=last.text)
        raise SchemaErrors(problems, len(errors)) from None


def _schema_problem(model: type[BaseModel], error: Any, path: str) -> RuleError:
    message = error["msg"]
    if error["type"] == "extra_forbidden":  # name the likely key instead of pydantic's wording
        message = unknown_key_hint(model, error["loc"])
    elif error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == ATTRIBUTE_NAME:
        message = ATTRIBUTE_NAME_HINT
    bad = error.get("input")
    shown = None if isinstance(bad, (dict, list)) or bad is None else str(bad)[:120]
    return RuleError(message, file=path, field=_loc_text(error["loc"]), text=shown)


def read_text_file(path: Path) -> str:
    """A rule or group file's text: a regular file (a FIFO or a device would block or never end) of
    at most ``MAX_RULE_FILE_BYTES``, read no further than that, in UTF-8 (a leading BOM is dropped)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait for a writer
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RuleError("not a regular file (a FIFO, a device or a socket is never read as a rule)", file=str(path))
        try:
            data = handle.read(MAX_RULE_FILE_BYTES + 1)
        except OSError as exc:
            raise _unreadable(path, exc) from None
    if len(data) > MAX_RULE_FILE_BYTES:
        raise RuleError(f"file larger than {MAX_RULE_FILE_BYTES} bytes", file=str(path))
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise RuleError(f"not UTF-8 text (byte {exc.start + 1}: {exc.reason})", file=str(path)) from None


def _unreadable(path: Path, exc: OSError) -> RuleError:
    if path.is_symlink() and not path.exists():
        return RuleError(f"a symbolic link to {os.readlink(path)!r}, which does not exist", file=str(path))
    if not os.path.lexists(path):
        return RuleError("no such file or folder", file=str(path))
    return RuleError(f"cannot read file ({exc.strerror or exc})", file=str(path))


def load_rule_file(path: Path, groups: Groups | None = None) -> Rule:
    """Raises: RuleError (also for an unreadable or oversized file)."""
    return parse_rule_text(read_text_file(path), str(path), groups)


def rule_files(path: Path) -> list[Path]:
    """Rule files under ``path``; files in a ``groups`` folder are event-type groups, not rules.

    Every entry named ``*.yaml``/``*.yml`` that is not a folder is listed, so one that cannot be read
    (a dangling link, a FIFO) is reported when loaded instead of silently left out. Symbolic links to
    folders are not followed (no loops).
    """
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.suffix in RULE_SUFFIXES and not p.is_dir() and GROUPS_DIR not in p.relative_to(path).parts
        )
    return [path]


# ---------------------------------------------------------------------------------------------
# Event-type groups (``Group@NAME``)
# ---------------------------------------------------------------------------------------------


class EventTypeGroupModel(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200)
    description: str = ""
    event_types: list[str] = Field(alias="eventTypes", min_length=1)


class GroupFileModel(_Model):
    """Schema of ``groups/*.yaml``: named lists of event types, used as ``eventType IN (Group@NAME)``."""

    groups: list[EventTypeGroupModel] = Field(min_length=1)


def load_groups(paths: Iterable[Path]) -> dict[str, tuple[str, ...]]:
    """Load every group file under ``paths`` (files or folders).

    Raises:
        RuleSetError: a group file is invalid or a group name repeats (names compare case-insensitively).
    """
    groups: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    errors: list[RuleError] = []
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.suffix in RULE_SUFFIXES and not p.is_dir()) if root.is_dir() else [root]
        for file in files:
            try:
                data, doc = _yaml_mapping_located(
                    read_text_file(file), str(file), "a group file must hold 'groups:', a list of {name, eventTypes}"
                )
                try:
                    parsed = _validate(GroupFileModel, data, str(file))
                except RuleError as err:
                    raise _with_lines(err, doc) from None
            except SchemaErrors as err:
                errors.extend(err.problems)
                continue
            except RuleError as err:
                errors.append(err)
                continue
            for i, group in enumerate(parsed.groups):
                if group.name.lower() in seen:
                    errors.append(
                        RuleError(
                            f"group {group.name!r} already defined in {seen[group.name.lower()]}",
                            file=str(file),
                            field=f"groups[{i}].name",
                        )
                    )
                    continue
                seen[group.name.lower()] = str(file)
                groups[group.name] = tuple(group.event_types)
    if errors:
        raise RuleSetError(errors)
    return groups


@lru_cache(maxsize=1)
def default_groups() -> dict[str, tuple[str, ...]]:
    """The event-type groups shipped with the product (``rules/groups/``)."""
    folder = default_rules_dir() / GROUPS_DIR
    return load_groups([folder]) if folder.is_dir() else {}


def load_rules(paths: Iterable[Path]) -> list[Rule]:
    """Load every rule file under ``paths`` (files or folders).

    Event-type groups come from the shipped ``rules/groups/`` plus any ``groups/`` folder directly
    under a given folder.

    Raises:
        RuleSetError: one or more files are invalid (all of them are listed), a path is missing,
            or two files share a rule id. Nothing is returned half-loaded.
    """
    paths = list(paths)
    rules: list[Rule] = []
    errors: list[RuleError] = []
    seen: dict[str, str] = {}
    extra = [
        p / GROUPS_DIR for p in paths if p.is_dir() and (p / GROUPS_DIR).is_dir() and p.resolve() != default_rules_dir().resolve()
    ]
    try:
        groups = {**default_groups(), **load_groups(extra)} if extra else default_groups()
    except RuleSetError as exc:
        raise RuleSetError(exc.errors) from None
    for root in paths:
        if not root.exists():
            errors.append(RuleError("no such file or folder", file=str(root)))
            continue
        for file in rule_files(root):
            try:
                rule = load_rule_file(file, groups)
            except SchemaErrors as err:
                errors.extend(err.problems)
                continue
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
