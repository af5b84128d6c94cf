"""Sequence rules under out-of-order delivery: late left-side events, batching, retries, the
absence timer and replay give the incidents of in-order delivery (or differ exactly as the README
and docs/correlation-semantics.md say). In memory and on Table Storage (Azurite)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from shared.engine import Engine
from shared.normalize import NormalizedEvent
from shared.state import MemoryStateStore, StateStore

from .test_sequence import ABSENT, CRED, PERSIST, T0, ev, rule

StoreFactory = Callable[[], StateStore]


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def new_store(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """A factory of fresh, empty stores of one kind (a test compares runs on stores of its own)."""
    if request.param == "memory":
        yield MemoryStateStore
        return
    from shared.table_store import TableStateStore

    azurite = request.getfixturevalue("azurite")
    made: list[TableStateStore] = []

    def make() -> StateStore:
        name = "o" + hashlib.blake2b(f"{request.node.nodeid}:{len(made)}".encode(), digest_size=8).hexdigest()
        store = TableStateStore.from_connection_string(azurite.connection_string, name)
        store.ensure_table()
        made.append(store)
        return store

    yield make
    for store in made:
        store.table.delete_table()


class Feed:
    """An engine over one store, keeping every snapshot it emitted (batches and timer)."""

    def __init__(self, store: StateStore, *rules: Any) -> None:
        self.engine = Engine(list(rules), store, lambda: T0)
        self.snaps: list[dict[str, Any]] = []

    def batch(self, *events: NormalizedEvent) -> list[dict[str, Any]]:
        out = self.engine.process(list(events)).incidents
        self.snaps.extend(out)
        return out

    def timer(self, at_s: float) -> list[dict[str, Any]]:
        out = self.engine.fire_due(T0 + timedelta(seconds=at_s)).incidents
        self.snaps.extend(out)
        return out

    def seen(self) -> list[tuple[Any, ...]]:
        return [
            (s["incidentId"], s["revision"], s["action"], s["firstSeen"], s["lastSeen"], s["triggerCount"]) for s in self.snaps
        ]


def _fed(new_store: StoreFactory, r: Any, in_order: list[NormalizedEvent], late: list[NormalizedEvent]) -> tuple[Feed, Feed]:
    """Two engines on fresh stores, fed one event per batch: in event-time order, and in another order."""
    feeds = Feed(new_store(), r), Feed(new_store(), r)
    for feed, events in zip(feeds, (in_order, late), strict=True):
        for e in events:
            feed.batch(e)
    return feeds


def _at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


class TestALateLeftSideEvent:
    """`persist NOT FOLLOWED_BY cred` within 300 s: each persist starts its own wait."""

    def test_a_late_leader_opens_its_own_earlier_absence_before_the_pending_one(self, new_store: StoreFactory) -> None:
        r = rule(ABSENT, window=300)
        a0, a1 = ev(PERSIST, 900, alertIdStr="a0"), ev(PERSIST, 1000, alertIdStr="a1")
        in_order, late = Feed(new_store(), r), Feed(new_store(), r)
        in_order.batch(a0)
        in_order.batch(a1)
        late.batch(a1)
        late.batch(a0)  # event time 900, delivered after 1000: inside the window, not late
        assert late.timer(1250) == in_order.timer(1250) != []  # the absence of a0 is due at 1200, not 1300
        assert [s["lastSeen"] for s in late.snaps] == [_at(1200)]
        late.timer(1400)
        in_order.timer(1400)
        assert [s["lastSeen"] for s in late.snaps] == [_at(1200), _at(1300)]
        assert late.seen() == in_order.seen()

    def test_a_follower_between_the_two_deadlines_cancels_only_the_later_absence(self, new_store: StoreFactory) -> None:
        r = rule(ABSENT, window=300)
        a0, a1, b = ev(PERSIST, 900, alertIdStr="a0"), ev(PERSIST, 1000, alertIdStr="a1"), ev(CRED, 1250, alertIdStr="b")
        in_order, late = _fed(new_store, r, [a0, a1, b], [a1, a0, b])
        in_order.timer(2000)
        late.timer(2000)
        assert [s["lastSeen"] for s in late.snaps] == [_at(1200)]  # a0's wait had no cred; a1's had one at 1250
        assert late.seen() == in_order.seen()

    def test_a_late_event_that_completes_a_thresholded_leader_starts_its_absence(self, new_store: StoreFactory) -> None:
        """`cred NOT FOLLOWED_BY persist` with two creds needed: cred@1000 alone completes nothing;
        cred@900 arriving after it completes the left side at 1000, as in event-time order."""
        r = rule("cred NOT FOLLOWED_BY persist", window=300, cred_min=2)
        c0, c1 = ev(CRED, 900, alertIdStr="c0"), ev(CRED, 1000, alertIdStr="c1")
        in_order, late = Feed(new_store(), r), Feed(new_store(), r)
        in_order.batch(c0)
        in_order.batch(c1)
        late.batch(c1)
        late.batch(c0)
        in_order.timer(1400)
        late.timer(1400)
        assert [(s["lastSeen"], s["attributes"]["credAlerts"]) for s in late.snaps] == [(_at(1300), 2)]
        assert late.seen() == in_order.seen()

    def test_in_one_batch_the_order_of_delivery_does_not_matter(self, new_store: StoreFactory) -> None:
        r = rule(ABSENT, window=300)
        a0, a1 = ev(PERSIST, 900, alertIdStr="a0"), ev(PERSIST, 1000, alertIdStr="a1")
        one, other = Feed(new_store(), r), Feed(new_store(), r)
        one.batch(a0, a1)
        other.batch(a1, a0)
        one.timer(1400)
        other.timer(1400)  # both absences fire in this call: one snapshot of the incident
        assert [(s["revision"], s["firstSeen"], s["lastSeen"]) for s in other.snaps] == [(2, _at(1200), _at(1300))]
        assert other.seen() == one.seen()


# -- any delivery order within the allowed lateness ------------------------------------------------

import orjson  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shared.errors import StoreError  # noqa: E402

from .test_engine import FAILURE_POINTS, Flaky  # noqa: E402
from .test_sequence import PATTERNS  # noqa: E402

W = 300  # the rule's window: an event is late once its group holds one more than W newer
FAR = 10**6  # a timer this far on resolves every absence

# (seconds since the previous event, subpattern: 0-2 the pattern's first / 3 its other one, host,
# delivery delay in seconds <= W); leaders are the more frequent, so that absences fire
delayed_streams = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 3), st.integers(0, 1), st.integers(0, W)), min_size=1, max_size=12
)
# per delivery: how many new events it takes, how many delivered ones it repeats (an overlapping
# redelivery), whether the timer runs after it, its failures before it goes through
plans = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.integers(0, 3),
        st.booleans(),
        st.lists(st.sampled_from([p for p in FAILURE_POINTS if p != "raced"]), max_size=2),
    ),
    max_size=12,
)


def _delivery(stream: list[tuple[int, int, int, int]], pattern: str) -> tuple[list[NormalizedEvent], list[NormalizedEvent]]:
    """The events in event-time order, and in delivery order: each event arrives ``delay`` after its
    event time (delays up to W: no event is late). A follower of NOT FOLLOWED_BY arrives on time: one
    delivered after its group passed an absence's deadline comes too late to cancel it (documented)."""
    first, other = (PERSIST, CRED) if pattern.startswith("persist") else (CRED, PERSIST)
    at, events, keys = 0, [], []
    for i, (gap, kind, host, delay) in enumerate(stream):
        at += gap
        events.append(ev(first if kind < 3 else other, at, f"h{host}", alertIdStr=f"e{i}"))
        on_time = kind == 3 and "NOT FOLLOWED_BY" in pattern
        keys.append((at + (0 if on_time else delay), i))
    return events, [events[i] for _, i in sorted(keys)]


def _newest_s(events: list[NormalizedEvent]) -> float:
    return max((e.event_time - T0).total_seconds() for e in events)


def _deliver(feed: Feed, flaky: Flaky, batch: list[NormalizedEvent], failures: list[str]) -> None:
    """A batch meeting ``failures`` (one per attempt) before it goes through, as the trigger's retry
    policy runs it; what a failed attempt emitted is kept (consumers drop repeats by id and revision)."""
    for point in [*failures, None]:
        flaky.fail = point
        try:
            out = feed.engine.process(batch).incidents
        except StoreError:
            continue
        finally:
            flaky.fail = None
        feed.snaps.extend(out)
        if point != "in output":
            return


def _tick(feed: Feed, flaky: Flaky, at_s: float, failures: list[str]) -> None:
    """The absence timer at event-time progress ``at_s``, sending before it saves, as the function does."""
    for point in [*failures, None]:
        flaky.fail = point
        try:
            feed.engine.fire_due(T0 + timedelta(seconds=at_s), emit=feed.snaps.extend)
            return
        except StoreError:
            continue
        finally:
            flaky.fail = None


def _exactly_once(snaps: list[dict[str, Any]]) -> dict[tuple[str, int], bytes]:
    """Every copy of an (incident, revision) is the same snapshot; the distinct ones, by id and revision."""
    out: dict[tuple[str, int], bytes] = {}
    for s in snaps:
        data = orjson.dumps(s)
        assert out.setdefault((s["incidentId"], s["revision"]), data) == data, (
            f"two snapshots of {s['incidentId']} r{s['revision']}"
        )
    return out


def _incidents(snaps: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Per incident id: its last revision's number, first/last seen, trigger count and attributes."""
    latest: dict[str, dict[str, Any]] = {}
    for s in snaps:
        if s["revision"] >= latest.get(s["incidentId"], {}).get("revision", 0):
            latest[s["incidentId"]] = s
    return {
        i: (s["revision"], s["firstSeen"], s["lastSeen"], s["triggerCount"], orjson.dumps(s["attributes"]))
        for i, s in latest.items()
    }


def _in_order(pattern: str, events: list[NormalizedEvent]) -> Feed:
    feed = Feed(MemoryStateStore(), rule(pattern, window=W))
    for e in events:
        feed.batch(e)
    feed.timer(FAR)
    return feed


@settings(max_examples=150, deadline=None)
@given(delayed_streams, plans, st.sampled_from(PATTERNS))
@example(stream=[(900, 0, 0, 200), (100, 0, 0, 0)], plan=[(1, 0, False, [])], pattern=ABSENT).via("the late leader of the issue")
@example(  # triggers at 41, 111, 173, 347, 378 are two windows of 300 s, also when 173 is processed first
    stream=[(41, 3, 0, 294), (70, 0, 0, 299), (62, 0, 0, 121), (174, 1, 0, 87), (31, 1, 0, 144)],
    plan=[(1, 0, False, [])] * 5,
    pattern="persist OR cred",
).via("triggerCount from the first trigger processed")
@example(  # persist@248 delivered after the trigger at 305 fired: it is in that trigger's window
    stream=[(40, 2, 0, 300), (26, 0, 0, 118), (182, 2, 1, 231), (6, 0, 1, 59), (51, 3, 1, 143), (90, 1, 0, 295)],
    plan=[(1, 0, False, [])] * 6,
    pattern="persist AND cred",
).via("firstSeen of a trigger fired before its earliest event arrived")
def test_any_delivery_within_the_lateness_gives_the_incidents_of_event_time_order(
    stream: list[tuple[int, int, int, int]], plan: list[tuple[int, int, bool, list[str]]], pattern: str
) -> None:
    """Delivery order within the window (a follower of NOT FOLLOWED_BY on time), any split into
    batches, failures at every point with retries, the timer between batches at the partition's
    progress minus a grace of W: every (incident, revision) is emitted as one snapshot, and the
    incidents end as in event-time order: the same ids and revisions for NOT FOLLOWED_BY (its
    triggers are resolved in deadline order), the same content for the other patterns (their id
    is anchored on the first trigger processed and re-evaluations add revisions, as documented)."""
    events, delivered = _delivery(stream, pattern)
    expected = _incidents(_in_order(pattern, events).snaps)
    flaky = Flaky(MemoryStateStore())
    feed = Feed(flaky, rule(pattern, window=W))  # type: ignore[arg-type]
    sent, steps = 0, iter(plan)
    while sent < len(delivered):
        take, repeat, tick, failures = next(steps, (len(delivered), 0, False, []))
        _deliver(feed, flaky, delivered[sent : sent + take] + delivered[max(0, sent - repeat) : sent], failures)
        sent += take
        if tick:  # event-time progress: the newest delivered minus a grace no smaller than any delay
            _tick(feed, flaky, _newest_s(delivered[:sent]) - W, failures)
    _tick(feed, flaky, FAR, [])
    _exactly_once(feed.snaps)
    got = _incidents(feed.snaps)
    if "NOT FOLLOWED_BY" in pattern or delivered == events:
        assert got == expected
    else:
        assert sorted(v[1:] for v in got.values()) == sorted(v[1:] for v in expected.values())


def test_a_follower_delivered_after_its_group_passed_the_deadline_does_not_cancel_the_published_absence(
    new_store: StoreFactory,
) -> None:
    """The documented limit: persist@0, persist@301 (event time of the group passed 0's deadline,
    the absence is published), then cred@200, not late (inside the window of 301) but too late to
    take the published absence back. In event-time order cred@200 cancels it."""
    r = rule(ABSENT, window=W)
    p0, p1, c = ev(PERSIST, 0, alertIdStr="p0"), ev(PERSIST, 301, alertIdStr="p1"), ev(CRED, 200, alertIdStr="c")
    in_order, late = _fed(new_store, r, [p0, c, p1], [p0, p1, c])
    assert [s["lastSeen"] for s in late.snaps] == [_at(W)]
    assert in_order.snaps == []
    in_order.timer(FAR)
    late.timer(FAR)
    assert [s["lastSeen"] for s in in_order.snaps] == [_at(301 + W)]  # persist@301's own wait
    assert [(s["revision"], s["lastSeen"]) for s in late.snaps][-1] == (2, _at(301 + W))


def _replayed(pattern: str, events: list[NormalizedEvent], batch: int, tmp: Any) -> list[dict[str, Any]]:
    """``python -m shared replay`` of the events in this order, ``batch`` events per engine batch."""
    import io
    from unittest import mock

    from shared.replay import replay

    path = tmp / f"events-{batch}.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({k: v for k, v in e.attrs.items() if k in _RAW}) for e in events))
    out = io.BytesIO()
    with mock.patch("shared.replay.REPLAY_BATCH", batch):
        replay([str(path)], [rule(pattern, window=W)], fmt="normalized", out=out, err=io.StringIO(), clock=lambda: LATER)
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


_RAW = ("eventType", "hostName", "user", "tenantId", "alertIdStr", "eventTime")
LATER = T0 + timedelta(days=1)  # the replay's clock: after every event (times ahead of it are clamped to it)


@settings(max_examples=150, deadline=None)
@given(delayed_streams, st.integers(1, 4), st.sampled_from(PATTERNS))
@example(stream=[(141, 0, 0, 0), (120, 3, 0, 41), (40, 0, 0, 0)], batch=1, pattern="persist FOLLOWED_BY cred").via(
    "one late follower fires two triggers"
)
@example(stream=[(51, 0, 0, 0), (100, 0, 0, 0), (150, 0, 0, 0)], batch=3, pattern="persist OR cred").via(
    "event times past the replay's clock"
)
def test_a_replay_of_any_delivery_within_the_lateness_gives_the_incidents_of_event_time_order(
    tmp_path_factory: Any, stream: list[tuple[int, int, int, int]], batch: int, pattern: str
) -> None:
    """The replay path: event-time progress is the newest event time replayed, absences fire from it
    after every batch; a file in delivery order (followers of NOT FOLLOWED_BY on time) ends with the
    incidents of the same file in event-time order (ids and revisions for NOT FOLLOWED_BY)."""
    events, delivered = _delivery(stream, pattern)
    tmp = tmp_path_factory.mktemp("replay")
    tmp.joinpath("in_order").mkdir()
    expected = _incidents(_replayed(pattern, events, 1, tmp.joinpath("in_order")))
    got = _incidents(_replayed(pattern, delivered, batch, tmp))
    if "NOT FOLLOWED_BY" in pattern or delivered == events:
        assert got == expected
    else:
        assert sorted(v[1:] for v in got.values()) == sorted(v[1:] for v in expected.values())


def test_a_trigger_delivered_after_its_group_passed_the_quiet_clear_opens_nothing(new_store: StoreFactory) -> None:
    """The documented limit of `clear: {after}`: persist@0, persist@300 (event time passed 0 + 200:
    the incident is cleared at 200 and persist@300 opens a new one), then persist@150, not late but
    at or before the published clear: it belongs to the closed incident and opens nothing. In
    event-time order persist@150 keeps the incident open: one incident, three triggers."""
    r = rule("persist OR cred", window=W, extra="clear:\n  after: 200\n")
    p0, p1, p2 = (ev(PERSIST, at, alertIdStr=f"p{at}") for at in (0, 150, 300))
    in_order, late = _fed(new_store, r, [p0, p1, p2], [p0, p2, p1])
    assert [(s["revision"], s["lastSeen"], s["triggerCount"]) for s in in_order.snaps][-1] == (3, _at(300), 1)
    assert len({s["incidentId"] for s in in_order.snaps}) == 1
    assert [(s["action"], s["lastSeen"]) for s in late.snaps] == [
        ("created", _at(0)),
        ("cleared", _at(200)),
        ("created", _at(300)),
    ]


def test_a_clearing_event_delivered_after_later_triggers_closes_them_with_the_incident(new_store: StoreFactory) -> None:
    """The documented limit of `clear: {query}`: persist@0, persist@100, then the clearing event @50.
    In event-time order the clear closes the incident of persist@0 and persist@100 opens a new one;
    delivered last, it closes the one incident that both triggers joined."""
    r = rule("persist OR cred", window=W, extra='clear:\n  query: eventType = "Host-Reimaged"\n')
    p0, p1, wipe = ev(PERSIST, 0, alertIdStr="p0"), ev(PERSIST, 100, alertIdStr="p1"), ev("Host-Reimaged", 50, alertIdStr="w")
    in_order, late = _fed(new_store, r, [p0, wipe, p1], [p0, p1, wipe])
    assert [(s["action"], s["lastSeen"]) for s in in_order.snaps] == [
        ("created", _at(0)),
        ("cleared", _at(50)),
        ("created", _at(100)),
    ]
    assert [(s["action"], s["revision"], s["lastSeen"]) for s in late.snaps] == [
        ("created", 1, _at(0)),
        ("updated", 2, _at(100)),
        ("cleared", 3, _at(100)),
    ]
