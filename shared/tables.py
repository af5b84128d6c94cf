"""Small shared edge helper for Azure Table clients: one way to create the table and one mapping of
Azure failures to :class:`StoreError` for every Table-backed store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .errors import StoreError


@contextlib.contextmanager
def azure_errors(what: str) -> Iterator[None]:
    """Re-raise any ``AzureError`` (service error, unreachable endpoint, auth) as ``StoreError``
    naming ``what`` and the table; other exceptions pass unchanged."""
    from azure.core.exceptions import AzureError

    try:
        yield
    except AzureError as exc:
        raise StoreError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


class TableBacked:
    """Holds a ``TableClient`` and creates its table on first use."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._ready = False

    def azure_errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return azure_errors(f"{what} (table {getattr(self.table, 'table_name', '?')})")

    def _ensure(self) -> None:
        if not self._ready:
            from azure.core.exceptions import ResourceExistsError

            with self.azure_errors("create table"), contextlib.suppress(ResourceExistsError):
                self.table.create_table()
            self._ready = True
