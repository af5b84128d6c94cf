"""Dead letters: every record the correlator does not count, kept whole and re-drivable.

A batch's rejected records are written as ONE claim-check blob (gzip'd JSON lines, one complete
dead-letter record per line, the original record bytes base64 in ``raw``) plus ONE queue message
that points to it and lists the first reasons. Two storage calls per batch, whatever the number of
rejections: a 1 MiB event of 500,000 tiny invalid records costs what a batch with one bad record does.

Blob names are content-addressed (``rejected/<yyyy>/<mm>/<dd>/p<partition>-s<first seq>-<digest>``),
so a retried batch rewrites the same blob. ``python -m shared redrive`` lists, shows and re-sends them.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

import orjson

from .claimcheck import ClaimStore, claim_name, claim_ref
from .normalize import MAX_RECORD_BYTES, Rejection

MAX_REASON_CHARS = 1000  # a reason may quote input (keys, values): capped so no record can bloat a letter
MAX_RAW_KEPT = 2 * MAX_RECORD_BYTES  # an oversized event body is kept up to here (Event Hub caps events at 1 MiB)
MAX_LISTED_REASONS = 20  # reasons quoted in the queue message; the blob holds all of them
MAX_LISTED_REASON_CHARS = 300  # per quoted reason in the queue message (the message must stay under 64 KiB)
LETTER_VERSION = 1


class DeadLetterQueue(Protocol):
    def send(self, messages: Sequence[str]) -> None:
        """Raises: StoreError when the queue is unreachable."""
        ...


def cap(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 24] + f"... [{len(text) - limit + 24} more chars]"


@dataclass(frozen=True)
class Origin:
    """Where a record came from: Event Hub coordinates, or a file name for replay."""

    partition: str | None = None
    sequence: int | None = None
    enqueued: datetime | None = None

    @cached_property
    def fields(self) -> dict[str, Any]:
        """The letter fields of this origin, computed once for all the records of an event."""
        return {"partition": self.partition, "sequenceNumber": self.sequence, "enqueuedTime": _iso(self.enqueued)}


def letter(rejection: Rejection, origin: Origin) -> dict[str, Any]:
    """The complete dead-letter record (one line of the blob)."""
    raw = rejection.raw if rejection.raw is not None else b""
    kept = raw[:MAX_RAW_KEPT]
    reason, position, fld = rejection.reason, rejection.position, rejection.field
    return {
        "reason": reason if len(reason) <= MAX_REASON_CHARS else cap(reason),
        "position": position if len(position) <= 300 else cap(position, 300),
        "format": rejection.format,
        "field": cap(fld, 300) if fld else None,
        **origin.fields,
        "rawBytes": len(raw),
        "rawTruncated": len(kept) < len(raw),
        "raw": base64.b64encode(kept).decode(),
    }


def encode_letters(letters: Sequence[dict[str, Any]]) -> bytes:
    """Blob content: gzip'd JSON lines (level 1: the data is repetitive, speed matters more)."""
    return gzip.compress(b"".join(orjson.dumps(x) + b"\n" for x in letters), compresslevel=1, mtime=0)


def decode_letters(data: bytes) -> Iterator[dict[str, Any]]:
    for line in gzip.decompress(data).splitlines():
        if line.strip():
            yield orjson.loads(line)


def raw_of(letter: Mapping[str, Any]) -> bytes:
    """The original record bytes of a dead-letter record."""
    return base64.b64decode(letter.get("raw") or b"")


class DeadLetterWriter:
    """Writes a batch's dead letters: one blob with every record, one queue message pointing to it."""

    def __init__(self, queue: DeadLetterQueue, claims: ClaimStore) -> None:
        self.queue = queue
        self.claims = claims

    def write(self, letters: Sequence[dict[str, Any]], *, when: datetime) -> dict[str, Any] | None:
        """Write ``letters`` (from :func:`letter`); returns the queue message, or None when empty.

        Raises:
            StoreError: the blob or the queue failed; nothing is lost since the batch is retried
                and the blob name is the same on the retry.
        """
        if not letters:
            return None
        data = encode_letters(letters)
        first = letters[0]
        hint = f"p{first.get('partition') or 'x'}-s{first.get('sequenceNumber')}"
        name = claim_name("rejected", data, when, hint) + ".jsonl.gz"
        self.claims.put(name, data, {"records": str(len(letters)), "version": str(LETTER_VERSION)})
        sequences = [x["sequenceNumber"] for x in letters if isinstance(x.get("sequenceNumber"), int)]
        message = {
            "kind": "rejected",
            "version": LETTER_VERSION,
            "records": len(letters),
            "partition": first.get("partition"),
            "firstSequenceNumber": min(sequences) if sequences else None,
            "lastSequenceNumber": max(sequences) if sequences else None,
            "enqueuedTime": first.get("enqueuedTime"),
            "reasons": [
                {"position": x["position"][:200], "reason": cap(x["reason"], MAX_LISTED_REASON_CHARS)}
                for x in letters[:MAX_LISTED_REASONS]
            ],
            "reasonsOmitted": max(0, len(letters) - MAX_LISTED_REASONS),
            "claimCheck": claim_ref(self.claims, name),
        }
        self.queue.send([orjson.dumps(message).decode()])
        return message


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    try:
        return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
    except (OverflowError, ValueError):
        return None
