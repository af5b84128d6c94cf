"""The pattern expression of a multi-subpattern rule: grammar, syntax tree and validation.

``pattern:`` combines subpattern names with ``AND``, ``OR``, ``FOLLOWED_BY``, ``NOT FOLLOWED_BY``
and parentheses (FortiSIEM's operators between subpatterns). Binding, tightest first:
``FOLLOWED_BY`` / ``NOT FOLLOWED_BY`` (left to right), then ``AND``, then ``OR``; so
``a AND b FOLLOWED_BY c`` is ``a AND (b FOLLOWED_BY c)``. ``FOLLOWED BY`` may be written with a space.

``NOT FOLLOWED_BY`` (absence) is allowed once, at the top of the expression:
``<positive expression> NOT FOLLOWED_BY <positive expression>``. The semantics are in
``docs/correlation-semantics.md``; evaluation lives in :mod:`shared.sequence`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from .errors import RuleError

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: seq (_AND seq)*
?seq: atom
    | seq _FOLLOWED atom         -> then
    | seq _NOT _FOLLOWED atom    -> absent
?atom: "(" or_expr ")"
     | NAME                      -> sub
_OR.2: /or\b/i
_AND.2: /and\b/i
_NOT.2: /not\b/i
_FOLLOWED.2: /followed(?:_|\s+)by\b/i
NAME: /[A-Za-z_][A-Za-z0-9_]*/
%ignore /\s+/
"""

_PARSER = Lark(GRAMMAR, parser="lalr", maybe_placeholders=False)


@dataclass(frozen=True)
class Sub:
    name: str
    column: int = 0


@dataclass(frozen=True)
class AllOf:
    children: tuple[PatternNode, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[PatternNode, ...]


@dataclass(frozen=True)
class Then:
    """``left FOLLOWED_BY right``: right completes strictly after left completed."""

    left: PatternNode
    right: PatternNode


@dataclass(frozen=True)
class Absent:
    """``left NOT FOLLOWED_BY right``: left completed and right did not follow within the window."""

    left: PatternNode
    right: PatternNode


PatternNode = Union[Sub, AllOf, AnyOf, Then, Absent]


def pattern_text(node: PatternNode) -> str:
    """Canonical text of a pattern (parses back to the same tree)."""
    if isinstance(node, Sub):
        return node.name
    if isinstance(node, (AllOf, AnyOf)):
        joiner = " AND " if isinstance(node, AllOf) else " OR "
        return joiner.join(_child(c) for c in node.children)
    op = " FOLLOWED_BY " if isinstance(node, Then) else " NOT FOLLOWED_BY "
    left = pattern_text(node.left) if isinstance(node.left, (Sub, Then)) else _child(node.left)
    return left + op + _child(node.right)


def _child(node: PatternNode) -> str:
    return node.name if isinstance(node, Sub) else f"({pattern_text(node)})"


def names(node: PatternNode) -> Iterator[Sub]:
    """Every subpattern reference, left to right."""
    if isinstance(node, Sub):
        yield node
    elif isinstance(node, (AllOf, AnyOf)):
        for c in node.children:
            yield from names(c)
    else:
        yield from names(node.left)
        yield from names(node.right)


def _absences(node: PatternNode) -> Iterator[Absent]:
    if isinstance(node, Absent):
        yield node
    if isinstance(node, (AllOf, AnyOf)):
        for c in node.children:
            yield from _absences(c)
    elif isinstance(node, (Then, Absent)):
        yield from _absences(node.left)
        yield from _absences(node.right)


@v_args(inline=True)
class _ToTree(Transformer[Token, PatternNode]):
    def or_expr(self, *children: PatternNode) -> PatternNode:
        return AnyOf(tuple(children))

    def and_expr(self, *children: PatternNode) -> PatternNode:
        return AllOf(tuple(children))

    def then(self, left: PatternNode, right: PatternNode) -> PatternNode:
        return Then(left, right)

    def absent(self, left: PatternNode, right: PatternNode) -> PatternNode:
        return Absent(left, right)

    def sub(self, name: Token) -> PatternNode:
        return Sub(str(name), name.column or 0)


def parse_pattern(text: str, known: tuple[str, ...]) -> PatternNode:
    """Parse and validate a pattern over the subpattern names ``known``.

    Raises:
        RuleError: bad syntax, an unknown or unused subpattern, or a misplaced ``NOT FOLLOWED_BY``;
            the message gives the column.
    """
    if not isinstance(text, str) or not text.strip():
        raise RuleError("empty pattern")
    try:
        tree = _ToTree().transform(_PARSER.parse(text))
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        if token is None or token.type == "$END":
            shown = "end of pattern" if token is not None else f"character {text[exc.pos_in_stream or 0]!r}"
        else:
            shown = repr(str(token))
        at_end = token is not None and token.type == "$END"
        column = exc.column if exc.column > 0 and not at_end else len(text) + 1
        raise RuleError(
            f"unexpected {shown} (operators: AND, OR, FOLLOWED_BY, NOT FOLLOWED_BY)", column=column, text=text
        ) from None
    except VisitError as exc:  # pragma: no cover - the transformer raises nothing of its own
        raise RuleError(f"cannot read pattern ({exc.orig_exc})", text=text) from None
    except RecursionError:
        raise RuleError("pattern nested too deeply", text=text[:80]) from None
    used = list(names(tree))
    for ref in used:
        if ref.name not in known:
            raise RuleError(f"unknown subpattern {ref.name!r} (defined: {', '.join(known)})", column=ref.column, text=text)
    missing = [n for n in known if n not in {r.name for r in used}]
    if missing:
        raise RuleError(f"subpattern(s) {', '.join(missing)} defined but not used in the pattern", text=text)
    absences = list(_absences(tree))
    if absences and (len(absences) > 1 or not isinstance(tree, Absent)):
        raise RuleError(
            "NOT FOLLOWED_BY is supported once, at the top of the pattern: '<expr> NOT FOLLOWED_BY <expr>'", text=text
        )
    return tree
