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

:meth:`LineFilter.scan` decides a whole block of lines in one loop (no call, generator step or
position string per skipped line); ``LineFilter(wanted)(line)`` is the same decision for one line.
``tests/test_preparse.py`` checks both against the full path on generated and damaged lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import cysimdjson

from .normalize import EVIDENCE_EVENT_TYPE, Skipped

_STREAM_PREFIX = "AdvancedHunting-"
_NOT_FILTERED = "AlertInfo"  # event type depends on properties.Category: always the full path
_MAX_CACHED = 4096  # distinct categories remembered; beyond that each is decided anew


class LineFilter:
    """Which lines of a block the full path must read, and how many of the others it would skip."""

    def __init__(self, wanted: Callable[[str], bool]) -> None:
        self._wanted = wanted
        self._parse = cysimdjson.JSONParser().parse  # one parser per filter: it reuses its buffers
        self._skipped_as: dict[str, str] = {}  # category -> event type, for categories no rule can match
        self._read: set[str] = set()  # categories whose rows take the full path

    def __call__(self, line: bytes) -> Skipped | None:
        """The ``Skipped`` the full path would give for ``line``, or ``None`` (take the full path)."""
        kept, skipped = self.scan([line])
        return None if kept else Skipped(next(iter(skipped)))

    def _skipped_event_type(self, category: object) -> str | None:
        """The event type of rows of ``category`` if no rule can match them, else ``None`` (remembered)."""
        if type(category) is not str or category in self._read:
            return None
        table = category[len(_STREAM_PREFIX) :] if category.startswith(_STREAM_PREFIX) else _NOT_FILTERED
        event_type = EVIDENCE_EVENT_TYPE if table == "AlertEvidence" else f"MS-Defender-{table}"
        skipped = None if table == _NOT_FILTERED or self._wanted(event_type) else event_type
        if len(self._skipped_as) + len(self._read) < _MAX_CACHED:
            if skipped is None:
                self._read.add(category)
            else:
                self._skipped_as[category] = skipped
        return skipped

    def scan(self, lines: Sequence[bytes]) -> tuple[list[int], Counter[str]]:
        """``(indices of the lines to read in full, skipped lines counted by event type)``.

        One loop over the block with everything in locals: the cost of a skipped line is its
        simdjson parse and a few look-ups.
        """
        parse = self._parse
        json_object = cysimdjson.JSONObject
        skipped_as, read = self._skipped_as, self._read
        kept: list[int] = []
        skipped: list[str] = []
        keep, skip = kept.append, skipped.append
        for i, line in enumerate(lines):
            try:
                doc = parse(line)
                category = doc.get("category")
                event_type = skipped_as.get(category)  # None: not (yet) known as skipped
            except (ValueError, RuntimeError):  # simdjson's errors, UTF-8 ones included
                keep(i)
                continue
            except (AttributeError, TypeError):  # not an object, or a category that is no string (unhashable)
                keep(i)
                continue
            if event_type is None:  # (no exception raised per kept line: an AlertInfo row is kept here)
                if type(category) is not str or category in read:  # absent, not a string, or known to be read
                    keep(i)
                    continue
                found = self._skipped_event_type(category)
                if found is None:
                    keep(i)
                    continue
                event_type = found
            keys = list(doc.keys())  # unescaped, duplicates kept
            if (
                keys.count("category") == 1
                and keys.count("properties") == 1
                and "value" not in keys
                and type(doc.get("properties")) is json_object
            ):
                skip(event_type)
            else:
                keep(i)
        return kept, Counter(skipped)
