"""Container log line formats, parsed only where needed: segment edges and search.

The stream itself is raw bytes and is never re-encoded. Two formats exist on a node:

* CRI (containerd, CRI-O): ``<RFC3339Nano> <stdout|stderr> <P|F> <message>\\n``
* Docker json-file: ``{"log":"<message>","stream":"stdout","time":"<RFC3339Nano>"}\\n``

Only the timestamp and message are extracted; anything unparseable yields ``None``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Final

from evidence_keeper import timefmt

_RFC3339: Final = re.compile(
    rb"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
)
_DOCKER_TIME: Final = re.compile(rb'"time"\s*:\s*"([^"]+)"')
EDGE_WINDOW: Final = 64 * 1024  # how far from a segment edge a complete line is looked for


def parse_ts(raw: bytes) -> datetime | None:
    """An RFC3339(Nano) timestamp as an aware datetime (nanoseconds cut to microseconds)."""
    m = _RFC3339.match(raw)
    if m is None:
        return None
    frac = (m[2] or b".0")[1:7].ljust(6, b"0")
    zone = m[3].decode()
    try:
        ts = datetime.strptime(m[1].decode(), "%Y-%m-%dT%H:%M:%S").replace(
            microsecond=int(frac)
        )
        if zone == "Z":
            return ts.replace(tzinfo=UTC)
        return datetime.fromisoformat(ts.isoformat() + zone).astimezone(UTC)
    except ValueError:
        return None


def line_ts(line: bytes) -> datetime | None:
    """The timestamp of one log line in either format."""
    if line.startswith(b"{"):
        m = _DOCKER_TIME.search(line)
        return parse_ts(m[1]) if m else None
    return parse_ts(line.split(b" ", 1)[0])


def line_message(line: bytes) -> bytes:
    """The message of a line (CRI: after the tag; Docker: the decoded ``log`` field)."""
    if line.startswith(b"{"):
        try:
            obj = json.loads(line)
            msg = obj.get("log", "")
            return msg.encode("utf-8", "surrogateescape") if isinstance(msg, str) else line
        except (ValueError, AttributeError):
            return line
    parts = line.split(b" ", 3)
    if len(parts) == 4 and parts[1] in (b"stdout", b"stderr") and parse_ts(parts[0]):
        return parts[3]
    return line


def edge_timestamps(head: bytes, tail: bytes) -> tuple[datetime | None, datetime | None]:
    """First and last parseable line timestamps of a segment, from its head and tail bytes.

    ``head`` starts at the segment start (its first line may be the continuation of a line
    split across segments: then the next line is used); ``tail`` ends at the segment end.
    """
    first = None
    for line in head.split(b"\n")[:64]:
        first = line_ts(line)
        if first is not None:
            break
    last = None
    lines = tail.split(b"\n")
    for line in reversed(lines[-64:]):
        last = line_ts(line)
        if last is not None:
            break
    return first, last


def rfc3339(ts: datetime | None) -> str:
    """Store metadata's form (``ek-first-ts``): "" for no time."""
    return "" if ts is None else timefmt.rfc3339(ts)
