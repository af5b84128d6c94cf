"""parse_time gives the same answer on every supported Python (3.10's fromisoformat is stricter)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shared.normalize import iso, parse_time

BASE = datetime(2019, 9, 1, 13, 31, 8, tzinfo=timezone.utc)


@pytest.mark.parametrize("digits", range(10))
@pytest.mark.parametrize("suffix", ["Z", "+00:00", "+0000", "z"])
def test_any_number_of_fraction_digits_parses_to_the_truncated_microsecond(digits: int, suffix: str) -> None:
    fraction = "987654321"[:digits]
    text = f"2019-09-01T13:31:08{'.' + fraction if digits else ''}{suffix}"
    micro = int((fraction + "000000")[:6]) if digits else 0
    assert parse_time(text) == BASE + timedelta(microseconds=micro)


def test_defender_time_with_two_fraction_digits_parses() -> None:
    assert parse_time("2019-09-01T13:31:08.57Z") == BASE + timedelta(microseconds=570000)


@pytest.mark.parametrize(
    ("text", "expected_hour"),
    [("2019-09-01T15:31:08.5+0200", 13), ("2019-09-01T08:31:08.5-0500", 13), ("2019-09-01T15:31:08+02:00", 13)],
)
def test_offsets_with_and_without_colon_convert_to_utc(text: str, expected_hour: int) -> None:
    parsed = parse_time(text)
    assert parsed is not None and parsed.hour == expected_hour and parsed.tzinfo == timezone.utc


@pytest.mark.parametrize("text", ["2019-09-01T13:31:08.+00:00", "not a time", "2019-13-01T00:00:00Z", "2019-09-01T13:31:08.5+2"])
def test_malformed_times_give_none_not_an_error(text: str) -> None:
    assert parse_time(text) is None


@given(
    moment=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)),
    extra=st.text(alphabet="0123456789", max_size=3),
)
@example(moment=datetime(2019, 9, 1, 13, 31, 8, 570000, tzinfo=timezone.utc), extra="")
def test_iso_text_round_trips_with_extra_fraction_digits(moment: datetime, extra: str) -> None:
    text = iso(moment)
    if "." not in text:
        text = text.replace("Z", ".000000Z")
    assert parse_time(text.replace("Z", extra + "Z")) == moment


# -- the fast path for Defender's usual form (YYYY-MM-DDTHH:MM:SS[.f...]Z) ----------------------------

_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=2)


@st.composite
def _utc_texts(draw: st.DrawFn) -> str:
    """Texts of the fast path's shape and near misses of it (bad fields, other zones, spaces, 'z')."""
    date = f"{draw(st.integers(0, 10000)):04d}-{draw(st.integers(0, 13)):02d}-{draw(st.integers(0, 32)):02d}"
    clock = f"{draw(st.integers(0, 24)):02d}:{draw(st.integers(0, 60)):02d}:{draw(st.integers(0, 60)):02d}"
    fraction = draw(st.one_of(st.just(""), st.text(alphabet="0123456789", max_size=9).map(lambda d: "." + d)))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "+0100", "", " Z", "Z "]))
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    return f"{date}{sep}{clock}{fraction}{zone}"


@given(text=_utc_texts())
@example(text="2026-11-01T00:00:00.000000Z")
@example(text="2026-11-01T00:00:00Z")
@example(text="2026-11-01T00:00:00.Z")
@example(text="2026-02-30T00:00:00.5Z")
def test_fast_path_parses_and_renders_as_the_general_path(text: str) -> None:
    from shared.normalize import _parse_shown, _parse_time

    expected = _parse_time(text)
    assert parse_time(text) == expected
    parsed, shown = _parse_shown(text)
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is timezone.utc
        assert shown is None or shown == iso(parsed)
    else:
        assert shown is None


@pytest.mark.parametrize(
    ("text", "own"),
    [
        ("2026-11-01T00:00:00.003000Z", True),
        ("2026-11-01T00:00:00Z", True),
        ("2026-11-01T00:00:00.000000Z", False),  # iso() drops a zero fraction
        ("2026-11-01T00:00:00.003Z", False),  # iso() writes 6 digits
        ("2026-11-01T00:00:00.0030001Z", False),
        ("2026-11-01T00:00:00.003000z", False),
    ],
)
def test_a_time_is_its_own_iso_text_only_when_iso_would_write_it_so(text: str, own: bool) -> None:
    from shared.normalize import _parse_shown

    parsed, shown = _parse_shown(text)
    assert parsed is not None and iso(parsed) == (text if own else iso(parsed))
    assert (shown == text) is own
