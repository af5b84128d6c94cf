"""Value helpers shared by the query language and the aggregates: one notion of number and text."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

MAX_CACHED_TEXTS = 4096  # answers a TextMemo keeps (its keys are input: bounded)
MAX_CACHED_TEXT_CHARS = 1024  # only inputs this short are remembered (real ones are a few hundred characters)

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
_MISSING: Any = object()


class TextMemo(dict[_K, _V], Generic[_K, _V]):
    """``read(key)``, remembered: for answers that depend on a short input text alone (technique
    lists, category spellings, which a feed repeats). At most ``MAX_CACHED_TEXTS`` answers, of keys
    whose texts total at most ``MAX_CACHED_TEXT_CHARS`` (a record may hold a 1 MiB text); when full,
    it starts over."""

    __slots__ = ("_read",)

    def __init__(self, read: Callable[[_K], _V]) -> None:
        super().__init__()
        self._read = read

    def __call__(self, key: _K, chars: int) -> _V:
        """The answer for ``key``, whose texts are ``chars`` long."""
        found = self.get(key, _MISSING)
        if found is _MISSING:
            found = self._read(key)
            if chars <= MAX_CACHED_TEXT_CHARS:
                if len(self) >= MAX_CACHED_TEXTS:
                    self.clear()
                self[key] = found
        return found  # type: ignore[no-any-return]


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
