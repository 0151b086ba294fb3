"""``evidence-keeper archive``: seal and archive the evidence of a scope (``POST /archive``),
on one agent (``--url``) or on every agent of the DaemonSet (``--all-nodes``, through the API
server's pod proxy or at the pod IPs), then a cluster manifest."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from typing import Any, Final

from evidence_keeper.agents import transport
from evidence_keeper.api.client import call
from evidence_keeper.archive.cluster import (
    ClusterResult,
    NodeArchive,
    cluster_archive,
)
from evidence_keeper.archive.manifest import Scope
from evidence_keeper.commands.base import (
    EXIT_NEGATIVE,
    EXIT_OK,
    CliError,
    subcommand,
)
from evidence_keeper.commands.common import (
    add_agents,
    add_config,
    add_namespace,
    add_output,
    agent_url,
    find_agents,
    flag_scope,
    kube_api,
    read_store,
    settings,
    token,
)
from evidence_keeper.commands.render import json_doc
from evidence_keeper.settings import Settings
from evidence_keeper.store import StoreError

NAME: Final = "archive"
EXIT_CODES: Final = """\
exit codes:
  0  accepted (without --wait), or the archive is complete (on every node with --all-nodes)
  1  the archive failed (on at least one node)
  2  error: bad arguments, no token, the agent or the API server cannot be reached"""


def add_scope(p: argparse.ArgumentParser, *,
              token_help: str = "default: archive_token_file") -> None:
    """What to archive and why (shared with ``kubectl evidence archive``)."""
    add_namespace(p, required=True, help="the namespace whose evidence is kept")
    p.add_argument("--pod", help="pod name or glob (* ? [...])")
    p.add_argument("--container", help="container name or glob")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m (default: all)")
    p.add_argument("--until", help="RFC3339 or a duration back from now (default: now)")
    p.add_argument("--reason", required=True, help="why the evidence is kept (in the manifest)")
    p.add_argument("--label", help="idempotency key: the same label gives the same archive")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    p.add_argument("--token-file", metavar="PATH", help=token_help)
    add_output(p, json_help="the final archive document")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="seal and archive the evidence of a scope"
                                           " (POST /archive)", exit_codes=EXIT_CODES)
    add_config(p)
    add_scope(p)
    p.add_argument("--wait", action="store_true", help="wait for the manifest, with progress")
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--all-nodes", action="store_true",
                   help="every agent of the DaemonSet, then a cluster manifest (implies --wait)")
    add_agents(p, kubeconfig_help="default: in-cluster, else $KUBECONFIG")
    p.add_argument("--via", choices=["proxy", "pod-ip"], default="proxy",
                   help="reach agents through the API server's pod proxy or at their pod IPs")
    return p


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    body: dict[str, Any] = {"namespace": args.namespace, "reason": args.reason,
                            "requester": f"{user}@{socket.gethostname()}"[:256]}
    for key in ("pod", "container", "since", "until", "label"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


def run(args: argparse.Namespace) -> int:
    cfg = settings(args)
    secret = token(args, cfg)
    body = request_body(args)
    if args.all_nodes:
        scope = flag_scope(args)
        return all_nodes(args, cfg, body, secret, scope, api=kube_api(args.kubeconfig),
                         via=args.via)
    return one_agent(args, body, secret)


def one_agent(args: argparse.Namespace, body: dict[str, Any], secret: str) -> int:
    url = agent_url(args)
    _, doc = call(url, "/archive", method="POST", body=body, token=secret)
    print(f"archive {doc['id']} accepted by {url}: {doc['status']}", file=sys.stderr)
    if args.wait or doc["status"] in ("complete", "failed"):
        doc = _wait(url, doc, secret, args.timeout)
    if args.output == "json":
        print(json_doc(doc))
    else:
        print(doc["id"])
    return EXIT_NEGATIVE if doc["status"] == "failed" else EXIT_OK


def _wait(url: str, doc: dict[str, Any], secret: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    started, shown = time.monotonic(), ""
    while doc["status"] in ("pending", "running"):
        if time.monotonic() > deadline:
            raise CliError(f"archive {doc['id']} not complete after {timeout:g}s"
                           f" ({doc.get('stage')})")
        time.sleep(0.3)
        _, doc = call(url, f"/archives/{doc['id']}", token=secret)
        line = f"{doc['status']}: {doc.get('stage') or ''}"
        if line != shown:
            shown = line
            print(f"  {time.monotonic() - started:6.1f}s  {line}", file=sys.stderr)
    if doc["status"] == "failed":
        print(f"archive {doc['id']} failed: {doc.get('error')}", file=sys.stderr)
    else:
        print(f"archive {doc['id']} complete: {doc['manifest_key']}", file=sys.stderr)
    return doc


def all_nodes(args: argparse.Namespace, cfg: Settings, body: dict[str, Any], secret: str,
              scope: Scope, *, api: Any, via: str) -> int:
    """Archive on every agent, then write the cluster manifest (the caller's store access)."""
    store = read_store(cfg)
    port = args.agent_port or cfg.listen_port
    pods = find_agents(api, args)
    print(f"triggering {len(pods)} agents: {', '.join(p.node or p.name for p in pods)}",
          file=sys.stderr)
    agents = transport(api, namespace=args.agent_namespace, port=port, via=via)
    started = time.monotonic()
    shown: dict[str, str] = {}

    def progress(nodes: list[NodeArchive]) -> None:
        for n in nodes:
            line = f"{n.status}: {n.error or n.stage}".rstrip(": ")
            if shown.get(n.agent_pod) != line:
                shown[n.agent_pod] = line
                print(f"  {time.monotonic() - started:6.1f}s  {n.node or n.agent_pod}: {line}",
                      file=sys.stderr)

    try:
        result = cluster_archive(store, cluster=cfg.cluster, pods=pods,
                                 transport=agents, body=body, token=secret, scope=scope,
                                 timeout_s=args.timeout, progress=progress,
                                 object_lock_days=cfg.object_lock_days)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    done = sum(n.status == "complete" for n in result.nodes)
    print(f"cluster archive {result.id}: {done}/{len(result.nodes)} nodes complete,"
          f" {result.segments} segments; manifest {result.manifest_key}", file=sys.stderr)
    print(json_doc(cluster_json(result)) if args.output == "json" else result.id)
    return EXIT_OK if result.complete else EXIT_NEGATIVE


def cluster_json(result: ClusterResult) -> dict[str, Any]:
    return {"id": result.id, "status": "complete" if result.complete else "failed",
            "manifest_key": result.manifest_key, "segments": result.segments,
            "nodes": [{"node": n.node, "agent_pod": n.agent_pod, "archive_id": n.archive_id,
                       "status": n.status, "manifest_key": n.manifest_key, "error": n.error}
                      for n in result.nodes]}
