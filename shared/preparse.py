"""Pre-parse filter: answer "no rule can match this line" from the raw bytes of a JSON line.

On a Defender streaming export nearly every row comes from a table no rule reads (process, network,
file events...). Building those rows as Python objects is most of what a replay of such a stream
costs. :class:`LineFilter` parses the line with simdjson (``cysimdjson``: a C++ parser that
validates the whole document, UTF-8, strings, numbers and nesting included, without building Python
objects) and reads only the top-level keys, ``category`` and the type of ``properties``. It answers
:class:`~shared.normalize.Skipped` only when the full path (``orjson.loads`` + ``Normalizer``) would
answer exactly that ``Skipped`` for the same line; in every other case it answers ``None`` and the
line takes the full path, so a bad line still yields its :class:`~shared.normalize.Rejection`.

The filter is exact, not heuristic. It skips a line only if all of these hold:

* simdjson accepts the line as one JSON object: it rejects everything orjson rejects (invalid
  UTF-8, lone surrogates, control characters in strings, numbers out of float range, nesting past
  1,024 levels); integers past 64 bits, which orjson takes, simdjson refuses, so such a line takes
  the full path;
* ``category`` and ``properties`` each appear once among the top-level keys (simdjson reads the
  first of two equal keys where orjson keeps the last) and there is no ``value`` key (an envelope);
* ``category`` is a string ``AdvancedHunting-<Table>`` with ``<Table>`` other than ``AlertInfo``
  (whose event type depends on the alert's own category) and ``properties`` is an object;
* no enabled rule can match the event type of that table (the same ``wanted(event_type)`` answer the
  normalizer asks the engine for).

``tests/test_preparse.py`` checks this against the full path on generated and damaged lines.
"""

from __future__ import annotations

from collections.abc import Callable

import cysimdjson

from .normalize import EVIDENCE_EVENT_TYPE, Skipped

_STREAM_PREFIX = "AdvancedHunting-"
_NOT_FILTERED = "AlertInfo"  # event type depends on properties.Category: always the full path
_MAX_CACHED = 4096  # distinct categories remembered; beyond that each is decided anew
_UNDECIDED = Skipped("")


class LineFilter:
    """``filter(line)`` -> the ``Skipped`` the full path would give, or ``None`` (take the full path)."""

    def __init__(self, wanted: Callable[[str], bool]) -> None:
        self._wanted = wanted
        self.check = self._compile()

    def __call__(self, line: bytes) -> Skipped | None:
        return self.check(line)

    def _decide(self, category: str) -> Skipped | None:
        if not category.startswith(_STREAM_PREFIX):
            return None
        table = category[len(_STREAM_PREFIX) :]
        if table == _NOT_FILTERED:
            return None
        event_type = EVIDENCE_EVENT_TYPE if table == "AlertEvidence" else f"MS-Defender-{table}"
        return None if self._wanted(event_type) else Skipped(event_type)

    def _compile(self) -> Callable[[bytes], Skipped | None]:
        """The per-line check as one closure (no attribute look-ups on the hot path)."""
        parse = cysimdjson.JSONParser().parse  # one parser per filter: it reuses its buffers
        json_object = cysimdjson.JSONObject
        by_category: dict[str, Skipped | None] = {}
        decide = self._decide
        undecided = _UNDECIDED

        def check(line: bytes) -> Skipped | None:
            try:
                doc = parse(line)
                category = doc.get("category")  # None when absent; AttributeError when not an object
            except (ValueError, RuntimeError, AttributeError):  # simdjson's errors, UTF-8 ones included
                return None
            if type(category) is not str:
                return None
            decided = by_category.get(category, undecided)
            if decided is undecided:
                decided = decide(category)
                if len(by_category) < _MAX_CACHED:
                    by_category[category] = decided
            if decided is None:
                return None
            keys = list(doc.keys())  # unescaped, duplicates kept
            if "value" in keys or keys.count("category") != 1 or keys.count("properties") != 1:
                return None
            if type(doc.get("properties")) is not json_object:
                return None
            return decided

        return check
