"""Window state per (rule, group key), its compact encoding, and the state store interface.

A group's state holds only what the rule's constraint and its incident need: for each counted event
a 64-bit hash of its identity, its event time (epoch ms) and the values the aggregates read (none for
COUNT(*)), plus the open incident's counters. Payloads are never kept.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .errors import ConcurrencyConflict

MAX_WINDOW_ENTRIES = 1000  # entries per group window; COUNT(*) entries are ~40 bytes encoded
MAX_STATE_BYTES = 60 * 1024  # encoded group state stays under Table's 64 KiB property limit
SIZE_CHECK_ENTRIES = 200  # below this many entries a state cannot reach MAX_STATE_BYTES without huge values


def identity_hash(identity: str) -> int:
    """64-bit hash of an event identity (signed, so it fits Table's Int64 and JSON exactly)."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A rule id and the group-by values; compared case-insensitively, case kept for display."""

    rule_id: str
    values: tuple[str, ...]

    @property
    def norm(self) -> tuple[str, ...]:
        return tuple(v.lower() for v in self.values)

    def __hash__(self) -> int:
        return hash((self.rule_id, self.norm))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupKey) and self.rule_id == other.rule_id and self.norm == other.norm

    @property
    def text(self) -> str:
        """Stable text form of the key (case-folded), used for ids and storage keys."""
        return self.rule_id + "\x1f" + "\x1f".join(self.norm)


@dataclass(slots=True)
class Incident:
    incident_id: str
    revision: int
    first_seen: int  # epoch ms of the episode's first event
    last_seen: int  # epoch ms of the newest triggering event
    last_trigger: int  # epoch ms (event time) of the latest trigger
    window_start: int  # epoch ms where the current trigger window began
    trigger_count: int
    attributes: dict[str, Any]

    def to_list(self) -> list[Any]:
        return [
            self.incident_id,
            self.revision,
            self.first_seen,
            self.last_seen,
            self.last_trigger,
            self.window_start,
            self.trigger_count,
            self.attributes,
        ]

    @classmethod
    def from_list(cls, data: Sequence[Any]) -> Incident:
        return cls(*data)


@dataclass(slots=True)
class GroupState:
    """Window entries are ``[time_ms, identity_hash, *values]`` kept sorted by time."""

    key: GroupKey
    entries: list[list[Any]] = field(default_factory=list)
    newest: int | None = None
    incident: Incident | None = None
    evicted: int = 0

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "r": self.key.rule_id,
                "k": list(self.key.values),
                "e": self.entries,
                "n": self.newest,
                "i": self.incident.to_list() if self.incident else None,
                "x": self.evicted,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupState:
        d = orjson.loads(data)
        incident = Incident.from_list(d["i"]) if d.get("i") else None
        return cls(GroupKey(d["r"], tuple(d["k"])), d["e"], d["n"], incident, d.get("x", 0))


@dataclass(frozen=True, slots=True)
class Loaded:
    """A stored state with its concurrency token (None: the group has no stored state)."""

    state: GroupState | None
    token: Any


@dataclass(frozen=True, slots=True)
class Change:
    key: GroupKey
    state: GroupState | None  # None: delete
    token: Any  # token from load; None means "create, must not exist"
    expires_at: int  # epoch ms (wall clock) after which the state may be purged


class StateStore(Protocol):
    """Where group states live between batches. Implementations: memory, Azure Table."""

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        """Load the states of ``keys`` in one go; expired or absent states load as ``Loaded(None, ...)``.

        Raises:
            StoreError: the store is unreachable.
        """
        ...

    def save(self, changes: Sequence[Change]) -> None:
        """Write ``changes`` conditionally on their tokens.

        Raises:
            ConcurrencyConflict: some keys were changed by another writer; ``.keys`` lists them,
                the other changes were written.
            StoreError: the store is unreachable.
        """
        ...

    def purge_expired(self, now_ms: int) -> int:
        """Delete states expired at ``now_ms``; returns how many were deleted."""
        ...


class KeysConflict(ConcurrencyConflict):
    def __init__(self, keys: Iterable[GroupKey]) -> None:
        self.keys = list(keys)
        super().__init__(f"{len(self.keys)} group state(s) changed by another writer")


class MemoryStateStore:
    """The embedded default store: a dict of serialized states with version counters.

    States are stored serialized, exactly as the Table store stores them, so both behave alike.
    """

    def __init__(self) -> None:
        self._data: dict[GroupKey, tuple[bytes, int, int]] = {}  # key -> (state, version, expires_at)
        self._lock = threading.Lock()
        self.calls = {"load": 0, "save": 0, "purge": 0}

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        self.calls["load"] += 1
        out: dict[GroupKey, Loaded] = {}
        with self._lock:
            for key in keys:
                stored = self._data.get(key)
                if stored is None:
                    out[key] = Loaded(None, None)
                elif stored[2] <= now_ms:
                    out[key] = Loaded(None, stored[1])  # expired: ignored, but the token still guards it
                else:
                    out[key] = Loaded(GroupState.from_bytes(stored[0]), stored[1])
        return out

    def save(self, changes: Sequence[Change]) -> None:
        self.calls["save"] += 1
        conflicts: list[GroupKey] = []
        with self._lock:
            for change in changes:
                current = self._data.get(change.key)
                current_token = current[1] if current else None
                if current_token != change.token:
                    conflicts.append(change.key)
                    continue
                if change.state is None:
                    self._data.pop(change.key, None)
                else:
                    version = (current_token or 0) + 1
                    # Copy to an exact-size bytes object: orjson's result keeps a 4 KiB buffer.
                    self._data[change.key] = (bytes(memoryview(change.state.to_bytes())), version, change.expires_at)
        if conflicts:
            raise KeysConflict(conflicts)

    def purge_expired(self, now_ms: int) -> int:
        self.calls["purge"] += 1
        with self._lock:
            dead = [k for k, v in self._data.items() if v[2] <= now_ms]
            for k in dead:
                del self._data[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)
