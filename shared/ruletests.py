"""Rule test cases as data: run a rule's timelines through the engine and compare the incidents.

Results are data (:class:`CaseResult` with structured :class:`Problem` entries); the renderers here
turn them into terminal text (an expected-vs-actual diff, coloured when asked), JSON and JUnit XML.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.etree import ElementTree as ET

import yaml

from .engine import BatchResult, Engine, Stats
from .errors import CorrelatorError
from .normalize import NormalizedEvent, Normalizer, Rejection, iso
from .rules import Rule, RuleTestCase, TestEvent
from .snapshot import Snapshot
from .state import MemoryStateStore

TIMELINE_START = datetime(2026, 1, 1, tzinfo=timezone.utc)

# Exit codes of ``python -m shared test-rules`` (documented in the README).
EXIT_PASSED, EXIT_FAILED, EXIT_INVALID, EXIT_NOTHING_SELECTED = 0, 1, 2, 2

_RED, _GREEN, _DIM, _BOLD, _RESET = "\033[31m", "\033[32m", "\033[2m", "\033[1m", "\033[0m"


@dataclass(frozen=True)
class Problem:
    """One expectation that did not hold: what was checked, what was expected, what happened."""

    what: str  # incidents | revisions | attributes | event | min-tests
    expected: Any
    actual: Any
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "expected": self.expected, "actual": self.actual, "message": self.message}


@dataclass(frozen=True)
class CaseResult:
    rule_id: str
    case: str
    passed: bool
    detail: str = ""
    file: str = ""
    lineno: int | None = None
    problems: tuple[Problem, ...] = field(default=())

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}" if self.lineno else self.file

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.rule_id} :: {self.case}" + (f" -- {self.detail}" if self.detail else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule_id,
            "test": self.case,
            "file": self.file,
            "line": self.lineno,
            "passed": self.passed,
            "problems": [p.as_dict() for p in self.problems],
        }


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


def run_case(rule: Rule, case: RuleTestCase, line: int | None = None) -> CaseResult:
    """Each event is processed as its own batch, at its offset from ``case.start`` (default
    ``TIMELINE_START``), with a fresh in-memory store."""
    normalizer = Normalizer()
    start = case.start or TIMELINE_START
    now = [start]
    try:
        engine = Engine(
            [replace(rule, model=rule.model.model_copy(update={"enabled": True}))], MemoryStateStore(), lambda: now[0]
        )
    except CorrelatorError as exc:  # e.g. a rule shape the engine does not run yet: a failure, not a crash
        reason = f"the engine cannot run this rule: {getattr(exc, 'reason', exc)}"
        return CaseResult(
            rule.id, case.name, False, reason, rule.path, line, (Problem("rule", "a runnable rule", reason, reason),)
        )
    latest: dict[str, Snapshot] = {}
    pairs: set[tuple[str, int]] = set()
    stats = Stats()
    for index, item in sorted(enumerate(case.events), key=lambda p: p[1].at):
        at = start + timedelta(seconds=item.at)
        now[0] = at
        event = _event(item, index, at, normalizer)
        if isinstance(event, str):
            problem = Problem("event", "a valid event", event, event)
            return CaseResult(rule.id, case.name, False, event, rule.path, line, (problem,))
        results = [engine.process([event])]
        _collect(results, stats, latest, pairs)
    if case.until is not None:  # time passes with no event: the absence timer's view
        now[0] = start + timedelta(seconds=case.until)
        _collect([engine.fire_due(now[0])], stats, latest, pairs)
    problems = _compare(case, latest, pairs)
    detail = "; ".join(p.message for p in problems)
    return CaseResult(rule.id, case.name, not problems, detail, rule.path, line, tuple(problems))


def _collect(results: list[BatchResult], stats: Stats, latest: dict[str, Snapshot], pairs: set[tuple[str, int]]) -> None:
    for result in results:
        stats += result.stats
        for snap in result.incidents:
            pairs.add((snap["incidentId"], snap["revision"]))
            kept = latest.get(snap["incidentId"])
            if kept is None or snap["revision"] >= kept["revision"]:
                latest[snap["incidentId"]] = snap


def _compare(case: RuleTestCase, latest: dict[str, Snapshot], pairs: set[tuple[str, int]]) -> list[Problem]:
    expect = case.expect
    problems = []
    if len(latest) != expect.incidents:
        problems.append(
            Problem("incidents", expect.incidents, len(latest), f"expected {expect.incidents} incident(s), got {len(latest)}")
        )
    if expect.revisions is not None and len(pairs) != expect.revisions:
        problems.append(
            Problem(
                "revisions", expect.revisions, len(pairs), f"expected {expect.revisions} snapshot revision(s), got {len(pairs)}"
            )
        )
    got = [snap["attributes"] for snap in latest.values()]
    for wanted in expect.attributes:
        if not any(_subset(wanted, attrs) for attrs in got):
            closest = max(got, key=lambda attrs: sum(k in attrs and attrs[k] == v for k, v in wanted.items()), default=None)
            problems.append(
                Problem("attributes", wanted, closest, f"no incident has attributes {wanted} (got {got})"),
            )
    return problems


def _subset(wanted: dict[str, Any], got: dict[str, Any]) -> bool:
    return all(k in got and got[k] == v for k, v in wanted.items())


def case_lines(path: str) -> dict[str, int]:
    """Line (1-based) of each test case's ``name`` in a rule file; empty when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            node = yaml.compose(handle, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        if key.value != "tests" or not isinstance(value, yaml.SequenceNode):
            continue
        for item in value.value:
            if isinstance(item, yaml.MappingNode):
                for k, v in item.value:
                    if k.value == "name" and isinstance(v, yaml.ScalarNode):
                        lines.setdefault(str(v.value), item.start_mark.line + 1)
    return lines


@dataclass(frozen=True)
class Selection:
    """Which tests to run: rule ids and test names (shell-style patterns, or a plain substring)."""

    rules: Sequence[str] = ()
    tests: Sequence[str] = ()

    @staticmethod
    def _hit(patterns: Sequence[str], value: str) -> bool:
        if not patterns:
            return True
        low = value.lower()
        return any(fnmatch.fnmatchcase(low, p.lower()) or p.lower() in low for p in patterns)

    def rule(self, rule_id: str) -> bool:
        return self._hit(self.rules, rule_id)

    def test(self, name: str) -> bool:
        return self._hit(self.tests, name)


def run_rule_tests(rules: list[Rule], selection: Selection | None = None, *, min_tests: int = 0) -> list[CaseResult]:
    """Run the selected cases; with ``min_tests``, a selected rule carrying fewer tests fails too."""
    selection = selection or Selection()
    results: list[CaseResult] = []
    for rule in rules:
        if not selection.rule(rule.id):
            continue
        lines = case_lines(rule.path)
        if len(rule.model.tests) < min_tests:
            n = len(rule.model.tests)
            message = f"the rule has {n} test case(s); at least {min_tests} required (--min-tests)"
            problem = Problem("min-tests", min_tests, n, message)
            results.append(CaseResult(rule.id, "(minimum number of tests)", False, message, rule.path, None, (problem,)))
        for case in rule.model.tests:
            if selection.test(case.name):
                results.append(run_case(rule, case, lines.get(case.name)))
    return results


# -- rendering ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def render_text(result: CaseResult, *, color: bool = False) -> list[str]:
    """PASS/FAIL line; for a failure, the file:line and an expected (-) versus actual (+) diff."""

    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    if result.passed:
        return [f"{paint(_GREEN, 'PASS')} {result.rule_id} :: {result.case}"]
    out = [f"{paint(_RED + _BOLD, 'FAIL')} {result.rule_id} :: {result.case}", f"  at {result.where}"]
    for problem in result.problems:
        if problem.what == "attributes":
            out.append(
                "  attributes: no incident has the expected values" + (" (closest incident shown)" if problem.actual else "")
            )
            wanted: dict[str, Any] = problem.expected
            actual: dict[str, Any] = problem.actual or {}
            for key, value in wanted.items():
                if key in actual and actual[key] == value:
                    out.append(paint(_DIM, f"      {key}: {_fmt(value)}"))
                else:
                    out.append(paint(_RED, f"    - {key}: {_fmt(value)}"))
                    out.append(paint(_GREEN, f"    + {key}: {_fmt(actual[key]) if key in actual else '(missing)'}"))
            if not actual:
                out.append(paint(_GREEN, "    + (no incident)"))
        elif problem.what in ("incidents", "revisions", "min-tests"):
            out.append(f"  {problem.what}:")
            out.append(paint(_RED, f"    - expected {_fmt(problem.expected)}"))
            out.append(paint(_GREEN, f"    + actual   {_fmt(problem.actual)}"))
        else:
            out.append(f"  {problem.message}")
    return out


def render_json(results: Iterable[CaseResult]) -> str:
    items = [r.as_dict() for r in results]
    failed = sum(not r["passed"] for r in items)
    return json.dumps({"passed": len(items) - failed, "failed": failed, "results": items}, indent=2, default=str)


def render_junit(results: Iterable[CaseResult]) -> bytes:
    """JUnit XML: one ``testsuite`` per rule, one ``testcase`` per test (``classname`` = rule id)."""
    by_rule: dict[str, list[CaseResult]] = {}
    for result in results:
        by_rule.setdefault(result.rule_id, []).append(result)
    root = ET.Element("testsuites", name="rule tests")
    total = failures = 0
    for rule_id, items in by_rule.items():
        failed = sum(not r.passed for r in items)
        suite = ET.SubElement(root, "testsuite", name=rule_id, tests=str(len(items)), failures=str(failed), errors="0")
        suite.set("file", items[0].file)
        for result in items:
            case = ET.SubElement(suite, "testcase", name=result.case, classname=rule_id, file=result.file)
            if result.lineno:
                case.set("line", str(result.lineno))
            if not result.passed:
                failure = ET.SubElement(case, "failure", message=result.detail[:500], type="RuleTestFailure")
                failure.text = "\n".join(render_text(result))
        total += len(items)
        failures += failed
    root.set("tests", str(total))
    root.set("failures", str(failures))
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
