"""Rule exceptions limited to effective time periods, decided on the incident's event time."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shared.engine import Engine
from shared.errors import RuleError
from shared.normalize import NormalizedEvent, Normalizer
from shared.periods import Period, zone
from shared.rules import Rule, parse_rule_text
from shared.ruletests import run_rule_tests
from shared.state import MemoryStateStore

FRI = datetime(2026, 5, 1, tzinfo=timezone.utc)  # a Friday
SAT = FRI + timedelta(days=1)
PERSIST = "M365Defender-Alert-Persistence"
CRED = "MS-Defender-Endpoint-Alert-CredentialAccess"
WEEKEND = '{days: [Sat, Sun], from: "00:00", to: "24:00"}'


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def multi(periods: str, pattern: str = "persist FOLLOWED_BY cred") -> Rule:
    text = textwrap.dedent(
        f"""\
        id: PERIOD_SEQ
        name: persistence then credential access
        severity: 8
        category: Security
        timeWindow: 600
        subpatterns:
          - {{name: persist, query: eventType IN (Group@PH_SYS_EVENT_MS_Defender_Alert_Persistence),
              groupBy: [tenantId, hostName], aggregateConstraint: COUNT(*) >= 1}}
          - {{name: cred, query: eventType IN (Group@PH_SYS_EVENT_MS_Defender_Alert_CredentialAccess),
              groupBy: [tenantId, hostName], aggregateConstraint: COUNT(*) >= 1}}
        pattern: {pattern}
        incidentAttributes: {{hostName: persist.hostName}}
        exceptions:
          - query: hostName = "build-server"
            periods: [{periods}]
        """
    )
    return parse_rule_text(text, "periods.yaml")


def single(periods: str) -> Rule:
    text = textwrap.dedent(
        f"""\
        id: PERIOD_ONE
        name: any alert
        severity: 5
        category: Security
        timeWindow: 60
        subpatterns:
          - {{name: s, query: eventType CONTAIN "Alert", groupBy: [hostName], aggregateConstraint: COUNT(*) >= 1}}
        incidentAttributes: {{hostName: s.hostName}}
        exceptions:
          - query: hostName = "build-server"
            periods: [{periods}]
        """
    )
    return parse_rule_text(text, "periods.yaml")


_n = [0]


def ev(event_type: str, at: datetime, host: str = "build-server") -> NormalizedEvent:
    _n[0] += 1
    rec = {"eventType": event_type, "hostName": host, "tenantId": "t1", "alertIdStr": f"p{_n[0]}", "eventTime": at.isoformat()}
    out = Normalizer(fmt="normalized").normalize(rec, "test", at)
    assert isinstance(out, NormalizedEvent)
    return out


def emitted(rule: Rule, events: list[NormalizedEvent], wall: datetime) -> list[dict[str, Any]]:
    engine = Engine([rule], MemoryStateStore(), lambda: wall)
    return [s for e in events for s in engine.process([e]).incidents]


class TestEngine:
    @pytest.mark.parametrize("make", [single, multi])
    def test_an_exception_holds_only_inside_its_period_on_event_time(self, make: Any) -> None:
        rule = make(WEEKEND)
        weekday = [ev(PERSIST, FRI + timedelta(hours=10)), ev(CRED, FRI + timedelta(hours=10, minutes=5))]
        weekend = [ev(PERSIST, SAT + timedelta(hours=10)), ev(CRED, SAT + timedelta(hours=10, minutes=5))]
        # the wall clock says the opposite of the event time each time: only event time counts
        assert emitted(rule, weekday, wall=SAT + timedelta(hours=12)) != []
        assert emitted(rule, weekend, wall=FRI + timedelta(days=7)) == []

    def test_other_hosts_are_not_excepted_inside_the_period(self) -> None:
        snaps = emitted(single(WEEKEND), [ev(PERSIST, SAT, host="prod-1")], wall=SAT)
        assert [s["attributes"]["hostName"] for s in snaps] == ["prod-1"]

    def test_an_absence_fired_by_the_timer_is_judged_at_its_deadline(self) -> None:
        # deadline = leader + 600 s: Friday 23:55 + 10 min = Saturday 00:05, inside the weekend period
        rule = multi(WEEKEND, pattern="persist NOT FOLLOWED_BY cred")
        late = Engine([rule], MemoryStateStore(), lambda: FRI)
        late.process([ev(PERSIST, FRI + timedelta(hours=23, minutes=55))])
        assert late.fire_due(SAT + timedelta(minutes=6)).incidents == []
        early = Engine([rule], MemoryStateStore(), lambda: FRI)  # deadline Friday 10:10: emitted
        early.process([ev(PERSIST, FRI + timedelta(hours=10))])
        [snap] = early.fire_due(FRI + timedelta(hours=11)).incidents
        assert snap["lastSeen"].startswith("2026-05-01T10:10")

    def test_a_single_period_bounds_the_exception_by_start_and_end(self) -> None:
        rule = single('{start: "2026-05-01T08:00:00+02:00", end: "2026-05-01T09:00:00+02:00"}')  # 06:00-07:00 UTC
        inside = [ev(PERSIST, FRI + timedelta(hours=6, minutes=59, seconds=59))]
        at_end = [ev(PERSIST, FRI + timedelta(hours=7))]  # end is exclusive
        assert emitted(rule, inside, wall=FRI) == []
        assert len(emitted(rule, at_end, wall=FRI)) == 1


class TestFirstEmission:
    def test_an_incident_excepted_at_creation_is_announced_as_created_when_it_first_passes(self) -> None:
        import orjson

        rule = single(WEEKEND)
        sunday_night = SAT + timedelta(days=1, hours=23, minutes=59, seconds=30)
        engine = Engine([rule], MemoryStateStore(), lambda: sunday_night)
        assert engine.process([ev(PERSIST, sunday_night)]).incidents == []  # excepted: nothing emitted
        monday = ev(PERSIST, sunday_night + timedelta(seconds=40))
        [first] = engine.process([monday]).incidents
        assert (first["revision"], first["action"]) == (2, "created")  # a created-only target hears of it
        [again] = engine.process([monday]).incidents  # the batch redelivered: the same bytes, still created
        assert orjson.dumps(again) == orjson.dumps(first)
        [later] = engine.process([ev(PERSIST, sunday_night + timedelta(seconds=50))]).incidents
        assert (later["revision"], later["action"]) == (3, "updated")

    def test_a_multi_subpattern_incident_excepted_at_creation_is_announced_as_created_too(self) -> None:
        rule = multi(WEEKEND)
        sunday_night = SAT + timedelta(days=1, hours=23, minutes=59)
        engine = Engine([rule], MemoryStateStore(), lambda: sunday_night)
        assert engine.process([ev(PERSIST, sunday_night), ev(CRED, sunday_night + timedelta(seconds=30))]).incidents == []
        [first] = engine.process([ev(CRED, sunday_night + timedelta(seconds=70))]).incidents  # Monday 00:00:10
        assert (first["revision"], first["action"]) == (2, "created")

    def test_states_of_rules_without_exceptions_keep_their_bytes(self) -> None:
        plain = replace(single(WEEKEND), exceptions=())
        store = MemoryStateStore()
        Engine([plain], store, lambda: SAT).process([ev(PERSIST, SAT)])
        [key] = list(store.held_keys())
        state = store.load([key], ms(SAT))[key].state
        assert state is not None and state.incident is not None and not state.incident.unannounced
        assert b'"iu"' not in state.to_bytes()


class TestPeriod:
    def test_a_span_over_midnight_belongs_to_the_day_it_starts_on(self) -> None:
        p = Period(tz=timezone.utc, days=frozenset({4}), daily=(22 * 60, 6 * 60))  # Fri 22:00 - Sat 06:00
        assert p.contains(ms(FRI + timedelta(hours=23)))
        assert p.contains(ms(SAT + timedelta(hours=5, minutes=59, seconds=59)))
        assert not p.contains(ms(SAT + timedelta(hours=6)))
        assert not p.contains(ms(FRI + timedelta(hours=5)))  # Friday early morning: Thursday's night, not listed
        assert not p.contains(ms(SAT + timedelta(hours=23)))

    def test_local_hours_follow_daylight_saving_time(self) -> None:
        berlin = zone("Europe/Berlin")
        p = Period(tz=berlin, days=frozenset(range(7)), daily=(8 * 60, 9 * 60))
        summer = datetime(2026, 7, 1, 6, 30, tzinfo=timezone.utc)  # 08:30 CEST
        winter = datetime(2026, 1, 7, 6, 30, tzinfo=timezone.utc)  # 07:30 CET
        assert p.contains(ms(summer)) and not p.contains(ms(winter))
        assert p.contains(ms(winter + timedelta(hours=1)))


@pytest.mark.parametrize(
    ("periods", "pattern"),
    [
        ('{from: "08:00", to: "18:00", timezone: Mars/Olympus}', r"periods\[0\]\.timezone: unknown time zone 'Mars/Olympus'"),
        ('{from: "8:00", to: "18:00"}', r"periods\[0\]\.from: '8:00' is not a time of day 'HH:MM'"),
        ('{from: "08:00", to: "24:30"}', r"periods\[0\]\.to: '24:30' is not a time of day between"),
        ('{from: "08:00"}', r"periods\[0\]\.to: a daily span needs both 'from' and 'to'"),
        ('{from: "08:00", to: "08:00"}', r"periods\[0\]\.from: 'from' must differ from 'to'"),
        ("{days: [Mon]}", r"periods\[0\]\.days: 'days' needs a daily span"),
        ("{timezone: UTC}", r"periods\[0\]: a period needs a daily span"),
        ('{start: "2026-05-02T00:00:00Z", end: "2026-05-01T00:00:00Z"}', r"periods\[0\]\.end: 'end' must be after 'start'"),
        ('{start: "2026-05-02T00:00:00"}', r"periods\.0\.start|periods\[0\]\.start: Input should have timezone info"),
        ('{days: [Monday], from: "08:00", to: "09:00"}', r"periods\[0\]\.days\[0\]: Input should be 'Mon'"),
    ],
)
def test_bad_periods_are_load_errors_naming_file_and_field(periods: str, pattern: str) -> None:
    with pytest.raises(RuleError, match=r"periods\.yaml: exceptions\[0\]\." + pattern):
        single(periods)


def test_rule_tests_can_start_their_timeline_at_a_chosen_event_time() -> None:
    base = single(WEEKEND)
    cases = [
        {
            "name": name,
            "start": start,
            "events": [{"at": 60, "event": {"eventType": PERSIST, "hostName": "build-server", "tenantId": "t1"}}],
            "expect": {"incidents": n},
        }
        for name, start, n in [("saturday", "2026-05-02T10:00:00Z", 0), ("friday", "2026-05-01T10:00:00Z", 1)]
    ]
    model = base.model.model_validate({**base.model.model_dump(by_alias=True), "tests": cases})
    rule = replace(base, model=model)
    results = run_rule_tests([rule])
    assert [(r.case, r.passed) for r in results] == [("saturday", True), ("friday", True)]


@given(
    st.integers(0, 4 * 365 * 24 * 60).map(
        lambda m: datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=m, seconds=m % 60)
    ),
    st.frozensets(st.integers(0, 6), min_size=1),
    st.integers(0, 24 * 60 - 1),
    st.integers(1, 24 * 60),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]),
)
@example(datetime(2026, 5, 2, 5, 59, 59, tzinfo=timezone.utc), frozenset({4}), 22 * 60, 6 * 60, "UTC")
def test_a_daily_span_holds_exactly_inside_the_local_interval_starting_on_a_listed_day(
    at: datetime, days: frozenset[int], lo: int, hi: int, zone_name: str
) -> None:
    """Oracle: for the local calendar day and the one before, the wall-clock interval
    [day + from, day (+1 if over midnight) + to) on a listed weekday contains the local time."""
    if lo == hi:
        return
    tz = zone(zone_name)
    local = at.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
    inside = False
    for back in (0, 1):
        day = local.date() - timedelta(days=back)
        midnight = datetime.combine(day, datetime.min.time())
        start = midnight + timedelta(minutes=lo)
        end = midnight + timedelta(days=1 if hi <= lo else 0, minutes=hi)
        inside = inside or (day.weekday() in days and start <= local < end)
    assert Period(tz=tz, days=days, daily=(lo, hi)).contains(ms(at)) == inside
