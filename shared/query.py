"""FortiSIEM's subpattern query language: grammar, syntax tree, printer and compiled predicates.

A query is parsed once (``parse_query``) into an immutable syntax tree, which ``compile`` turns into
a plain Python closure: evaluating an event is then only attribute look-ups and comparisons.

Semantics (also in the README's rule-language section):

* string comparisons are case-insensitive for every operator;
* an attribute may hold several values (a list); a positive operator holds if any value
  satisfies it, its negation holds if none does;
* a missing attribute satisfies no positive operator and every negated one;
* ``IS NULL`` holds when the attribute is missing, null, ``""`` or an empty list;
* ``<``, ``<=``, ``>``, ``>=`` and ``BETWEEN`` compare numbers (numeric strings count as numbers;
  anything else does not match); ``BETWEEN`` also compares IP addresses when both bounds are IPs;
* ``=`` with a number literal compares numerically; with a string literal, as text;
* regular expressions are Python ``re`` patterns, searched (not anchored), case-insensitive,
  compiled once; a bad pattern, or one repeating a repeating group (``(a+)+``), is a rule error;
* ``IN`` / ``NOT IN`` lists may name event-type groups (``Group@NAME``, FortiSIEM's syntax): the
  group's members (``rules/groups/*.yaml``) join the list; an unknown group is a rule error.

Cross-subpattern conditions (a multi-subpattern rule's ``correlation:``) use the same operators on
``subpattern.attribute`` references: ``persist.hostName = cred.hostName AND persist.user != cred.user``
(:func:`parse_correlation`).
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from .errors import RuleError
from .values import as_number, as_text, is_empty

MAX_QUERY_CHARS = 65_536  # the largest shipped or imported query is under 1,000 characters
MAX_QUERY_DEPTH = 32  # nested AND/OR/NOT: each level is a frame in every walk and a parenthesis in compile_node
MAX_QUERY_CONDITIONS = 1_000  # conditions (an IN list is one); each costs load time and a closure
MAX_NUMBER_DIGITS = 100  # a number literal longer than this is not a count, a severity nor a port

Predicate = Callable[[Mapping[str, Any]], bool]
Literal = Union[str, int, float]

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*
?not_expr: _NOT not_expr -> negate
         | atom
?atom: "(" or_expr ")"
     | comparison
?comparison: ATTR CMP_OP value                             -> compare
           | ATTR _CONTAIN value                           -> contain
           | ATTR _NOT _CONTAIN value                      -> not_contain
           | ATTR _IN "(" item ("," item)* ")"             -> in_list
           | ATTR _NOT _IN "(" item ("," item)* ")"        -> not_in_list
           | ATTR _REGEXP STRING                           -> regexp
           | ATTR _NOT _REGEXP STRING                      -> not_regexp
           | ATTR _BETWEEN "(" value "," value ")"         -> between
           | ATTR _NOT _BETWEEN "(" value "," value ")"    -> not_between
           | ATTR _IS _NULL                                -> is_null
           | ATTR _IS _NOT _NULL                           -> is_not_null
?value: STRING | IPV4 | NUMBER
?item: value | GROUP
GROUP.3: /group@[A-Za-z0-9_.\-]+/i
CMP_OP: "<=" | ">=" | "!=" | "<>" | "=" | "<" | ">"
_OR.2: /or\b/i
_AND.2: /and\b/i
_NOT.2: /not\b/i
_CONTAIN.2: /contains?\b/i
_IN.2: /in\b/i
_REGEXP.2: /regexp\b/i
_BETWEEN.2: /between\b/i
_IS.2: /is\b/i
_NULL.2: /null\b/i
ATTR: /[A-Za-z_$@][A-Za-z0-9_.$@]*/
STRING: /"(?:[^"\\]|\\.)*"/ | /'(?:[^'\\]|\\.)*'/
IPV4.3: /\d{1,3}(?:\.\d{1,3}){3}(?![0-9.])/
NUMBER: /-?\d+(?:\.\d+)?(?![A-Za-z0-9_.])/
%ignore /\s+/
"""

_PARSER = Lark(GRAMMAR, parser="lalr", maybe_placeholders=False, propagate_positions=False)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}
_STRING_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _decode_string(token: str) -> str:
    """Unquote a string literal: ``\\"``, ``\\'``, ``\\\\``, ``\\n``, ``\\t``, ``\\r`` are escapes."""
    body = token[1:-1]
    return _STRING_ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def _decode_regex(token: str) -> str:
    """Unquote a regex literal: only the quote escape is removed; ``\\\\`` stays a regex escape."""
    quote = token[0]
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: m.group(1) if m.group(1) == quote else m.group(0), body)


def _encode_string(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f'"{out}"'


def _encode_regex(pattern: str) -> str:
    # Keep backslash pairs as they are; escape a bare quote.
    return '"' + re.sub(r'\\.|"', lambda m: '\\"' if m.group(0) == '"' else m.group(0), pattern) + '"'


def _literal_text(value: Literal) -> str:
    return _encode_string(value) if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------------------
# Syntax tree
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    attr: str
    op: str  # one of = != < <= > >=
    value: Literal


@dataclass(frozen=True)
class Contain:
    attr: str
    value: Literal
    negated: bool = False


@dataclass(frozen=True)
class InList:
    attr: str
    values: tuple[Literal, ...]
    negated: bool = False
    groups: tuple[str, ...] = ()  # ``Group@NAME`` references, as written
    members: tuple[str, ...] = ()  # the groups' event types, resolved at parse time


@dataclass(frozen=True)
class Regexp:
    attr: str
    pattern: str
    negated: bool = False


@dataclass(frozen=True)
class Between:
    attr: str
    low: Literal
    high: Literal
    negated: bool = False


@dataclass(frozen=True)
class IsNull:
    attr: str
    negated: bool = False


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


Node = Union[Compare, Contain, InList, Regexp, Between, IsNull, Not, And, Or]
Leaf = Union[Compare, Contain, InList, Regexp, Between, IsNull]


def to_text(node: Node) -> str:
    """Print a syntax tree as query text that parses back to the same tree."""
    if isinstance(node, (And, Or)):
        joiner = " AND " if isinstance(node, And) else " OR "
        return joiner.join(_child_text(c) for c in node.children)
    if isinstance(node, Not):
        return "NOT " + _child_text(node.child)
    neg = "NOT " if getattr(node, "negated", False) else ""
    if isinstance(node, Compare):
        return f"{node.attr} {node.op} {_literal_text(node.value)}"
    if isinstance(node, Contain):
        return f"{node.attr} {neg}CONTAIN {_literal_text(node.value)}"
    if isinstance(node, InList):
        items = [_literal_text(v) for v in node.values] + [f"Group@{g}" for g in node.groups]
        return f"{node.attr} {neg}IN ({', '.join(items)})"
    if isinstance(node, Regexp):
        return f"{node.attr} {neg}REGEXP {_encode_regex(node.pattern)}"
    if isinstance(node, Between):
        return f"{node.attr} {neg}BETWEEN ({_literal_text(node.low)}, {_literal_text(node.high)})"
    return f"{node.attr} IS {neg}NULL"


def _child_text(node: Node) -> str:
    text = to_text(node)
    return f"({text})" if isinstance(node, (And, Or, Not)) else text


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _number(token: Token) -> int | float:
    text = str(token)
    if len(text) > MAX_NUMBER_DIGITS:
        raise RuleError(f"number of {len(text)} characters (at most {MAX_NUMBER_DIGITS})", column=token.column)
    return float(text) if "." in text else int(text)


def _value(token: Token) -> Literal:
    if token.type == "STRING":
        return _decode_string(token)
    if token.type == "IPV4":
        return str(token)
    return _number(token)


Groups = Mapping[str, tuple[str, ...]]  # event-type group name -> event types


@v_args(inline=True)
class _ToTree(Transformer[Token, Node]):
    def __init__(self, groups: Groups | None = None) -> None:
        super().__init__()
        self.groups = {k.lower(): (k, v) for k, v in (groups or {}).items()}

    def _list(self, attr: Token, items: tuple[Token, ...], negated: bool) -> Node:
        values: list[Literal] = []
        names: list[str] = []
        members: list[str] = []
        for item in items:
            if item.type != "GROUP":
                values.append(_value(item))
                continue
            wanted = str(item).split("@", 1)[1]
            found = self.groups.get(wanted.lower())
            if found is None:
                known = ", ".join(sorted(v[0] for v in self.groups.values())[:20]) or "none loaded"
                raise RuleError(f"unknown event-type group {wanted!r} (known: {known})", column=item.column, text=str(item))
            names.append(found[0])
            members.extend(found[1])
        return InList(str(attr), tuple(values), negated, tuple(names), tuple(dict.fromkeys(members)))

    def or_expr(self, *children: Node) -> Node:
        return Or(tuple(children))

    def and_expr(self, *children: Node) -> Node:
        return And(tuple(children))

    def negate(self, child: Node) -> Node:
        return Not(child)

    def compare(self, attr: Token, op: Token, value: Token) -> Node:
        operator = "!=" if str(op) == "<>" else str(op)
        literal = _value(value)
        if operator in ("<", "<=", ">", ">=") and as_number(literal) is None:
            raise RuleError(f"operator {operator} needs a number", column=value.column, text=str(value))
        return Compare(str(attr), operator, literal)

    def contain(self, attr: Token, value: Token) -> Node:
        return Contain(str(attr), _value(value))

    def not_contain(self, attr: Token, value: Token) -> Node:
        return Contain(str(attr), _value(value), True)

    def in_list(self, attr: Token, *items: Token) -> Node:
        return self._list(attr, items, False)

    def not_in_list(self, attr: Token, *items: Token) -> Node:
        return self._list(attr, items, True)

    def regexp(self, attr: Token, pattern: Token, negated: bool = False) -> Node:
        text = _decode_regex(str(pattern))
        try:
            re.compile(text)
        except re.error as exc:
            raise RuleError(f"bad regular expression ({exc})", column=pattern.column, text=text) from None
        except (RecursionError, OverflowError):
            raise RuleError("regular expression too complex", column=pattern.column, text=text) from None
        if _nested_repeat(text):
            raise RuleError(
                "regular expression repeats a group that itself repeats (like '(a+)+'), which can take exponential "
                "time on a value that almost matches; repeat once ('(ab|c)+'), or make the inner part atomic ('(?>a+)')",
                column=pattern.column,
                text=text,
            )
        return Regexp(str(attr), text, negated)

    def not_regexp(self, attr: Token, pattern: Token) -> Node:
        return self.regexp(attr, pattern, True)

    def between(self, attr: Token, low: Token, high: Token, negated: bool = False) -> Node:
        lo, hi = _value(low), _value(high)
        if _range_kind(lo, hi) is None:
            raise RuleError("BETWEEN needs two numbers or two IP addresses", column=low.column, text=f"{lo}, {hi}")
        return Between(str(attr), lo, hi, negated)

    def not_between(self, attr: Token, low: Token, high: Token) -> Node:
        return self.between(attr, low, high, True)

    def is_null(self, attr: Token) -> Node:
        return IsNull(str(attr))

    def is_not_null(self, attr: Token) -> Node:
        return IsNull(str(attr), True)


_SRE_PARSE: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_UNBOUNDED_REPEATS = ("MAX_REPEAT", "MIN_REPEAT")


def _nested_repeat(pattern: str) -> bool:
    """Whether an unbounded repeat (``*``, ``+``, ``{n,}``) holds another one: the shape that makes a
    backtracking engine take exponential time (``(a+)+$`` on ``aaaa...b``). Possessive repeats and
    atomic groups do not backtrack, so what they hold starts afresh."""
    stack: list[tuple[Any, bool]] = [(_SRE_PARSE.parse(pattern), False)]
    while stack:
        items, inside = stack.pop()
        for op, av in items:
            name = str(op)
            if name in _UNBOUNDED_REPEATS or name == "POSSESSIVE_REPEAT":
                unbounded = av[1] == _SRE_PARSE.MAXREPEAT
                if unbounded and inside and name != "POSSESSIVE_REPEAT":
                    return True
                stack.append((av[2], (inside or unbounded) and name != "POSSESSIVE_REPEAT"))
            elif name == "SUBPATTERN":
                stack.append((av[-1], inside))
            elif name == "ATOMIC_GROUP":
                stack.append((av, False))
            elif name == "BRANCH":
                stack.extend((branch, inside) for branch in av[1])
            elif name in ("ASSERT", "ASSERT_NOT"):
                stack.append((av[1], inside))
            elif name == "GROUPREF_EXISTS":
                stack.extend((part, inside) for part in av[1:] if part is not None)
    return False


def _syntax_error(exc: UnexpectedInput, text: str) -> RuleError:
    if isinstance(exc, UnexpectedEOF):
        return RuleError("unexpected end of query", column=len(text) + 1, text=text)
    if isinstance(exc, UnexpectedCharacters):
        return RuleError(f"unexpected character {text[exc.pos_in_stream or 0]!r}", column=exc.column, text=text)
    token = getattr(exc, "token", None)
    if token is not None and token.type == "$END":
        return RuleError("unexpected end of query", column=len(text) + 1, text=text)
    shown = str(token) if token is not None else "?"
    return RuleError(f"unexpected {shown!r}", column=exc.column, text=text)


def parse_query(text: str, groups: Groups | None = None) -> Node:
    """Parse query text into a syntax tree; ``groups`` resolves ``Group@NAME`` references.

    Raises:
        RuleError: the text is not a valid query or names an unknown group; the message gives the column.
    """
    if not isinstance(text, str) or not text.strip():
        raise RuleError("empty query")
    check_length(text, "query", MAX_QUERY_CHARS)
    try:
        tree = _PARSER.parse(text)
        result = _ToTree(groups).transform(tree)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            err = exc.orig_exc
            raise RuleError(err.reason, column=err.column, text=err.text) from None
        raise RuleError(f"cannot compile ({exc.orig_exc})", text=text) from None
    except RecursionError:
        raise RuleError(f"query nested more than {MAX_QUERY_DEPTH} levels deep (AND, OR, NOT)") from None
    if isinstance(result, Token):  # a bare attribute or literal is not a condition
        raise RuleError("a condition is missing its operator", column=1, text=text)
    _check_shape(result)
    return result


def check_length(text: str, what: str, limit: int) -> None:
    """Raises: RuleError when ``text`` is longer than ``limit`` characters (before any parsing)."""
    if len(text) > limit:
        raise RuleError(f"{what} of {len(text)} characters (at most {limit})")


def _check_shape(root: Node) -> None:
    """At most ``MAX_QUERY_DEPTH`` levels and ``MAX_QUERY_CONDITIONS`` conditions (walked without recursion)."""
    conditions = 0
    stack: list[tuple[Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_QUERY_DEPTH:
            raise RuleError(f"query nested more than {MAX_QUERY_DEPTH} levels deep (AND, OR, NOT)")
        if isinstance(node, (And, Or)):
            stack.extend((c, depth + 1) for c in node.children)
        elif isinstance(node, Not):
            stack.append((node.child, depth + 1))
        else:
            conditions += 1
    if conditions > MAX_QUERY_CONDITIONS:
        raise RuleError(f"query of {conditions} conditions (at most {MAX_QUERY_CONDITIONS})")


# ---------------------------------------------------------------------------------------------
# Compilation to closures
# ---------------------------------------------------------------------------------------------


def _range_kind(low: Literal, high: Literal) -> str | None:
    if as_number(low) is not None and as_number(high) is not None:
        return "number"
    try:
        ipaddress.ip_address(str(low))
        ipaddress.ip_address(str(high))
    except ValueError:
        return None
    return "ip"


def _any(values: Any, test: Callable[[Any], bool]) -> bool:
    if type(values) in (list, tuple):
        return any(test(v) for v in values if v is not None)
    return test(values)


def _compile_equal(attr: str, literal: Literal) -> Predicate:
    target_num = as_number(literal) if not isinstance(literal, str) else None
    if target_num is not None:

        def num_test(v: Any) -> bool:
            return as_number(v) == target_num

        def eq_num(event: Mapping[str, Any]) -> bool:
            v = event.get(attr)
            return v is not None and _any(v, num_test)

        return eq_num

    target = as_text(literal)

    def eq_text(event: Mapping[str, Any]) -> bool:
        v = event.get(attr)
        if v is None:
            return False
        kind = type(v)
        if kind is str:
            return bool(v == target or v.lower() == target)
        if kind is tuple or kind is list:
            return any((x.lower() if type(x) is str else as_text(x)) == target for x in v)
        return as_text(v) == target

    return eq_text


_ORDER: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compile_leaf(node: Leaf) -> Predicate:
    attr = node.attr
    if isinstance(node, IsNull):
        if node.negated:
            return lambda e: not is_empty(e.get(attr))
        return lambda e: is_empty(e.get(attr))

    test: Callable[[Any], bool]
    if isinstance(node, Compare):
        if node.op in ("=", "!="):
            eq = _compile_equal(attr, node.value)
            if node.op == "=":
                return eq
            return lambda e: not eq(e)
        bound = as_number(node.value)
        assert bound is not None  # checked at parse time
        order = _ORDER[node.op]

        def test(v: Any) -> bool:
            n = as_number(v)
            return n is not None and order(n, bound)

        negated = False
    elif isinstance(node, Contain):
        needle = as_text(node.value)

        def test(v: Any) -> bool:
            return needle in as_text(v)

        if not node.negated:

            def contain(event: Mapping[str, Any]) -> bool:
                v = event.get(attr)
                if type(v) is str:
                    return needle in v.lower()
                return v is not None and _any(v, test)

            return contain
        negated = True
    elif isinstance(node, InList):
        texts = frozenset(as_text(v) for v in (*node.values, *node.members) if isinstance(v, str))
        numbers = frozenset(n for v in node.values if not isinstance(v, str) for n in [as_number(v)] if n is not None)
        if not numbers:
            return _text_list_leaf(attr, texts, node.negated)

        def test(v: Any) -> bool:
            if as_text(v) in texts:
                return True
            return bool(numbers) and as_number(v) in numbers

        negated = node.negated
    elif isinstance(node, Regexp):
        search = re.compile(node.pattern, re.IGNORECASE).search

        def test(v: Any) -> bool:
            return search(v if type(v) is str else str(v)) is not None

        negated = node.negated
    else:
        test = _between_test(node)
        negated = node.negated

    if negated:

        def none_match(event: Mapping[str, Any]) -> bool:
            v = event.get(attr)
            return v is None or not _any(v, test)

        return none_match

    def any_match(event: Mapping[str, Any]) -> bool:
        v = event.get(attr)
        return v is not None and _any(v, test)

    return any_match


def _text_list_leaf(attr: str, texts: frozenset[str], negated: bool) -> Predicate:
    """``IN`` / ``NOT IN`` a list of texts only: what the general leaf computes (``as_text(v) in
    texts`` for each non-null value of the attribute), with the per-value calls written out."""

    def any_in(event: Mapping[str, Any]) -> bool:
        v = event.get(attr)
        if v is None:
            return False
        kind = type(v)
        if kind is str:
            return v.lower() in texts
        if kind is tuple or kind is list:
            for x in v:  # noqa: SIM110 (a loop, not any() over a generator: this runs per event)
                if x is not None and (x.lower() if type(x) is str else as_text(x)) in texts:
                    return True
            return False
        return as_text(v) in texts

    if negated:
        return lambda event: not any_in(event)
    return any_in


def _between_test(node: Between) -> Callable[[Any], bool]:
    if _range_kind(node.low, node.high) == "number":
        lo, hi = as_number(node.low), as_number(node.high)
        assert lo is not None and hi is not None

        def in_numbers(v: Any) -> bool:
            n = as_number(v)
            return n is not None and lo <= n <= hi

        return in_numbers
    ip_lo, ip_hi = ipaddress.ip_address(str(node.low)), ipaddress.ip_address(str(node.high))

    def in_ips(v: Any) -> bool:
        try:
            ip = ipaddress.ip_address(str(v))
        except ValueError:
            return False
        return ip.version == ip_lo.version and ip_lo <= ip <= ip_hi  # type: ignore[operator]

    return in_ips


def compile_node(node: Node) -> Predicate:
    """Turn a syntax tree into one predicate function over an event's attribute mapping.

    The tree is compiled to the source of a single Python function: string ``=`` and ``CONTAIN``
    on single-valued attributes are inlined (the hot path of every Defender rule); every other
    condition calls its own closure. Values reach the code through the function's namespace, never
    through its source text, so rule text cannot inject code.
    """
    namespace: dict[str, Any] = {"_as_text": as_text}
    source = _emit(node, namespace)
    code = f"def _predicate(e):\n    return bool({source})\n"
    exec(compile(code, "<rule query>", "exec"), namespace)
    predicate: Predicate = namespace["_predicate"]
    return predicate


def _emit(node: Node, ns: dict[str, Any]) -> str:
    n = len(ns)
    if isinstance(node, Not):
        return f"(not {_emit(node.child, ns)})"
    if isinstance(node, (And, Or)):
        joiner = " and " if isinstance(node, And) else " or "
        return "(" + joiner.join(_emit(c, ns) for c in node.children) + ")"
    leaf = _compile_leaf(node)
    ns[f"_leaf{n}"] = leaf
    ns[f"_attr{n}"] = node.attr
    if isinstance(node, Compare) and node.op == "=" and isinstance(node.value, str):
        ns[f"_t{n}"] = as_text(node.value)
        return (
            f"((_v{n} := e.get(_attr{n})).__class__ is str and (_v{n} == _t{n} or _v{n}.lower() == _t{n})"
            f" or _v{n} is not None and _v{n}.__class__ is not str and _leaf{n}(e))"
        )
    if isinstance(node, Contain) and not node.negated:
        ns[f"_t{n}"] = as_text(node.value)
        return (
            f"((_v{n} := e.get(_attr{n})).__class__ is str and _t{n} in _v{n}.lower()"
            f" or _v{n} is not None and _v{n}.__class__ is not str and _leaf{n}(e))"
        )
    return f"_leaf{n}(e)"


def partial_eval(node: Node, known: Mapping[str, Any]) -> bool | None:
    """Three-valued evaluation with only some attributes known: ``None`` means "depends".

    Used to skip events early: if a query is ``False`` knowing only an event's type, no other
    attribute can make it match, so the event's full attribute set is never built.
    """
    if isinstance(node, Not):
        inner = partial_eval(node.child, known)
        return None if inner is None else not inner
    if isinstance(node, (And, Or)):
        results = [partial_eval(c, known) for c in node.children]
        if isinstance(node, And):
            if False in results:
                return False
            return True if all(r is True for r in results) else None
        if True in results:
            return True
        return False if all(r is False for r in results) else None
    if node.attr not in known:
        return None
    return _compiled_leaf(node)(known)


def mentions(node: Node, attr: str, needle: str) -> bool:
    """Whether a positive condition on ``attr`` names a value containing ``needle`` (any case)."""
    if isinstance(node, (And, Or)):
        return any(mentions(c, attr, needle) for c in node.children)
    if isinstance(node, Not):
        return False
    if node.attr != attr or getattr(node, "negated", False):
        return False
    if (isinstance(node, Compare) and node.op == "=") or isinstance(node, Contain):
        values: tuple[Literal, ...] = (node.value,)  # type: ignore[union-attr]
    elif isinstance(node, InList):
        values = (*node.values, *node.members)
    elif isinstance(node, Regexp):
        values = (node.pattern,)
    else:
        return False
    return any(needle.lower() in str(v).lower() for v in values)


@lru_cache(maxsize=4096)
def _compiled_leaf(node: Leaf) -> Predicate:
    return _compile_leaf(node)


@dataclass(frozen=True)
class Query:
    """A parsed and compiled subpattern query."""

    text: str
    tree: Node
    matches: Predicate

    @classmethod
    def parse(cls, text: str, groups: Groups | None = None) -> Query:
        tree = parse_query(text, groups)
        return cls(text=text, tree=tree, matches=compile_node(tree))

    @classmethod
    def any_of(cls, queries: Sequence[Query]) -> Query:
        """One query matching what any of ``queries`` matches (a multi-subpattern rule's prefilter)."""
        tree = Or(tuple(q.tree for q in queries))
        return cls(text=" OR ".join(f"({q.text})" for q in queries), tree=tree, matches=compile_node(tree))

    def could_match(self, known: Mapping[str, Any]) -> bool:
        return partial_eval(self.tree, known) is not False


# ---------------------------------------------------------------------------------------------
# Cross-subpattern conditions (``correlation:`` of a multi-subpattern rule)
# ---------------------------------------------------------------------------------------------

CORRELATION_GRAMMAR = r"""
?start: conj
?conj: term (_AND term)*
?term: "(" conj ")"
     | REF CMP_OP REF      -> ref_compare
     | REF CMP_OP value    -> literal_compare
?value: STRING | IPV4 | NUMBER
CMP_OP: "<=" | ">=" | "!=" | "<>" | "=" | "<" | ">"
_AND.2: /and\b/i
REF: /[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_$@][A-Za-z0-9_.$@]*/
STRING: /"(?:[^"\\]|\\.)*"/ | /'(?:[^'\\]|\\.)*'/
IPV4.3: /\d{1,3}(?:\.\d{1,3}){3}(?![0-9.])/
NUMBER: /-?\d+(?:\.\d+)?(?![A-Za-z0-9_.])/
%ignore /\s+/
"""

_CORRELATION_PARSER = Lark(CORRELATION_GRAMMAR, parser="lalr", maybe_placeholders=False)


@dataclass(frozen=True)
class Ref:
    """``subpattern.attribute``; ``column`` is where it was written (1-based)."""

    sub: str
    attr: str
    column: int = 0

    @property
    def text(self) -> str:
        return f"{self.sub}.{self.attr}"


@dataclass(frozen=True)
class CrossCompare:
    """One cross-subpattern comparison: a reference against another reference or a literal."""

    left: Ref
    op: str  # = != < <= > >=
    right: Union[Ref, str, int, float]

    @property
    def text(self) -> str:
        right = self.right.text if isinstance(self.right, Ref) else _literal_text(self.right)
        return f"{self.left.text} {self.op} {right}"

    def refs(self) -> tuple[Ref, ...]:
        return (self.left, self.right) if isinstance(self.right, Ref) else (self.left,)

    def holds(self, left: Any, right: Any) -> bool:
        """Compare two attribute values (the right one is the literal when there is no right reference).

        Text compares case-insensitively, numbers numerically; a missing value satisfies only ``!=``.
        """
        if is_empty(left) or is_empty(right):
            return self.op == "!=" and not (is_empty(left) and is_empty(right))
        if self.op in ("=", "!="):
            a, b = as_number(left), as_number(right)
            same = a == b if a is not None and b is not None else as_text(left) == as_text(right)
            return same if self.op == "=" else not same
        a, b = as_number(left), as_number(right)
        return a is not None and b is not None and _ORDER[self.op](a, b)


def _split_ref(token: Token) -> Ref:
    sub, _, attr = str(token).partition(".")
    return Ref(sub, attr, token.column or 0)


@v_args(inline=True)
class _ToCorrelation(Transformer[Token, Any]):
    def conj(self, *terms: Any) -> tuple[CrossCompare, ...]:
        out: list[CrossCompare] = []
        for t in terms:
            out.extend(t if isinstance(t, tuple) else (t,))
        return tuple(out)

    def ref_compare(self, left: Token, op: Token, right: Token) -> CrossCompare:
        return CrossCompare(_split_ref(left), "!=" if str(op) == "<>" else str(op), _split_ref(right))

    def literal_compare(self, left: Token, op: Token, value: Token) -> CrossCompare:
        operator = "!=" if str(op) == "<>" else str(op)
        literal = _value(value)
        if operator in _ORDER and as_number(literal) is None:
            raise RuleError(f"operator {operator} needs a number", column=value.column, text=str(value))
        return CrossCompare(_split_ref(left), operator, literal)


def parse_correlation(text: str) -> tuple[CrossCompare, ...]:
    """Parse cross-subpattern conditions: comparisons of ``sub.attr`` joined by ``AND``.

    Raises:
        RuleError: not a conjunction of comparisons; the message gives the column.
    """
    if not isinstance(text, str) or not text.strip():
        raise RuleError("empty correlation condition")
    check_length(text, "correlation condition", MAX_QUERY_CHARS)
    try:
        result = _ToCorrelation().transform(_CORRELATION_PARSER.parse(text))
    except UnexpectedInput as exc:
        err = _syntax_error(exc, text)
        hint = " (conditions between subpatterns are comparisons of subpattern.attribute joined by AND)"
        raise RuleError(err.reason + hint, column=err.column, text=text) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            raise RuleError(exc.orig_exc.reason, column=exc.orig_exc.column, text=text) from None
        raise RuleError(f"cannot compile ({exc.orig_exc})", text=text) from None
    except RecursionError:
        raise RuleError("correlation condition nested too deeply", text=text) from None
    return result if isinstance(result, tuple) else (result,)
