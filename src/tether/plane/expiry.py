"""When an agent token expires, as operators write it: a duration, a time, or never."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

#: The longest a token may be given: about ten years.
LONGEST = timedelta(days=3650)
_UNITS = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?")
NEVER = "never"
HELP = (
    "a duration (30m, 12h, 90d, 2w, 1d12h), a time in ISO 8601 (2027-01-31, 2027-01-31T18:00Z; "
    "UTC where no offset is given), or never"
)


def parse_expiry(text: str, now: datetime) -> datetime | None:
    """The moment ``text`` names, counted from ``now``; None for ``never``.

    Raises ``ValueError`` with a sentence for anything else, a moment not in the
    future, or one further than ``LONGEST``.
    """
    value = text.strip()
    if value.lower() == NEVER:
        return None
    match = _DURATION.fullmatch(value.lower())
    if value and match is not None and any(match.groups()):
        amount = sum(
            (int(count) * _UNITS[unit] for count, unit in zip(match.groups(), "wdhm", strict=True) if count),
            timedelta(),
        )
        if amount <= timedelta():
            raise ValueError(f"expiry {text!r} is no time at all; give {HELP}")
        moment = now + amount
    else:
        moment = _moment(value, text)
    if moment <= now:
        raise ValueError(f"expiry {text!r} is not in the future (now is {now:%Y-%m-%d %H:%M} UTC)")
    if moment - now > LONGEST:
        raise ValueError(f"expiry {text!r} is more than {LONGEST.days} days away; use {NEVER!r} for no expiry")
    return moment


def _moment(value: str, text: str) -> datetime:
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expiry {text!r} is not {HELP}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
