"""Small shared edge helper for Azure Table clients."""

from __future__ import annotations

import contextlib
from typing import Any


class TableBacked:
    """Holds a ``TableClient`` and creates its table on first use."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            from azure.core.exceptions import ResourceExistsError

            with contextlib.suppress(ResourceExistsError):
                self.table.create_table()
            self._ready = True
