"""Rule chaining: incident snapshots fed back to the rules as events, FortiSIEM style.

In FortiSIEM an incident is itself an event whose ``eventType`` is the rule's id, so a rule can
correlate incidents (``eventType = "PH_RULE_..."``). Here a snapshot becomes such an event when some
enabled rule could match its rule id (nothing is fed back otherwise, so rules that nobody chains
cost nothing). The event carries the incident's group-by values and attributes plus ``incidentId``,
``ruleId``, ``ruleName``, ``eventSeverity``, ``tenantId`` and ``chainDepth``.

Loop protection: a rule never sees its own incidents, and feedback stops after
``MAX_CHAIN_DEPTH`` levels within one batch (A → B → A → … ends there; the depth is in every
chained event and snapshot evidence). Each (incident, revision) is one event with a stable identity,
so redelivered batches and replays count it once. Cleared snapshots are not fed back.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .normalize import OTHER, NormalizedEvent
from .snapshot import Snapshot

MAX_CHAIN_DEPTH = 3  # levels of incidents-of-incidents per batch
CHAIN_FORMAT = "incident"


def as_events(snapshots: Iterable[Snapshot], wanted: frozenset[str], depth: int) -> list[NormalizedEvent]:
    """Events for the snapshots of rules in ``wanted`` (created or updated), at chain ``depth``."""
    out = []
    for snap in snapshots:
        rule_id = snap.get("ruleId")
        if rule_id not in wanted or snap.get("action") not in ("created", "updated"):
            continue
        attrs: dict[str, Any] = {**snap.get("groupBy", {}), **snap.get("attributes", {})}
        attrs.update(
            {
                "eventType": rule_id,
                "incidentId": snap["incidentId"],
                "incidentRevision": snap["revision"],
                "ruleId": rule_id,
                "ruleName": snap.get("ruleName"),
                "eventSeverity": snap.get("severity"),
                "chainDepth": depth,
                "eventTime": snap["lastSeen"],
            }
        )
        if snap.get("tenantId"):
            attrs["tenantId"] = snap["tenantId"]
        out.append(
            NormalizedEvent(
                attrs={k: v for k, v in attrs.items() if v is not None},
                identity=f"incident:{snap['incidentId']}:{snap['revision']}",
                event_time=datetime.fromisoformat(snap["lastSeen"].replace("Z", "+00:00")),
                time_fallback=False,
                kind=OTHER,
                format=CHAIN_FORMAT,
                position=f"incident {snap['incidentId']} revision {snap['revision']}",
            )
        )
    return out
