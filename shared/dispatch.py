"""Indexed rule matching: test an event only against the rules that could match it.

A rule set is compiled, per event type seen, into the rules whose query could still hold knowing
only the ``eventType`` (the same three-valued evaluation the prefilter uses), and those rules are
indexed by one exact-value condition each query cannot do without: a top-level conjunct such as
``attackTechniqueId = "T1053"`` or ``alertName IN ("a", "b")`` (string values, compared
case-insensitively, as the query language does). An event then meets only the rules of its event
type that have no such condition, plus those whose indexed value it carries. Every candidate is
still tested with its full compiled query, in rule order, so the result is exactly the brute-force
``[r for r in rules if r.query.matches(attrs)]`` (``tests/test_dispatch.py`` checks this on random
rules and events); the index only skips rules that provably cannot match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .query import And, Compare, InList, Node, Or, partial_eval
from .rules import Rule
from .values import as_text

MAX_EVENT_TYPES = 4096  # event types remembered; event types are input, so the cache is bounded
_NO_TYPE = object()  # cache key for events without a string eventType


def _exact_values(node: Node) -> tuple[str, frozenset[str]] | None:
    """``(attr, lower-cased values)`` if ``node`` holds only when ``attr`` has one of the values."""
    if isinstance(node, Compare) and node.op == "=" and isinstance(node.value, str):
        return node.attr, frozenset([as_text(node.value)])
    if isinstance(node, InList) and not node.negated and node.values and all(isinstance(v, str) for v in node.values):
        return node.attr, frozenset(as_text(v) for v in node.values)
    if isinstance(node, Or) and node.children:
        parts = [_exact_values(c) for c in node.children]
        if all(p is not None for p in parts) and len({p[0] for p in parts if p is not None}) == 1:
            return parts[0][0], frozenset().union(*(p[1] for p in parts if p is not None))  # type: ignore[index]
    return None


def index_condition(tree: Node) -> tuple[str, frozenset[str]] | None:
    """The exact-value condition a query cannot do without (the one with the fewest values), if any.

    ``eventType`` is left out: event types are handled by the per-type candidate lists.
    """
    conjuncts = tree.children if isinstance(tree, And) else (tree,)
    best: tuple[str, frozenset[str]] | None = None
    for conjunct in conjuncts:
        found = _exact_values(conjunct)
        if found is None or found[0] == "eventType":
            continue
        if best is None or len(found[1]) < len(best[1]):
            best = found
    return best


@dataclass
class _Candidates:
    """The rules an event of one event type can match: unindexed ones and indexed ones."""

    always: list[tuple[int, Rule]] = field(default_factory=list)
    by_value: dict[str, dict[str, list[tuple[int, Rule]]]] = field(default_factory=dict)


class Dispatch:
    """``matching(attrs)``: the rules (in their order) whose query matches the event's attributes."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._conditions = [index_condition(r.query.tree) for r in self.rules]
        self._by_type: dict[object, _Candidates] = {}

    def _candidates(self, event_type: object) -> _Candidates:
        known = {"eventType": event_type} if event_type is not _NO_TYPE else {}
        out = _Candidates()
        for pos, (rule, condition) in enumerate(zip(self.rules, self._conditions, strict=True)):
            if partial_eval(rule.query.tree, known) is False:
                continue
            if condition is None:
                out.always.append((pos, rule))
                continue
            attr, values = condition
            table = out.by_value.setdefault(attr, {})
            for value in values:
                table.setdefault(value, []).append((pos, rule))
        return out

    def matching(self, attrs: Mapping[str, Any]) -> list[Rule]:
        event_type = attrs.get("eventType")
        key = event_type if type(event_type) is str else _NO_TYPE
        cand = self._by_type.get(key)
        if cand is None:
            cand = self._candidates(key)
            if len(self._by_type) >= MAX_EVENT_TYPES:
                self._by_type.clear()
            self._by_type[key] = cand
        found = cand.always
        merged = False  # several lists joined: order and uniqueness to restore
        for attr, table in cand.by_value.items():
            value = attrs.get(attr)
            if value is None:
                continue
            if type(value) in (list, tuple):
                keys = [item.lower() if type(item) is str else as_text(item) for item in value]
            else:
                keys = [value.lower() if type(value) is str else as_text(value)]
            for text in keys:
                hits = table.get(text)
                if hits:
                    merged = merged or bool(found)
                    found = found + hits if found else hits
        if merged:
            unique = dict(found)  # position -> rule
            return [unique[pos] for pos in sorted(unique) if unique[pos].query.matches(attrs)]
        return [rule for _, rule in found if rule.query.matches(attrs)]
