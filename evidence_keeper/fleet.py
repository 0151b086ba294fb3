"""The cluster as the API server sees it: every node, its agent, and what the agent says.

The node list is the truth about what must be covered; agent pods are found by the chart's
labels (as ``archive --all-nodes`` does) and each agent is asked for ``/readyz`` and ``/gaps``
through the API server's pod proxy (``pods/<name>:<port>/proxy/...``; the API server
authenticates the caller and does not pass its credentials on) or at its pod IP, in parallel.

Each node becomes one :class:`NodeRow`: agent ready, sinks up per check (the debounced view of
``sink_up{sink,check}``), shipping current, loss in the window, and the named failures. A node
with no agent pod is a failure of its own, unless it is cordoned (not schedulable): nobody
preserves its logs and no ledger anywhere records that. The table, the verdict and the JSON
report are rendered with the other commands' output (:mod:`evidence_keeper.commands.render`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from evidence_keeper.agents import (
    AGENT_NAMESPACE,
    AGENT_SELECTOR,
    fan_out,
    list_agent_pods,
    read_list,
    transport,
)
from evidence_keeper.archive.cluster import AgentPod, AgentTransport, ClusterError
from evidence_keeper.timefmt import rfc3339

QUERY_WORKERS: Final = 16
QUERY_TIMEOUT_S: Final = 15.0
NO_AGENT: Final = "no evidence-keeper agent — logs on this node are not preserved"

__all__ = ["AGENT_SELECTOR", "NO_AGENT", "ClusterError", "Fleet", "NodeRow", "Selection",
           "agent_checks", "survey"]


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    cordoned: bool
    ready: bool


def list_nodes(api: Any, *, selector: str | None) -> list[Node]:
    """The cluster's nodes (by label selector), read as plain JSON."""
    kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": 30}
    if selector:
        kwargs["label_selector"] = selector
    out = []
    for item in read_list(api, "nodes", lambda core: core.list_node(**kwargs)):
        conds = {c.get("type"): c.get("status") for c in item.get("status", {}).get(
            "conditions") or []}
        out.append(Node(name=str(item.get("metadata", {}).get("name", "")),
                        cordoned=bool(item.get("spec", {}).get("unschedulable")),
                        ready=conds.get("Ready") == "True"))
    return sorted(out, key=lambda n: n.name)


# ------------------------------------------------------------------------------ checks
Check = tuple[bool, str]


def sink_checks(sink: dict[str, Any]) -> dict[str, bool | None]:
    """Per check of one sink from ``/readyz``: the debounced view of ``sink_up{sink,check}``."""
    checks = list(sink.get("checks") or [sink.get("failed_check") or sink.get("kind") or "up"])
    up = sink.get("up")
    if up is None:
        return dict.fromkeys(checks, None)
    if up:
        return dict.fromkeys(checks, True)
    failed = sink.get("failed_check") or checks[0]
    out: dict[str, bool | None] = {}
    passed = True
    for c in checks:
        if c == failed:
            passed = False
        out[c] = passed
    if failed not in out:
        out[failed] = False
    return out


def agent_checks(ready: dict[str, Any], loss: dict[str, Any], *, since: str,
                 max_backlog: float) -> list[Check]:
    """What ``preflight`` requires of one agent, as (ok, text) pairs."""
    checks: list[Check] = [(bool(ready.get("ready")),
                            "agent ready (spool recovered, log root tailed)")]
    for s in ready.get("sinks", []):
        ok = s.get("up") is True
        why = "" if ok else f": {s.get('failed_check') or 'not probed yet'} {s.get('error') or ''}"
        checks.append((ok, f"sink {s['sink']} ({s['target']}) up{why}".rstrip()))
    age = float(ready.get("spool", {}).get("oldest_unshipped_age_s", 0))
    checks.append((age <= max_backlog,
                   f"shipping current (oldest unshipped {age:.1f}s <= {max_backlog:g}s)"))
    n_loss = len(loss.get("gaps", []))
    checks.append((n_loss == 0, f"no loss gaps since {since} ({n_loss} found)"))
    return checks


@dataclass
class NodeRow:
    """One node's line of the cluster table."""

    node: str
    agent_pod: str | None = None
    agent: str = "none"  # none | ready | not-ready | unreachable
    cordoned: bool = False
    node_ready: bool = True
    sinks: list[dict[str, Any]] = field(default_factory=list)
    shipping_current: bool | None = None
    oldest_unshipped_age_s: float | None = None
    ledger_unshipped_records: int | None = None
    loss_gaps: int | None = None
    lost_bytes: int | None = None
    loss_unknown_length: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("gaps")
        d["ok"] = self.ok
        return d


def _loss_summary(row: NodeRow, gaps: list[dict[str, Any]]) -> None:
    losses = [g for g in gaps if g.get("kind") == "loss"]
    row.loss_gaps = len(losses)
    row.lost_bytes = sum(int(g["bytes"]) for g in losses if g.get("bytes") is not None)
    row.loss_unknown_length = sum(1 for g in losses if g.get("bytes") is None)


def query_node(node: Node, pods: Sequence[AgentPod], client: AgentTransport, *,
               gaps_params: dict[str, str], loss_since: str, max_backlog: float) -> NodeRow:
    """Ask this node's agent for ``/readyz`` and ``/gaps`` (blocking)."""
    row = NodeRow(node=node.name, cordoned=node.cordoned, node_ready=node.ready)
    if not pods:
        if node.cordoned:
            # Not schedulable: no agent is required there (one that runs must still pass).
            row.notes.append(f"node {node.name}: cordoned, no agent (not required)")
        else:
            row.failures.append(f"node {node.name}: {NO_AGENT}")
        return row
    pod = next((p for p in pods if p.ready), pods[0])  # a rolling update may show two
    row.agent_pod = pod.name
    status, ready = client.request(pod, "GET", "/readyz")
    if status not in (200, 503) or "ready" not in ready:
        row.agent = "unreachable"
        row.failures.append(f"node {node.name}: agent {pod.name} does not answer"
                            f" ({ready.get('error') or f'HTTP {status}'})")
        return row
    row.agent = "ready" if ready.get("ready") else "not-ready"
    row.sinks = [{"sink": s.get("sink"), "target": s.get("target"), "up": s.get("up"),
                  "checks": sink_checks(s), "error": s.get("error")}
                 for s in ready.get("sinks", [])]
    row.oldest_unshipped_age_s = float(ready.get("spool", {}).get("oldest_unshipped_age_s", 0))
    row.ledger_unshipped_records = (ready.get("ledger") or {}).get("unshipped_records")
    row.shipping_current = row.oldest_unshipped_age_s <= max_backlog
    status, gaps = client.request(pod, "GET", "/gaps", params=gaps_params)
    if status != 200:
        row.failures.append(f"node {node.name}: /gaps failed ({gaps.get('error')})")
        gaps = {"gaps": []}
    row.gaps = [{**g, "node": node.name} for g in gaps.get("gaps", [])]
    # A filter that excludes loss gaps (another kind, open ones only) says nothing of loss.
    counted = gaps_params.get("kind") in (None, "loss") and gaps_params.get("open") != "true"
    if counted:
        _loss_summary(row, row.gaps)
    loss = {"gaps": [g for g in row.gaps if g.get("kind") == "loss"]}
    for ok, text in agent_checks(ready, loss, since=loss_since, max_backlog=max_backlog):
        if not ok and (counted or not text.startswith("no loss gaps")):
            row.failures.append(f"node {node.name}: {text}")
    return row


@dataclass
class Fleet:
    rows: list[NodeRow]
    excluded: list[str]
    orphans: list[AgentPod]  # agent pods on nodes that are not in the selection
    generated_at: str

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which nodes must be covered, and where the agents are."""

    node_selector: str | None = None
    exclude: frozenset[str] = frozenset()
    agent_namespace: str = AGENT_NAMESPACE
    agent_selector: str = AGENT_SELECTOR
    port: int = 9095
    via: str = "proxy"  # proxy | pod-ip


def survey(api: Any, selection: Selection, *, gaps_params: dict[str, str], loss_since: str,
           max_backlog: float, progress: Callable[[int, int], None] | None = None) -> Fleet:
    """Every selected node with its agent's answers (blocking; agents asked in parallel).

    Raises ``ClusterError`` when the API server cannot list nodes or pods, ``ValueError`` for
    a selection that names no node.
    """
    nodes = list_nodes(api, selector=selection.node_selector)
    unknown = selection.exclude - {n.name for n in nodes}
    if unknown:
        raise ValueError(f"--exclude-node: no node named {', '.join(sorted(unknown))}")
    nodes = [n for n in nodes if n.name not in selection.exclude]
    if not nodes:
        raise ValueError("no nodes selected" + (f" by {selection.node_selector!r}"
                                                if selection.node_selector else ""))
    pods = list_agent_pods(api, namespace=selection.agent_namespace,
                           selector=selection.agent_selector)
    by_node: dict[str, list[AgentPod]] = {}
    for p in pods:
        by_node.setdefault(p.node, []).append(p)
    client = transport(api, namespace=selection.agent_namespace, port=selection.port,
                       via=selection.via, timeout_s=QUERY_TIMEOUT_S)
    rows = fan_out(lambda n: query_node(n, by_node.get(n.name, []), client,
                                        gaps_params=gaps_params, loss_since=loss_since,
                                        max_backlog=max_backlog),
                   nodes, workers=QUERY_WORKERS, name="ek-fleet", progress=progress)
    names = {n.name for n in nodes}
    orphans = [p for p in pods if p.node not in names and p.node not in selection.exclude]
    return Fleet(rows, sorted(selection.exclude), orphans, rfc3339(datetime.now(UTC)))
