"""The incident snapshot's type: what the engine emits, the queue carries and consumers read.

A :class:`Snapshot` is a plain ``dict`` at run time (a ``TypedDict`` costs nothing and encodes byte
for byte as before); the type only lets ``mypy --strict`` check the keys that the engine, webhook,
functions, rule tests, receiver and replay read. Key order on the wire is ``SNAPSHOT_ORDER`` in
:mod:`shared.engine`. A snapshot read back from JSON (a queue message, a webhook body) is checked by
:func:`as_snapshot` for the two keys every consumer keys on before it is treated as one.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast


class TriggerEvent(TypedDict):
    """One triggering event as a snapshot carries it (``triggerEvents``, newest last)."""

    eventType: str
    eventTime: str
    timeFallback: bool
    format: str
    position: str
    identity: str
    attributes: dict[str, Any]
    raw: Any


class RuleFields(TypedDict):
    """The parts of a snapshot that its rule and group key fix (not recorded in the outbox)."""

    ruleId: str
    tenantId: str
    ruleName: str
    severity: int
    category: str
    tactics: list[dict[str, Any]]
    techniques: list[dict[str, Any]]
    groupBy: dict[str, str]
    remediation: str


class _Snapshot(RuleFields):
    incidentId: str
    revision: int
    action: str  # created | updated | cleared
    attributes: dict[str, Any]
    triggerCount: int
    firstSeen: str  # ISO 8601 UTC, event time
    lastSeen: str
    triggerEvents: list[TriggerEvent]


class Snapshot(_Snapshot, total=False):
    """A full incident snapshot; consumers keep the highest ``revision`` per ``incidentId``."""

    entities: dict[str, Any]
    triggerEventsTrimmed: int  # oldest trigger events dropped to fit a size limit
    attributesTrimmed: bool
    entitiesTrimmed: bool
    schemaVersion: str  # webhook bodies only


def as_snapshot(value: Any) -> Snapshot:
    """``value`` (decoded JSON) as a snapshot, once it has the keys consumers rely on.

    Raises:
        ValueError: not a mapping with a string ``incidentId`` and an integer ``revision``.
    """
    if not isinstance(value, dict):
        raise ValueError(f"an incident snapshot is a JSON object, not {type(value).__name__}")
    if not isinstance(value.get("incidentId"), str) or type(value.get("revision")) is not int:
        raise ValueError("an incident snapshot needs a string incidentId and an integer revision")
    return cast(Snapshot, value)
