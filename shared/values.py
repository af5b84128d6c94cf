"""Value helpers shared by the query language and the aggregates: one notion of number and text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def as_number(value: Any) -> float | None:
    """Return ``value`` as a float if it is a number or a numeric string, else ``None``.

    Booleans are not numbers here: ``True`` would otherwise compare equal to 1.
    """
    kind = type(value)
    if kind is int or kind is float:
        return float(value)
    if kind is str:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def iter_values(value: Any) -> Iterable[Any]:
    """Yield each value of a possibly multi-valued attribute (a list or tuple holds several)."""
    if type(value) in (list, tuple):
        return value  # type: ignore[no-any-return]
    return (value,)


def as_text(value: Any) -> str:
    """Canonical lower-case text of a scalar for case-insensitive comparison."""
    if type(value) is str:
        return value.lower()
    if type(value) is float and value.is_integer():
        return str(int(value))
    if type(value) is bool:
        return "true" if value else "false"
    return str(value).lower()


def is_empty(value: Any) -> bool:
    """Absent, null, an empty string or an empty list all count as "no value"."""
    return value is None or value == "" or (type(value) in (list, tuple) and len(value) == 0)
