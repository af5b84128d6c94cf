"""The Graph data source: poll ``security/alerts_v2`` (and ``security/incidents``) per tenant and publish
to the alerts Event Hub.

Both data sources then take one path: the correlator reads Graph alerts from the same hub as
Defender's streaming export.

* Per tenant, ``GET /v1.0/security/alerts_v2?$filter=lastUpdateDateTime ge <cursor>`` ordered by
  ``lastUpdateDateTime``, following ``@odata.nextLink``; with ``GRAPH_RESOURCES`` including
  ``incidents``, the same for ``security/incidents`` (own cursor; no ``$orderby``, which is not
  documented there), so that FortiSIEM's incident rule (``M365Defender-Incident``) has input.
* 429 and 5xx honour ``Retry-After`` (fractional seconds or a date; non-finite values refused),
  else exponential backoff with jitter; no single wait passes ``MAX_WAIT_S`` and no run passes its
  time budget (the tenant fails with the reason and is polled next run); a 401 refreshes the token
  once; at most 150 requests per minute per tenant.
* ``@odata.nextLink`` is followed only to the scheme, host and port of ``GRAPH_BASE_URL``: the
  bearer token never leaves that origin.
* The cursor (per tenant, Table Storage) moves only once the run's whole page sequence is
  published, to the newest ``lastUpdateDateTime`` seen, never past the time of the poll; so the
  order the service returns does not matter. Alerts at or after the cursor are remembered by event
  identity (``id`` + ``lastUpdateDateTime``): the overlap ``ge`` returns again is not re-published,
  and a failed run re-publishes (the correlator counts each version once), never skips.
"""

from __future__ import annotations

import logging
import math
import random
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
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError
from urllib3.util import Retry, parse_url

from . import httpedge
from .errors import CorrelatorError
from .normalize import iso, parse_time
from .tables import TableBacked

log = logging.getLogger("defender_correlator.graph")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_BASE_URL = "https://graph.microsoft.com/v1.0"
REQUESTS_PER_MINUTE = 150  # Graph security API limit per app per tenant
PAGE_SIZE = 100
INCIDENT_PAGE_SIZE = 50  # the documented maximum $top of security/incidents
MAX_PAGES_PER_RUN = 200  # a run stops after this many pages; the cursor carries on next time
RUN_BUDGET_S = 240.0  # one run of every tenant, well inside the 10-minute function timeout
MAX_WAIT_S = 60.0  # the longest single Retry-After/backoff wait a tenant may take
ALERTS, INCIDENTS = "alerts_v2", "incidents"
RESOURCES = (ALERTS, INCIDENTS)  # polled collections under /security (incidents: FortiSIEM's incident rule)
PERMISSIONS = {ALERTS: "SecurityAlert.Read.All", INCIDENTS: "SecurityIncident.Read.All"}
MAX_REQUEST_S = 60.0  # a response body is read within this of the request's start (reads alone bound only each read)
MAX_PAGE_BYTES = 32 << 20  # one alerts_v2 page of PAGE_SIZE alerts is far below this; a larger body is refused


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
    def load(self, tenant: str, resource: str = ALERTS) -> tuple[str | None, list[str]]:
        """The tenant's cursor for ``resource`` (ISO time) and the identities already published at that time."""
        ...

    def save(self, tenant: str, cursor: str, boundary: list[str], resource: str = ALERTS) -> None: ...


def _cursor_key(tenant: str, resource: str) -> str:
    """alerts_v2 cursors keep the tenant alone as their key (as before incidents were polled)."""
    return tenant if resource == ALERTS else f"{tenant}~{resource}"  # "~" is never in a tenant (settings)


@dataclass
class MemoryCursorStore:
    data: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def load(self, tenant: str, resource: str = ALERTS) -> tuple[str | None, list[str]]:
        cursor, boundary = self.data.get(_cursor_key(tenant, resource), (None, []))
        return cursor, list(boundary)

    def save(self, tenant: str, cursor: str, boundary: list[str], resource: str = ALERTS) -> None:
        self.data[_cursor_key(tenant, resource)] = (cursor, list(boundary))


MAX_BOUNDARY_IDENTITIES = 500
MAX_BOUNDARY_CHARS = 30_000  # one Table string property holds 64 KiB of UTF-16: 32K characters


def _bounded_boundary(boundary: list[str]) -> str:
    """The newest boundary identities, as many as fit one Table property. Dropping the oldest only
    costs re-publishing them (the correlator recognises each alert version), never a skip."""
    kept = boundary[-MAX_BOUNDARY_IDENTITIES:]
    text = orjson.dumps(kept).decode()
    while len(text) > MAX_BOUNDARY_CHARS and kept:
        kept = kept[len(kept) // 4 + 1 :]
        text = orjson.dumps(kept).decode()
    return text


class TableCursorStore(TableBacked):
    """Cursors in Azure Table Storage: one entity per tenant."""

    PARTITION = "graph-cursor"

    def load(self, tenant: str, resource: str = ALERTS) -> tuple[str | None, list[str]]:
        from azure.core.exceptions import ResourceNotFoundError

        self._ensure()
        with self.azure_errors("graph cursor read"):
            try:
                entity = self.table.get_entity(self.PARTITION, _row_key(tenant, resource))
            except ResourceNotFoundError:
                return None, []
        try:
            boundary = orjson.loads(entity.get("boundary", "[]"))
        except orjson.JSONDecodeError:
            boundary = []  # an unreadable boundary only costs re-publishing (recognised downstream)
        return entity.get("cursor"), [str(b) for b in boundary] if isinstance(boundary, list) else []

    def save(self, tenant: str, cursor: str, boundary: list[str], resource: str = ALERTS) -> None:
        from azure.data.tables import UpdateMode

        self._ensure()
        # One poller per tenant at a time (the timer trigger is a singleton), so a plain upsert is safe here.
        entity = {
            "PartitionKey": self.PARTITION,
            "RowKey": _row_key(tenant, resource),
            "tenant": tenant,
            "resource": resource,
            "cursor": cursor,
            "boundary": _bounded_boundary(boundary),
        }
        with self.azure_errors("graph cursor write"):
            self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)


def _row_key(tenant: str, resource: str = ALERTS) -> str:
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", tenant)[:200]
    return key if resource == ALERTS else f"{key}~{resource}"  # "~" never survives the substitution


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


def graph_session(retries: int = 3, backoff_s: float = 0.5) -> requests.Session:
    """A session that retries connection and read failures only; the poller itself handles
    429/5xx, so that every wait is checked against the run's time budget."""
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=0,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=(),
        backoff_factor=backoff_s,
        backoff_max=30,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = httpedge.WatchedAdapter(max_retries=retry)  # its connections obey httpedge.hard_deadline
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False
    return session


def identity_of(item: dict[str, Any], resource: str = ALERTS) -> str:
    """The same identity the normalizer gives a Graph alert (``graph:<id>:<lastUpdateDateTime>``) or
    incident (``graph-incident:...``)."""
    prefix = "graph" if resource == ALERTS else "graph-incident"
    return f"{prefix}:{item.get('id')}:{item.get('lastUpdateDateTime') or item.get('createdDateTime')}"


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) as the HTTP library parses ``url``; None when it is unusable."""
    if "\\" in url or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parsed = parse_url(url)
    except LocationParseError:
        return None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("https", "http") or not parsed.host or parsed.auth:
        return None
    return scheme, parsed.host.lower(), parsed.port or (443 if scheme == "https" else 80)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds (fractional accepted, HTTP date accepted); None if absent.

    Raises:
        GraphError: a value that is not a finite, non-negative number or a date.
    """
    try:
        return httpedge.retry_after_seconds(value)
    except ValueError as exc:
        raise GraphError(str(exc)) from None


@dataclass
class PollResult:
    tenant: str
    resource: str = ALERTS
    published: int = 0
    pages: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    cursor: str | None = None
    error: str | None = None


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class GraphPoller:
    """Polls tenants one after another within a time budget per run (``budget_s``, below the
    function timeout); one tenant's failure, whatever it is, never stops the others."""

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
        retries: int = 5,
        backoff_s: float = 1.0,
        max_wait_s: float = MAX_WAIT_S,
        budget_s: float = RUN_BUDGET_S,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        resources: Sequence[str] = (ALERTS,),
    ) -> None:
        unknown = [r for r in resources if r not in RESOURCES]
        if unknown or not resources:
            raise GraphError(f"Graph resources {list(resources)!r}: each must be one of {', '.join(RESOURCES)}")
        self.resources = tuple(dict.fromkeys(resources))
        self.credential_for = credential_for
        self.cursors = cursors
        self.publisher = publisher
        self.base_url = base_url.rstrip("/")
        origin = _origin(self.base_url)
        if origin is None:
            raise GraphError(f"GRAPH_BASE_URL {self.base_url!r} is not an http(s) URL with a host")
        self.origin = origin
        self.session = session or graph_session()
        self.limiter = limiter or RateLimiter()
        self.lookback = lookback
        self.clock = clock
        self.timeout_s = timeout_s
        self.retries, self.backoff_s, self.max_wait_s, self.budget_s = retries, backoff_s, max_wait_s, budget_s
        self.monotonic, self.sleep = monotonic, sleep
        self._deadline = math.inf

    def poll_all(self, tenants: Iterable[str]) -> list[PollResult]:
        """Poll every tenant (each of its resources) within ``budget_s``; one failure does not stop
        the others: a tenant's incidents failing (a missing permission) leaves its alerts polled."""
        self._deadline = self.monotonic() + self.budget_s
        results = []
        try:
            for tenant in tenants:
                for resource in self.resources:
                    results.append(self._poll_isolated(tenant, resource))
        finally:
            self._deadline = math.inf
        return results

    def _poll_isolated(self, tenant: str, resource: str) -> PollResult:
        what = tenant if resource == ALERTS else f"{tenant} ({resource})"
        if self.monotonic() >= self._deadline:
            reason = f"the run's time budget ({self.budget_s:g}s) was spent before this tenant; polled next run"
            log.error("graph poll of tenant %s skipped: %s", what, reason)
            return PollResult(tenant, resource, error=reason)
        try:
            return self.poll(tenant, resource)
        except Exception as exc:  # isolation: any failure of one tenant is that tenant's result
            reason = str(exc) if isinstance(exc, GraphError) else f"{type(exc).__name__}: {exc}"
            log.error("graph poll of tenant %s failed: %s", what, reason)
            return PollResult(tenant, resource, error=reason)

    def poll(self, tenant: str, resource: str = ALERTS) -> PollResult:
        """Publish every alert (or incident) updated since the tenant's cursor, then move the cursor.

        The cursor moves only once the whole page sequence is published, to the newest
        ``lastUpdateDateTime`` seen (never past the time of this poll), so the order in which the
        service returns alerts does not matter; alerts at or after the new cursor are remembered by
        identity so the overlap that ``ge`` returns again is not re-published.

        Raises: GraphError (the cursor stays where it was; the next run re-reads and the correlator
        counts each alert version once), or the publisher's or cursor store's error.
        """
        result = PollResult(tenant, resource)
        poll_time = self.clock()
        stored, boundary = self.cursors.load(tenant, resource)
        start = _time_of(stored) if stored else None
        if start is None:
            start, boundary = poll_time - self.lookback, []
        if start > poll_time:  # a cursor from a clock gone wrong never hides the present: re-read the lookback
            start, boundary = poll_time - self.lookback, []
        cursor = iso(start)
        seen = set(boundary)
        newest = start
        late: list[tuple[datetime, str]] = []  # (time, identity) of everything seen at or after the start
        ascending, previous = True, None
        params: dict[str, Any] = {"$filter": f"lastUpdateDateTime ge {cursor}"}
        if resource == ALERTS:  # works on alerts_v2 in practice; not documented for incidents (order is not needed)
            params["$orderby"] = "lastUpdateDateTime asc"
        params["$top"] = PAGE_SIZE if resource == ALERTS else INCIDENT_PAGE_SIZE
        query = urlencode(params)
        url: str | None = f"{self.base_url}/security/{resource}?{query}"
        token = self._token(tenant)
        # the run's time budget bounds the pages too, not only the waits: a slow service never runs a
        # tenant (and the tenants after it) past the function timeout; ascending pages keep their progress
        while url and result.pages < MAX_PAGES_PER_RUN and self.monotonic() < self._deadline:
            page, token = self._get(tenant, url, token, resource)
            result.pages += 1
            alerts = page.get("value")
            if not isinstance(alerts, list):
                raise GraphError(f"page {result.pages}: no 'value' list in the response")
            fresh = []
            for alert in alerts:
                if not isinstance(alert, dict):
                    continue
                ident = identity_of(alert, resource)
                when = _time_of(alert.get("lastUpdateDateTime"))
                if when is not None:
                    late.append((when, ident))
                    newest = max(newest, when)
                    if previous is not None and when < previous:
                        ascending = False
                    previous = when
                if ident in seen:
                    result.duplicates += 1
                    continue
                seen.add(ident)
                fresh.append(alert)
            if fresh:
                rejected = self.publisher.publish(tenant, [orjson.dumps(a) for a in fresh])
                result.rejected += rejected
                result.published += len(fresh) - len(rejected)
            url = self._next(page.get("@odata.nextLink"))
        if url and not ascending:
            raise GraphError(
                f"stopped at {result.pages} pages (the run's page or time limit) with alerts out of order; "
                f"the cursor stays at {cursor} "
                "(published alerts are recognised by identity next time)"
            )
        new = min(newest, poll_time)
        new_boundary = [ident for when, ident in late if when >= new]
        if new == start:
            new_boundary = list(boundary) + new_boundary
        result.cursor = iso(new)
        if result.cursor != stored or new_boundary != boundary:
            # after every page was published
            self.cursors.save(tenant, result.cursor, list(dict.fromkeys(new_boundary)), resource)
        log.info(
            "graph poll %s %s: %d published, %d duplicates, %d page(s), cursor %s",
            tenant,
            resource,
            result.published,
            result.duplicates,
            result.pages,
            result.cursor,
        )
        return result

    def _next(self, link: Any) -> str | None:
        """The next page's URL, only on the origin (scheme, host, port) of ``GRAPH_BASE_URL``.

        Raises: GraphError for any other origin (the token is never sent there).
        """
        if link is None:
            return None
        if not isinstance(link, str) or _origin(link) != self.origin:
            shown = _origin(link) if isinstance(link, str) else None
            where = f"{shown[0]}://{shown[1]}:{shown[2]}" if shown else "an unusable URL"
            scheme, host, port = self.origin
            raise GraphError(f"@odata.nextLink points to {where}, not to {scheme}://{host}:{port} (GRAPH_BASE_URL); not followed")
        return link

    def _token(self, tenant: str) -> str:
        """A token for Graph in ``tenant``; ``azure-identity`` credentials cache it until it expires."""
        try:
            token = self.credential_for(tenant).get_token(GRAPH_SCOPE, tenant_id=tenant)
        except Exception as exc:
            raise GraphError(f"token for tenant {tenant}: {type(exc).__name__}") from None
        return str(token.token)

    def _wait(self, seconds: float, why: str) -> None:
        """Sleep unless that would pass ``max_wait_s`` or the run's time budget.

        Raises: GraphError naming the wait that was refused.
        """
        remaining = self._deadline - self.monotonic()
        if seconds > self.max_wait_s or seconds > remaining:
            limit = min(self.max_wait_s, max(0.0, remaining))
            raise GraphError(f"{why}: waiting {seconds:g}s exceeds the {limit:.0f}s left for this run; polled again next run")
        self.sleep(seconds)

    def _get(self, tenant: str, url: str, token: str, resource: str = ALERTS) -> tuple[dict[str, Any], str]:
        refreshed = False
        failures = 0
        while True:
            self.limiter.acquire(tenant)
            # each read waits at most timeout_s (less when the run's budget is nearly spent); the body is
            # read within MAX_REQUEST_S of the start (headers are bounded by the read timeout only)
            started = self.monotonic()
            deadline = started + MAX_REQUEST_S
            timeout = max(1.0, min(self.timeout_s, self._deadline - started))
            # the whole request, headers included, ends within MAX_REQUEST_S: the watchdog cuts the
            # connection of a server dripping any part of its answer (sessions with a WatchedAdapter)
            with httpedge.hard_deadline(MAX_REQUEST_S) as expired:
                try:
                    response = self.session.get(
                        url,
                        headers={"Authorization": f"Bearer {token}", "Prefer": "include-unknown-enum-members"},
                        timeout=timeout,
                        allow_redirects=False,
                        stream=True,  # the body is read below against the deadline and the size cap
                    )
                    with response:
                        body = self._body(response, deadline) if response.status_code == 200 else b""
                except (requests.RequestException, Urllib3Error, OSError) as exc:
                    if expired.is_set():
                        raise GraphError(self._CUT) from None
                    raise GraphError(f"GET failed ({type(exc).__name__})") from None
            if expired.is_set():  # cut while the body arrived: what was read is not the whole page
                raise GraphError(self._CUT)
            status = response.status_code
            if status == 401 and not refreshed:
                refreshed = True
                token = self._token(tenant)  # once: a second 401 fails the run
                continue
            if status in RETRY_STATUSES and failures < self.retries:
                failures += 1
                after = retry_after_seconds(response.headers.get("Retry-After"))
                if after is None:
                    after = min(self.max_wait_s, self.backoff_s * 2 ** (failures - 1) * (1 + random.random() / 2))
                self._wait(after, f"HTTP {status} from {resource}")
                continue
            if status == 403:
                raise GraphError(f"HTTP 403 from {resource}: the app needs the {PERMISSIONS[resource]} permission in this tenant")
            if status != 200:
                raise GraphError(f"HTTP {status} from {resource}")
            try:
                page = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise GraphError(f"malformed JSON in the {resource} response") from None
            if not isinstance(page, dict):
                raise GraphError(f"{resource} response is not a JSON object")
            return page, token

    _CUT = "response still arriving at the request's time limit; polled again next run"

    def _body(self, response: requests.Response, deadline: float) -> bytes:
        """The body, read in chunks: a server that drips it slowly is cut at ``deadline`` (each read
        alone would stay within the read timeout), and one larger than ``MAX_PAGE_BYTES`` is refused.

        Raises: GraphError naming which limit was passed.
        """
        chunks, size = [], 0
        while chunk := response.raw.read1(1 << 16, decode_content=True):  # one socket read at most
            size += len(chunk)
            if size > MAX_PAGE_BYTES:
                raise GraphError(f"response larger than {MAX_PAGE_BYTES} bytes; refused")
            if self.monotonic() > deadline:
                raise GraphError(self._CUT)
            chunks.append(chunk)
        return b"".join(chunks)


def _time_of(value: Any) -> datetime | None:
    try:
        return parse_time(value) if isinstance(value, str) else None
    except (OverflowError, ValueError):
        return None


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
