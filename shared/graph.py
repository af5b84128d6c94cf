"""The Graph data source: poll ``security/alerts_v2`` per tenant and publish to the alerts Event Hub.

Both data sources then take one path: the correlator reads Graph alerts from the same hub as
Defender's streaming export.

* Per tenant, ``GET /v1.0/security/alerts_v2?$filter=lastUpdateDateTime ge <cursor>`` ordered by
  ``lastUpdateDateTime``, following ``@odata.nextLink``.
* 429 honours ``Retry-After`` (fractional seconds), else exponential backoff with jitter; 5xx are
  retried; a 401 refreshes the token once; at most 150 requests per minute per tenant.
* The cursor (per tenant, Table Storage) advances only after a page's alerts were published. The
  boundary alerts that ``ge`` returns again are recognised by event identity (``id`` +
  ``lastUpdateDateTime``), so a crash between publish and cursor save re-publishes, never skips.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from urllib.parse import urlencode

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from .errors import CorrelatorError
from .normalize import iso, parse_time
from .tables import TableBacked

log = logging.getLogger("defender_correlator.graph")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_BASE_URL = "https://graph.microsoft.com/v1.0"
REQUESTS_PER_MINUTE = 150  # Graph security API limit per app per tenant
PAGE_SIZE = 100
MAX_PAGES_PER_RUN = 200  # a run stops after this many pages; the cursor carries on next time


class GraphError(CorrelatorError):
    """Polling one tenant failed; its cursor did not move past unpublished alerts."""


class TokenCredential(Protocol):
    """What ``azure-identity`` credentials offer."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any: ...


class Publisher(Protocol):
    def publish(self, tenant: str, records: Sequence[bytes]) -> list[str]:
        """Publish records (one alert each) with the tenant as partition key; returns rejection reasons.

        Raises:
            Exception: the hub is unreachable (nothing may be assumed published).
        """
        ...


class CursorStore(Protocol):
    def load(self, tenant: str) -> tuple[str | None, list[str]]:
        """The tenant's cursor (ISO time) and the identities already published at that time."""
        ...

    def save(self, tenant: str, cursor: str, boundary: list[str]) -> None: ...


@dataclass
class MemoryCursorStore:
    data: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def load(self, tenant: str) -> tuple[str | None, list[str]]:
        cursor, boundary = self.data.get(tenant, (None, []))
        return cursor, list(boundary)

    def save(self, tenant: str, cursor: str, boundary: list[str]) -> None:
        self.data[tenant] = (cursor, list(boundary))


class TableCursorStore(TableBacked):
    """Cursors in Azure Table Storage: one entity per tenant."""

    PARTITION = "graph-cursor"

    def load(self, tenant: str) -> tuple[str | None, list[str]]:
        from azure.core.exceptions import ResourceNotFoundError

        self._ensure()
        try:
            entity = self.table.get_entity(self.PARTITION, _row_key(tenant))
        except ResourceNotFoundError:
            return None, []
        return entity.get("cursor"), orjson.loads(entity.get("boundary", "[]"))

    def save(self, tenant: str, cursor: str, boundary: list[str]) -> None:
        from azure.data.tables import UpdateMode

        self._ensure()
        # One poller per tenant at a time (the timer trigger is a singleton), so a plain upsert is safe here.
        self.table.upsert_entity(
            {
                "PartitionKey": self.PARTITION,
                "RowKey": _row_key(tenant),
                "tenant": tenant,
                "cursor": cursor,
                "boundary": orjson.dumps(boundary[-500:]).decode(),
            },
            mode=UpdateMode.REPLACE,
        )


def _row_key(tenant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tenant)[:200]


class RateLimiter:
    """At most ``limit`` calls per ``period`` seconds (sliding window), per key."""

    def __init__(
        self,
        limit: int = REQUESTS_PER_MINUTE,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit, self.period, self.clock, self.sleep = limit, period, clock, sleep
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Wait for a slot; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                calls = self._calls.setdefault(key, deque())
                now = self.clock()
                while calls and now - calls[0] >= self.period:
                    calls.popleft()
                if len(calls) < self.limit:
                    calls.append(now)
                    return waited
                delay = self.period - (now - calls[0])
            self.sleep(delay)
            waited += delay


class _Retry(Retry):
    """Retry-After may be fractional on Graph (``Retry-After: 2.128``); urllib3 only takes integers."""

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            return float(super().parse_retry_after(retry_after))


def graph_session(retries: int = 5, backoff_s: float = 1.0) -> requests.Session:
    retry = _Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=(429, 500, 502, 503, 504),
        backoff_factor=backoff_s,
        backoff_max=60,
        backoff_jitter=backoff_s / 2,
        respect_retry_after_header=True,
        retry_after_max=300,
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.trust_env = False
    return session


def identity_of(alert: dict[str, Any]) -> str:
    """The same identity the normalizer gives a Graph alert (``graph:<id>:<lastUpdateDateTime>``)."""
    return f"graph:{alert.get('id')}:{alert.get('lastUpdateDateTime') or alert.get('createdDateTime')}"


@dataclass
class PollResult:
    tenant: str
    published: int = 0
    pages: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    cursor: str | None = None
    error: str | None = None


class GraphPoller:
    def __init__(
        self,
        credential_for: Callable[[str], TokenCredential],
        cursors: CursorStore,
        publisher: Publisher,
        *,
        base_url: str = GRAPH_BASE_URL,
        session: requests.Session | None = None,
        limiter: RateLimiter | None = None,
        lookback: timedelta = timedelta(days=1),
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        timeout_s: float = 30.0,
    ) -> None:
        self.credential_for = credential_for
        self.cursors = cursors
        self.publisher = publisher
        self.base_url = base_url.rstrip("/")
        self.session = session or graph_session()
        self.limiter = limiter or RateLimiter()
        self.lookback = lookback
        self.clock = clock
        self.timeout_s = timeout_s

    def poll_all(self, tenants: Iterable[str]) -> list[PollResult]:
        """Poll every tenant; one tenant's failure does not stop the others."""
        results = []
        for tenant in tenants:
            try:
                results.append(self.poll(tenant))
            except GraphError as exc:
                log.error("graph poll of tenant %s failed: %s", tenant, exc)
                results.append(PollResult(tenant, error=str(exc)))
        return results

    def poll(self, tenant: str) -> PollResult:
        """Raises: GraphError (the cursor stays where the last published page left it)."""
        result = PollResult(tenant)
        cursor, boundary = self.cursors.load(tenant)
        if cursor is None:
            cursor = iso(self.clock() - self.lookback)
        seen = set(boundary)
        query = urlencode({"$filter": f"lastUpdateDateTime ge {cursor}", "$orderby": "lastUpdateDateTime asc", "$top": PAGE_SIZE})
        url: str | None = f"{self.base_url}/security/alerts_v2?{query}"
        token = self._token(tenant)
        while url and result.pages < MAX_PAGES_PER_RUN:
            page, token = self._get(tenant, url, token)
            result.pages += 1
            alerts = page.get("value")
            if not isinstance(alerts, list):
                raise GraphError(f"page {result.pages}: no 'value' list in the response")
            fresh = []
            for alert in alerts:
                if not isinstance(alert, dict):
                    continue
                ident = identity_of(alert)
                if ident in seen:
                    result.duplicates += 1
                    continue
                seen.add(ident)
                fresh.append(alert)
            if fresh:
                rejected = self.publisher.publish(tenant, [orjson.dumps(a) for a in fresh])
                result.rejected += rejected
                result.published += len(fresh) - len(rejected)
            cursor, boundary = _advance(cursor, boundary, alerts)
            self.cursors.save(tenant, cursor, boundary)  # only after the page was published
            seen = set(boundary) | {identity_of(a) for a in fresh}
            next_link = page.get("@odata.nextLink")
            url = next_link if isinstance(next_link, str) else None
        result.cursor = cursor
        log.info(
            "graph poll %s: %d published, %d duplicates, %d page(s), cursor %s",
            tenant,
            result.published,
            result.duplicates,
            result.pages,
            cursor,
        )
        return result

    def _token(self, tenant: str) -> str:
        """A token for Graph in ``tenant``; ``azure-identity`` credentials cache it until it expires."""
        try:
            token = self.credential_for(tenant).get_token(GRAPH_SCOPE, tenant_id=tenant)
        except Exception as exc:
            raise GraphError(f"token for tenant {tenant}: {type(exc).__name__}") from None
        return str(token.token)

    def _get(self, tenant: str, url: str, token: str) -> tuple[dict[str, Any], str]:
        refreshed = False
        while True:
            self.limiter.acquire(tenant)
            try:
                response = self.session.get(
                    url,
                    headers={"Authorization": f"Bearer {token}", "Prefer": "include-unknown-enum-members"},
                    timeout=self.timeout_s,
                )
            except requests.RequestException as exc:
                raise GraphError(f"GET failed ({type(exc).__name__})") from None
            if response.status_code == 401 and not refreshed:
                refreshed = True
                token = self._token(tenant)  # once: a second 401 fails the run
                continue
            if response.status_code != 200:
                raise GraphError(f"HTTP {response.status_code} from alerts_v2")
            try:
                page = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise GraphError("malformed JSON in the alerts_v2 response") from None
            if not isinstance(page, dict):
                raise GraphError("alerts_v2 response is not a JSON object")
            return page, token


def _advance(cursor: str, boundary: list[str], alerts: list[Any]) -> tuple[str, list[str]]:
    """New cursor = newest ``lastUpdateDateTime`` seen; boundary = identities at exactly that time."""
    best = parse_time(cursor)
    best_text = cursor
    ids: list[str] = list(boundary)
    for alert in alerts:
        if not isinstance(alert, dict):
            continue
        text = alert.get("lastUpdateDateTime")
        when = parse_time(text)
        if when is None or best is None:
            continue
        if when > best:
            best, best_text, ids = when, str(text), [identity_of(alert)]
        elif when == best:
            ids.append(identity_of(alert))
    return best_text, list(dict.fromkeys(ids))


# -- publishing ----------------------------------------------------------------------------------


class BatchPublisher:
    """Publishes with ``EventDataBatch``es built per partition key, splitting at the size limit.

    ``make_batch(partition_key)`` and ``send(batch)`` are ``EventHubProducerClient.create_batch``
    and ``send_batch`` in production; tests pass real ``EventDataBatch`` objects of a chosen size.
    """

    def __init__(self, make_batch: Callable[[str], Any], send: Callable[[Any], None]) -> None:
        self.make_batch = make_batch
        self.send = send
        self.sent = 0

    def publish(self, tenant: str, records: Sequence[bytes]) -> list[str]:
        from azure.eventhub import EventData

        rejected: list[str] = []
        batch = self.make_batch(tenant)
        for i, record in enumerate(records):
            try:
                batch.add(EventData(record))
                continue
            except ValueError:
                pass
            if len(batch):
                self.send(batch)
                self.sent += len(batch)
                batch = self.make_batch(tenant)
            try:
                batch.add(EventData(record))
            except ValueError:
                rejected.append(f"record {i} of tenant {tenant}: {len(record)} bytes exceeds the hub's batch size limit")
        if len(batch):
            self.send(batch)
            self.sent += len(batch)
        return rejected


def eventhub_publisher(producer: Any) -> BatchPublisher:
    """A publisher on an ``azure.eventhub.EventHubProducerClient``."""
    return BatchPublisher(lambda key: producer.create_batch(partition_key=key), producer.send_batch)
