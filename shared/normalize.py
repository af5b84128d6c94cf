"""Defender alerts in every wire format, normalized to FortiSIEM attribute names.

Pure: bytes and parsed JSON in, :class:`NormalizedEvent` / :class:`Rejection` out. Bad input never
raises out of a batch: each bad record becomes a ``Rejection`` naming the format tried, the field and
the position, and every other record is still processed.

Formats (detected per record, or forced): Graph ``alerts_v2`` (``graph``), Defender XDR streaming
records (``streaming``), MDE alerts API (``mde``), legacy MDE SIEM API (``siem``) and
already-normalized FortiSIEM-style events (``normalized``). The README has the attribute table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import orjson

from .errors import RecordError
from .values import TextMemo

if TYPE_CHECKING:
    from .preparse import LineFilter

MAX_RECORD_BYTES = 1 << 20  # one alert record; real alerts are a few KiB, Event Hub caps events at 1 MiB
READ_BLOCK_BYTES = 1 << 18  # JSON lines files are read in blocks this big and split into lines here
UTF8_BOM = b"\xef\xbb\xbf"  # Windows tools (PowerShell's Out-File, Notepad) start UTF-8 files with it
MAX_DOCUMENT_BYTES = 256 << 20  # a whole (non line-delimited) JSON file read at once
MAX_RAW_BYTES = 4096  # raw record kept as incident evidence
DEFAULT_MAX_SKEW_S = 300  # an event time this far ahead of arrival is a bad clock, not a future event
DEFAULT_MAX_AGE_S = 3650 * 86400  # older than this is absurd (and near datetime's range limits)
MAX_KEY_CHARS_IN_REASON = 40  # a rejection reason quotes record keys cut to this length
# Outside these, epoch-ms arithmetic and ISO rendering (with any offset) near datetime's limits fail.
_MIN_EVENT_TIME = datetime(1970, 1, 2, tzinfo=timezone.utc)
_MAX_EVENT_TIME = datetime(9000, 1, 1, tzinfo=timezone.utc)
NO_CATEGORY = frozenset({"", "null", "none"})  # category texts seen in real payloads that mean "no category"

FORMATS = ("auto", "graph", "streaming", "mde", "siem", "normalized")

ALERT, EVIDENCE, OTHER = "alert", "evidence", "event"
EVIDENCE_EVENT_TYPE = "MS-Defender-Endpoint-AlertEvidence"
INCIDENT_EVENT_TYPE = "M365Defender-Incident"  # a Graph security/incidents object (FortiSIEM's incident rule)

_TECHNIQUE = re.compile(r"^T\d{4}(?:\.\d{3})?$")
_TECHNIQUE_IN_TEXT = re.compile(r"\((T\d{4}(?:\.\d{3})?)\)")
_FRACTION = re.compile(r"^([^.]*)\.(\d*)(.*)$")  # ISO time: what comes before, in and after the fraction
_COLONLESS_OFFSET = re.compile(r"^(.*T.*[+-])(\d\d)(\d\d)$")  # ISO time with a +HHMM offset
_SEVERITY = {
    "informational": (1, "LOW"),
    "low": (3, "LOW"),
    "medium": (6, "MEDIUM"),
    "high": (9, "HIGH"),
}
_STREAM_PREFIX = "AdvancedHunting-"
_JSON_COLUMNS = ("AdditionalFields", "Categories")  # dynamic columns that arrive JSON-encoded
_JOIN_ATTRS = ("tenantId", "hostName", "user")  # attributes of an AlertEvidence row the join reads (besides the ids)


@dataclass(slots=True)
class NormalizedEvent:
    """One event in FortiSIEM vocabulary, with what the engine needs besides the attributes."""

    attrs: dict[str, Any]
    identity: str  # same record twice -> same identity; new alert version -> new identity
    event_time: datetime  # aware UTC; the record's own time, else its arrival time
    time_fallback: bool  # True when event_time is the arrival time
    kind: str  # alert | evidence | event
    format: str
    position: str
    raw: Any = dc_field(repr=False, default=None)

    @property
    def event_type(self) -> str:
        return str(self.attrs.get("eventType", ""))


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that could not be normalized, as data (the Functions layer dead-letters it)."""

    position: str
    reason: str
    format: str | None = None
    field: str | None = None
    raw: bytes | None = dc_field(default=None, repr=False)

    def __str__(self) -> str:
        where = f" [{self.format}" + (f" field {self.field}" if self.field else "") + "]" if self.format else ""
        return f"{self.position}: {self.reason}{where}"


@dataclass(frozen=True, slots=True)
class Skipped:
    """A well-formed record that no loaded rule can match; its attributes were never built."""

    event_type: str
    count: int = 1  # records it stands for: JSON lines skipped before parsing are reported together


Item = Union[NormalizedEvent, Rejection, Skipped]
Prefilter = Callable[[str], bool]


_UTC_TEXT = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz])", re.ASCII)  # Defender's usual form


def _utc_text(match: re.Match[str]) -> datetime | None:
    """:func:`parse_time` of a text :data:`_UTC_TEXT` matched in full: the same text its general
    path builds for ``fromisoformat`` (fraction padded or cut to 6 digits, ``Z`` as ``+00:00``),
    built without its other steps (strip, the other regular expressions), which leave such a text as is."""
    head, fraction = match.group(1, 2)
    try:
        parsed = datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00" if fraction else head + "+00:00")
    except ValueError:
        return None
    return parsed if parsed.tzinfo is timezone.utc else parsed.astimezone(timezone.utc)


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 text (any fraction digits, ``Z`` or offset) or epoch seconds/ms -> aware UTC."""
    if type(value) is str:
        match = _UTC_TEXT.fullmatch(value)
        if match is not None:
            return _utc_text(match)
    return _parse_time(value)


def _parse_shown(value: Any) -> tuple[datetime | None, str | None]:
    """``(parse_time(value), iso(parse_time(value)) if it is known to be value itself else None)``:
    :func:`iso` writes 6 fraction digits (none when the microsecond is 0) and ``Z``, so a time
    already written that way is its own ISO text (the usual case: no rendering needed)."""
    match = _UTC_TEXT.fullmatch(value) if type(value) is str else None
    if match is None:
        return parse_time(value), None
    parsed = _utc_text(match)
    fraction = match.group(2)
    own = parsed is not None and match.group(3) == "Z" and (fraction is None or (len(fraction) == 6 and parsed.microsecond != 0))
    return parsed, value if own else None


def _parse_time(value: Any) -> datetime | None:
    """:func:`parse_time` of any value (the general path)."""
    if isinstance(value, str) and value:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        # fromisoformat before 3.11 takes exactly 3 or 6 fraction digits and only +HH:MM offsets:
        # pad/cut the fraction to 6 digits and add the colon, so every version parses the same text.
        frac = _FRACTION.match(text)
        if frac:
            if not frac.group(2):
                return None  # "08." (3.11+ would accept it, 3.10 not)
            text = f"{frac.group(1)}.{(frac.group(2) + '000000')[:6]}{frac.group(3)}"
        offset = _COLONLESS_OFFSET.match(text)
        if offset:
            text = f"{offset.group(1)}{offset.group(2)}:{offset.group(3)}"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.astimezone(timezone.utc)
    if type(value) in (int, float) and value > 0:
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def technique_ids(values: Iterable[Any]) -> tuple[str, ...]:
    """Upper-cased, de-duplicated technique ids, each sub-technique followed by its parent id."""
    out: dict[str, None] = {}
    for value in values:
        if not isinstance(value, str) or not value.strip():
            continue
        tid = value.strip().upper()
        out[tid] = None
        if _TECHNIQUE.match(tid) and "." in tid:
            out[tid.split(".", 1)[0]] = None
    return tuple(out)


def streaming_techniques(value: Any) -> tuple[str, ...]:
    """``AttackTechniques``: a string holding a JSON list of ``"Name (Txxxx.yyy)"``, or ``""``.

    A feed repeats a few technique texts: the ids of a text are remembered (the answer depends on
    the text alone)."""
    if type(value) is str:
        return _TECHNIQUES_OF(value, len(value))
    return _read_techniques(value)


def _read_techniques(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items: Any = value
    if isinstance(value, str):
        try:
            items = orjson.loads(value)
        except orjson.JSONDecodeError:
            items = [value]  # tolerate a bare "Name (T1234)" string
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise RecordError("AttackTechniques is neither a list nor a JSON list in a string", field="AttackTechniques")
    found = [m for item in items if isinstance(item, str) for m in _TECHNIQUE_IN_TEXT.findall(item)]
    bare = [item for item in items if isinstance(item, str) and _TECHNIQUE.match(item.strip().upper())]
    return technique_ids(found + bare)


_TECHNIQUES_OF: TextMemo[str, tuple[str, ...]] = TextMemo(_read_techniques)


def _check_techniques(props: dict[str, Any]) -> tuple[str, ...]:
    """Raise what :func:`streaming_techniques` raises for ``properties.AttackTechniques``, without
    collecting the ids (an AlertEvidence row only the join reads); returns ``()``."""
    value = props.get("AttackTechniques")
    if value is None or value == "":
        return ()
    items = value
    if isinstance(value, str):
        try:
            items = orjson.loads(value)
        except orjson.JSONDecodeError:
            return ()
    if isinstance(items, (str, list)):
        return ()
    raise RecordError("AttackTechniques is neither a list nor a JSON list in a string", field="AttackTechniques")


def _severity(attrs: dict[str, Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        return
    score = _SEVERITY.get(value.lower())
    if score:
        attrs["eventSeverity"], attrs["eventSeverityCat"] = score
    else:
        attrs["eventSeverityCat"] = "UNKNOWN"


def _text(rec: dict[str, Any], key: str, fmt: str, *, required: bool = False, where: str = "") -> str | None:
    value = rec.get(key)
    if value is None or value == "":
        if required:
            raise RecordError(f"missing required field {where + key!r}", fmt=fmt, field=where + key)
        return None
    if isinstance(value, str):
        return value
    if type(value) is int:
        return str(value)  # ids are numbers in some formats (MDE incidentId)
    raise RecordError(f"field {where + key!r} must be a string, got {type(value).__name__}", fmt=fmt, field=where + key)


def _put(attrs: dict[str, Any], name: str, value: Any) -> None:
    if value is not None and value != "" and value != ():
        attrs[name] = value


def content_hash(obj: Any) -> str:
    """Stable hash of a JSON value (key order does not matter)."""
    data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_PASCAL_SPLIT = re.compile(r"[\s_/]+")


def _pascal(text: str) -> str:
    """``credential access`` -> ``CredentialAccess`` (remembered: a feed has a few dozen categories)."""
    return _PASCAL_OF(text, len(text))


def _read_pascal(text: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in _PASCAL_SPLIT.split(text) if part)


_PASCAL_OF: TextMemo[str, str] = TextMemo(_read_pascal)


_GRAPH_INCIDENT_FIELDS = (  # (attribute, Graph incident property), copied as text when present
    ("incidentTitle", "displayName"),
    ("tenantId", "tenantId"),
    ("incidentStatus", "status"),
    ("incidentClassification", "classification"),
    ("incidentDetermination", "determination"),
    ("incidentWebUrl", "incidentWebUrl"),
    ("assignedTo", "assignedTo"),
    ("incidentCreatedTime", "createdDateTime"),
)


def is_graph_incident(rec: dict[str, Any]) -> bool:
    """A Graph ``security/incidents`` object (by its type, or by the fields only incidents have)."""
    otype = rec.get("@odata.type")
    if isinstance(otype, str):
        return otype.endswith("security.incident")
    return "incidentWebUrl" in rec and "displayName" in rec and "title" not in rec


def detect_format(rec: Any) -> str | None:
    """Which wire format a single record is in, or None."""
    if not isinstance(rec, dict):
        return None
    category = rec.get("category")
    if isinstance(category, str) and category.startswith(_STREAM_PREFIX) and "properties" in rec:
        return "streaming"
    otype = rec.get("@odata.type")
    if is_graph_incident(rec):
        return "graph"
    if (
        (isinstance(otype, str) and otype.endswith("security.alert"))
        or "providerAlertId" in rec
        or ("createdDateTime" in rec and ("serviceSource" in rec or "mitreTechniques" in rec))
    ):
        return "graph"
    if "alertCreationTime" in rec or "aadTenantId" in rec or "machineId" in rec:
        return "mde"
    if "AlertTime" in rec and ("LinkToWDATP" in rec or "AlertTitle" in rec):
        return "siem"
    if "eventType" in rec:
        return "normalized"
    return None


_HANDLERS = {f: f"_{f}" for f in ("graph", "streaming", "mde", "siem", "normalized")}  # format -> Normalizer method


class Normalizer:
    """Turns payloads into normalized events.

    ``prefilter(event_type)`` says whether any loaded rule could match an event of that type; when
    it says no, the record yields :class:`Skipped` without its attributes being built.
    """

    def __init__(
        self,
        *,
        fmt: str = "auto",
        prefilter: Prefilter | None = None,
        max_skew_s: int | None = None,
        max_age_s: int | None = None,
        evidence_columns: bool = True,
    ) -> None:
        """``max_skew_s`` / ``max_age_s``: event times beyond them are clamped to arrival (None: no
        limit; the Functions app and ``replay`` use :data:`DEFAULT_MAX_SKEW_S` / ``_AGE_S`` or the
        app settings). A time outside datetime's range is clamped whatever the limits.

        ``evidence_columns=False`` (no rule matches AlertEvidence rows as events, so they only feed
        the join): an AlertEvidence row's attributes are only what the join reads (event type,
        tenant, alert id, host, user, event time); its columns are not copied into attributes. The
        row is validated as in the full form (the same rejections) and keeps the same identity and
        raw record, from which the join takes its entities."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.prefilter = prefilter
        self.max_skew = timedelta(seconds=max_skew_s) if max_skew_s is not None else None
        self.max_age = timedelta(seconds=max_age_s) if max_age_s is not None else None
        self.evidence_columns = evidence_columns
        self._line_filter: LineFilter | None = None

    # -- entry points -------------------------------------------------------------------------

    def line_filter(self) -> LineFilter | None:
        """The exact pre-parse filter for JSON lines (see ``shared/preparse.py``), if a prefilter is set."""
        if self._line_filter is None and self.prefilter is not None and self.fmt in ("auto", "streaming"):
            from .preparse import LineFilter  # it builds on this module's types

            self._line_filter = LineFilter(self.prefilter)
        return self._line_filter

    def from_bytes(self, body: bytes, position: str, arrival: datetime) -> Iterator[Item]:
        """One message body, line or document: a record, a JSON array, or a records/value envelope.

        A body that is not one JSON document is tried as JSON lines.
        """
        if len(body) > MAX_DOCUMENT_BYTES:
            yield Rejection(position, f"payload of {len(body)} bytes exceeds {MAX_DOCUMENT_BYTES}", raw=body[:MAX_RECORD_BYTES])
            return
        body = body.removeprefix(UTF8_BOM)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            lines = body.splitlines()
            if len(lines) > 1:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield from self.from_line(line, f"{position}:{number}", arrival)
                return
            yield Rejection(position, _json_reason(exc, body), raw=body)
            return
        yield from self.from_document(doc, position, arrival, check_size=len(body) > MAX_RECORD_BYTES)

    def from_line(self, line: bytes, position: str, arrival: datetime) -> Iterator[Item]:
        """One line of JSON lines input."""
        if len(line) > MAX_RECORD_BYTES:
            yield Rejection(position, f"record of {len(line)} bytes exceeds the {MAX_RECORD_BYTES}-byte cap", raw=line)
            return
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield Rejection(position, _json_reason(exc, line), raw=line)
            return
        yield from self.from_document(doc, position, arrival)

    def from_document(self, doc: Any, position: str, arrival: datetime, *, check_size: bool = False) -> Iterator[Item]:
        """Unwrap envelopes (``records``, ``value``, bare array) and normalize each record.

        ``check_size``: the document was bigger than one record may be, so each record is measured
        and one over ``MAX_RECORD_BYTES`` is rejected (as the Event Hub path and ``send`` do).
        """
        records: Any = None
        if isinstance(doc, dict):
            records = doc.get("records")
            if not (isinstance(records, list) and "category" not in doc):
                value = doc.get("value")
                odata = "@odata.context" in doc or "@odata.nextLink" in doc or "id" not in doc
                records = value if isinstance(value, list) and odata else None
        elif isinstance(doc, list):
            records = doc
        else:
            yield Rejection(position, f"expected a JSON object or array, got {type(doc).__name__}", raw=raw_json(doc))
            return
        if records is None:
            yield self._sized(doc, position, arrival, check_size)
            return
        for i, rec in enumerate(records):
            yield self._sized(rec, f"{position}#{i}", arrival, check_size)

    def _sized(self, rec: Any, position: str, arrival: datetime, check_size: bool) -> Item:
        if check_size:
            data = raw_json(rec) or b""
            if len(data) > MAX_RECORD_BYTES:
                return Rejection(position, f"record of {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte cap", raw=data)
        return self.normalize(rec, position, arrival)

    def normalize(self, rec: Any, position: str, arrival: datetime) -> Item:
        """Normalize one record; never raises for bad input."""
        fmt = self.fmt if self.fmt != "auto" else detect_format(rec)
        if fmt is None:
            keys = ", ".join(_short(k) for k in sorted(rec)[:6]) if isinstance(rec, dict) else type(rec).__name__
            more = f" and {len(rec) - 6} more" if isinstance(rec, dict) and len(rec) > 6 else ""
            return Rejection(position, f"record of no known format (keys: {keys}{more})", raw=raw_json(rec))
        if not isinstance(rec, dict):
            return Rejection(position, f"expected a JSON object, got {type(rec).__name__}", fmt, raw=raw_json(rec))
        try:
            # by name, not a dict of bound methods: that would tie the normalizer in a reference cycle,
            # and with it the engine its prefilter belongs to (freed only by the cyclic collector)
            handler: Callable[[dict[str, Any], str, datetime], Item] = getattr(self, _HANDLERS[fmt])
            return handler(rec, position, arrival)
        except RecordError as err:
            return Rejection(position, err.reason, err.fmt or fmt, err.field, raw=raw_json(rec))
        except MemoryError:
            raise
        except Exception as exc:  # a parser bug is this record's rejection, never the batch's failure
            reason = f"malformed record ({type(exc).__name__}: {_short(str(exc), 200)})"
            return Rejection(position, reason, fmt, raw=raw_json(rec))

    # -- helpers ------------------------------------------------------------------------------

    def _skip(self, event_type: str) -> bool:
        return self.prefilter is not None and not self.prefilter(event_type)

    def _time(self, attrs: dict[str, Any], value: Any, arrival: datetime) -> tuple[datetime, bool]:
        """The event time, or the arrival time when the record has none (``eventTimeSource:
        arrival``) or one no clock could honestly give: more than the max skew ahead of arrival,
        older than the max age, or out of datetime's range (``eventTimeSource: clamped``, the
        reported text kept in ``eventTimeReported``). A clamped time never moves a window."""
        shown = None
        try:
            parsed, shown = _parse_shown(value)
            sane = parsed is None or (
                # differences, not shifted bounds: arrival - a huge max age would overflow
                (self.max_age is None or arrival - parsed <= self.max_age)
                and (self.max_skew is None or parsed - arrival <= self.max_skew)
                and _MIN_EVENT_TIME <= parsed <= _MAX_EVENT_TIME
            )
        except (OverflowError, ValueError):  # e.g. 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
            parsed, sane = arrival, False
        if parsed is None:
            attrs["eventTimeSource"] = "arrival"
            parsed, fallback = arrival, True
        elif not sane:
            attrs["eventTimeSource"] = "clamped"
            attrs["eventTimeReported"] = _short(str(value), 64)
            parsed, fallback = arrival, True
        else:
            attrs["eventTime"] = shown if shown is not None else iso(parsed)
            return parsed, False
        attrs["eventTime"] = iso(parsed)
        return parsed, fallback

    # -- formats ------------------------------------------------------------------------------

    def _alert_head(
        self, rec: dict[str, Any], fmt: str, prefix: str, category_key: str, id_key: str
    ) -> tuple[dict[str, Any] | Skipped, str]:
        """Event type (checked against the prefilter before anything else), alert id, category."""
        category = _category(_text(rec, category_key, fmt))
        event_type = prefix + (f"-{_pascal(category)}" if category else "")
        if self._skip(event_type):
            return Skipped(event_type), category
        alert_id = _text(rec, id_key, fmt, required=True)
        attrs: dict[str, Any] = {"eventType": event_type, "alertIdStr": alert_id}
        _put(attrs, "attackTactic", category)
        return attrs, category

    def _graph(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        fmt = "graph"
        if is_graph_incident(rec):
            return self._graph_incident(rec, position, arrival)
        attrs, _ = self._alert_head(rec, fmt, "M365Defender-Alert", "category", "id")
        if isinstance(attrs, Skipped):
            return attrs
        alert_id = attrs["alertIdStr"]
        _put(attrs, "alertName", _text(rec, "title", fmt))
        _put(attrs, "tenantId", _text(rec, "tenantId", fmt))
        _put(attrs, "attackTechniqueId", _mitre_techniques(rec, fmt, allow_text=False))
        _severity(attrs, rec.get("severity"))
        _put(attrs, "incidentExtTicketId", _text(rec, "incidentId", fmt))
        _put(attrs, "alertWebUrl", _text(rec, "alertWebUrl", fmt))
        _put(attrs, "serviceSource", _text(rec, "serviceSource", fmt))
        _put(attrs, "detectionSource", _text(rec, "detectionSource", fmt))
        _put(attrs, "alertStatus", _text(rec, "status", fmt))
        _put(attrs, "description", _text(rec, "description", fmt))
        _put(attrs, "alertCreatedTime", _text(rec, "createdDateTime", fmt))
        host, user = _graph_host_user(rec.get("evidence"))
        _put(attrs, "hostName", host)
        _put(attrs, "user", user)
        version = _text(rec, "lastUpdateDateTime", fmt) or _text(rec, "createdDateTime", fmt)
        when, fallback = self._time(attrs, version, arrival)
        identity = f"graph:{alert_id}:{version or content_hash(rec)}"
        return NormalizedEvent(attrs, identity, when, fallback, ALERT, fmt, position, rec)

    def _graph_incident(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        """A Graph ``security/incidents`` object: event type ``M365Defender-Incident`` (what
        FortiSIEM's incident rule matches), the incident's title, id, severity and status."""
        fmt = "graph"
        event_type = INCIDENT_EVENT_TYPE
        if self._skip(event_type):
            return Skipped(event_type)
        incident_id = _text(rec, "id", fmt, required=True)
        attrs: dict[str, Any] = {"eventType": event_type, "incidentExtTicketId": incident_id}
        for attr, key in _GRAPH_INCIDENT_FIELDS:
            _put(attrs, attr, _text(rec, key, fmt))
        _severity(attrs, rec.get("severity"))
        version = _text(rec, "lastUpdateDateTime", fmt) or _text(rec, "createdDateTime", fmt)
        when, fallback = self._time(attrs, version, arrival)
        identity = f"graph-incident:{incident_id}:{version or content_hash(rec)}"
        return NormalizedEvent(attrs, identity, when, fallback, ALERT, fmt, position, rec)

    def _mde(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        fmt = "mde"
        attrs, _ = self._alert_head(rec, fmt, "MS-Defender-Endpoint-Alert", "category", "id")
        if isinstance(attrs, Skipped):
            return attrs
        alert_id = attrs["alertIdStr"]
        _put(attrs, "alertName", _text(rec, "title", fmt))
        _put(attrs, "tenantId", _text(rec, "aadTenantId", fmt))
        _put(attrs, "attackTechniqueId", _mitre_techniques(rec, fmt, allow_text=True))  # documented as "String"
        _severity(attrs, rec.get("severity"))
        _put(attrs, "incidentExtTicketId", _text(rec, "incidentId", fmt))
        _put(attrs, "serviceSource", "microsoftDefenderForEndpoint")
        _put(attrs, "detectionSource", _text(rec, "detectionSource", fmt))
        _put(attrs, "alertStatus", _text(rec, "status", fmt))
        _put(attrs, "description", _text(rec, "description", fmt))
        _put(attrs, "hostName", _text(rec, "computerDnsName", fmt))
        _put(attrs, "alertCreatedTime", _text(rec, "alertCreationTime", fmt))
        related = rec.get("relatedUser")
        if isinstance(related, dict):
            _put(attrs, "user", _text(related, "userName", fmt, where="relatedUser."))
        version = _text(rec, "lastUpdateTime", fmt) or _text(rec, "alertCreationTime", fmt)
        when, fallback = self._time(attrs, version, arrival)
        # Evidence is not part of the identity: Elastic's capture splits one alert per evidence line.
        identity = f"mde:{alert_id}:{version or content_hash({k: v for k, v in rec.items() if k != 'evidence'})}"
        return NormalizedEvent(attrs, identity, when, fallback, ALERT, fmt, position, rec)

    def _siem(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        fmt = "siem"
        attrs, _ = self._alert_head(rec, fmt, "Microsoft-WinDefATP-Alert", "Category", "AlertId")
        if isinstance(attrs, Skipped):
            return attrs
        alert_id = attrs["alertIdStr"]
        _put(attrs, "alertName", _text(rec, "AlertTitle", fmt))
        _severity(attrs, rec.get("Severity"))
        _put(attrs, "alertWebUrl", _text(rec, "LinkToWDATP", fmt))
        _put(attrs, "detectionSource", _text(rec, "Source", fmt))
        _put(attrs, "description", _text(rec, "Description", fmt))
        _put(attrs, "hostName", _text(rec, "ComputerDnsName", fmt) or _text(rec, "MachineName", fmt))
        user, domain = _text(rec, "UserName", fmt), _text(rec, "UserDomain", fmt)
        _put(attrs, "user", f"{domain}\\{user}" if user and domain else user)
        _put(attrs, "attackName", _text(rec, "ThreatName", fmt) or _text(rec, "AlertTitle", fmt))
        _put(attrs, "fileName", _text(rec, "FileName", fmt))
        _put(attrs, "hashCode", _text(rec, "Sha1", fmt) or _text(rec, "Sha256", fmt))
        _put(attrs, "serviceSource", "microsoftDefenderForEndpoint")
        when, fallback = self._time(attrs, rec.get("AlertTime"), arrival)
        version = _text(rec, "LastProcessedTimeUtc", fmt) or content_hash(rec)
        return NormalizedEvent(attrs, f"siem:{alert_id}:{version}", when, fallback, ALERT, fmt, position, rec)

    def _streaming(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        fmt = "streaming"
        category = rec.get("category")
        props = rec.get("properties")
        if not isinstance(category, str) or not category.startswith(_STREAM_PREFIX):
            raise RecordError("missing or bad 'category' (expected 'AdvancedHunting-<Table>')", fmt=fmt, field="category")
        if not isinstance(props, dict):
            raise RecordError("'properties' must be an object", fmt=fmt, field="properties")
        table = category[len(_STREAM_PREFIX) :]
        if table == "AlertInfo":
            event_type, alert_category = _alert_type(_text(props, "Category", fmt, where="properties."))
            kind = ALERT
        elif table == "AlertEvidence":
            event_type, kind, alert_category = EVIDENCE_EVENT_TYPE, EVIDENCE, ""
        else:
            event_type, kind, alert_category = f"MS-Defender-{table}", OTHER, ""
        if self._skip(event_type):
            return Skipped(event_type)
        attrs: dict[str, Any] = {}
        columns = kind == OTHER or (kind == EVIDENCE and self.evidence_columns)
        if columns:
            for key, value in props.items():  # raw columns stay queryable by their own names
                _put(attrs, key, value)
            for key in _JSON_COLUMNS:
                _decode_json_column(attrs, key)
        elif kind == EVIDENCE:  # the columns the join would read had they been copied (a column may bear their name)
            for key in _JOIN_ATTRS:
                _put(attrs, key, props.get(key))
        attrs["eventType"] = event_type
        tenant = rec.get("tenantId")
        if isinstance(tenant, str) and tenant:  # (written out, as below, where _put's tests reduce to this)
            attrs["tenantId"] = tenant
        if kind != OTHER:
            alert_id = _text(props, "AlertId", fmt, required=True, where="properties.")
            attrs["alertIdStr"] = alert_id
            title = _text(props, "Title", fmt, where="properties.")
            full = kind == ALERT or columns  # else only the join reads this row: validated alike, less kept
            techniques = streaming_techniques(props.get("AttackTechniques")) if full else _check_techniques(props)
            service = _text(props, "ServiceSource", fmt, where="properties.")
            detection = _text(props, "DetectionSource", fmt, where="properties.")
            if full:  # _text gives None or a non-empty text
                if title is not None:
                    attrs["alertName"] = title
                if techniques:
                    attrs["attackTechniqueId"] = techniques
                if service is not None:
                    attrs["serviceSource"] = service
                if detection is not None:
                    attrs["detectionSource"] = detection
                _severity(attrs, props.get("Severity"))
        if kind == ALERT and alert_category:
            attrs["attackTactic"] = alert_category
        device = props.get("DeviceName")
        if isinstance(device, str) and device:
            attrs["hostName"] = device
        account = props.get("AccountName") or props.get("InitiatingProcessAccountName")
        if isinstance(account, str) and account:
            attrs["user"] = account
        when, fallback = self._time(attrs, props.get("Timestamp") or rec.get("time"), arrival)
        identity = f"stream:{table}:{props.get('AlertId') or ''}:{content_hash(props)}"
        return NormalizedEvent(attrs, identity, when, fallback, kind, fmt, position, rec)

    def _normalized(self, rec: dict[str, Any], position: str, arrival: datetime) -> Item:
        fmt = "normalized"
        event_type = rec.get("eventType")
        if not isinstance(event_type, str) or not event_type:
            raise RecordError("missing required field 'eventType'", fmt=fmt, field="eventType")
        if self._skip(event_type):
            return Skipped(event_type)
        attrs = {k: v for k, v in rec.items() if v is not None}
        techniques = attrs.get("attackTechniqueId")
        if techniques is not None:
            attrs["attackTechniqueId"] = technique_ids([techniques] if isinstance(techniques, str) else techniques)
        when, fallback = self._time(attrs, rec.get("eventTime"), arrival)
        event_id = rec.get("eventId")
        identity = f"event:{event_id}" if isinstance(event_id, (str, int)) else f"event:{content_hash(rec)}"
        kind = ALERT if "alertIdStr" in attrs else OTHER
        return NormalizedEvent(attrs, identity, when, fallback, kind, fmt, position, rec)


def _mitre_techniques(rec: dict[str, Any], fmt: str, *, allow_text: bool) -> tuple[str, ...]:
    techniques = rec.get("mitreTechniques") or []
    if allow_text and isinstance(techniques, str):
        techniques = [t for t in re.split(r"[,\s]+", techniques) if t]
    if not isinstance(techniques, list):
        raise RecordError("field 'mitreTechniques' must be a list", fmt=fmt, field="mitreTechniques")
    return technique_ids(techniques)


def _decode_json_column(attrs: dict[str, Any], key: str) -> None:
    value = attrs.get(key)
    if not isinstance(value, str) or value[:1] not in ("{", "["):
        return
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return  # keep the text: a malformed decoration is not a reason to lose the event
    if isinstance(decoded, dict):
        for sub, sub_value in decoded.items():
            if isinstance(sub_value, (str, int, float, bool)):
                attrs[f"{key}.{sub}"] = sub_value
    elif isinstance(decoded, list):
        attrs[key] = tuple(decoded)


def _graph_host_user(evidence: Any) -> tuple[str | None, str | None]:
    host = user = None
    if not isinstance(evidence, list):
        return None, None
    for item in evidence:
        if not isinstance(item, dict):
            continue
        otype = str(item.get("@odata.type", ""))
        if host is None and otype.endswith("deviceEvidence"):
            value = item.get("deviceDnsName") or item.get("hostName")
            host = value if isinstance(value, str) else None
        if user is None and otype.endswith(("userEvidence", "processEvidence")):
            account = item.get("userAccount")
            if isinstance(account, dict):
                value = account.get("accountName") or account.get("userPrincipalName")
                user = value if isinstance(value, str) else None
    return host, user


def _json_reason(exc: orjson.JSONDecodeError, body: bytes) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return f"invalid UTF-8 at byte {uexc.start}"
    return f"not JSON ({exc})"


def raw_json(rec: Any) -> bytes | None:
    """The whole record as JSON bytes (what a dead letter keeps, so it can be re-sent)."""
    try:
        return orjson.dumps(rec, default=str)
    except TypeError:
        pass
    try:  # orjson reads 1,024 levels of nesting but writes only 254: write deeper records without recursion
        return _dumps_deep(rec)
    except TypeError:
        return None


class _Token(bytes):
    """Literal JSON punctuation on :func:`_dumps_deep`'s stack (a value is never one)."""


def _dumps_deep(rec: Any) -> bytes:
    parts: list[bytes] = []
    stack: list[Any] = [rec]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            parts.append(item)
        elif isinstance(item, (dict, list)):
            pieces: list[Any] = [_Token(b"{" if isinstance(item, dict) else b"[")]
            entries = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for i, (key, value) in enumerate(entries):
                if i:
                    pieces.append(_Token(b","))
                if isinstance(item, dict):
                    pieces.append(_Token(orjson.dumps(str(key)) + b":"))
                pieces.append(value)
            pieces.append(_Token(b"}" if isinstance(item, dict) else b"]"))
            stack.extend(reversed(pieces))
        else:
            parts.append(orjson.dumps(item, default=str))
    return b"".join(parts)


def _short(text: str, limit: int = MAX_KEY_CHARS_IN_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _alert_type(category_text: str | None) -> tuple[str, str]:
    """``(event type, category)`` of an AlertInfo row with this ``Category`` text (remembered per text)."""
    return _ALERT_TYPE_OF(category_text, len(category_text or ""))


def _read_alert_type(category_text: str | None) -> tuple[str, str]:
    category = _category(category_text)
    return "MS-Defender-Endpoint-Alert" + (f"-{_pascal(category)}" if category else ""), category


_ALERT_TYPE_OF: TextMemo[str | None, tuple[str, str]] = TextMemo(_read_alert_type)


def _category(value: str | None) -> str:
    """A category text, or "" for the texts real payloads use to say "none"."""
    if value is None or value.strip().lower() in NO_CATEGORY:
        return ""
    return value


RAW_NESTING_ROOM = 32  # levels a trigger event's values sit below in what holds them: outbox record, snapshot, webhook body


def raw_evidence(raw: Any, limit: int = MAX_RAW_BYTES) -> Any:
    """The raw record for incident evidence, replaced by a marked preview when over ``limit``."""
    try:
        data = orjson.dumps(raw, default=str)
    except TypeError:  # nested past orjson's write limit: keep a preview, which every encoder can write
        data = raw_json(raw) or b""
    else:
        if len(data) <= limit:
            return raw
    return _preview(data, limit)


def _preview(data: bytes, limit: int = MAX_RAW_BYTES) -> dict[str, Any]:
    return {"truncated": True, "bytes": len(data), "preview": data[: limit // 2].decode("utf-8", "replace")}


def writable_evidence(summary: dict[str, Any]) -> None:
    """Make ``summary`` (a trigger event as a snapshot holds it) writable ``RAW_NESTING_ROOM`` levels
    down, in place: its raw record, if it could not be, becomes a preview (as ``raw_evidence`` makes
    for one orjson cannot write at all), and each such attribute value its JSON text (a Defender
    column decoded from JSON, or a field of a normalized record, may nest 1,024 levels deep)."""
    raw = summary.get("raw")
    if type(raw) in (list, dict) and not _writable_at_room(raw):
        summary["raw"] = _preview(raw_json(raw) or b"")
    attributes = summary.get("attributes")
    if not isinstance(attributes, dict):
        return
    for name, value in attributes.items():
        if type(value) in (list, dict) and not _writable_at_room(value):
            attributes[name] = (raw_json(value) or b"").decode("utf-8", "replace")


def _writable_at_room(value: Any) -> bool:
    wrapped = value
    for _ in range(RAW_NESTING_ROOM):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped, default=str)
    except TypeError:
        return False
    return True


def iter_file(normalizer: Normalizer, stream: BinaryIO, name: str, arrival: Callable[[], datetime]) -> Iterator[Item]:
    """Stream a file: JSON lines are read in blocks (bounded memory); a file whose first line is
    not a complete JSON value is read as one document (capped at ``MAX_DOCUMENT_BYTES``)."""
    first = stream.readline(MAX_RECORD_BYTES + 1).removeprefix(UTF8_BOM)
    number = 1  # the first line's number: blank lines before it count, so positions name the right line
    while first and not first.strip():
        first = stream.readline(MAX_RECORD_BYTES + 1)
        number += 1
    if not first:
        return
    try:
        orjson.loads(first)
        line_mode = True
    except orjson.JSONDecodeError:
        line_mode = False
    if not line_mode:
        rest = stream.read(MAX_DOCUMENT_BYTES + 1 - len(first))
        yield from normalizer.from_bytes(first + rest, name, arrival())
        return
    yield from _iter_lines(normalizer, stream, first, name, arrival, number)


def _iter_lines(
    normalizer: Normalizer, stream: BinaryIO, head: bytes, name: str, arrival: Callable[[], datetime], first: int = 1
) -> Iterator[Item]:
    """JSON lines, read in blocks of ``READ_BLOCK_BYTES`` and split here (not line by line).

    Lines no rule can match are decided per block by the pre-parse filter (``shared/preparse.py``):
    no parse into Python objects, clock call or position string; they are counted per event type
    and reported as ``Skipped(event_type, n)`` before the block's other lines. A line longer than
    ``MAX_RECORD_BYTES`` is rejected without being held: its bytes are dropped up to its newline.
    """
    line_filter = normalizer.line_filter()
    read = getattr(stream, "read1", stream.read)  # what is there (a pipe) rather than waiting for a full block
    lines = head.split(b"\n")
    tail = lines.pop()  # bytes after the last newline seen
    yield from _block(normalizer, lines, first, name, arrival, line_filter)
    number = first + len(lines)  # line number of the first line of the next block
    dropping = False  # inside a line over the cap (already rejected): drop up to its newline
    while True:
        chunk = read(READ_BLOCK_BYTES)
        eof = not chunk
        if dropping:
            end = chunk.find(b"\n")
            if end < 0 and not eof:
                continue
            dropping, number, chunk = False, number + 1, chunk[end + 1 :] if end >= 0 else b""
        lines = chunk.split(b"\n")
        if tail:  # the line the previous block ended in (not copying the whole block onto it)
            lines[0] = tail + lines[0]
        size = len(tail) + len(chunk)
        tail = b"" if eof else lines.pop()  # at the end of input the last line needs no newline
        yield from _block(normalizer, lines, number, name, arrival, line_filter, may_be_long=size > MAX_RECORD_BYTES)
        number += len(lines)
        if len(tail) > MAX_RECORD_BYTES:
            yield Rejection(f"{name}:{number}", f"record exceeds the {MAX_RECORD_BYTES}-byte cap")
            tail, dropping = b"", True
        if eof:
            return


def _block(
    normalizer: Normalizer,
    lines: list[bytes],
    number: int,
    name: str,
    arrival: Callable[[], datetime],
    line_filter: LineFilter | None,
    *,
    may_be_long: bool = False,
) -> Iterator[Item]:
    """The lines of one block: skipped ones counted, the others read in full (or rejected if over the cap)."""
    if may_be_long:  # rare: a line of this block may be over the cap, so take the lines one by one
        for i, line in enumerate(lines):
            if len(line) > MAX_RECORD_BYTES:
                yield Rejection(f"{name}:{number + i}", f"record exceeds the {MAX_RECORD_BYTES}-byte cap")
            else:
                yield from _block(normalizer, [line], number + i, name, arrival, line_filter)
        return
    kept: Iterable[int] = range(len(lines))
    if line_filter is not None:
        kept, skipped = line_filter.scan(lines)
        for event_type, count in skipped.items():
            yield Skipped(event_type, count)
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for i in kept:
        line = lines[i]
        if not line or line.isspace():  # bytes.isspace: the whitespace bytes.strip() removes, no copy made
            continue
        # what from_line does for a line within the cap, one generator fewer for a plain record
        position = f"{name}:{number + i}"
        try:
            doc = loads(line)
        except decode_error:
            yield from normalizer.from_line(line, position, arrival())  # its rejection
            continue
        if type(doc) is dict and "records" not in doc and "value" not in doc:  # no envelope: one record
            yield normalizer.normalize(doc, position, arrival())
        else:
            yield from normalizer.from_document(doc, position, arrival())


def iter_paths(normalizer: Normalizer, paths: Iterable[str], arrival: Callable[[], datetime]) -> Iterator[Item]:
    """Stream every input path (``-`` for stdin) through :func:`iter_file`, closing files as it goes."""
    import sys

    for path in paths:
        if path == "-":
            yield from iter_file(normalizer, sys.stdin.buffer, "<stdin>", arrival)
            continue
        with Path(path).open("rb") as stream:
            yield from iter_file(normalizer, stream, path, arrival)
