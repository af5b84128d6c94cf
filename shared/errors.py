"""One exception hierarchy for the product; every error says where it came from.

All errors derive from :class:`CorrelatorError` (a ``ValueError``), so callers can catch one type.
"""

from __future__ import annotations

MAX_QUOTED_CHARS = 200  # an error quotes at most this much of the offending text


def one_line(text: str) -> str:
    """``text`` with every line break, control, format (bidirectional, zero-width) and separator
    character escaped (``\\n``, ``\\x1b``, ``\\u202e``), so a message from hostile input stays one
    line and cannot restyle a terminal or reorder what it shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CorrelatorError(ValueError):
    """Root of every error this package raises on purpose."""


class RuleError(CorrelatorError):
    """A rule file, field or query is invalid.

    The message names the file, the field, and for query text the column, and quotes the
    offending text, e.g. ``rules/x.yaml: subpatterns[0].query: column 12: unexpected 'AND'``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        column: int | None = None,
        text: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.field = field
        self.column = column
        self.text = text
        self.line = line  # of the field in the file, where the loader could tell
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        if self.column is not None:
            parts.append(f"column {self.column}")
        parts.append(self.reason)
        if self.text is not None:
            shown = self.text if len(self.text) <= MAX_QUOTED_CHARS else self.text[:MAX_QUOTED_CHARS] + "..."
            parts[-1] += f" in {shown!r}"
        if self.line is not None:
            parts[-1] += f" (line {self.line})"
        return one_line(": ".join(parts))

    def located(self, *, file: str | None = None, field: str | None = None) -> RuleError:
        """Return a copy with the file and/or field filled in where they were unknown."""
        return RuleError(
            self.reason,
            file=self.file or file,
            field=self._join_field(field, self.field),
            column=self.column,
            text=self.text,
            line=self.line,
        )

    def at_line(self, line: int | None) -> RuleError:
        """Return a copy that names the line of its field (``None``: unchanged)."""
        if line is None or self.line is not None:
            return self
        return RuleError(self.reason, file=self.file, field=self.field, column=self.column, text=self.text, line=line)

    @staticmethod
    def _join_field(outer: str | None, inner: str | None) -> str | None:
        if outer and inner:
            return f"{outer}.{inner}" if not inner.startswith("[") else f"{outer}{inner}"
        return outer or inner


class RuleSetError(CorrelatorError):
    """Several rule files failed to load; ``errors`` holds every one of them."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class RecordError(CorrelatorError):
    """A record could not be normalized (bad input). Raised inside the parser, returned as data."""

    def __init__(self, reason: str, *, fmt: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.fmt = fmt
        self.field = field
        super().__init__(reason)


class StoreError(CorrelatorError):
    """The state store failed in a way a retry of the whole batch may fix (infrastructure)."""


class ConcurrencyConflict(StoreError):
    """A conditional write lost to another writer (ETag mismatch or create of an existing key)."""


class SettingsError(CorrelatorError):
    """A required app setting is missing or malformed; the message names the setting."""


class RuleImportError(CorrelatorError):
    """A file given to an importer is not a rule of that kind (the message names the file and why)."""


class EndpointError(CorrelatorError):
    """A remote endpoint (Event Hub, webhook, Graph) could not be reached or refused our credentials."""
