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
from evidence_keeper.fleet import Fleet, NodeRow
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
    """Left-aligned columns; the last column is not padded (it may be long), no line ends in
    spaces."""
    if not rows:
        return []
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(n - 1)]
    return [("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  "
             + r[-1]).rstrip() for r in rows]


def format_gaps(doc: dict[str, Any], *, node_column: bool = False) -> str:
    """The ``/gaps`` document as a table (with a NODE column for several agents' gaps)."""
    head = ("ID", "KIND", "START", "END", "WHAT", "DETAIL")
    rows: list[tuple[str, ...]] = [(("NODE",) if node_column else ()) + head]
    for g in doc["gaps"]:
        row = (str(g["id"]), g["kind"], g["start"][:19], (g["end"] or "open")[:19],
               _gap_what(g), _gap_detail(g))
        rows.append(((str(g.get("node", "")),) if node_column else ()) + row)
    lines = table(rows)
    nodes = doc.get("nodes", "?")
    n = len(nodes) if isinstance(nodes, list) else nodes  # the nodes, or how many
    where = f"node {doc['node']}" if "node" in doc else f"{n} node{'' if n == 1 else 's'}"
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


# ------------------------------------------------------------------------------ the fleet
def _sinks_text(row: NodeRow) -> str:
    if row.agent in ("none", "unreachable"):
        return "-"
    parts = []
    for s in row.sinks:
        checks: dict[str, bool | None] = s["checks"]
        if all(v is True for v in checks.values()):
            parts.append(f"{s['sink']} up")
        elif all(v is None for v in checks.values()):
            parts.append(f"{s['sink']} unprobed")
        else:
            parts.append(f"{s['sink']} DOWN(" + ",".join(
                f"{c}:{'ok' if v else 'FAIL' if v is False else '?'}"
                for c, v in checks.items()) + ")")
    return " ".join(parts) or "-"


def _shipping_text(row: NodeRow) -> str:
    if row.shipping_current is None:
        return "-"
    age = f"{row.oldest_unshipped_age_s or 0:.1f}s"
    text = f"current ({age})" if row.shipping_current else f"BEHIND ({age})"
    if row.ledger_unshipped_records:
        text += f" ledger+{row.ledger_unshipped_records}"
    return text


def _loss_text(row: NodeRow) -> str:
    if row.loss_gaps is None:
        return "-"
    if row.loss_gaps == 0:
        return "none"
    unknown = f" +{row.loss_unknown_length} unknown" if row.loss_unknown_length else ""
    return f"{row.loss_gaps} gaps, {row.lost_bytes} B{unknown}"


def _agent_text(row: NodeRow) -> str:
    text = {"none": "NONE", "not-ready": "NOT READY", "unreachable": "UNREACHABLE"}.get(
        row.agent, row.agent)
    if row.cordoned:
        text += " (cordoned)"
    if not row.node_ready:
        text += " (node NotReady)"
    return text


def format_fleet(fleet: Fleet, *, window: str) -> str:
    rows: list[Sequence[str]] = [("NODE", "AGENT", "SINKS", "SHIPPING", f"LOSS ({window})",
                                  "VERDICT")]
    for r in fleet.rows:
        rows.append((r.node, _agent_text(r), _sinks_text(r), _shipping_text(r), _loss_text(r),
                     "ok" if r.ok else "FAIL"))
    lines = table(rows)
    for r in fleet.rows:
        lines += [f"  FAIL  {f}" for f in r.failures]
        lines += [f"  note  {n}" for n in r.notes]
    if fleet.excluded:
        lines.append(f"  excluded: {', '.join(fleet.excluded)}")
    for p in fleet.orphans:
        lines.append(f"  note  agent pod {p.name} runs on node {p.node or '?'}, which is not"
                     " selected")
    return "\n".join(lines)


def verdict(fleet: Fleet) -> str:
    failed = [r for r in fleet.rows if not r.ok]
    if not failed:
        return (f"cluster preflight passed: {len(fleet.rows)} nodes, every agent ready, sinks"
                " up, shipping current, no loss")
    return (f"cluster preflight FAILED: {len(failed)} of {len(fleet.rows)} nodes"
            f" ({', '.join(r.node for r in failed)}); evidence would be at risk")


def fleet_json(fleet: Fleet, *, window_since: str | None) -> dict[str, Any]:
    return {"generated_at": fleet.generated_at, "ok": fleet.ok, "verdict": verdict(fleet),
            "window_since": window_since, "excluded": fleet.excluded,
            "nodes": [r.to_json() for r in fleet.rows],
            "failures": [f for r in fleet.rows for f in r.failures],
            "orphan_agents": [{"pod": p.name, "node": p.node} for p in fleet.orphans]}
