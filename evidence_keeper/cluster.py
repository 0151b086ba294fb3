"""``gaps`` and ``preflight``: one agent, every node of the cluster, or the store's ledger.

Three ways to ask "what was lost, and is every log path working?":

* one agent (``--url``): its ``/gaps`` and ``/readyz``, as before;
* every node (``--all-nodes``): the API server's node list is the truth about what must be
  covered, and the agent pods are found by the chart's labels (as ``archive --all-nodes``
  does). Each agent is asked through the API server's pod proxy (or its pod IP, ``--via``).
  The answer is one row per node: agent ready, sinks up per check, shipping current, loss in
  the window; a node with no agent is a named failure, because its logs are preserved by
  nobody. ``preflight --all-nodes`` exits 0 only if every selected node passes;
* the store (``gaps --from-store``): the ledger objects every agent shipped, read with no
  agent running, newest state per gap (``archive/ledger.py``).

The module is shaped like a command package: :func:`add_gaps_parser` / :func:`run_gaps` and
:func:`add_preflight_parser` / :func:`run_preflight`; ``run_*`` return the exit code and print
one clear line on error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from evidence_keeper.api.client import ApiError, call, default_url
from evidence_keeper.archive.ledger import (
    LedgerObject,
    format_ledger_report,
    newest_gaps,
    read_ledger,
    verify_ledger,
)
from evidence_keeper.archive.service import (
    AgentPod,
    ClusterError,
    kube_client,
    list_agent_pods,
)
from evidence_keeper.model import GAP_KINDS
from evidence_keeper.settings import Settings, load_settings, parse_duration
from evidence_keeper.ship.store import Store, StoreError, open_store

AGENT_SELECTOR: Final = "app.kubernetes.io/name=evidence-keeper"
QUERY_WORKERS: Final = 16
NO_AGENT: Final = "no evidence-keeper agent — logs on this node are not preserved"


class CommandError(Exception):
    """A user-facing failure: one line, exit code 2."""


# ------------------------------------------------------------------------------ parsers
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="YAML configuration file (or $EK_CONFIG)")
    p.add_argument("--url", help="one agent's API (default: from the configured listen address)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help="text (a table) or json (for CI)")
    p.add_argument("--json", action="store_const", const="json", dest="output",
                   help="alias of -o json")


def _fleet(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("every node (--all-nodes)")
    g.add_argument("--all-nodes", action="store_true",
                   help="every node of the cluster, through the API server")
    g.add_argument("--kubeconfig", metavar="PATH", help="default: in-cluster, else $KUBECONFIG")
    g.add_argument("--node-selector", metavar="SELECTOR",
                   help="only nodes with these labels (e.g. node-role.kubernetes.io/worker=)")
    g.add_argument("--exclude-node", action="append", default=[], metavar="NODE",
                   help="leave this node out (repeatable, or a comma list)")
    g.add_argument("--agent-namespace", default="evidence-keeper")
    g.add_argument("--agent-selector", default=AGENT_SELECTOR)
    g.add_argument("--agent-port", type=int, help="default: the port of the listen setting")
    g.add_argument("--via", choices=["proxy", "pod-ip"], default="proxy",
                   help="reach agents through the API server's pod proxy or at their pod IPs")


def add_gaps_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "gaps", help="list gaps: one agent's ledger, every node's, or the store's")
    _common(p)
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("--kind", choices=list(GAP_KINDS))
    p.add_argument("--namespace")
    p.add_argument("--open", action="store_true", help="only gaps still open")
    p.add_argument("--from-store", action="store_true",
                   help="read the ledger the agents shipped to the store (no agent needed)")
    p.add_argument("--node", help="with --from-store: only this node's ledger")
    _fleet(p)
    return p


def add_preflight_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "preflight", help="exit 0 only if sinks are up and shipping is current (chaos gate)")
    _common(p)
    p.add_argument("--since", default="1h",
                   help="fail on loss gaps newer than this (RFC3339 or duration; default 1h)")
    p.add_argument("--max-backlog-s", type=float,
                   help="largest acceptable oldest-unshipped age (default: backlog_threshold_s)")
    _fleet(p)
    return p


# ------------------------------------------------------------------------------ helpers
def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def parse_when(value: str | None, name: str, now: datetime) -> datetime | None:
    """RFC3339 or a duration back from ``now`` (as the API's ``since``/``until``)."""
    if value is None:
        return None
    v = value.strip()
    if v and v[0].isdigit() and not re.fullmatch(r"\d{4}-.*", v):
        try:
            return now - timedelta(seconds=parse_duration(v))
        except (ValueError, OverflowError):
            raise CommandError(f"{name}: {value!r} is neither RFC3339 nor a duration"
                               " like 30m") from None
    try:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise CommandError(f"{name}: {value!r} is neither RFC3339 nor a duration"
                           " like 30m") from None
    if ts.tzinfo is None:
        raise CommandError(f"{name}: {value!r} needs a time zone (e.g. Z)")
    return ts.astimezone(UTC)


def _rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _excluded(args: argparse.Namespace) -> set[str]:
    return {n.strip() for item in args.exclude_node for n in item.split(",") if n.strip()}


def _fail(exc: Exception) -> int:
    print(f"evidence-keeper: {exc}", file=sys.stderr)
    return 2


def _modes(args: argparse.Namespace, *, store: bool) -> None:
    chosen = [flag for flag, on in (("--url", bool(args.url)), ("--all-nodes", args.all_nodes),
                                    ("--from-store", store and args.from_store)) if on]
    if len(chosen) > 1:
        raise CommandError(f"{' and '.join(chosen)} exclude each other")
    if not args.all_nodes and (args.exclude_node or args.node_selector):
        raise CommandError("--exclude-node and --node-selector need --all-nodes")


# ------------------------------------------------------------------------------ agents
class AgentClient(Protocol):
    def get(self, pod: AgentPod, path: str, params: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, Any]]: ...


class ProxyClient:
    """GET an agent's API through ``/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/...``."""

    def __init__(self, api: Any, *, namespace: str, port: int, timeout_s: float = 15.0) -> None:
        self.api, self.namespace, self.port, self.timeout_s = api, namespace, port, timeout_s

    def get(self, pod: AgentPod, path: str, params: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        resource = f"/api/v1/namespaces/{self.namespace}/pods/{pod.name}:{self.port}/proxy{path}"
        try:
            req = self.api.param_serialize(
                method="GET", resource_path=resource, query_params=list((params or {}).items()),
                header_params={"Accept": "application/json", "User-Agent": "evidence-keeper"},
                auth_settings=["BearerToken"])
            resp = self.api.call_api(*req, _request_timeout=self.timeout_s)
            status, data = int(resp.status), resp.read()
        except ApiException as exc:
            status, data = int(exc.status or 0), (exc.body or b"")
        except Exception as exc:
            return 0, {"error": f"cannot reach {pod.name} through the API server: {exc}"}
        return status, _doc(data, status)


class PodIPClient:
    """GET an agent's API at ``http://<pod IP>:<port>`` (from inside the cluster)."""

    def __init__(self, *, port: int, timeout_s: float = 15.0) -> None:
        self.port, self.timeout_s = port, timeout_s

    def get(self, pod: AgentPod, path: str, params: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, Any]]:
        if not pod.ip:
            return 0, {"error": f"pod {pod.name} has no IP"}
        try:
            return call(f"http://{pod.ip}:{self.port}", path, params=params,
                        timeout=self.timeout_s, accept_status=(400, 404, 500, 502, 503))
        except ApiError as exc:
            return 0, {"error": str(exc)}


def _doc(data: bytes | str, status: int) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return {"error": text.strip()[:200] or f"empty answer (HTTP {status})"}
    if not isinstance(doc, dict):
        return {"error": "not a JSON object"}
    if doc.get("kind") == "Status":  # the API server's own answer: the pod was not reached
        return {"error": str(doc.get("message") or doc.get("reason") or "API server error")}
    return doc


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    cordoned: bool
    ready: bool


def list_nodes(api: Any, *, selector: str | None) -> list[Node]:
    """The cluster's nodes (by label selector), read as plain JSON."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        core: Any = client.CoreV1Api(api)
        kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": 30}
        if selector:
            kwargs["label_selector"] = selector
        doc = json.loads(core.list_node(**kwargs).read())
    except ApiException as exc:
        raise ClusterError(f"cannot list nodes: HTTP {exc.status} {exc.reason}") from None
    except Exception as exc:
        raise ClusterError(f"cannot list nodes: {exc}") from None
    out = []
    for item in doc.get("items") or []:
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


def query_node(node: Node, pods: Sequence[AgentPod], client: AgentClient, *,
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
    status, ready = client.get(pod, "/readyz")
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
    status, gaps = client.get(pod, "/gaps", gaps_params)
    if status != 200:
        row.failures.append(f"node {node.name}: /gaps failed ({gaps.get('error')})")
        gaps = {"gaps": []}
    row.gaps = [{**g, "node": node.name} for g in gaps.get("gaps", [])]
    _loss_summary(row, row.gaps)
    loss = {"gaps": [g for g in row.gaps if g.get("kind") == "loss"]}
    for ok, text in agent_checks(ready, loss, since=loss_since, max_backlog=max_backlog):
        if not ok:
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


def survey(args: argparse.Namespace, settings: Settings, *, gaps_params: dict[str, str],
           loss_since: str, max_backlog: float,
           progress: Callable[[int, int], None] | None = None) -> Fleet:
    """Every selected node with its agent's answers (blocking; agents asked in parallel)."""
    api = kube_client(args.kubeconfig)
    nodes = list_nodes(api, selector=args.node_selector)
    excluded = _excluded(args)
    unknown = excluded - {n.name for n in nodes}
    if unknown:
        raise CommandError(f"--exclude-node: no node named {', '.join(sorted(unknown))}")
    nodes = [n for n in nodes if n.name not in excluded]
    if not nodes:
        raise CommandError("no nodes selected" + (f" by {args.node_selector!r}"
                                                  if args.node_selector else ""))
    pods = list_agent_pods(api, namespace=args.agent_namespace, selector=args.agent_selector)
    by_node: dict[str, list[AgentPod]] = {}
    for p in pods:
        by_node.setdefault(p.node, []).append(p)
    port = args.agent_port or settings.listen_port
    client: AgentClient = (ProxyClient(api, namespace=args.agent_namespace, port=port)
                           if args.via == "proxy" else PodIPClient(port=port))
    rows: list[NodeRow] = []
    with ThreadPoolExecutor(max_workers=QUERY_WORKERS, thread_name_prefix="ek-fleet") as pool:
        futures = [pool.submit(query_node, n, by_node.get(n.name, []), client,
                               gaps_params=gaps_params, loss_since=loss_since,
                               max_backlog=max_backlog) for n in nodes]
        for done, fut in enumerate(futures, start=1):
            rows.append(fut.result())
            if progress is not None:
                progress(done, len(futures))
    names = {n.name for n in nodes}
    orphans = [p for p in pods if p.node not in names and p.node not in excluded]
    return Fleet(rows, sorted(excluded), orphans, _rfc3339(datetime.now(UTC)))


class _Progress:
    """``asked N/M agents`` on stderr, only when the survey takes longer than 2 s."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.started >= 2.0 and (now - self.last >= 5.0 or done == total):
            self.last = now
            print(f"asked {done}/{total} agents", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ rendering
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


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_fleet(fleet: Fleet, *, window: str) -> str:
    rows: list[Sequence[str]] = [("NODE", "AGENT", "SINKS", "SHIPPING", f"LOSS ({window})",
                                  "VERDICT")]
    for r in fleet.rows:
        rows.append((r.node, _agent_text(r), _sinks_text(r), _shipping_text(r), _loss_text(r),
                     "ok" if r.ok else "FAIL"))
    lines = [table(rows)]
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


def format_gaps(doc: dict[str, Any], *, with_node: bool = False) -> str:
    """The gaps table (``doc`` as ``/gaps`` returns it); ``with_node`` adds a NODE column."""
    head = ("NODE",) if with_node else ()
    rows: list[Sequence[str]] = [(*head, "ID", "KIND", "START", "END", "WHAT", "DETAIL")]
    for g in doc["gaps"]:
        if g["kind"] == "loss":
            what = (f"{g.get('namespace')}/{g.get('pod')}/{g.get('container')}#{g.get('restart')}"
                    f" @{g.get('offset')} +{g.get('bytes') if g.get('bytes') is not None else '?'}"
                    f" {g.get('reason', '')}")
        else:
            what = " ".join(str(x) for x in (g.get("sink"), g.get("check"), g.get("reason"))
                            if x)
        detail = g.get("detail") or ""
        cov = g.get("coverage")
        if cov:
            detail = (f"coverage: {cov['streams']} streams, {cov['captured_bytes']} B captured,"
                      f" {cov['shipped_bytes']} B shipped; {detail}")
        node = (str(g.get("node")),) if with_node else ()
        rows.append((*node, str(g["id"]), g["kind"], g["start"][:19], (g["end"] or "open")[:19],
                     what, detail[:90]))
    lines = [table(rows)]
    n = len(doc.get("nodes") or [])
    where = f"{n} node{'' if n == 1 else 's'}" if with_node else f"node {doc['node']}"
    lines.append(f"{len(doc['gaps'])} gaps on {where} (generated {doc['generated_at']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ gaps
def _gaps_params(args: argparse.Namespace) -> dict[str, str]:
    params = {k: getattr(args, k) for k in ("since", "until", "kind", "namespace")
              if getattr(args, k)}
    if args.open:
        params["open"] = "true"
    return params


def run_gaps(args: argparse.Namespace) -> int:
    try:
        _modes(args, store=True)
        if args.node and not args.from_store:
            raise CommandError("--node reads one node's ledger from the store: add --from-store"
                               " (or use --all-nodes)")
        if args.from_store:
            return _gaps_from_store(args)
        if args.all_nodes:
            return _gaps_all_nodes(args)
        _, doc = call(_url(args), "/gaps", params=_gaps_params(args))
    except (CommandError, ApiError, ClusterError, StoreError) as exc:
        return _fail(exc)
    print(json.dumps(doc, indent=2) if args.output == "json" else format_gaps(doc))
    return 0


def _url(args: argparse.Namespace) -> str:
    return str(args.url) if args.url else default_url(_settings(args).listen)


def _gaps_all_nodes(args: argparse.Namespace) -> int:
    settings = _settings(args)
    now = datetime.now(UTC)
    parse_when(args.since, "--since", now)  # a bad value is one line here, not N agent errors
    parse_when(args.until, "--until", now)
    fleet = survey(args, settings, gaps_params=_gaps_params(args),
                   loss_since=args.since or "the start of the ledger",
                   max_backlog=settings.backlog_threshold_s, progress=_Progress())
    silent = [r.node for r in fleet.rows if r.agent not in ("ready", "not-ready")]
    gaps = [g for r in fleet.rows for g in r.gaps]
    if silent:
        # What those agents shipped before they went quiet: the store's ledger knows.
        shipped, _objects, _store = _store_gaps(args, settings, silent)
        gaps += [{**g, "source": "store"} for g in shipped]
    gaps.sort(key=lambda g: (str(g.get("start")), str(g["node"]), int(g["id"])))
    complete = not silent
    if args.output == "json":
        doc = fleet_json(fleet, window_since=args.since)
        doc["complete"] = complete
        doc["gaps"] = gaps
        print(json.dumps(doc, indent=2))
    else:
        print(format_fleet(fleet, window=args.since or "all"))
        print()
        print(format_gaps({"gaps": gaps, "nodes": fleet.rows,
                           "generated_at": fleet.generated_at}, with_node=True))
        if not complete:
            print(f"no live answer from {', '.join(silent)}: their gaps above are what their"
                  " agents shipped to the store's ledger before", file=sys.stderr)
    return 0 if complete else 1


def _store_gaps(args: argparse.Namespace, settings: Settings, nodes: list[str] | None,
                ) -> tuple[list[dict[str, Any]], list[LedgerObject], Store]:
    """The newest state of the nodes' gaps from the store's ledger, filtered as ``/gaps``."""
    now = datetime.now(UTC)
    since = parse_when(args.since, "--since", now)
    until = parse_when(args.until, "--until", now)
    if since and until and since > until:
        raise CommandError("--since is after --until")
    store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    objects = read_ledger(store, settings.cluster, nodes=nodes, progress=_Progress())
    gaps = newest_gaps(objects, since=since, until=until, kind=args.kind)
    if args.namespace:
        gaps = [g for g in gaps if g.get("namespace") == args.namespace]
    if args.open:
        gaps = [g for g in gaps if g.get("end") is None]
    return gaps, objects, store


def _gaps_from_store(args: argparse.Namespace) -> int:
    settings = _settings(args)
    gaps, objects, store = _store_gaps(args, settings, [args.node] if args.node else None)
    problems = [(o.key, p) for o in objects for p in o.problems]
    for key, p in problems:
        print(f"warning: {key}: {p} (run `evidence-keeper verify --ledger`)", file=sys.stderr)
    nodes = sorted({o.node for o in objects})
    doc = {"cluster": settings.cluster, "store": store.describe(),
           "generated_at": _rfc3339(datetime.now(UTC)), "nodes": nodes,
           "objects": len(objects), "damaged_objects": sorted({k for k, _ in problems}),
           "gaps": gaps}
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(format_gaps(doc, with_node=True))
        print(f"read {len(objects)} ledger objects of {len(nodes)}"
              f" node{'' if len(nodes) == 1 else 's'} from {store.describe()}", file=sys.stderr)
    if not objects:
        print(f"no ledger objects in {store.describe()} for cluster {settings.cluster}"
              + (f" node {args.node}" if args.node else ""), file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ verify --ledger
def add_verify_ledger_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", action="store_true",
                   help="check the gap ledger's chains in the store instead of an archive")
    p.add_argument("--node", help="with --ledger: only this node's chain")


def run_verify_ledger(args: argparse.Namespace) -> int:
    """``verify --ledger``: every ledger chain (or one node's) as segment chains are checked."""
    try:
        if not args.ledger:
            raise CommandError("verify needs an ARCHIVE_ID, or --ledger for the gap ledger")
        if args.archive_id is not None:
            raise CommandError("verify --ledger takes no ARCHIVE_ID (an archive's ledger"
                               " objects are checked with the archive)")
        settings = _settings(args)
        store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        report = verify_ledger(store, settings.cluster,
                               nodes=[args.node] if args.node else None, progress=_Progress())
    except (CommandError, StoreError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_ledger_report(report, f"{store.describe()} (cluster {settings.cluster})"))
    if report.objects == 0:
        print("no ledger objects found" + (f" for node {args.node}" if args.node else ""),
              file=sys.stderr)
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------ preflight
def run_preflight(args: argparse.Namespace) -> int:
    try:
        _modes(args, store=False)
        if args.all_nodes:
            return _preflight_all_nodes(args)
        return _preflight_one(args)
    except (CommandError, ApiError, ClusterError, StoreError) as exc:
        return _fail(exc)


def _max_backlog(args: argparse.Namespace) -> float:
    if args.max_backlog_s is not None:
        return float(args.max_backlog_s)
    return _settings(args).backlog_threshold_s if not args.url else 60.0


def _preflight_one(args: argparse.Namespace) -> int:
    """The gate a chaos test runs first: every sink up, store current, no recent loss."""
    url = _url(args)
    max_backlog = _max_backlog(args)
    _, ready = call(url, "/readyz", accept_status=(503,))
    _, loss = call(url, "/gaps", params={"kind": "loss", "since": args.since})
    checks = agent_checks(ready, loss, since=args.since, max_backlog=max_backlog)
    problems = [text for ok, text in checks if not ok]
    if args.output == "json":
        print(json.dumps({"ok": not problems, "node": ready.get("node"),
                          "checks": [{"ok": ok, "check": text} for ok, text in checks]},
                         indent=2))
    else:
        for ok, text in checks:
            print(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    if problems:
        print(f"preflight failed: {len(problems)} problem(s); evidence would be at risk",
              file=sys.stderr)
        return 1
    if args.output != "json":
        print("preflight passed: sinks up, shipping current, no recent loss")
    return 0


def _preflight_all_nodes(args: argparse.Namespace) -> int:
    settings = _settings(args)
    since = parse_when(args.since, "--since", datetime.now(UTC))
    assert since is not None
    max_backlog = (args.max_backlog_s if args.max_backlog_s is not None
                   else settings.backlog_threshold_s)
    fleet = survey(args, settings,
                   gaps_params={"kind": "loss", "since": _rfc3339(since)},
                   loss_since=args.since, max_backlog=max_backlog, progress=_Progress())
    if args.output == "json":
        print(json.dumps(fleet_json(fleet, window_since=_rfc3339(since)), indent=2))
        if not fleet.ok:  # CI logs show stderr even when they keep the JSON as an artifact
            print(verdict(fleet), file=sys.stderr)
    else:
        print(format_fleet(fleet, window=args.since))
        print(verdict(fleet))
    return 0 if fleet.ok else 1


__all__ = ["add_gaps_parser", "add_preflight_parser", "add_verify_ledger_arguments",
           "format_gaps", "run_gaps", "run_preflight", "run_verify_ledger"]
