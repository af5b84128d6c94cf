"""``python -m shared send``: publish alert files (any supported format) to an Event Hub."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import IO, Any

import orjson

from .errors import EndpointError, SettingsError
from .graph import BatchPublisher
from .normalize import NormalizedEvent, Normalizer, Rejection, iter_paths

FLUSH_EVERY = 500  # records buffered per tenant before a publish


def raw_records(paths: list[str], fmt: str) -> Iterator[tuple[str, bytes] | Rejection]:
    """Each good record as (tenant, its own JSON); envelopes are unwrapped so every event is one alert."""
    now = datetime.now(timezone.utc)
    for item in iter_paths(Normalizer(fmt=fmt), paths, lambda: now):
        if isinstance(item, Rejection):
            yield item
        elif isinstance(item, NormalizedEvent):
            tenant = item.attrs.get("tenantId")
            yield (str(tenant) if tenant else "", orjson.dumps(item.raw))


def send(
    paths: list[str], publisher: BatchPublisher, *, fmt: str = "auto", err: IO[str] = sys.stderr, progress: bool = False
) -> dict[str, Any]:
    counts = {"read": 0, "sent": 0, "rejected": 0}
    pending: dict[str, list[bytes]] = defaultdict(list)

    def flush(tenant: str) -> None:
        records = pending.pop(tenant, [])
        if records:
            reasons = publisher.publish(tenant, records)
            for reason in reasons:
                err.write(f"rejected: {reason}\n")
            counts["rejected"] += len(reasons)
            counts["sent"] += len(records) - len(reasons)

    for item in raw_records(paths, fmt):
        counts["read"] += 1
        if isinstance(item, Rejection):
            counts["rejected"] += 1
            err.write(f"{item}\n")
            continue
        tenant, record = item
        pending[tenant].append(record)
        if len(pending[tenant]) >= FLUSH_EVERY:
            flush(tenant)
        if progress and counts["read"] % 1000 == 0:
            err.write(f"\r{counts['read']} read, {counts['sent']} sent")
            err.flush()
    for tenant in list(pending):
        flush(tenant)
    if progress:
        err.write("\n")
    return counts


def make_producer(
    connection_string: str | None, namespace: str | None, hub: str, *, connection_env: str = "EVENTHUB_CONNECTION_STRING"
) -> Any:
    """Raises: SettingsError naming ``connection_env`` for a malformed connection string (never its value)."""
    from azure.eventhub import EventHubProducerClient

    if connection_string:
        try:
            return EventHubProducerClient.from_connection_string(connection_string, eventhub_name=hub, retry_total=2)
        except (ValueError, TypeError, KeyError):
            raise SettingsError(
                f"${connection_env} is not an Event Hubs connection string "
                "(Endpoint=sb://<namespace>/;SharedAccessKeyName=...;SharedAccessKey=...)"
            ) from None
    from azure.identity import DefaultAzureCredential

    fqdn = namespace if namespace and "." in namespace else f"{namespace}.servicebus.windows.net"
    return EventHubProducerClient(
        fully_qualified_namespace=fqdn, eventhub_name=hub, credential=DefaultAzureCredential(), retry_total=2
    )


def send_files(paths: list[str], producer: Any, *, fmt: str = "auto", progress: bool = False) -> dict[str, Any]:
    """:func:`send` on a producer, closing it.

    Raises: EndpointError when the hub cannot be reached or refuses the credentials (records sent
    before that stay sent).
    """
    from azure.core.exceptions import AzureError, ClientAuthenticationError
    from azure.eventhub.exceptions import EventHubError

    from .graph import eventhub_publisher

    try:
        with producer:
            return send(paths, eventhub_publisher(producer), fmt=fmt, progress=progress)
    except (EventHubError, ClientAuthenticationError, AzureError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise EndpointError(f"could not send to the Event Hub ({type(exc).__name__}: {first})") from None
