"""``python -m shared redrive``: list, show and re-send dead-lettered records; re-queue poison incidents.

Dead letters live in claim-check blobs (``rejected/...`` in ``DEADLETTER_CONTAINER``), one blob per
batch, gzip'd JSON lines of complete records (see :mod:`shared.deadletters`); the ``rejected-alerts``
queue only notifies. Records are addressed as ``<blob>`` (all of its records) or ``<blob>#<n>``.
Re-sending is idempotent: a re-sent blob is marked ``resentAt`` and skipped next time (``--force``
overrides), and the correlator counts an event identity once while its window is alive.

Poison incidents live on the poison queue (``INCIDENTS_POISON_QUEUE``), their body inline or
claim-checked to ``poison/...``. ``requeue-poison`` puts each body back on ``INCIDENTS_QUEUE``
base64-encoded (as ``host.json`` tells the queue trigger to expect) and only then deletes the
poison message; the forwarder's delivery records make a repeated re-queue deliver nothing twice.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

import orjson
from azure.core.exceptions import AzureError

from .claimcheck import ClaimStore
from .deadletters import decode_letters, raw_of
from .errors import CorrelatorError

POISON_BATCH = 32  # messages received per call (the queue service maximum)
COMMAND_RETRIES = 2  # an operator waits for the answer: fail in seconds when storage is unreachable
POISON_VISIBILITY_S = 300  # a received poison message stays hidden this long while it is re-queued


class RedriveError(CorrelatorError):
    """A redrive argument names nothing (no such blob, record or queue)."""


@dataclass(frozen=True, slots=True)
class Address:
    blob: str
    index: int | None  # None: every record of the blob

    @classmethod
    def parse(cls, text: str) -> Address:
        blob, _, index = text.partition("#")
        if not blob.startswith("rejected/"):
            raise RedriveError(f"{text!r}: a dead-letter address is rejected/...[#<record number>]")
        try:
            return cls(blob, int(index) if index else None)
        except ValueError:
            raise RedriveError(f"{text!r}: the record number after '#' must be an integer") from None


def records_of(claims: ClaimStore, address: Address) -> list[tuple[int, dict[str, Any]]]:
    """The dead-letter records at ``address`` with their numbers.

    Raises: ClaimMissing (no such blob), RedriveError (no such record number).
    """
    letters = list(enumerate(decode_letters(claims.get(address.blob))))
    if address.index is None:
        return letters
    if not 0 <= address.index < len(letters):
        raise RedriveError(f"{address.blob} holds {len(letters)} record(s); there is no #{address.index}")
    return [letters[address.index]]


def list_rejected(claims: ClaimStore, prefix: str = "rejected/") -> Iterator[dict[str, Any]]:
    for info in claims.list(prefix):
        yield {
            "blob": info.name,
            "records": int(info.metadata.get("records", "0") or 0),
            "bytes": info.size,
            "resentAt": info.metadata.get("resentAt"),
        }


def show_record(number: int, letter: Mapping[str, Any], blob: str) -> dict[str, Any]:
    """A record for display: the original as text when it is UTF-8, else still base64."""
    raw = raw_of(letter)
    shown: dict[str, Any] = {"address": f"{blob}#{number}", **{k: v for k, v in letter.items() if k != "raw"}}
    try:
        shown["record"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown["rawBase64"] = letter.get("raw")
    return shown


def tenant_of(raw: bytes) -> str:
    """Partition key for a re-sent record: its tenant when it names one (as ``send`` does)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(doc, dict):
        for key in ("tenantId", "aadTenantId"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
    return ""


@dataclass
class ResendResult:
    sent: int = 0
    skipped_blobs: int = 0
    refused: int = 0


def resend(
    claims: ClaimStore,
    addresses: Iterable[Address],
    *,
    publisher: Any = None,
    out: IO[bytes] | None = None,
    force: bool = False,
    err: IO[str] = sys.stderr,
    now: datetime | None = None,
) -> ResendResult:
    """Re-send the records at ``addresses`` to the hub (``publisher``) or as JSON lines to ``out``
    (for ``python -m shared replay``). Whole blobs are marked ``resentAt`` once sent.

    Raises: ClaimMissing, RedriveError, StoreError; the hub's errors propagate (nothing is marked).
    """
    result = ResendResult()
    stamp = (now or datetime.now(timezone.utc)).isoformat()
    for address in addresses:
        resent_at = claims.info(address.blob).metadata.get("resentAt") if address.index is None else None
        if resent_at and not force:
            err.write(f"{address.blob}: already re-sent at {resent_at} (--force to repeat)\n")
            result.skipped_blobs += 1
            continue
        by_tenant: dict[str, list[bytes]] = {}
        for _, letter in records_of(claims, address):
            raw = raw_of(letter)
            if out is not None:
                out.write(raw.rstrip(b"\r\n") + b"\n")
                result.sent += 1
            else:
                by_tenant.setdefault(tenant_of(raw), []).append(raw)
        for tenant, records in by_tenant.items():
            reasons = publisher.publish(tenant, records)
            for reason in reasons:
                err.write(f"refused by the hub: {reason}\n")
            result.refused += len(reasons)
            result.sent += len(records) - len(reasons)
        if address.index is None:
            claims.set_metadata(address.blob, {"resentAt": stamp})
    return result


# -- poison incidents -------------------------------------------------------------------------


HOST_PARKED = "parked by the Functions host after its last dequeue (no reason recorded)"


def poison_message(content: str) -> dict[str, Any]:
    """A poison message as the forwarder writes it (JSON: ``reason``, ``body`` or ``claimCheck``), or
    as the Functions host parks one itself when the function failed on every dequeue (a crash, a
    timeout): the incident message as it was stored, base64 (``host.json`` ``messageEncoding``)."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    try:
        decoded = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if is_snapshot(decoded):
        return {"reason": HOST_PARKED, "body": decoded.decode()}
    return {"body": content}


def poison_body(message: Mapping[str, Any], claims: ClaimStore) -> bytes:
    """The complete incident body of a poison message (inline, or behind its claim check)."""
    check = message.get("claimCheck")
    if isinstance(check, dict) and check.get("blob"):
        return claims.get(str(check["blob"]))
    return str(message.get("body") or "").encode()


def is_snapshot(body: bytes) -> bool:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and "incidentId" in doc and "revision" in doc


@dataclass
class RequeueResult:
    requeued: int = 0
    left: int = 0  # not incident snapshots: re-queueing them would only poison them again


def requeue_poison(
    poison: Any,
    incidents: Any,
    claims: ClaimStore,
    *,
    limit: int | None = None,
    err: IO[str] = sys.stderr,
    deliveries: Any = None,
) -> RequeueResult:
    """Move poison messages back onto the incidents queue (``incidents`` must encode base64).

    With ``deliveries`` (the forwarder's delivery log), the poison records of the message's
    ``targets`` are cleared first, so the forwarder delivers the re-queued revision to them again.

    A message is deleted from the poison queue only after its body was queued: a crash in
    between re-queues it again later, which the forwarder's delivery records make harmless.
    """
    result = RequeueResult()
    seen: set[str] = set()
    left: list[Any] = []  # hidden while the queue is walked (so the walk moves on), visible again after
    try:
        _requeue(poison, incidents, claims, limit, err, deliveries, result, seen, left)
    finally:
        for message in left:
            with contextlib.suppress(AzureError):  # else it reappears when its visibility timeout ends
                poison.update_message(message, pop_receipt=message.pop_receipt, visibility_timeout=0)
    return result


def _requeue(
    poison: Any,
    incidents: Any,
    claims: ClaimStore,
    limit: int | None,
    err: IO[str],
    deliveries: Any,
    result: RequeueResult,
    seen: set[str],
    left: list[Any],
) -> None:
    while limit is None or result.requeued < limit:
        batch = list(
            poison.receive_messages(
                messages_per_page=POISON_BATCH, visibility_timeout=POISON_VISIBILITY_S, max_messages=POISON_BATCH
            )
        )
        fresh = [m for m in batch if m.id not in seen]
        if not fresh:
            break
        for message in fresh:
            seen.add(message.id)
            parsed = poison_message(message.content)
            body = poison_body(parsed, claims)
            if not is_snapshot(body):
                err.write(f"poison message {message.id}: not an incident snapshot, left on the poison queue\n")
                result.left += 1
                left.append(message)
                continue
            if deliveries is not None:
                from .webhook import forget_poisoned

                forget_poisoned(deliveries, parsed, body)
            incidents.send_message(body.decode("utf-8"))
            poison.delete_message(message)
            result.requeued += 1
            if limit is not None and result.requeued >= limit:
                break


def peek_poison(poison: Any, claims: ClaimStore) -> Iterator[dict[str, Any]]:
    """The first poison messages (a queue can only be peeked 32 deep), summarised."""
    for message in poison.peek_messages(max_messages=POISON_BATCH):
        parsed = poison_message(message.content)
        body = poison_body(parsed, claims)
        snap = orjson.loads(body) if is_snapshot(body) else {}
        yield {
            "messageId": message.id,
            "reason": parsed.get("reason"),
            "incidentId": snap.get("incidentId"),
            "revision": snap.get("revision"),
            "bodyBytes": len(body),
            "claimCheck": parsed.get("claimCheck"),
        }


# -- command line -------------------------------------------------------------------------------


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def storage_from_env() -> Any:
    from .clients import StorageClients

    source = dict(os.environ)
    return StorageClients(
        connection=source.get("STATE_STORAGE_CONNECTION"),
        table_uri=source.get("STATE_STORAGE__tableServiceUri"),
        queue_uri=source.get("STATE_STORAGE__queueServiceUri"),
        blob_uri=source.get("STATE_STORAGE__blobServiceUri"),
        client_id=source.get("AZURE_CLIENT_ID"),
        retry_total=COMMAND_RETRIES,
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser("redrive", help="list, show and re-send dead letters; re-queue poison incidents")
    p.set_defaults(func=main)
    r = p.add_subparsers(dest="action", required=True)
    ls = r.add_parser("list", help="dead-letter blobs (or, with --poison, the first poison messages)")
    ls.add_argument("--prefix", default="rejected/", help="blob name prefix, e.g. rejected/2026/11/28/")
    ls.add_argument("--poison", action="store_true", help="peek the poison queue instead")
    show = r.add_parser("show", help="the records of a dead-letter blob, one JSON object per line")
    show.add_argument("address", help="rejected/...[#<record number>]")
    show.add_argument("--raw", action="store_true", help="print only the original record bytes")
    rs = r.add_parser("resend", help="re-send dead-lettered records to the hub, or to a file for replay")
    rs.add_argument("addresses", nargs="*", help="rejected/...[#n] (default with --all: every blob not yet re-sent)")
    rs.add_argument("--all", action="store_true", help="every dead-letter blob under --prefix")
    rs.add_argument("--prefix", default="rejected/")
    rs.add_argument("--to-file", metavar="PATH", help="write the records as JSON lines (then: python -m shared replay PATH)")
    rs.add_argument("--hub", help="Event Hub name to publish to")
    rs.add_argument("--namespace", help="Event Hubs namespace (uses DefaultAzureCredential)")
    rs.add_argument("--connection-env", default="EVENTHUB_CONNECTION_STRING")
    rs.add_argument("--force", action="store_true", help="re-send blobs already marked as re-sent")
    rq = r.add_parser("requeue-poison", help="put poison incidents back on the incidents queue (base64)")
    rq.add_argument("--max", type=int, default=None, help="at most this many messages")


def main(args: Any) -> int:
    from azure.core.exceptions import AzureError

    from .claimcheck import BlobClaims, ClaimMissing
    from .errors import SettingsError, StoreError

    try:
        clients = storage_from_env()
        claims = BlobClaims(clients.container(_env("DEADLETTER_CONTAINER", "deadletters")))
        return _run(args, clients, claims)
    except (RedriveError, ClaimMissing, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, AzureError) as exc:  # storage unreachable or refusing our credentials
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 3


def _poison_queue_name() -> str:
    return _env("INCIDENTS_POISON_QUEUE", f"{_env('INCIDENTS_QUEUE', 'incidents')}-poison")


def _run(args: Any, clients: Any, claims: ClaimStore) -> int:
    out = sys.stdout
    if args.action == "list":
        rows = peek_poison(clients.queue(_poison_queue_name()), claims) if args.poison else list_rejected(claims, args.prefix)
        for row in rows:
            out.write(orjson.dumps(row).decode() + "\n")
        return 0
    if args.action == "show":
        address = Address.parse(args.address)
        for number, letter in records_of(claims, address):
            if args.raw:
                sys.stdout.buffer.write(raw_of(letter).rstrip(b"\r\n") + b"\n")
            else:
                out.write(orjson.dumps(show_record(number, letter, address.blob)).decode() + "\n")
        return 0
    if args.action == "resend":
        if bool(args.to_file) == bool(args.hub):
            raise RedriveError("say where to: --to-file PATH or --hub NAME")
        if args.all:
            addresses = [
                Address(row["blob"], None) for row in list_rejected(claims, args.prefix) if args.force or not row["resentAt"]
            ]
        else:
            addresses = [Address.parse(a) for a in args.addresses]
        if not addresses:
            print("nothing to re-send", file=sys.stderr)
            return 0
        if args.to_file:
            with open(args.to_file, "ab") as stream:
                result = resend(claims, addresses, out=stream, force=args.force)
        else:
            from .graph import eventhub_publisher
            from .send import make_producer

            connection = os.environ.get(args.connection_env) if args.connection_env else None
            if not connection and not args.namespace:
                raise RedriveError(f"set ${args.connection_env} to an Event Hubs connection string, or pass --namespace")
            with make_producer(connection, args.namespace, args.hub) as producer:
                result = resend(claims, addresses, publisher=eventhub_publisher(producer), force=args.force)
        print(
            f"re-sent {result.sent} record(s), refused {result.refused}, skipped {result.skipped_blobs} blob(s)", file=sys.stderr
        )
        return 1 if result.refused else 0
    incidents = clients.queue(_env("INCIDENTS_QUEUE", "incidents"), base64=True)
    from .webhook import TableDeliveryLog

    deliveries = TableDeliveryLog(clients.table(_env("DELIVERY_TABLE", "webhookdeliveries")))
    moved = requeue_poison(clients.queue(_poison_queue_name()), incidents, claims, limit=args.max, deliveries=deliveries)
    print(f"re-queued {moved.requeued} poison incident(s); left {moved.left} that are not incident snapshots", file=sys.stderr)
    return 0
