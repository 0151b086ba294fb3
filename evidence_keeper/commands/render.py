"""Text renderings shared by the commands, the kubectl plugin and the demo.

JSON output is the API's or the report's own document (``json_doc``); text output is made
here so that ``evidence-keeper gaps``, ``kubectl evidence gaps`` and the demo print the same
table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evidence_keeper.archive.search import Hit, format_json
from evidence_keeper.timefmt import rfc3339


def json_doc(doc: Any) -> str:
    return json.dumps(doc, indent=2)


def _gap_what(g: dict[str, Any]) -> str:
    if g["kind"] == "loss":
        size = g.get("bytes") if g.get("bytes") is not None else "?"
        return (f"{g.get('namespace')}/{g.get('pod')}/{g.get('container')}#{g.get('restart')}"
                f" @{g.get('offset')} +{size} {g.get('reason', '')}")
    return " ".join(str(x) for x in (g.get("sink"), g.get("check"), g.get("reason")) if x)


def _gap_detail(g: dict[str, Any]) -> str:
    detail = str(g.get("detail") or "")
    cov = g.get("coverage")
    if cov:
        detail = (f"coverage: {cov['streams']} streams, {cov['captured_bytes']} B captured,"
                  f" {cov['shipped_bytes']} B shipped; {detail}")
    return detail[:90]


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the last column is not padded (it may be long)."""
    if not rows:
        return []
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(n - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
            for r in rows]


def format_gaps(doc: dict[str, Any], *, node_column: bool = False) -> str:
    """The ``/gaps`` document as a table (with a NODE column for several agents' gaps)."""
    head = ("ID", "KIND", "START", "END", "WHAT", "DETAIL")
    rows: list[tuple[str, ...]] = [(("NODE",) if node_column else ()) + head]
    for g in doc["gaps"]:
        row = (str(g["id"]), g["kind"], g["start"][:19], (g["end"] or "open")[:19],
               _gap_what(g), _gap_detail(g))
        rows.append(((str(g.get("node", "")),) if node_column else ()) + row)
    lines = table(rows)
    where = f"node {doc['node']}" if "node" in doc else f"{doc.get('nodes', '?')} nodes"
    lines.append(f"{len(doc['gaps'])} gaps on {where} (generated {doc['generated_at']})")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    text: str
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "check": self.text}
        if self.node is not None:
            out["node"] = self.node
        return out


def format_checks(checks: Sequence[Check]) -> str:
    return "\n".join(f"  {'ok  ' if c.ok else 'FAIL'}  "
                     + (f"{c.node}: " if c.node is not None else "") + c.text for c in checks)


def format_hit(hit: Hit, *, output: str, timestamps: bool = False,
               namespace: bool = False) -> bytes:
    """One search hit: stern's ``[ns] pod container │ message`` (optionally with the line's
    timestamp first, RFC3339 UTC, ``-`` when the line has none), or one JSON object."""
    if output == "json":
        return format_json(hit)
    s = hit.stream
    head = f"{s.namespace} " if namespace else ""
    if timestamps:
        ts = hit.ts
        head = (rfc3339(ts) if ts is not None else "-") + " " + head
    return f"{head}{s.pod} {s.container} │ ".encode() + hit.message + b"\n"
