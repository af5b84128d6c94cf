"""Window state per (rule, tenant, group key), its compact encoding, and the state store interface.

A group's state holds only what the rule's constraint and its incident need: for each counted event
a 64-bit hash of its identity, its event time (epoch ms) and the values the aggregates read (none for
COUNT(*)), plus the open incident's counters, the eviction high-water mark, and the group's outbox:
the snapshots its most recent batches emitted, so that a redelivered batch re-emits exactly them.
Payloads are never kept.

Encoding (version 2): the state is one JSON document (``to_bytes``, at most ``MAX_STATE_BYTES``),
stored deflated (``encode``), and the outbox a sequence of length-prefixed zlib records (``outbox_bytes``, at most
``MAX_OUTBOX_BYTES``); the store writes both in one conditional write. A record is deflated when a store
first writes it (``packed_record``): until then the state holds its JSON. Version 1 states (no ``v``)
still load: no eviction mark, no outbox, no tenant.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sqlite3
import struct
import sys
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .entities import KINDS, empty, expand
from .errors import ConcurrencyConflict
from .normalize import writable_evidence

STATE_VERSION = 2
MAX_WINDOW_ENTRIES = 1000  # entries per group window; COUNT(*) entries are ~40 bytes encoded
MAX_STATE_BYTES = 60 * 1024  # encoded group state stays under Table's 64 KiB property limit
MAX_ENTRY_BYTES = 48 * 1024  # encoded window entries of a group, capped event by event (so whatever the batching)
SIZE_CHECK_ENTRIES = 200  # below this many entries a state cannot reach MAX_STATE_BYTES without huge values
MAX_OUTBOX_BYTES = 56 * 1024  # compressed outbox a group keeps of its earlier batches (one Table property)
OUTBOX_PROPERTY_BYTES = 63 * 1024  # one Table binary property holds at most 64 KiB
OUTBOX_PROPERTIES = 8  # the newest batch's record may span this many properties (a backfill of one group)
MAX_RECORD_BYTES = OUTBOX_PROPERTIES * OUTBOX_PROPERTY_BYTES - MAX_OUTBOX_BYTES - 8  # one batch's record
MAX_OUTBOX_RECORDS = 32  # batches whose emissions a group remembers
LIVE_STATES = 20_000  # states the in-memory store keeps as objects (the most recently written)
MAX_SHARED_VALUES = 4096  # tenant values the in-memory store numbers in its compact keys


def deflate(data: bytes, level: int = 6, raw: bool = False, zdict: bytes = b"") -> bytes:
    """``data`` deflated (zlib format, or raw deflate when ``raw``), with a window just big enough for
    ``zdict`` + ``data``: zlib's default 32 KiB window and 128 KiB hash table are allocated and cleared
    for every stream, which costs ten times the compression of a state of a few hundred bytes. Any
    inflater reads the result (a window at least as big as the data finds the same matches)."""
    wbits = min(15, max(9, (len(data) + len(zdict)).bit_length()))
    window, mem = -wbits if raw else wbits, max(1, wbits - 7)
    packer = (
        zlib.compressobj(level, zlib.DEFLATED, window, mem, zdict=zdict)
        if zdict
        else zlib.compressobj(level, zlib.DEFLATED, window, mem)
    )
    return packer.compress(data) + packer.flush()


def identity_hash(identity: str) -> int:
    """64-bit hash of an event identity (signed, so it fits Table's Int64 and JSON exactly)."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A rule id and the group-by values; compared case-insensitively, case kept for display.

    Keys made by ``engine.group_key`` always hold the event's tenant among ``values`` (appended when
    the rule does not group by ``tenantId``), so no two tenants share a key, a state or an incident
    id; ``tenant`` names it for storage partitioning and for the snapshot.
    """

    rule_id: str
    values: tuple[str, ...]
    tenant: str = field(default="", compare=False)
    # case-folded values and hash, computed once: keys are hashed on every dict access of a batch
    norm: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        norm = tuple(map(_folded, self.values))
        # a key of values without capitals shares its tuple: stores keep one key per open group
        object.__setattr__(self, "norm", self.values if norm == self.values else norm)
        object.__setattr__(self, "_hash", hash((self.rule_id, norm)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupKey) and self.rule_id == other.rule_id and self.norm == other.norm

    @property
    def text(self) -> str:
        """Stable text form of the key (case-folded), used for ids and storage keys. A value holding
        the separator ``\\x1f`` (or the escape ``\\x1b``) is escaped, so no two keys share a text;
        every other value is written as is (so ids and storage keys of such keys never change)."""
        return self.rule_id + "\x1f" + "\x1f".join(_unambiguous(v) for v in self.norm)


def _folded(value: str) -> str:
    """``value.lower()``; the value itself when that changes nothing, else interned (names repeat
    across groups), so open groups do not hold a second copy of each value."""
    low = value.lower()
    return value if low == value else sys.intern(low)


def _unambiguous(value: str) -> str:
    if "\x1f" not in value and "\x1b" not in value:
        return value
    return value.replace("\x1b", "\x1b\x1b").replace("\x1f", "\x1b\x1e")


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
    entities: dict[str, Any] | None = None  # stored beside the list (state key "ie"): older readers ignore it
    # No revision emitted yet: every one so far matched a rule exception (state key "iu", written only
    # while true, so states of rules without exceptions keep their bytes; absent in older states = emitted)
    unannounced: bool = False

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
class OutboxRecord:
    """What one batch emitted for a group: the identity hashes of the events it applied there and
    the snapshots, exactly as emitted."""

    ids: list[int]
    snapshots: list[dict[str, Any]]

    def encode(self) -> bytes:
        """The record as a group state holds it until a store writes it: its JSON (see ``packed_record``),
        copied out of orjson's result, which keeps its whole output buffer (4 KiB at least) however
        short the JSON: held by thousands of states, that was most of a replay's memory.

        A trigger event's attribute nested too deep for orjson to write here (it writes 254 levels,
        reads 1,024) is replaced, in place, by its JSON text (``writable_evidence``): the snapshots
        made from these fields share their trigger events, so they carry what the record keeps."""
        try:
            data = orjson.dumps([self.ids, self.snapshots])
        except TypeError:
            for own in self.snapshots:
                for event in own.get("triggerEvents") or ():
                    writable_evidence(event)
            data = orjson.dumps([self.ids, self.snapshots])
        return memoryview(data).tobytes()

    @classmethod
    def decode(cls, data: bytes) -> OutboxRecord:
        """A record in either form: its JSON (``encode``) or as stored (``packed_record``)."""
        if data[:1] == b"[":
            ids, snapshots = orjson.loads(data)
            return cls(ids, snapshots)
        unpacker = zlib.decompressobj(zdict=_ZDICT)
        ids, snapshots = orjson.loads(unpacker.decompress(data) + unpacker.flush())
        return cls(ids, snapshots)


MAX_ATTRIBUTES_BYTES = 16 * 1024  # an incident's attributes, JSON-encoded, in its group state (and so in its snapshots)
# A mapped attribute is a name of at most 200 characters (the rule model's) and a group-by value of at
# most 512 characters, a number or null: 712 characters of at most 6 bytes each in JSON. So this many
# take at most MAX_ATTRIBUTES_BYTES, and need no measuring.
SURELY_SMALL_ATTRIBUTES = 4
ATTRIBUTE_CHARS = 712


def cut_attributes(attributes: dict[str, Any], limit: int = MAX_ATTRIBUTES_BYTES) -> int:
    """Drop attributes, largest first (by their JSON; ties by name), until ``attributes`` encodes
    within ``limit`` bytes; returns how many were dropped. Deterministic, and a no-op on attributes
    that fit (every rule mapping a few values: only hundreds of mappings or hostile values reach it)."""
    size = len(orjson.dumps(attributes))
    if size <= limit:
        return 0
    dropped = 0
    for cost, name in sorted(((len(orjson.dumps([k, v])), k) for k, v in attributes.items()), key=lambda c: (-c[0], c[1])):
        if size <= limit:
            break
        del attributes[name]
        dropped += 1
        size -= cost - 2  # '["k",v]' is one byte longer than '"k":v,' and two longer than a last '"k":v'
    return dropped


def packed_record(record: bytes) -> bytes:
    """An outbox record as stores write it: deflated against ``_ZDICT``. A record the engine made is
    JSON (``OutboxRecord.encode``) and deflated only when a store writes it (most records are never
    written to a table: deflating each as it was made cost more than the rest of its snapshot); one
    already deflated (a zlib header: its first byte's low four bits are 8, so never ``[``) is
    returned as is, byte for byte."""
    return deflate(record, zdict=_ZDICT) if record[:1] == b"[" else record


def record_size_within(record: bytes, limit: int) -> bool:
    """Whether ``packed_record(record)`` takes at most ``limit`` bytes, deflating only when the JSON's
    bound does not already say so (deflate never adds more than 0.1 % + 64 bytes to its input)."""
    if record[:1] != b"[":
        return len(record) <= limit
    return len(record) + len(record) // 1000 + 64 <= limit or len(packed_record(record)) <= limit


# Preset zlib dictionary of the text every recorded snapshot repeats: part of encoding version 2,
# so it must never change without a new STATE_VERSION.
_ZDICT = (
    b'"tenantId":"alertIdStr":"alertName":"attackTechniqueId":["eventId":"incidentCount":'
    b'"identity":"event:"position":"format":"normalized","timeFallback":false,"eventType":"M365Defender-Alert-'
    b'"raw":{"truncated":true,"bytes":"preview":"attributes":{"eventTime":"'
    b'"firstSeen":"lastSeen":"triggerCount":1,"triggerEvents":[{"eventType":"MS-Defender-Endpoint-Alert'
    b'[{"incidentId":"inc-","revision":1,"action":"created","updated"'
)


_LEN = struct.Struct(">I")


def _within(records: Sequence[bytes], limit: int) -> bool:
    """Whether the packed, length-prefixed ``records`` surely take at most ``limit`` bytes (JSON
    records counted at deflate's bound; ``False`` means: pack them to know)."""
    return sum(4 + len(r) + (len(r) // 1000 + 64 if r[:1] == b"[" else 0) for r in records) <= limit


def split_outbox(data: bytes) -> list[bytes]:
    """The encoded records of an outbox property, oldest first."""
    out, i = [], 0
    while i < len(data):
        (n,) = _LEN.unpack_from(data, i)
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


@dataclass(slots=True)
class GroupState:
    """Window entries are ``[time_ms, identity_hash, *values]`` kept sorted by (time, hash).

    ``mark`` is the eviction high-water mark: the (time, hash) of the newest entry ever evicted to
    respect a cap. Every event at or below it was counted before (or would be evicted at once), so
    a redelivered evicted event changes nothing. ``outbox`` holds encoded :class:`OutboxRecord` s,
    oldest first; records are decoded only when a batch redelivers known events.
    """

    key: GroupKey
    entries: list[list[Any]] = field(default_factory=list)
    newest: int | None = None
    incident: Incident | None = None
    evicted: int = 0
    mark: list[int] | None = None
    outbox: list[bytes] = field(default_factory=list)
    ext: dict[str, Any] | None = None  # the multi-subpattern correlator's own fields (shared/sequence.py)
    pending: dict[str, Any] | None = None  # entities of counted events that no trigger has taken yet
    links: list[list[Any]] = field(default_factory=list)  # alert evidence groups: [rule id, values, tenant] of its groups

    def copy(self) -> GroupState:
        """An independent copy, equal to ``from_bytes(to_bytes())`` with the same outbox (whose
        records are bytes): every list and dict is new, copied through JSON as a stored state is."""
        inc = self.incident
        ents = {k: v for k, v in inc.entities.items() if v} if inc is not None and inc.entities else None
        pending = {k: v for k, v in self.pending.items() if v} if self.pending else None
        entries, mark, attributes, ents, ext, pending, links = orjson.loads(
            orjson.dumps([self.entries, self.mark, inc.attributes if inc else None, ents, self.ext, pending, self.links])
        )
        if inc is not None:
            inc = Incident(
                inc.incident_id,
                inc.revision,
                inc.first_seen,
                inc.last_seen,
                inc.last_trigger,
                inc.window_start,
                inc.trigger_count,
                attributes,
                expand(ents) if ents else None,
                inc.unannounced,
            )
        pending = expand(pending) if pending else None
        return GroupState(self.key, entries, self.newest, inc, self.evicted, mark, list(self.outbox), ext, pending, links)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "v": STATE_VERSION,
            "r": self.key.rule_id,
            "k": list(self.key.values),
            "e": self.entries,
            "n": self.newest,
            "i": self.incident.to_list() if self.incident else None,
            "x": self.evicted,
            **({"m": self.mark} if self.mark is not None else {}),
            # the tenant, unless it is the last group value (so for every shipped rule: saves its repetition)
            **({"t": self.key.tenant} if self.key.values[-1:] != (self.key.tenant,) else {}),
            # written only by multi-subpattern rules, so other states keep their bytes
            **({"s": self.ext} if self.ext is not None else {}),
        }
        # Entities and join links are optional keys: a state without them encodes as before.
        if self.incident is not None and self.incident.entities:  # only the kinds that hold values
            doc["ie"] = {k: v for k, v in self.incident.entities.items() if v}
        if self.incident is not None and self.incident.unannounced:
            doc["iu"] = 1
        if self.pending:
            doc["p"] = {k: v for k, v in self.pending.items() if v}
        if self.links:
            doc["l"] = self.links
        return orjson.dumps(doc)

    def outbox_bytes(self) -> bytes:
        """The outbox as stores write it: its records packed (``packed_record``; the packed form
        replaces a JSON one in ``outbox``, so each record is deflated once), length-prefixed."""
        outbox = self.outbox
        for i, r in enumerate(outbox):
            if r[:1] == b"[":
                outbox[i] = packed_record(r)
        return b"".join(_LEN.pack(len(r)) + r for r in outbox)

    def add_record(self, record: bytes) -> None:
        """Append a record; drop the oldest beyond ``MAX_OUTBOX_RECORDS`` or ``MAX_OUTBOX_BYTES`` of
        packed records (the newest record always stays: up to ``MAX_RECORD_BYTES``, so the outbox fits
        its properties). Sizes are those of the packed records, whichever form ``outbox`` holds, so
        what is kept does not depend on when a store packed them. Past the cap they are packed, even a
        lone one: JSON records never take more than ``MAX_OUTBOX_BYTES`` of a state kept as an object."""
        outbox = self.outbox
        outbox.append(record)
        while len(outbox) > MAX_OUTBOX_RECORDS:
            outbox.pop(0)
        if not _within(outbox, MAX_OUTBOX_BYTES):
            self.outbox_bytes()  # the exact sizes: pack them
            while len(outbox) > 1 and sum(4 + len(r) for r in outbox) > MAX_OUTBOX_BYTES:
                outbox.pop(0)

    def shrink(self, limit: int = MAX_STATE_BYTES) -> int:
        """The last resort once no window entry is left, so that ``to_bytes()`` fits ``limit`` whatever
        a rule maps: drop incident attributes (of the open incident and of a pending absence's, which
        becomes one) largest first, then the entities no trigger has taken yet, then a pending
        absence's values of its left side (cross-subpattern conditions against them are skipped),
        then the incident's entities (listed in their ``truncated``). Returns how many attributes
        were dropped (a snapshot says ``attributesTrimmed``: it holds fewer than its rule maps).

        Bound: what is left is the key (``engine.MAX_KEY_BYTES``), a sequence rule's trigger times
        (200) and fixed fields: far under ``MAX_STATE_BYTES``. Deterministic: the same state is cut alike."""
        size = len(self.to_bytes())
        dropped = 0
        pending = (self.ext or {}).get("p")
        while size > limit:
            pools = [self.incident.attributes if self.incident is not None else {}]
            if pending is not None and isinstance(pending[3], dict):
                pools.append(pending[3])
            before = dropped
            for pool in pools:
                dropped += cut_attributes(pool, len(orjson.dumps(pool)) - (size - limit) // len(pools) - 1)
            if dropped == before:
                break
            size = len(self.to_bytes())
        if size > limit and self.pending:
            self.pending = None
            size = len(self.to_bytes())
        if size > limit and pending is not None and pending[2]:
            pending[2] = {}
            size = len(self.to_bytes())
        if size > limit and self.incident is not None and self.incident.entities:
            held = self.incident.entities
            cut = empty()
            cut["truncated"] = [k for k in KINDS if held.get(k) or k in held.get("truncated", ())]
            self.incident.entities = cut
        return dropped

    def encode(self) -> bytes:
        """The stored form: ``to_bytes`` deflated (version 1 stored the JSON as is)."""
        return deflate(self.to_bytes())

    @classmethod
    def decode(cls, data: bytes, outbox: bytes = b"") -> GroupState:
        return cls.from_bytes(data if data[:1] == b"{" else zlib.decompress(data), outbox)

    @classmethod
    def from_bytes(cls, data: bytes, outbox: bytes = b"") -> GroupState:
        d = orjson.loads(data)
        version = d.get("v", 1)
        if version > STATE_VERSION:
            raise ValueError(f"group state version {version} is newer than this code ({STATE_VERSION})")
        incident = Incident.from_list(d["i"]) if d.get("i") else None
        if incident is not None and d.get("ie"):
            incident.entities = expand(d["ie"])  # every kind, in order, as the snapshot shows it
        if incident is not None and d.get("iu"):
            incident.unannounced = True
        values = tuple(d["k"])
        tenant = d.get("t", values[-1] if version > 1 and values else "")
        key = GroupKey(d["r"], values, tenant)
        state = cls(key, d["e"], d["n"], incident, d.get("x", 0), d.get("m"), split_outbox(outbox), d.get("s"))
        state.pending, state.links = (expand(d["p"]) if d.get("p") else None), d.get("l") or []
        return state


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
    due_at: int | None = None  # epoch ms (event time) after which time passing alone has work (absences)


class StateStore(Protocol):
    """Where group states live between batches. Implementations: memory, Azure Table."""

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        """Load the states of ``keys`` in one go; expired or absent states load as ``Loaded(None, ...)``.

        Raises:
            StoreError: the store is unreachable.
        """
        ...

    def save(self, changes: Sequence[Change]) -> None:
        """Write ``changes`` conditionally on their tokens. The states given belong to the store from
        then on (the in-memory store keeps the objects): callers do not change them afterwards.

        Raises:
            ConcurrencyConflict: some keys were changed by another writer; ``.keys`` lists them,
                the other changes were written.
            StoreError: the store is unreachable.
        """
        ...

    def purge_expired(self, now_ms: int) -> int:
        """Delete states expired at ``now_ms``; returns how many were deleted."""
        ...

    def load_due(self, progress_ms: int, now_ms: int, limit: int) -> dict[GroupKey, Loaded]:
        """Load up to ``limit`` unexpired states whose ``due_at`` is at or before ``progress_ms``.

        Raises:
            StoreError: the store is unreachable.
        """
        ...

    def save_progress(self, partition: str, event_ms: int, wall_ms: int) -> None:
        """Record that ``partition`` has delivered events up to event time ``event_ms`` (at ``wall_ms``).

        Raises:
            StoreError: the store is unreachable.
        """
        ...

    def load_progress(self) -> dict[str, tuple[int, int]]:
        """Every partition's recorded (event time, wall time) progress, epoch ms.

        Raises:
            StoreError: the store is unreachable.
        """
        ...


class KeysConflict(ConcurrencyConflict):
    def __init__(self, keys: Iterable[GroupKey]) -> None:
        self.keys = list(keys)
        super().__init__(f"{len(self.keys)} group state(s) changed by another writer")


class MemoryStateStore:
    """The embedded default store: a dict of serialized states with version counters.

    States are stored serialized and come back exactly as the Table store would return them
    (``stored()`` gives its encoded state and outbox), so both behave alike. A packed group is two
    bytes objects in a dict: its key in a compact form (the rule's number in this store and the
    case-folded values; no ``GroupKey``, which is rebuilt from the state) and its state packed with
    its version and expiry (``_pack``).

    ``hot_limit`` bounds the states held in memory: beyond it, the least recently written states move
    to a private on-disk SQLite file (deleted when the store is closed or collected) and come back
    when read. Nothing is dropped or changed by the move (same bytes, version, expiry and due time),
    so a store with a limit answers every call exactly as one without; ``replay`` sets one so that a
    long replay runs in bounded memory. ``None``: everything stays in memory.

    The ``live_limit`` most recently written states are kept as objects (a state object passed to
    ``save`` belongs to the store from then on; ``load`` hands out copies, see ``GroupState.copy``),
    and packed only when newer writes push them out: a group touched by batch after batch is not
    deflated and inflated for every batch. What any call answers is the same either way.
    """

    def __init__(self, hot_limit: int | None = None, spill_dir: str | None = None, live_limit: int = LIVE_STATES) -> None:
        # Tiers, each key in one, older writes below newer ones: spill file < _data < _live.
        self._live: dict[GroupKey, tuple[GroupState, int, int]] = {}  # key -> (state, version, expiry)
        self._data: dict[bytes, bytes] = {}  # compact key (_key) -> the state packed with its version and expiry (_pack)
        self._due: dict[GroupKey, int] = {}  # key -> due_at (event time) of live groups that have one
        self._due_packed: dict[bytes, int] = {}  # compact key -> due_at of packed groups (in the order of _data)
        self._progress: dict[str, tuple[int, int]] = {}  # partition -> (event ms, wall ms)
        self._rules: dict[str, tuple[str, int]] = {}  # rule id -> its number here (the compact key's head), shared position
        self._shared: dict[str, str] = {}  # shared value -> its form in compact keys (see _key)
        self._shared_text: list[bytes] = []  # by number: the shared values
        self._zdicts: list[bytes] = []  # by rule number: the deflate dictionary's start (_STATE_ZDICT, rule id)
        self._loaded: dict[GroupKey, bytes] = {}  # compact keys of the last load's packed or absent keys
        self._lock = threading.Lock()
        self._closed = False
        self.calls = {"load": 0, "save": 0, "purge": 0}
        if hot_limit is not None and hot_limit < 1:
            raise ValueError(f"hot_limit must be at least 1, not {hot_limit}")
        self.hot_limit = hot_limit
        self.live_limit = max(0, min(live_limit, hot_limit if hot_limit is not None else live_limit))
        self._spill_dir = spill_dir
        self._spill: _Spill | None = None  # opened on the first move to disk

    def _key(self, key: GroupKey) -> bytes:
        """The compact key: the rule's number, then each case-folded value after a ``\\x1f`` (escaped
        as in ``GroupKey.text``), so two keys share it exactly when they are equal.

        One value per rule is written as a number when it is one of this store's shared values: the
        value at the position where the rule's first key held its tenant. Tenant ids repeat in every
        group of a tenant (a GUID is a tenth of a packed group); the first ``MAX_SHARED_VALUES``
        distinct values seen there are numbered, later ones stay text. Which values are numbered
        never changes, so the compact key stays a function of the key."""
        rule = self._rules.get(key.rule_id)
        norm = key.norm
        if rule is None:
            at = len(key.values) - 1 - key.values[::-1].index(key.tenant) if key.tenant in key.values else -1
            rule = self._rules[key.rule_id] = (str(len(self._zdicts)), at)
            self._zdicts.append(_STATE_ZDICT + key.rule_id.encode(errors="surrogatepass"))
        head, at = rule
        if not norm:
            return head.encode()
        escape = any("\x1b" in v or "\x1f" in v for v in norm)  # a value holds one: escape them all
        parts = list(map(_unambiguous, norm)) if escape else list(norm)
        if 0 <= at < len(parts):
            shared = self._shared.get(norm[at])
            if shared is None and len(self._shared) < MAX_SHARED_VALUES:
                shared = self._shared[norm[at]] = "\x1b\x1d" + str(len(self._shared_text))
                self._shared_text.append(norm[at].encode(errors="surrogatepass"))
            if shared is not None:  # a text part never starts with ESC GS (escaped parts: ESC ESC, ESC RS)
                parts[at] = shared
        return (head + "\x1f" + "\x1f".join(parts)).encode(errors="surrogatepass")

    def _zdict(self, ck: bytes) -> bytes:
        """The deflate dictionary of a group's packed state: text states repeat, its rule id, its
        shared value (written out) and its compact key."""
        cut = ck.find(b"\x1f")
        zdict = self._zdicts[int(ck if cut < 0 else ck[:cut])]
        shared = ck.find(b"\x1f\x1b\x1d")
        if shared < 0:
            return zdict + ck
        end = ck.find(b"\x1f", shared + 1)
        return zdict + self._shared_text[int(ck[shared + 3 : end if end >= 0 else len(ck)])] + ck

    def load(self, keys: Sequence[GroupKey], now_ms: int) -> dict[GroupKey, Loaded]:
        self.calls["load"] += 1
        out: dict[GroupKey, Loaded] = {}
        with self._lock:
            self._check_open()
            live, data = self._live, self._data
            cks = self._loaded = {k: self._key(k) for k in keys if k not in live}  # the save that follows reuses them
            spilled = self._spill.get([ck for ck in cks.values() if ck not in data]) if self._spill else {}
            for key in keys:
                held = live.get(key)
                if held is not None:
                    state, version, expires_at = held
                    out[key] = Loaded(state.copy() if expires_at > now_ms else None, version)
                    continue
                ck = cks[key]
                packed = data.get(ck) or spilled.get(ck)
                if packed is None:
                    out[key] = Loaded(None, None)
                    continue
                version, expires_at = _HEAD.unpack_from(packed)
                # expired: ignored, but the token still guards it
                out[key] = Loaded(_unpack(self._zdict(ck), packed) if expires_at > now_ms else None, version)
        return out

    def save(self, changes: Sequence[Change]) -> None:
        self.calls["save"] += 1
        conflicts: list[GroupKey] = []
        with self._lock:
            self._check_open()
            live, data, loaded = self._live, self._data, self._loaded
            cks = {c.key: loaded.get(c.key) or self._key(c.key) for c in changes if c.key not in live}
            on_disk = self._spill.versions([ck for ck in cks.values() if ck not in data]) if self._spill else {}
            for change in changes:
                key = change.key
                held = live.get(key)
                ck = cks.get(key)
                if held is not None:
                    current_token: int | None = held[1]
                else:
                    assert ck is not None
                    current = data.get(ck)
                    current_token = _HEAD.unpack_from(current)[0] if current else on_disk.get(ck)
                if current_token != change.token:
                    conflicts.append(key)
                    continue
                self._due.pop(key, None)
                if ck is not None:  # (was) packed, on disk or absent
                    self._due_packed.pop(ck, None)
                    if ck in on_disk:  # comes back to memory (or is deleted)
                        assert self._spill is not None
                        self._spill.delete(ck)
                        del on_disk[ck]
                    data.pop(ck, None)
                live.pop(key, None)  # re-inserted last: the dicts' order is the write order
                if change.state is not None:
                    live[key] = (change.state, (current_token or 0) + 1, change.expires_at)
                    if change.due_at is not None:
                        self._due[key] = change.due_at
            self._fit_tiers()
        if conflicts:
            raise KeysConflict(conflicts)

    def _fit_tiers(self) -> None:
        """Pack, then move to disk, the least recently written states beyond the limits (under the lock)."""
        if len(self._live) > self.live_limit:
            self._pack_oldest(len(self._live) - self.live_limit)
        if self.hot_limit is not None and len(self._data) + len(self._live) > self.hot_limit:
            self._move_to_disk(len(self._data) + len(self._live) - self.hot_limit + self.hot_limit // 10)

    def _pack_oldest(self, n: int) -> None:
        """Pack the ``n`` least recently written live states (under the lock); they are newer than
        every packed one, so they go after them."""
        for key in list(itertools.islice(self._live, n)):
            state, version, expires_at = self._live.pop(key)
            ck = self._key(key)
            self._data[ck] = _pack(self._zdict(ck), state, version, expires_at)
            due = self._due.pop(key, None)
            if due is not None:
                self._due_packed[ck] = due

    def _move_to_disk(self, n: int) -> None:
        """Move the ``n`` least recently written states to the spill file (under the lock)."""
        if len(self._data) < n:
            self._pack_oldest(n - len(self._data))
        if self._spill is None:
            self._spill = _Spill(self._spill_dir)
        cks = list(itertools.islice(self._data, n))
        self._spill.put([(ck, self._data.pop(ck), self._due_packed.pop(ck, None)) for ck in cks])

    def purge_expired(self, now_ms: int) -> int:
        self.calls["purge"] += 1
        with self._lock:
            self._check_open()
            dead = [ck for ck, v in self._data.items() if _HEAD.unpack_from(v)[1] <= now_ms]
            for ck in dead:
                del self._data[ck]
                self._due_packed.pop(ck, None)
            dead_live = [k for k, v in self._live.items() if v[2] <= now_ms]
            for k in dead_live:
                del self._live[k]
                self._due.pop(k, None)
            return len(dead) + len(dead_live) + (self._spill.purge(now_ms) if self._spill else 0)

    def load_due(self, progress_ms: int, now_ms: int, limit: int) -> dict[GroupKey, Loaded]:
        """Due groups in the order they were last written (states on disk were written before the
        packed ones, and those before the live ones)."""
        self.calls["load"] += 1
        out: dict[GroupKey, Loaded] = {}
        with self._lock:
            self._check_open()
            for ck, packed in self._spill.due(progress_ms, now_ms, limit) if self._spill else ():
                state = _unpack(self._zdict(ck), packed)
                out[state.key] = Loaded(state, _HEAD.unpack_from(packed)[0])
            for ck, due in self._due_packed.items():
                if len(out) >= limit:
                    break
                packed = self._data[ck]
                version, expires_at = _HEAD.unpack_from(packed)
                if due <= progress_ms and expires_at > now_ms:
                    state = _unpack(self._zdict(ck), packed)
                    out[state.key] = Loaded(state, version)
            for key, due in self._due.items():
                if len(out) >= limit:
                    break
                state, version, expires_at = self._live[key]
                if due <= progress_ms and expires_at > now_ms:
                    out[key] = Loaded(state.copy(), version)
        return out

    def save_progress(self, partition: str, event_ms: int, wall_ms: int) -> None:
        with self._lock:
            self._check_open()
            self._progress[partition] = (event_ms, wall_ms)

    def load_progress(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            self._check_open()
            return dict(self._progress)

    def stored(self, key: GroupKey) -> tuple[bytes, bytes, int, int]:
        """What the Table store would hold for ``key``: (encoded state, outbox, version, expiry). For tests."""
        with self._lock:
            self._check_open()
            held = self._live.get(key)
            if held is not None:
                return held[0].encode(), held[0].outbox_bytes(), held[1], held[2]
            ck = self._key(key)
            packed = self._data.get(ck) or (self._spill.get([ck]).get(ck) if self._spill else None)
            if packed is None:
                raise KeyError(key)
            state = _unpack(self._zdict(ck), packed)
        version, expires_at = _HEAD.unpack_from(packed)
        return state.encode(), state.outbox_bytes(), version, expires_at

    def put_stored(self, key: GroupKey, data: bytes, outbox: bytes, version: int, expires_at: int) -> None:
        """Store an encoded state (any encoding version) as is, bypassing the token check: a write like
        ``save``'s (the newest, from whichever tier held the key; its due time kept). For tests."""
        with self._lock:
            self._check_open()
            ck = self._key(key)
            due = self._due.pop(key, None)
            due = self._due_packed.pop(ck, None) if due is None else due
            if self._spill is not None and ck not in self._data and key not in self._live:
                due = self._spill.due_of(ck) if due is None else due
                self._spill.delete(ck)
            self._data.pop(ck, None)
            self._live.pop(key, None)
            self._live[key] = (GroupState.decode(data, outbox), version, expires_at)
            if due is not None:
                self._due[key] = due
            self._fit_tiers()

    def held_keys(self) -> list[GroupKey]:
        """The keys of the states held in memory, least recently written first (not those on disk), as
        their states hold them. For tests."""
        with self._lock:
            self._check_open()
            return [*(_unpack(self._zdict(ck), packed).key for ck, packed in self._data.items()), *self._live]

    def close(self) -> None:
        """Drop every state, in memory and in the spill file (which is deleted). The store then refuses
        every call that reads or writes states (``ValueError``, as a closed file does): a store that
        answered after losing part of its states would hand out absences for groups it once held."""
        with self._lock:
            self._closed = True
            if self._spill is not None:
                self._spill.close()
                self._spill = None
            for held in (self._live, self._data, self._due, self._due_packed, self._progress, self._loaded):
                held.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the in-memory state store is closed: its states were dropped")

    @property
    def on_disk(self) -> int:
        """How many states are in the spill file."""
        with self._lock:
            return len(self._spill) if self._spill else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._live) + len(self._data) + (len(self._spill) if self._spill else 0)


# A packed state: version and expiry (epoch ms), then one raw deflate stream of the state JSON, a NUL
# (which JSON never holds) and the outbox records in the form the state holds them (length-prefixed).
_HEAD = struct.Struct(">qq")
# Text a state JSON repeats, for the deflate dictionary of packed states (the rule id and the group's
# compact key are appended): in-memory only, so it may change between releases.
_STATE_ZDICT = _ZDICT + b'{"v":2,"r":"e":[[,"n":"i":["inc-",1,"x":0,"ie":{"techniques":[{"id":"T1'


def _pack(zdict: bytes, state: GroupState, version: int, expires_at: int) -> bytes:
    """What the in-memory store keeps per group: one bytes object (no tuple, no int objects), the
    state JSON and its outbox records deflated together against a dictionary holding the group's own
    key. A record the engine made is JSON: deflated here with the state (rather than alone and again
    here), it costs one deflate and a fraction of the bytes."""
    records = b"".join(_LEN.pack(len(r)) + r for r in state.outbox)
    return _HEAD.pack(version, expires_at) + deflate(state.to_bytes() + b"\x00" + records, raw=True, zdict=zdict)


def _unpack(zdict: bytes, packed: bytes) -> GroupState:
    unpacker = zlib.decompressobj(-15, zdict=zdict)  # any window: the stream's is at most 32 KiB
    data = unpacker.decompress(memoryview(packed)[_HEAD.size :]) + unpacker.flush()
    cut = data.index(b"\x00")
    return GroupState.from_bytes(data[:cut], data[cut + 1 :])


_SPILL_CHUNK = 500  # keys per SQLite query (its default limit on bound parameters is 32,766)


class _Spill:
    """States moved out of memory: one table of a private SQLite file in a temporary directory.

    Rows hold exactly what the in-memory dicts hold (compact key, packed state, version, expiry, due
    time); the file is scratch space (no journal, no fsync) and is deleted on ``close`` or when collected."""

    def __init__(self, directory: str | None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="correlator-spill-", dir=directory)
        self._db = sqlite3.connect(os.path.join(self._dir.name, "states.sqlite"), check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-4096;"
            "CREATE TABLE g (k BLOB PRIMARY KEY, b BLOB, v INTEGER, x INTEGER, d INTEGER, n INTEGER) WITHOUT ROWID;"
            "CREATE INDEX g_due ON g (n) WHERE d IS NOT NULL;"
        )
        self._count = 0
        self._moved = 0  # states ever moved here: their write order
        self._finalizer = weakref.finalize(self, _Spill._cleanup, self._db, self._dir)

    @staticmethod
    def _cleanup(db: sqlite3.Connection, directory: tempfile.TemporaryDirectory[str]) -> None:
        db.close()
        directory.cleanup()

    def _rows(self, sql: str, cks: Sequence[bytes]) -> dict[bytes, Any]:
        out: dict[bytes, Any] = {}
        for i in range(0, len(cks), _SPILL_CHUNK):
            chunk = cks[i : i + _SPILL_CHUNK]
            for k, value in self._db.execute(sql.format(",".join("?" * len(chunk))), chunk):
                out[k] = value
        return out

    def get(self, cks: Sequence[bytes]) -> dict[bytes, bytes]:
        if not cks or not self._count:
            return {}
        return self._rows("SELECT k, b FROM g WHERE k IN ({})", cks)

    def versions(self, cks: Sequence[bytes]) -> dict[bytes, int]:
        if not cks or not self._count:
            return {}
        return self._rows("SELECT k, v FROM g WHERE k IN ({})", cks)

    def put(self, rows: Sequence[tuple[bytes, bytes, int | None]]) -> None:
        first = self._moved
        self._db.executemany(
            "INSERT INTO g VALUES (?, ?, ?, ?, ?, ?)",
            [(ck, b, *_HEAD.unpack_from(b), due, first + i) for i, (ck, b, due) in enumerate(rows)],
        )
        self._count += len(rows)
        self._moved += len(rows)

    def delete(self, ck: bytes) -> None:
        self._count -= self._db.execute("DELETE FROM g WHERE k = ?", (ck,)).rowcount

    def due_of(self, ck: bytes) -> int | None:
        row = self._db.execute("SELECT d FROM g WHERE k = ?", (ck,)).fetchone()
        return None if row is None else int(row[0]) if row[0] is not None else None

    def purge(self, now_ms: int) -> int:
        gone = self._db.execute("DELETE FROM g WHERE x <= ?", (now_ms,)).rowcount
        self._count -= gone
        return gone

    def due(self, progress_ms: int, now_ms: int, limit: int) -> list[tuple[bytes, bytes]]:
        # in write order, as the in-memory groups are listed (all of them were written later)
        sql = "SELECT k, b FROM g WHERE d IS NOT NULL AND d <= ? AND x > ? ORDER BY n LIMIT ?"
        return list(self._db.execute(sql, (progress_ms, now_ms, limit)))

    def close(self) -> None:
        self._finalizer()

    def __len__(self) -> int:
        return self._count
