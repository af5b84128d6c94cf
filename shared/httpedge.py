"""What the HTTP clients at the edges (the webhook forwarder, the Graph poller) share: reading
``Retry-After``, and a hard deadline for a whole request.

A ``requests`` timeout bounds each socket operation, not the request: a server that drips its status
line, headers or body a byte at a time within the read timeout holds the connection for ever.
:func:`hard_deadline` shuts down, when its time passes, every connection that a session mounted with
:class:`WatchedAdapter` opened in the block, which ends any blocked read or write at once.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` value in seconds (fractional accepted, HTTP date accepted); None if absent.

    Raises:
        ValueError: a value that is not a finite, non-negative number or a date (quoted, cut to 40
            characters).
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            raise ValueError(f"unusable Retry-After {text[:40]!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"unusable Retry-After {text[:40]!r}")
    return seconds


class _Watch(threading.local):
    """The sockets opened in the current thread's :func:`hard_deadline` block (``None`` outside
    one), and whether its time has passed."""

    sockets: list[socket.socket] | None = None
    expired: threading.Event | None = None


_watch = _Watch()


def _watched(sock: socket.socket) -> socket.socket:
    """Register a duplicate of a freshly connected socket (before TLS wraps it) with the current
    block: shutting the duplicate down ends every operation on the connection."""
    if _watch.sockets is not None:
        twin = sock.dup()
        _watch.sockets.append(twin)
        if _watch.expired is not None and _watch.expired.is_set():
            with contextlib.suppress(OSError):
                twin.shutdown(socket.SHUT_RDWR)
    return sock


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class WatchedAdapter(HTTPAdapter):
    """``requests``' adapter whose connections register their sockets with :func:`hard_deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[threading.Event]:
    """Within the block, connections opened in this thread through a :class:`WatchedAdapter` are shut
    down once ``seconds`` pass (the operation in progress then fails). Yields an event that is set when
    that happened, so the caller can tell "cut at the deadline" from other failures."""
    sockets: list[socket.socket] = []
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        for twin in list(sockets):
            with contextlib.suppress(OSError):
                twin.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(max(0.0, seconds), cut)
    watchdog.daemon = True
    _watch.sockets, _watch.expired = sockets, expired
    watchdog.start()
    try:
        yield expired
    finally:
        watchdog.cancel()
        _watch.sockets = _watch.expired = None
        for twin in sockets:
            twin.close()
