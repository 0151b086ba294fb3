"""``kubectl evidence preflight``: the chaos gate for the whole cluster — every agent ready,
its sinks up, its shipping current, no recent loss. An agent that does not answer fails it."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands import preflight as local
from evidence_keeper.commands.base import subcommand
from evidence_keeper.commands.common import find_agents
from evidence_keeper.commands.kubectl.cluster import (
    add_kube,
    agent_port,
    ask_all,
    cluster_settings,
    connect,
    on_node,
)
from evidence_keeper.commands.render import Check

NAME: Final = "preflight"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="exit 0 only if every agent is ready, its sinks up and"
                                           " its shipping current (chaos gate)",
                   exit_codes=local.EXIT_CODES)
    add_kube(p)
    p.add_argument("--node", help="only the agent on this node")
    local.add_checks(p)
    return p


def run(args: argparse.Namespace) -> int:
    api = connect(args)
    pods = on_node(find_agents(api, args), args.node)
    max_backlog = args.max_backlog_s
    if max_backlog is None:
        max_backlog = cluster_settings(api, args).backlog_threshold_s
    port = agent_port(args, api)
    ready = ask_all(api, args, pods, "/readyz", port=port, accept=(503,))
    loss = ask_all(api, args, pods, "/gaps", params={"kind": "loss", "since": args.since},
                   port=port)
    results: list[Check] = []
    for r, g in zip(ready, loss, strict=True):
        problem = r.error or g.error
        if problem is not None:
            results.append(Check(False, f"agent {r.pod.name} answers: {problem}", r.node))
            continue
        results += local.checks(r.doc, g.doc, since=args.since, max_backlog=max_backlog,
                                node=r.node)
    return local.report(results, output=args.output,
                        where={"agents": [p.name for p in pods]})
