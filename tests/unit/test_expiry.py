"""Token expiry as operators write it: durations, times, never; refusals that say why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tether.plane.expiry import parse_expiry

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "after"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("90d", timedelta(days=90)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 1W2D ", timedelta(weeks=1, days=2)),
    ],
)
def test_durations_count_from_now(text: str, after: timedelta) -> None:
    assert parse_expiry(text, NOW) == NOW + after


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2027-01-31", datetime(2027, 1, 31, tzinfo=UTC)),
        ("2027-01-31T18:00Z", datetime(2027, 1, 31, 18, 0, tzinfo=UTC)),
        ("2027-01-31T18:00", datetime(2027, 1, 31, 18, 0, tzinfo=UTC)),
        ("2027-01-31T20:00+02:00", datetime(2027, 1, 31, 18, 0, tzinfo=UTC)),
    ],
)
def test_times_are_utc_where_no_offset_is_given(text: str, moment: datetime) -> None:
    assert parse_expiry(text, NOW) == moment


def test_never_is_no_expiry() -> None:
    assert parse_expiry("never", NOW) is None
    assert parse_expiry("Never", NOW) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0m", "no time at all"),
        ("2026-12-01", "not in the future"),
        ("2026-12-06T11:59Z", "not in the future"),
        ("3651d", "more than 3650 days"),
        ("12 hours", "a duration (30m"),
        ("5s", "a duration (30m"),
        ("", "a duration (30m"),
        ("tomorrow", "a duration (30m"),
    ],
)
def test_anything_else_is_refused_with_a_sentence(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="expiry") as refused:
        parse_expiry(text, NOW)
    assert says in str(refused.value)
