"""``evidence-keeper preflight``: the gate a chaos test runs first — every sink up, shipping
current, no recent loss. Exit 0 only if every check passes."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from evidence_keeper.api.client import call
from evidence_keeper.commands import cluster
from evidence_keeper.commands.base import EXIT_NEGATIVE, EXIT_OK, subcommand
from evidence_keeper.commands.common import add_config, add_output, agent_url, settings
from evidence_keeper.commands.render import Check, format_checks, json_doc
from evidence_keeper.fleet import agent_checks

NAME: Final = "preflight"
DEFAULT_MAX_BACKLOG_S: Final = 60.0  # with --url and no config: the default backlog threshold
EXIT_CODES: Final = """\
exit codes:
  0  every check passed: agent ready, sinks up, shipping current, no recent loss
     (--all-nodes: on every schedulable node, each of which has an agent)
  1  at least one check failed (each is listed; -o json for a machine-readable report)
  2  error: the agent cannot be reached, bad arguments or configuration"""


def add_checks(p: argparse.ArgumentParser) -> None:
    """The thresholds (shared with ``kubectl evidence preflight``)."""
    p.add_argument("--since", default="1h",
                   help="fail on loss gaps newer than this (RFC3339 or duration; default 1h)")
    p.add_argument("--max-backlog-s", type=float,
                   help="largest acceptable oldest-unshipped age (default: backlog_threshold_s)")
    add_output(p, json_help="{ok, url, checks: [{ok, check}]}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="exit 0 only if sinks are up and shipping is current"
                                           " (chaos gate)", exit_codes=EXIT_CODES)
    add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    add_checks(p)
    cluster.add_fleet(p)
    return p


def checks(ready: dict[str, Any], loss: dict[str, Any], *, since: str, max_backlog: float,
           node: str | None = None) -> list[Check]:
    """The gate's checks from one agent's ``/readyz`` and ``/gaps?kind=loss`` documents."""
    return [Check(ok, text, node)
            for ok, text in agent_checks(ready, loss, since=since, max_backlog=max_backlog)]


def report(results: list[Check], *, output: str, where: dict[str, Any]) -> int:
    """Print the checks (text or JSON) and the verdict; the exit code."""
    failed = [c for c in results if not c.ok]
    if output == "json":
        print(json_doc({"ok": not failed, **where, "checks": [c.to_json() for c in results]}))
    else:
        print(format_checks(results))
    if failed:
        print(f"preflight failed: {len(failed)} problem(s); evidence would be at risk",
              file=sys.stderr)
        return EXIT_NEGATIVE
    if output != "json":
        print("preflight passed: sinks up, shipping current, no recent loss")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.all_nodes or args.exclude_node or args.node_selector:
        return cluster.run_preflight(args)
    url = agent_url(args)
    max_backlog = args.max_backlog_s
    if max_backlog is None:
        max_backlog = (settings(args).backlog_threshold_s if not args.url
                       else DEFAULT_MAX_BACKLOG_S)
    _, ready = call(url, "/readyz", accept_status=(503,))
    _, loss = call(url, "/gaps", params={"kind": "loss", "since": args.since})
    results = checks(ready, loss, since=args.since, max_backlog=max_backlog)
    return report(results, output=args.output, where={"url": url})
