"""Aggregate constraints (FortiSIEM ``GroupEvtConstr``) and the aggregates a rule's incident maps.

``COUNT(*)``, ``COUNT(attr)``, ``COUNT(DISTINCT attr)``, ``SUM``, ``AVG``, ``MIN``, ``MAX`` over the
events of a window, compared with a number by ``= != < <= > >=``, combined with ``AND``/``OR`` and
parentheses. A compiled constraint declares which per-event values the window must keep
(``needed_attrs``); ``COUNT(*)`` needs none, so a COUNT(*) window keeps only identities and times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from .errors import RuleError
from .query import MAX_NUMBER_DIGITS, check_length
from .values import as_number, as_text, is_empty, iter_values

FUNCTIONS = ("COUNT", "SUM", "AVG", "MIN", "MAX")
MAX_CONSTRAINT_CHARS = 4_096  # FortiSIEM constraints are a few comparisons
MAX_CONSTRAINT_DEPTH = 32  # evaluated recursively for every event of every group

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: atom (_AND atom)*
?atom: "(" or_expr ")"
     | aggregate CMP_OP NUMBER -> compare
aggregate: NAME "(" STAR ")"             -> star
         | NAME "(" _DISTINCT ATTR ")"   -> distinct
         | NAME "(" ATTR ")"             -> plain
STAR: "*"
CMP_OP: "<=" | ">=" | "!=" | "<>" | "=" | "<" | ">"
_OR.2: /or\b/i
_AND.2: /and\b/i
_DISTINCT.2: /distinct\b/i
NAME: /[A-Za-z_]+(?=\s*\()/
ATTR: /[A-Za-z_$@][A-Za-z0-9_.$@]*/
NUMBER: /-?\d+(?:\.\d+)?/
%ignore /\s+/
"""

_PARSER = Lark(GRAMMAR, parser="lalr", maybe_placeholders=False)
_AGG_PARSER = Lark(GRAMMAR, parser="lalr", maybe_placeholders=False, start="aggregate")


@dataclass(frozen=True)
class Aggregate:
    """One aggregate function over the window, e.g. ``COUNT(DISTINCT hostName)``."""

    func: str
    attr: str | None = None  # None for COUNT(*)
    distinct: bool = False

    @property
    def text(self) -> str:
        if self.attr is None:
            return f"{self.func}(*)"
        return f"{self.func}({'DISTINCT ' if self.distinct else ''}{self.attr})"

    def compute(self, column: Sequence[Any] | None, count: int) -> float | int | None:
        """Value over a window of ``count`` events; ``column`` holds this aggregate's attribute."""
        if self.attr is None:
            return count
        assert column is not None
        present = [v for v in column if not is_empty(v)]
        if self.func == "COUNT":
            if self.distinct:
                return len({as_text(x) for v in present for x in iter_values(v)})
            return len(present)
        numbers = [n for v in present for x in iter_values(v) for n in [as_number(x)] if n is not None]
        if not numbers:
            return None
        if self.func == "SUM":
            return sum(numbers)
        if self.func == "AVG":
            return sum(numbers) / len(numbers)
        return min(numbers) if self.func == "MIN" else max(numbers)


@dataclass(frozen=True)
class Comparison:
    aggregate: Aggregate
    op: str
    bound: float


@dataclass(frozen=True)
class AllOf:
    children: tuple[ConstraintNode, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[ConstraintNode, ...]


ConstraintNode = Union[Comparison, AllOf, AnyOf]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _check_function(name: Token, *, star: bool = False, distinct: bool = False) -> str:
    func = str(name).upper()
    if func not in FUNCTIONS:
        raise RuleError(f"unknown aggregate {str(name)!r} (known: {', '.join(FUNCTIONS)})", column=name.column)
    if (star or distinct) and func != "COUNT":
        shown = "*" if star else "DISTINCT"
        raise RuleError(f"{func}({shown} ...) is not an aggregate; only COUNT takes {shown}", column=name.column)
    return func


@v_args(inline=True)
class _ToTree(Transformer[Token, Any]):
    def or_expr(self, *children: ConstraintNode) -> ConstraintNode:
        return AnyOf(tuple(children))

    def and_expr(self, *children: ConstraintNode) -> ConstraintNode:
        return AllOf(tuple(children))

    def star(self, name: Token, _star: Token) -> Aggregate:
        return Aggregate(_check_function(name, star=True))

    def distinct(self, name: Token, attr: Token) -> Aggregate:
        return Aggregate(_check_function(name, distinct=True), str(attr), True)

    def plain(self, name: Token, attr: Token) -> Aggregate:
        return Aggregate(_check_function(name), str(attr))

    def compare(self, aggregate: Aggregate, op: Token, number: Token) -> Comparison:
        operator = "!=" if str(op) == "<>" else str(op)
        bound = float(number)
        if not math.isfinite(bound) or len(number) > MAX_NUMBER_DIGITS:
            raise RuleError(f"number of {len(number)} characters (at most {MAX_NUMBER_DIGITS})", column=number.column)
        return Comparison(aggregate, operator, bound)


def _parse(parser: Lark, text: str, what: str) -> Any:
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"empty {what}")
    check_length(text, what, MAX_CONSTRAINT_CHARS)
    try:
        tree = _ToTree().transform(parser.parse(text))
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        if token is None or token.type == "$END":
            shown = "end of text" if token is not None else f"character {text[exc.pos_in_stream or 0]!r}"
        else:
            shown = repr(str(token))
        raise RuleError(f"unexpected {shown}", column=exc.column if exc.column > 0 else len(text) + 1, text=text) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            raise RuleError(exc.orig_exc.reason, column=exc.orig_exc.column, text=text) from None
        raise RuleError(f"cannot compile ({exc.orig_exc})", text=text) from None
    except RecursionError:
        raise RuleError(f"{what} nested too deeply", text=text) from None
    if not isinstance(tree, Aggregate) and _depth(tree) > MAX_CONSTRAINT_DEPTH:
        raise RuleError(f"{what} nested more than {MAX_CONSTRAINT_DEPTH} levels deep (AND, OR)", text=text)
    return tree


def _depth(root: ConstraintNode) -> int:
    deepest = 0
    stack: list[tuple[ConstraintNode, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if not isinstance(node, Comparison):
            stack.extend((c, depth + 1) for c in node.children)
    return deepest


def parse_aggregate(text: str) -> Aggregate:
    """Parse one aggregate such as ``COUNT(*)`` (used by incident attribute mappings)."""
    result = _parse(_AGG_PARSER, text, "aggregate")
    assert isinstance(result, Aggregate)
    return result


def _aggregates_of(node: ConstraintNode) -> list[Aggregate]:
    if isinstance(node, Comparison):
        return [node.aggregate]
    return [a for c in node.children for a in _aggregates_of(c)]


def _to_text(node: ConstraintNode) -> str:
    if isinstance(node, Comparison):
        bound = int(node.bound) if node.bound.is_integer() else node.bound
        return f"{node.aggregate.text} {node.op} {bound}"
    joiner = " AND " if isinstance(node, AllOf) else " OR "
    return joiner.join(_to_text(c) if isinstance(c, Comparison) else f"({_to_text(c)})" for c in node.children)


@dataclass(frozen=True)
class Constraint:
    """A compiled aggregate constraint."""

    text: str
    tree: ConstraintNode

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """Raises: RuleError naming the column and quoting the text."""
        tree = _parse(_PARSER, text, "aggregate constraint")
        return cls(text=text, tree=tree)

    @property
    def aggregates(self) -> tuple[Aggregate, ...]:
        return tuple(dict.fromkeys(_aggregates_of(self.tree)))

    @property
    def canonical(self) -> str:
        return _to_text(self.tree)

    def holds(self, values: dict[Aggregate, float | int | None]) -> bool:
        """Evaluate with the aggregates' current values (None = no value: comparison is false)."""
        return _holds(self.tree, values)


def _holds(node: ConstraintNode, values: dict[Aggregate, float | int | None]) -> bool:
    if isinstance(node, Comparison):
        v = values.get(node.aggregate)
        return v is not None and _OPS[node.op](float(v), node.bound)
    if isinstance(node, AllOf):
        return all(_holds(c, values) for c in node.children)
    return any(_holds(c, values) for c in node.children)


def needed_attrs(aggregates: Sequence[Aggregate]) -> tuple[str, ...]:
    """The per-event attributes a window must keep to compute ``aggregates`` (sorted, unique)."""
    return tuple(sorted({a.attr for a in aggregates if a.attr is not None}))
