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

The fleet itself (nodes, agents, rows) is :mod:`evidence_keeper.fleet`, its table, verdict and
JSON report :mod:`evidence_keeper.commands.render`; the store's ledger is
:mod:`evidence_keeper.archive.ledger`. The ``gaps``, ``preflight`` and ``verify`` command
modules add :func:`add_fleet` (and :func:`add_verify_ledger_arguments`) to their parsers and
hand these modes to :func:`run_gaps`, :func:`run_preflight` and :func:`run_verify_ledger`,
which return the exit code and print one clear line on error (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from evidence_keeper import timefmt
from evidence_keeper.agents import kube_client
from evidence_keeper.api.client import ApiError, call, default_url
from evidence_keeper.archive.cluster import ClusterError
from evidence_keeper.archive.ledger import (
    LedgerObject,
    format_ledger_report,
    newest_gaps,
    read_ledger,
    verify_ledger,
)
from evidence_keeper.commands.common import Progress, add_agents
from evidence_keeper.commands.render import fleet_json, format_fleet, format_gaps, verdict
from evidence_keeper.fleet import (
    Selection,
    agent_checks,
    survey,
)
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.store import Store, StoreError, open_store


class CommandError(Exception):
    """A user-facing failure: one line, exit code 2."""


# ------------------------------------------------------------------------------ parsers
def add_fleet(p: argparse.ArgumentParser) -> None:
    """``--all-nodes`` and how to find the nodes and their agents (gaps, preflight)."""
    g = p.add_argument_group("every node (--all-nodes)")
    g.add_argument("--all-nodes", action="store_true",
                   help="every node of the cluster, through the API server")
    add_agents(g, kubeconfig_help="default: in-cluster, else $KUBECONFIG")
    g.add_argument("--node-selector", metavar="SELECTOR",
                   help="only nodes with these labels (e.g. node-role.kubernetes.io/worker=)")
    g.add_argument("--exclude-node", action="append", default=[], metavar="NODE",
                   help="leave this node out (repeatable, or a comma list)")
    g.add_argument("--via", choices=["proxy", "pod-ip"], default="proxy",
                   help="reach agents through the API server's pod proxy or at their pod IPs")


# ------------------------------------------------------------------------------ helpers
def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def parse_when(value: str | None, name: str, now: datetime) -> datetime | None:
    """RFC3339 or a duration back from ``now`` (as the API's ``since``/``until``)."""
    if value is None:
        return None
    try:
        return timefmt.parse_time(value, name, now)
    except timefmt.TimeError as exc:
        raise CommandError(str(exc)) from None


def _selection(args: argparse.Namespace, settings: Settings) -> Selection:
    return Selection(
        node_selector=args.node_selector,
        exclude=frozenset(n.strip() for item in args.exclude_node for n in item.split(",")
                          if n.strip()),
        agent_namespace=args.agent_namespace, agent_selector=args.agent_selector,
        port=args.agent_port or settings.listen_port, via=args.via)


def _survey(args: argparse.Namespace, settings: Settings, **kw: Any) -> Any:
    try:
        with _progress("asked", "agents") as progress:
            return survey(kube_client(args.kubeconfig), _selection(args, settings),
                          progress=progress, **kw)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def _progress(verb: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """The commands' shared :class:`Progress` (after 2 s, on stderr), ended on exit."""
    p = Progress(verb, unit=unit)
    try:
        yield p.update
    finally:
        p.close()


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


# ------------------------------------------------------------------------------ gaps
def gaps_params(args: argparse.Namespace) -> dict[str, str]:
    """The ``/gaps`` query of the filter flags (``gaps.add_filters``)."""
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
        _, doc = call(_url(args), "/gaps", params=gaps_params(args))
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
    fleet = _survey(args, settings, gaps_params=gaps_params(args),
                    loss_since=args.since or "the start of the ledger",
                    max_backlog=settings.backlog_threshold_s)
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
                           "generated_at": fleet.generated_at}, node_column=True))
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
    with _progress("read", "ledger objects") as progress:
        objects = read_ledger(store, settings.cluster, nodes=nodes, progress=progress)
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
           "generated_at": timefmt.rfc3339(datetime.now(UTC)), "nodes": nodes,
           "objects": len(objects), "damaged_objects": sorted({k for k, _ in problems}),
           "gaps": gaps}
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(format_gaps(doc, node_column=True))
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
        with _progress("verified", "ledger objects") as progress:
            report = verify_ledger(store, settings.cluster,
                                   nodes=[args.node] if args.node else None,
                                   progress=progress)
    except (CommandError, StoreError) as exc:
        return _fail(exc)
    if args.output == "json":
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
    fleet = _survey(args, settings, gaps_params={"kind": "loss", "since": timefmt.rfc3339(since)},
                    loss_since=args.since, max_backlog=max_backlog)
    if args.output == "json":
        print(json.dumps(fleet_json(fleet, window_since=timefmt.rfc3339(since)), indent=2))
        if not fleet.ok:  # CI logs show stderr even when they keep the JSON as an artifact
            print(verdict(fleet), file=sys.stderr)
    else:
        print(format_fleet(fleet, window=args.since))
        print(verdict(fleet))
    return 0 if fleet.ok else 1


__all__ = ["add_fleet", "add_verify_ledger_arguments", "gaps_params", "run_gaps",
           "run_preflight", "run_verify_ledger"]
