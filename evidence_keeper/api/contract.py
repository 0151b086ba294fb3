"""What requests and answers of the HTTP API look like (CONTRACT.md section 6), without I/O.

Shared by the API handlers (:mod:`evidence_keeper.api.app`), the archive service and the CLI,
and importing nothing of the agent, so each of them can use it at module level:

* :class:`BadRequest` is an error answer (``{"error": ...}`` with its status);
* :func:`parse_time` reads ``since``/``until`` (RFC3339 or a duration back from now);
* :func:`parse_json_body` reads a JSON request body under a size and a nesting limit: a deeply
  nested document is a 400 before the parser could recurse into a RecursionError (a 500);
* :func:`conform_gap` shapes a ledger row as the contract prints it: every ``loss`` carries
  ``bytes``, ``null`` when the hole's length is unknown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

from evidence_keeper import timefmt

MAX_BODY: Final = 64 * 1024
MAX_JSON_DEPTH: Final = 16


# The archive token's header for clients behind the API server's pod proxy, which consumes
# and strips ``Authorization``.
TOKEN_HEADER: Final = "X-Evidence-Keeper-Token"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_time(value: str, name: str, now: datetime) -> datetime:
    """:func:`evidence_keeper.timefmt.parse_time` (RFC3339 or a duration back from now), a
    bad value as a 400."""
    try:
        return timefmt.parse_time(value, name, now)
    except timefmt.TimeError as exc:
        raise BadRequest(str(exc)) from None


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings skipped)."""
    if raw.count(b"[") + raw.count(b"{") <= 1:
        return raw.count(b"[") + raw.count(b"{")
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_json_body(raw: bytes, *, max_bytes: int = MAX_BODY, max_depth: int = MAX_JSON_DEPTH,
                    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
                    ) -> Any:
    """A request body as JSON; BadRequest (413 too large, 400 otherwise) when it is not."""
    if len(raw) > max_bytes:
        raise BadRequest(f"request body over {max_bytes} bytes", 413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    if json_depth(raw) > max_depth:
        raise BadRequest(f"malformed JSON: nested deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:  # unreachable below max_depth; kept as the last line of defence
        raise BadRequest(f"malformed JSON: nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:120]}") from None


def conform_gap(row: Mapping[str, Any]) -> dict[str, Any]:
    """A gap as the contract prints it: a ``loss`` always has ``bytes`` (null = unknown)."""
    out = dict(row)
    if out.get("kind") == "loss":
        out.setdefault("bytes", None)
    return out
