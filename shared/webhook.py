"""Incidents forwarded to webhooks: signed, retried, idempotent, never lost.

Pure parts (payload formats, signing, verification, filters) and the HTTP edge (``requests``, one
attempt at a time under a hard deadline; :func:`deliver` retries with backoff, jitter and
``Retry-After`` within a time budget). Delivery records (which revision of
which incident reached which target) sit behind a small interface with a Table Storage and an
in-memory implementation.

Signature scheme (documented in the README, verified by :func:`verify_signature`):
``X-Signature-256: sha256=<hex HMAC-SHA256(secret, "<X-Webhook-Timestamp>." + body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urljoin

import orjson
import requests
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from . import views
from .engine import fit_snapshot
from .errors import CorrelatorError, SettingsError, StoreError
from .httpedge import WatchedAdapter, hard_deadline, retry_after_seconds
from .snapshot import Snapshot, as_snapshot
from .tables import TableBacked

log = logging.getLogger("defender_correlator.webhook")

SCHEMA_VERSION = "1.1"  # minor versions only add fields (1.1: tenantId, entities)
MAX_PAYLOAD_BYTES = 256 * 1024  # receivers (Teams workflows, Slack) reject bodies far smaller than 1 MiB
TEAMS_MAX_BYTES = 28 * 1024  # Teams cards are limited to about 28 KB
SIGNATURE_HEADER = "X-Signature-256"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_TOLERANCE_S = 300  # receivers reject timestamps older than this (replay protection)
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
MAX_REDIRECTS = 3

Format = Literal["json", "teams", "slack"]


class DeliveryError(CorrelatorError):
    """Delivery failed. ``permanent`` failures (4xx other than 408/429, bad redirects) are not retried."""

    def __init__(self, message: str, *, permanent: bool, status: int | None = None) -> None:
        self.permanent = permanent
        self.status = status
        super().__init__(message)


class WebhookTarget(BaseModel):
    """One destination. The secret is a ``SecretStr``: it never shows in logs, reprs or errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    url: str
    secret: SecretStr | None = None
    format: Format = "json"
    actions: tuple[str, ...] = ("created", "updated")
    min_severity: int = Field(default=1, ge=1, le=10)
    allow_http: bool = False  # plain HTTP is allowed to loopback only, and only with this flag
    timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=4, ge=0, le=10)
    backoff_s: float = Field(default=1.0, ge=0)

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - {"created", "updated"}
        if not value:
            raise ValueError("names no action: the target would forward nothing (known: created, updated)")
        if unknown:
            raise ValueError(f"unknown actions {sorted(unknown)} (known: created, updated)")
        return value

    def check_url(self) -> None:
        """Raises: SettingsError unless the URL passes :func:`endpoint` (the one URL policy)."""
        self.endpoint()

    def endpoint(self) -> str:
        """The URL to connect to: parsed once by urllib3 (the parser ``requests`` connects with),
        validated on that parsed form, and returned re-serialised from it, so that what is checked is
        what is connected to.

        Raises: SettingsError naming the target (never the URL: it may carry a credential).
        """
        return checked_url(self.url, allow_http=self.allow_http, where=f"webhook target {self.name}")

    def wants(self, snapshot: Mapping[str, Any]) -> bool:
        severity = snapshot.get("severity", 0)
        return snapshot.get("action") in self.actions and type(severity) is int and severity >= self.min_severity


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def checked_url(raw: str, *, allow_http: bool, where: str) -> str:
    """The one URL policy for webhooks: https:// with a host, or http:// to loopback with the
    override; never user-info, a backslash or control characters.

    Raises: SettingsError naming ``where``.
    """
    if "\\" in raw or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw) or not raw.isprintable():
        raise SettingsError(f"{where}: URL contains a backslash, a space, a control or an invisible character")
    try:
        parsed = parse_url(raw)
    except LocationParseError:
        raise SettingsError(f"{where}: URL cannot be parsed") from None
    scheme, host = (parsed.scheme or "").lower(), (parsed.host or "").lower()
    if parsed.auth is not None or "@" in (parsed.netloc or ""):
        raise SettingsError(f"{where}: URL must not carry user info (user:password@)")
    if not host:
        raise SettingsError(f"{where}: URL has no host")
    if scheme == "https":
        return str(parsed.url)
    if scheme == "http" and _is_loopback(host):
        if allow_http:
            return str(parsed.url)
        raise SettingsError(f"{where}: http:// needs the allow-http override (tests and local runs only)")
    raise SettingsError(f"{where}: URL must be https:// (or http:// to loopback with the override)")


def redact_url(text: str) -> str:
    """``text`` with the path and query of every URL (and every bare request path) replaced: Slack
    and Teams webhook URLs carry their credential there."""
    text = _FULL_URL.sub(lambda m: f"{m.group(1)}/<redacted>", text)
    return _BARE_PATH.sub(lambda m: f"{m.group(1)}/<redacted>", text)


_FULL_URL = re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://[^/\s'"?#]+)[/?#][^\s'"]*""")
_BARE_PATH = re.compile(r"""(^|[\s'"(=:,])/(?!<redacted>)[^\s'"]*""")


class RedactUrls(logging.Filter):
    """Rewrites a log record so that no URL path or query reaches any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format is left to the handler's own error path
            return True
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACTED_LOGGERS = ("urllib3", "urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager", "urllib3.util.retry")
_redactor = RedactUrls()


def install_log_redaction() -> None:
    """Put the redacting filter on urllib3's loggers (filters are not inherited by child loggers, so
    each one that logs a URL gets it) and on our own; idempotent."""
    names = set(_REDACTED_LOGGERS) | {n for n in logging.root.manager.loggerDict if n.startswith("urllib3")}
    for name in sorted(names | {log.name}):
        logger = logging.getLogger(name)
        if _redactor not in logger.filters:
            logger.addFilter(_redactor)


install_log_redaction()


# -- payloads ----------------------------------------------------------------------------------


def json_payload(snapshot: Snapshot, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The documented JSON body: the snapshot plus ``schemaVersion``, trimmed to ``limit``."""
    return fit_snapshot({"schemaVersion": SCHEMA_VERSION, **snapshot}, limit)


def _title(snapshot: Mapping[str, Any]) -> str:
    subject = views.alert_name(snapshot) or views.host(snapshot)
    return f"{snapshot.get('ruleName', snapshot.get('ruleId'))}" + (f": {subject}" if subject else "")


def _facts(snapshot: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Who and where first (host, user, tenant), then the incident; observed techniques beside the rule's."""
    facts = [
        ("Host", ", ".join(views.hosts(snapshot)[:3]) or "-"),
        ("User", ", ".join(views.users(snapshot)[:3]) or "-"),
        ("Tenant", views.tenant(snapshot) or "-"),
        ("Severity", str(snapshot.get("severity"))),
        ("Action", f"{snapshot.get('action')} (revision {snapshot.get('revision')})"),
        ("First seen", str(snapshot.get("firstSeen"))),
        ("Last seen", str(snapshot.get("lastSeen"))),
        ("Triggers", str(snapshot.get("triggerCount"))),
    ]
    observed = ", ".join(views.observed_techniques(snapshot))
    if observed:
        facts.append(("Observed techniques", observed[:200]))
    techniques = ", ".join(views.rule_techniques(snapshot))
    if techniques:
        facts.append(("Rule techniques", techniques))
    facts += [(str(k), str(v)[:200]) for k, v in snapshot.get("attributes", {}).items()]
    return facts


def _who_line(snapshot: Mapping[str, Any], link: Callable[[str], str], text: Callable[[str], str] = str) -> str:
    """``Host fin-ws-017 · User CONTOSO\\j.doe · <link>``: the first thing a reader sees under the title."""
    url = _alert_url(snapshot)
    parts = [f"Host {text(views.host(snapshot) or '-')}", f"User {text(views.user(snapshot) or '-')}"]
    if url:
        parts.append(link(url))
    return " \u00b7 ".join(parts)


def _teams(text: str) -> str:
    """Text for an Adaptive Card, whose TextBlocks and facts render markdown: a ``](`` in alert data is
    split by a zero-width space, so ``[Reset password](https://evil)`` shows as text, not a link."""
    return text.replace("](", "]\u200b(")


def teams_payload(snapshot: Snapshot) -> bytes:
    """An Adaptive Card (1.4) in the message envelope that Teams workflow webhooks accept."""
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": _teams(_title(snapshot)[:300]), "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "FactSet", "facts": [{"title": _teams(k), "value": _teams(v)} for k, v in _facts(snapshot)]},
            {"type": "TextBlock", "text": str(snapshot.get("remediation", ""))[:1000], "wrap": True, "isSubtle": True},
        ],
        "msteams": {"width": "Full"},
    }
    url = _alert_url(snapshot)
    if url:
        card["body"][1]["facts"].insert(2, {"title": "Defender", "value": f"[Open the alert]({url})"})
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open in Microsoft Defender", "url": url}]
    body = {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}],
    }
    data = orjson.dumps(body)
    facts = card["body"][1]["facts"]
    while len(data) > TEAMS_MAX_BYTES and len(facts) > 1:  # drop trailing facts until the card fits
        del facts[max(1, len(facts) - max(1, (len(data) - TEAMS_MAX_BYTES) // 200)) :]
        data = orjson.dumps(body)
    return data


def _slack(text: str) -> str:
    """Text for Slack's ``mrkdwn`` (and its ``text`` fallback): ``&``, ``<``, ``>`` escaped as Slack
    requires, so alert data can neither mention ``<!channel>`` nor add a ``<url|link>``."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str) -> str:
    return "<" + url.replace("<", "%3C").replace(">", "%3E").replace("|", "%7C") + "|Open in Defender>"


def slack_payload(snapshot: Snapshot) -> bytes:
    """Slack Block Kit message for an incoming webhook (``text`` is the notification fallback)."""
    who = _who_line(snapshot, _slack_link, _slack)
    fields = [{"type": "mrkdwn", "text": f"*{_slack(k)}*\n{_slack(v)}"[:2000]} for k, v in _facts(snapshot)[2:]][
        :10
    ]  # at most 10
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _title(snapshot)[:150], "emoji": False}},
        {"type": "section", "text": {"type": "mrkdwn", "text": who[:3000]}},
        {"type": "section", "fields": fields},
    ]
    remediation = str(snapshot.get("remediation", ""))
    if remediation:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _slack(remediation)[:2000]}]})
    url = _alert_url(snapshot)
    if url:
        blocks.append(
            {
                "type": "actions",
                "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Open in Defender"}, "url": url}],
            }
        )
    fallback = _slack(f"{_title(snapshot)} ({_who_line(snapshot, lambda url: url)})")
    return orjson.dumps({"text": fallback[:3000], "blocks": blocks})


def _alert_url(snapshot: Mapping[str, Any]) -> str | None:
    return views.link(snapshot) or None


def payload_for(target: WebhookTarget, snapshot: Snapshot) -> bytes:
    if target.format == "teams":
        return teams_payload(snapshot)
    if target.format == "slack":
        return slack_payload(snapshot)
    return json_payload(snapshot)


# -- signing -----------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None
) -> bool:
    """Receiver-side check: the signature matches the body and the timestamp is fresh."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return False  # str.isdigit() also accepts non-ASCII digits such as '١٢' or '²'
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_s:
        return False
    # compare_digest raises TypeError on a non-ASCII str: such a signature is simply wrong
    return signature.isascii() and hmac.compare_digest(sign(secret, timestamp, body), signature)


def headers_for(target: WebhookTarget, snapshot: Mapping[str, Any], body: bytes, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "defender-correlator/1",
        TIMESTAMP_HEADER: timestamp,
        IDEMPOTENCY_HEADER: f"{snapshot['incidentId']}:{snapshot['revision']}",
    }
    if target.secret is not None:
        headers[SIGNATURE_HEADER] = sign(target.secret.get_secret_value(), timestamp, body)
    return headers


# -- HTTP --------------------------------------------------------------------------------------

DELIVERY_BUDGET_S = 60.0  # one target's delivery of one message: every attempt and every wait
MESSAGE_BUDGET_S = 300.0  # every target of one message: half the function timeout (host.json, 10 min)


@dataclass
class Attempt:
    status: int | None
    attempts: int
    location: str | None = None
    retry_after: str | None = None


class Poster(Protocol):
    def post(self, target: WebhookTarget, url: str, body: bytes, headers: dict[str, str], deadline_s: float) -> Attempt:
        """One POST, answered (status line and headers) within ``deadline_s`` seconds.

        Raises: DeliveryError (transient) on a network error or no answer in time.
        """
        ...


class RequestsPoster:
    """One POST per call with ``requests``, bounded as a whole: a watchdog shuts the connection down
    when ``deadline_s`` passes (the read timeout alone bounds each read, so a receiver dripping its
    answer a byte at a time could hold a connection for ever). The response body is never read: an
    endless or compressed body costs nothing."""

    def __init__(self) -> None:
        self._session = requests.Session()
        adapter = WatchedAdapter(max_retries=0)  # retries and waits are deliver()'s, within its budget
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.trust_env = False  # no proxy or netrc credentials picked up from the environment

    def post(self, target: WebhookTarget, url: str, body: bytes, headers: dict[str, str], deadline_s: float) -> Attempt:
        with hard_deadline(deadline_s) as expired:
            try:
                timeout = min(target.timeout_s, deadline_s)
                with self._session.post(
                    url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True
                ) as response:
                    status = response.status_code
                    location, retry_after = response.headers.get("Location"), response.headers.get("Retry-After")
            except (requests.RequestException, Urllib3Error, http.client.HTTPException, OSError) as exc:
                why = f"no answer within {deadline_s:g}s" if expired.is_set() else type(exc).__name__
                raise DeliveryError(why, permanent=False) from None
        if expired.is_set():  # answered, but cut while the rest arrived: not an answer to rely on
            raise DeliveryError(f"no answer within {deadline_s:g}s", permanent=False)
        return Attempt(status, 1, location, retry_after)


def deliver(
    target: WebhookTarget,
    snapshot: Snapshot,
    poster: Poster,
    now: Callable[[], float] = time.time,
    *,
    budget_s: float = DELIVERY_BUDGET_S,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Attempt:
    """POST one snapshot to one target within ``budget_s`` seconds: retried on network errors, no
    answer within the target's timeout, 408, 429 and 5xx (honouring ``Retry-After`` while the wait
    fits the budget, else exponential backoff with jitter), redirects followed only within the same
    scheme, host and port.

    Raises:
        DeliveryError: ``permanent`` for 4xx (other than 408/429) and refused redirects; transient
            once the retries or the budget are spent, or for a wait the budget cannot hold.
    """
    url = target.endpoint()
    body = payload_for(target, snapshot)
    deadline = monotonic() + budget_s
    attempts = failures = redirects = 0
    while True:
        left = deadline - monotonic()
        if left <= 0:
            raise DeliveryError(f"delivery budget of {budget_s:g}s spent after {attempts} attempt(s)", permanent=False)
        attempts += 1
        try:
            result = poster.post(target, url, body, headers_for(target, snapshot, body, now()), min(target.timeout_s, left))
        except DeliveryError as err:
            status, why, after = None, str(err), None
        else:
            status, why = result.status or 0, f"HTTP {result.status}"
            if 200 <= status < 300:
                return Attempt(status, attempts)
            if status in (301, 302, 303, 307, 308) and result.location:
                url = _redirected(target, url, result.location, status)
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise DeliveryError("too many redirects", permanent=True, status=status)
                continue
            if 300 <= status < 500 and status not in RETRY_STATUSES:
                raise DeliveryError(f"{why} after {attempts} attempt(s)", permanent=True, status=status)
            after = result.retry_after
        if (status is not None and status not in RETRY_STATUSES) or failures >= target.retries:
            raise DeliveryError(f"{why} after {attempts} attempt(s)", permanent=False, status=status)
        failures += 1
        wait = _wait_s(target, failures, after)
        left = deadline - monotonic()
        if wait > left:
            asked = f"Retry-After {after.strip()[:40]!r}" if after else f"a backoff of {wait:.1f}s"
            raise DeliveryError(
                f"{why} after {attempts} attempt(s); {asked} exceeds the {max(0.0, left):.0f}s left of the "
                f"{budget_s:g}s delivery budget (the queue delivers the message again)",
                permanent=False,
                status=status,
            )
        sleep(wait)


def _wait_s(target: WebhookTarget, failures: int, retry_after: str | None) -> float:
    """The wait before the next attempt: ``Retry-After`` when usable, else exponential backoff with jitter."""
    try:
        asked = retry_after_seconds(retry_after)
    except ValueError:
        asked = None
    if asked is not None:
        return asked
    return target.backoff_s * 2.0 ** (failures - 1) + random.uniform(0, target.backoff_s / 2)


def _redirected(target: WebhookTarget, url: str, location: str, status: int) -> str:
    """The redirect's URL if it passes the URL policy and keeps the scheme, host and port.

    Raises: DeliveryError (permanent) naming why it was refused.
    """
    try:
        nxt = checked_url(urljoin(url, location), allow_http=target.allow_http, where="redirect")
    except SettingsError as exc:
        raise DeliveryError(f"refused redirect ({exc})", permanent=True, status=status) from None
    if _origin(nxt) != _origin(url):
        raise DeliveryError(f"refused redirect to another host ({_origin(nxt)[1]})", permanent=True, status=status)
    return nxt


def _origin(url: str) -> tuple[str, str, int]:
    parsed = parse_url(url)
    scheme = parsed.scheme or ""
    return scheme, (parsed.host or "").lower(), parsed.port or (443 if scheme == "https" else 80)


# -- delivery records --------------------------------------------------------------------------


class DeliveryLog(Protocol):
    """Per (target, incident): the highest revision delivered and the highest revision poisoned.

    Raises (every method): StoreError when the store is unreachable.
    """

    def delivered_revision(self, target: str, incident_id: str) -> int:
        """Highest revision delivered to ``target`` for the incident (0: none)."""
        ...

    def record(self, target: str, incident_id: str, revision: int) -> None: ...

    def poisoned_revision(self, target: str, incident_id: str) -> int:
        """Highest revision whose delivery to ``target`` ended on the poison queue (0: none)."""
        ...

    def record_poisoned(self, target: str, incident_id: str, revision: int) -> None: ...

    def clear_poisoned(self, target: str, incident_id: str) -> None:
        """Forget the poison record, so that a re-driven message is delivered again."""
        ...


@dataclass
class MemoryDeliveryLog:
    data: dict[tuple[str, str], int] = field(default_factory=dict)
    poisoned: dict[tuple[str, str], int] = field(default_factory=dict)

    def delivered_revision(self, target: str, incident_id: str) -> int:
        return self.data.get((target, incident_id), 0)

    def record(self, target: str, incident_id: str, revision: int) -> None:
        key = (target, incident_id)
        self.data[key] = max(revision, self.data.get(key, 0))

    def poisoned_revision(self, target: str, incident_id: str) -> int:
        return self.poisoned.get((target, incident_id), 0)

    def record_poisoned(self, target: str, incident_id: str, revision: int) -> None:
        key = (target, incident_id)
        self.poisoned[key] = max(revision, self.poisoned.get(key, 0))

    def clear_poisoned(self, target: str, incident_id: str) -> None:
        self.poisoned.pop((target, incident_id), None)


class TableDeliveryLog(TableBacked):
    """Delivery records in Azure Table Storage: one entity per (target, incident), holding the
    delivered (``revision``) and the poisoned (``poisonedRevision``) revision."""

    @staticmethod
    def _keys(target: str, incident_id: str) -> tuple[str, str]:
        return target, hashlib.blake2b(incident_id.encode(), digest_size=16).hexdigest()

    def _get(self, target: str, incident_id: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        self._ensure()
        with self.azure_errors("delivery log read"):
            try:
                return dict(self.table.get_entity(*self._keys(target, incident_id)))
            except ResourceNotFoundError:
                return None

    def delivered_revision(self, target: str, incident_id: str) -> int:
        entity = self._get(target, incident_id)
        return _read_int(entity.get("revision", 0)) if entity else 0

    def poisoned_revision(self, target: str, incident_id: str) -> int:
        entity = self._get(target, incident_id)
        return _read_int(entity.get("poisonedRevision", 0)) if entity else 0

    def record(self, target: str, incident_id: str, revision: int) -> None:
        self._raise_to(target, incident_id, "revision", revision)

    def record_poisoned(self, target: str, incident_id: str, revision: int) -> None:
        self._raise_to(target, incident_id, "poisonedRevision", revision)

    def clear_poisoned(self, target: str, incident_id: str) -> None:
        from azure.data.tables import UpdateMode

        self._ensure()
        pk, rk = self._keys(target, incident_id)
        with self.azure_errors("delivery log write"):
            self.table.upsert_entity({"PartitionKey": pk, "RowKey": rk, "poisonedRevision": 0}, mode=UpdateMode.MERGE)

    def _raise_to(self, target: str, incident_id: str, prop: str, revision: int) -> None:
        """Conditional write: never lower a revision another worker recorded."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
        from azure.data.tables import UpdateMode

        self._ensure()
        pk, rk = self._keys(target, incident_id)
        with self.azure_errors("delivery log write"):
            for _ in range(5):
                try:
                    entity = self.table.get_entity(pk, rk)
                except ResourceNotFoundError:
                    try:
                        entity = {"PartitionKey": pk, "RowKey": rk, "incidentId": incident_id, prop: _int64(revision)}
                        self.table.create_entity(entity)
                        return
                    except ResourceExistsError:
                        continue
                if _read_int(entity.get(prop, 0)) >= revision:
                    return
                entity[prop] = _int64(revision)
                try:
                    etag, unchanged = entity.metadata["etag"], MatchConditions.IfNotModified
                    self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=unchanged)
                    return
                except ResourceModifiedError:
                    continue
        raise StoreError(f"delivery log write: {target}/{incident_id} kept changing under 5 conditional writes")


def _int64(value: int) -> Any:
    """An Int64 Table property: the SDK writes a Python int as Int32 and refuses one of 2**31 or more."""
    from azure.data.tables import EdmType, EntityProperty

    return EntityProperty(value, EdmType.INT64)


def _read_int(value: Any) -> int:
    """An Int32 property reads as an int, an Int64 one as an ``EntityProperty``."""
    return int(getattr(value, "value", value))


def forget_poisoned(deliveries: DeliveryLog, poison_message: Mapping[str, Any], body: bytes) -> list[str]:
    """Before a poison message's body is re-driven: clear the poison records of the targets it names,
    so that the re-driven message is delivered to them again. Returns the targets cleared.

    Raises: StoreError.
    """
    try:
        incident_id = str(orjson.loads(body)["incidentId"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return []
    targets = [str(t) for t in poison_message.get("targets") or () if t != "*"]
    for name in targets:
        deliveries.clear_poisoned(name, incident_id)
    return targets


_INCIDENT_ID = re.compile(r"[\x21-\x7e]{1,256}")

# -- the forwarder -------------------------------------------------------------------------------


@dataclass
class ForwardResult:
    delivered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # target -> reason (permanent)


class PoisonSink(Protocol):
    def send(self, message: str) -> None: ...


class Forwarder:
    """Forward one incident snapshot to every target that wants it."""

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        deliveries: DeliveryLog,
        poster: Poster | None = None,
        poison: PoisonSink | None = None,
        max_dequeue_count: int = 5,
        now: Callable[[], float] = time.time,
        *,
        delivery_budget_s: float = DELIVERY_BUDGET_S,
        message_budget_s: float = MESSAGE_BUDGET_S,
    ) -> None:
        for target in targets:
            target.check_url()
        self.targets = list(targets)
        self.deliveries = deliveries
        self.poster = poster or RequestsPoster()
        self.poison = poison
        self.max_dequeue_count = max_dequeue_count
        self.now = now
        self.delivery_budget_s, self.message_budget_s = delivery_budget_s, message_budget_s

    def handle(self, body: bytes, *, dequeue_count: int = 1, message_id: str | None = None) -> ForwardResult:
        """Deliver a queued snapshot.

        Raises:
            DeliveryError: a transient failure while retries remain (the queue re-delivers the
                message later). On the last dequeue, and for permanent failures, the message goes to
                the poison sink with its reason instead, and nothing is raised.
        """
        result = ForwardResult()
        try:
            snapshot = as_snapshot(orjson.loads(body))
            incident_id, revision = snapshot["incidentId"], snapshot["revision"]
            severity = snapshot.get("severity", 0)
            if type(severity) is not int:  # the targets' filters compare it (a bool is not a severity)
                raise ValueError(f"severity must be an integer, not {type(severity).__name__}")
            if not _INCIDENT_ID.fullmatch(incident_id):  # the engine's ids are inc-<hex>
                raise ValueError("incidentId must be 1-256 visible ASCII characters (it goes into the Idempotency-Key header)")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self._to_poison(body, f"not an incident snapshot ({type(exc).__name__}: {str(exc)[:200]})", message_id)
            result.failed["*"] = "not an incident snapshot"
            return result
        transient: dict[str, str] = {}
        # each delivery of the message starts at another target and the message has a time budget, so
        # a target that is slow on every attempt never keeps the incident from the others
        start = (max(1, dequeue_count) - 1) % max(1, len(self.targets))
        deadline = time.monotonic() + self.message_budget_s
        for target in self.targets[start:] + self.targets[:start]:
            if not target.wants(snapshot):
                result.skipped.append(target.name)
                continue
            if self.deliveries.delivered_revision(target.name, incident_id) >= revision:
                result.skipped.append(target.name)  # already delivered, or a newer revision was
                continue
            if self.deliveries.poisoned_revision(target.name, incident_id) >= revision:
                result.skipped.append(target.name)  # this revision is on the poison queue already
                continue
            left = min(self.delivery_budget_s, deadline - time.monotonic())
            try:
                if left <= 0:
                    raise DeliveryError(f"not tried: the message's {self.message_budget_s:g}s budget was spent", permanent=False)
                attempt = deliver(target, snapshot, self.poster, self.now, budget_s=left)
            except DeliveryError as err:
                reason = f"target {target.name}: {err}"
                log.warning("webhook delivery failed: %s (incident %s revision %d)", reason, incident_id, revision)
                if err.permanent:
                    result.failed[target.name] = reason
                else:
                    transient[target.name] = reason
                continue
            self.deliveries.record(target.name, incident_id, revision)
            result.delivered.append(target.name)
            log.info(
                "webhook delivered to %s: %s revision %d in %d attempt(s)", target.name, incident_id, revision, attempt.attempts
            )
        last = dequeue_count >= self.max_dequeue_count
        if transient and last:
            result.failed.update(
                {name: f"gave up after {dequeue_count} deliveries of the message: {why}" for name, why in transient.items()}
            )
        if result.failed:
            # One poison entry per (revision, target): the targets are recorded as poisoned for this
            # revision, so a re-delivery of the message (another target's transient failure) or a
            # duplicate message neither calls them again nor parks the revision again.
            self._to_poison(body, "; ".join(result.failed.values()), message_id, targets=sorted(result.failed))
            for name in result.failed:
                self.deliveries.record_poisoned(name, incident_id, revision)
        if transient and not last:
            raise DeliveryError("; ".join(transient.values()), permanent=False)
        return result

    def _to_poison(self, body: bytes, reason: str, message_id: str | None, targets: Sequence[str] = ("*",)) -> None:
        log.error("incident message %s to poison queue: %s", message_id, reason)
        if self.poison is not None:
            self.poison.send(
                orjson.dumps(
                    {
                        "reason": reason,
                        "messageId": message_id,
                        "targets": list(targets),
                        "body": body.decode("utf-8", "replace"),
                    }
                ).decode()
            )
