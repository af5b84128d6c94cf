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
        in_order, late = Feed(new_store(), r), Feed(new_store(), r)
        for e in (a0, a1, b):
            in_order.batch(e)
        for e in (a1, a0, b):
            late.batch(e)
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
