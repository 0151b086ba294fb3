"""Time, written and read in one place.

Every timestamp the agent writes (gap ledger, lifecycle records, store metadata, manifests,
API documents) is UTC RFC3339 with microseconds and ``Z``: ``2025-11-10T12:27:00.000000Z``.
That one fixed width makes timestamps sort lexically in time order, which the ledger and the
manifests rely on; :func:`rfc3339` is the only writer.

Reading has two strictness levels, and both live here:

* :func:`parse_rfc3339` is lenient (any ISO 8601 with a zone, ``Z`` or ``z``; ``None`` for
  anything else) for documents the agent or Kubernetes wrote: a bad field must never stop a
  reader, it only loses that field's time.
* :func:`parse_time` is strict, for what a user types (``--since``, ``?since=``): RFC3339 with a
  zone, or a duration back from ``now`` (``30m``, ``2h``); a bad value raises
  :class:`TimeError` with one line naming the parameter. The HTTP API turns it into a 400,
  the CLI into its one-line error.

Container log lines carry RFC3339Nano stamps parsed on the hot path by
:mod:`evidence_keeper.formats` (bytes, nanoseconds cut to microseconds); that parser stays
next to the line formats it serves.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

from evidence_keeper.settings import parse_duration

MAX_DURATION_S: Final = 100 * 365 * 86400  # "30m" is a window; "1e12s" is a typo
_DATE_HEAD: Final = re.compile(r"\d{4}-")


class TimeError(ValueError):
    """A user-supplied time that is neither RFC3339 nor a duration (one line, names it)."""


def rfc3339(ts: datetime) -> str:
    """UTC RFC3339 with microseconds and ``Z``: fixed width, so it sorts lexically in time."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_or_none(ts: datetime | None) -> str | None:
    """:func:`rfc3339`, with ``None`` (JSON null) for no time."""
    return None if ts is None else rfc3339(ts)


def parse_rfc3339(value: object) -> datetime | None:
    """An aware UTC datetime from an RFC3339/ISO 8601 string with a zone, else ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts.astimezone(UTC) if ts.tzinfo is not None else None


def parse_time(value: str, name: str, now: datetime) -> datetime:
    """RFC3339 (``2025-11-10T12:27:00Z``) or a duration back from ``now`` (``30m``, ``2h``)."""
    v = value.strip()
    if not v:
        raise TimeError(f"{name}: empty value")
    if v[0].isdigit() and not _DATE_HEAD.match(v):
        try:
            seconds = parse_duration(v)
        except ValueError:
            raise TimeError(f"{name}: {value!r} is neither RFC3339 nor a duration"
                            " like 30m") from None
        if seconds > MAX_DURATION_S:
            raise TimeError(f"{name}: duration {value!r} is too long")
        return now - timedelta(seconds=seconds)
    try:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeError(f"{name}: {value!r} is neither RFC3339 nor a duration"
                        " like 30m") from None
    if ts.tzinfo is None:
        raise TimeError(f"{name}: {value!r} needs a time zone (e.g. Z)")
    return ts.astimezone(UTC)


def now_rfc3339() -> str:
    """The current time in the one format."""
    return rfc3339(datetime.now(UTC))
