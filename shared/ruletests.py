"""Rule test cases as data: run a rule's timelines through the engine and compare the incidents."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from .engine import Engine, Stats
from .normalize import NormalizedEvent, Normalizer, Rejection, iso
from .rules import Rule, RuleTestCase, TestEvent
from .state import MemoryStateStore

TIMELINE_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class CaseResult:
    rule_id: str
    case: str
    passed: bool
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.rule_id} :: {self.case}" + (f" -- {self.detail}" if self.detail else "")


def _event(item: TestEvent, index: int, at: datetime, normalizer: Normalizer) -> NormalizedEvent | str:
    payload: Any = item.event if item.event is not None else item.raw
    if payload is None:
        return f"events[{index}]: needs 'event' (normalized attributes) or 'raw' (a Defender payload)"
    if item.event is not None and "eventTime" not in payload:
        payload = {**payload, "eventTime": iso(at)}
    fmt_normalizer = normalizer if item.format == "auto" else Normalizer(fmt=item.format)
    if item.event is not None:
        fmt_normalizer = Normalizer(fmt="normalized")
    result = fmt_normalizer.normalize(payload, f"events[{index}]", at)
    if isinstance(result, Rejection):
        return f"events[{index}] rejected: {result}"
    if not isinstance(result, NormalizedEvent):
        return f"events[{index}] was skipped"
    if item.raw is not None:  # `at` sets the time of raw payloads too, so timelines stay in offsets
        result = replace(result, event_time=at, attrs={**result.attrs, "eventTime": iso(at)})
    return result


def run_case(rule: Rule, case: RuleTestCase) -> CaseResult:
    """Each event is processed as its own batch, at its offset, with a fresh in-memory store."""
    normalizer = Normalizer()
    now = [TIMELINE_START]
    engine = Engine([replace(rule, model=rule.model.model_copy(update={"enabled": True}))], MemoryStateStore(), lambda: now[0])
    latest: dict[str, dict[str, Any]] = {}
    pairs: set[tuple[str, int]] = set()
    stats = Stats()
    for index, item in sorted(enumerate(case.events), key=lambda p: p[1].at):
        at = TIMELINE_START + timedelta(seconds=item.at)
        now[0] = at
        event = _event(item, index, at, normalizer)
        if isinstance(event, str):
            return CaseResult(rule.id, case.name, False, event)
        result = engine.process([event])
        stats += result.stats
        for snap in result.incidents:
            pairs.add((snap["incidentId"], snap["revision"]))
            if snap["revision"] >= latest.get(snap["incidentId"], {}).get("revision", 0):
                latest[snap["incidentId"]] = snap
    expect = case.expect
    problems = []
    if len(latest) != expect.incidents:
        problems.append(f"expected {expect.incidents} incident(s), got {len(latest)}")
    if expect.revisions is not None and len(pairs) != expect.revisions:
        problems.append(f"expected {expect.revisions} snapshot revision(s), got {len(pairs)}")
    for wanted in expect.attributes:
        if not any(_subset(wanted, snap["attributes"]) for snap in latest.values()):
            got = [snap["attributes"] for snap in latest.values()]
            problems.append(f"no incident has attributes {wanted} (got {got})")
    return CaseResult(rule.id, case.name, not problems, "; ".join(problems))


def _subset(wanted: dict[str, Any], got: dict[str, Any]) -> bool:
    return all(k in got and got[k] == v for k, v in wanted.items())


def run_rule_tests(rules: list[Rule]) -> list[CaseResult]:
    return [run_case(rule, case) for rule in rules for case in rule.model.tests]
