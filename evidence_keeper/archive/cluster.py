"""An archive of a scope on every node: the cluster manifest over the node manifests.

:func:`cluster_archive` triggers each agent (through an :class:`AgentTransport`: the API
server's pod proxy or pod IPs, see :mod:`evidence_keeper.agents`) with the same label, waits for
the node manifests, and writes a cluster manifest listing them with their digests, plus any
segments of the scope that no reachable agent covered (nodes that are gone) and those nodes'
gap-ledger objects. Blocking: the CLI runs it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from evidence_keeper.archive.ledger import window_entries
from evidence_keeper.archive.manifest import (
    MANIFEST_VERSION,
    Scope,
    archive_id,
    encode,
    load_manifest,
    manifest_full_key,
    manifest_key,
    manifest_meta,
    seal,
    select_segments,
)
from evidence_keeper.discover.lifecycle import LifecycleLedger, read_lifecycle
from evidence_keeper.store import Store
from evidence_keeper.timefmt import rfc3339


def _now() -> str:
    return rfc3339(datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class AgentPod:
    name: str
    node: str
    ip: str
    ready: bool


class AgentTransport(Protocol):
    """One request to one agent: ``(status, JSON object)``, status 0 when nothing answered."""

    def request(self, pod: AgentPod, method: str, path: str, *,
                params: Mapping[str, str] | None = None, body: dict[str, Any] | None = None,
                token: str | None = None) -> tuple[int, dict[str, Any]]: ...


class ClusterError(Exception):
    pass


def lifecycle_records(store: Store, cluster: str, scope: Scope, *, nodes: Collection[str] | None,
                      exclude: Collection[str] = (), local: object = None,
                      ) -> list[dict[str, Any]]:
    """Lifecycle records of the scope's pods in the window, on ``nodes`` (None: any node)."""
    glob = scope.pod is not None and any(c in scope.pod for c in "*?[")
    records = read_lifecycle(
        store, cluster=cluster, namespace=scope.namespace,
        pod=None if glob or scope.pod is None else scope.pod, since=scope.since,
        until=scope.until, local=local if isinstance(local, LifecycleLedger) else None)
    return [r for r in records if scope.matches_pod(str(r.get("pod", "")))
            and (nodes is None or r.get("node") in nodes) and r.get("node") not in exclude]


@dataclass
class NodeArchive:
    node: str
    agent_pod: str
    archive_id: str | None = None
    status: str = "pending"
    manifest_key: str | None = None
    manifest_digest: str | None = None
    error: str | None = None
    stage: str = ""


@dataclass
class ClusterResult:
    id: str
    manifest_key: str
    nodes: list[NodeArchive] = field(default_factory=list)
    segments: int = 0  # in node manifests and uncovered

    @property
    def complete(self) -> bool:
        return all(n.status == "complete" for n in self.nodes)


def _trigger(pod: AgentPod, transport: AgentTransport, *, body: dict[str, Any],
             token: str) -> NodeArchive:
    """``POST /archive`` on one agent; its entry, failed at once if the agent refused."""
    entry = NodeArchive(node=pod.node, agent_pod=pod.name)
    status, doc = transport.request(pod, "POST", "/archive", body=body, token=token)
    if status == 202 and isinstance(doc.get("id"), str):
        entry.archive_id, entry.status = doc["id"], str(doc.get("status", "pending"))
        entry.manifest_key, entry.error = doc.get("manifest_key"), doc.get("error")
    else:
        entry.status = "failed"
        entry.error = f"HTTP {status}: {doc.get('error', 'no answer')}" if status else str(
            doc.get("error"))
    return entry


def _wait_nodes(nodes: list[NodeArchive], by_name: Mapping[str, AgentPod],
                transport: AgentTransport, *, token: str, timeout_s: float, poll_s: float,
                progress: Callable[[list[NodeArchive]], None] | None) -> None:
    """Poll every pending node archive until it ends or the deadline fails it."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [n for n in nodes if n.status in ("pending", "running")]
        if progress is not None:
            progress(nodes)
        if not waiting:
            return
        if time.monotonic() > deadline:
            for n in waiting:
                n.status, n.error = "failed", f"not complete after {timeout_s:g}s ({n.stage})"
            return
        time.sleep(poll_s)
        for n in waiting:
            status, doc = transport.request(by_name[n.agent_pod], "GET",
                                            f"/archives/{n.archive_id}", token=token)
            if status != 200:
                n.stage = f"HTTP {status}: {doc.get('error')}"
                continue  # a transient proxy error; the deadline decides
            n.status = str(doc.get("status"))
            n.stage = str(doc.get("stage") or "")
            n.error = doc.get("error")
            n.manifest_key = doc.get("manifest_key")


def cluster_archive(store: Store, *, cluster: str, pods: Sequence[AgentPod],
                    transport: AgentTransport, body: dict[str, Any], token: str,
                    scope: Scope, timeout_s: float = 600.0, poll_s: float = 0.5,
                    object_lock_days: int = 0,
                    progress: Callable[[list[NodeArchive]], None] | None = None,
                    ) -> ClusterResult:
    """Archive ``scope`` on every agent and write the cluster manifest (blocking)."""
    label = body.get("label") or f"cluster-{secrets.token_hex(8)}"
    body = {**body, "label": label}
    cid = archive_id("cluster", cluster, label)
    result = ClusterResult(cid, manifest_full_key(store, cluster, cid))
    for pod in pods:
        result.nodes.append(_trigger(pod, transport, body=body, token=token))
    _wait_nodes(result.nodes, {p.name: p for p in pods}, transport, token=token,
                timeout_s=timeout_s, poll_s=poll_s, progress=progress)
    covered: set[str] = set()
    for n in result.nodes:
        if n.status == "complete" and n.archive_id is not None:
            try:
                node_doc, _ = load_manifest(store, cluster, n.archive_id)
            except Exception as exc:
                n.status, n.error = "failed", f"node manifest unreadable: {exc}"
                continue
            n.manifest_digest = str(node_doc.get("digest"))
            result.segments += len(node_doc.get("segments") or [])
            covered.add(n.node)
    uncovered = select_segments(store, cluster=cluster, scope=scope, exclude_nodes=covered)
    result.segments += len(uncovered.segments)
    doc = seal({
        "version": MANIFEST_VERSION, "kind": "cluster", "id": cid, "created_at": _now(),
        "node": None, "cluster": cluster, "store": store.describe(), "request": body,
        "window": scope.window_json(), "requester": {"name": body.get("requester")},
        "nodes": [asdict(n) for n in result.nodes],
        "segments": [e.to_json() for e in uncovered.segments],
        "lifecycle": lifecycle_records(store, cluster, scope, nodes=None, exclude=covered),
        "gaps": [],
        # Nodes no node manifest speaks for (gone, or their archive failed): their ledgers.
        "ledger": window_entries(store, cluster, since=scope.since, until=scope.until,
                                 exclude=covered),
    })
    retain = None
    if object_lock_days > 0:
        retain = datetime.now(UTC) + timedelta(days=object_lock_days)
    store.put(manifest_key(cluster, cid), encode(doc), manifest_meta(doc), retain_until=retain)
    return result
