"""``kubectl evidence gaps``: every agent's gap ledger, merged, with the node of each gap."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands import gaps as local
from evidence_keeper.commands.base import EXIT_ERROR, EXIT_OK, subcommand
from evidence_keeper.commands.cluster import gaps_params
from evidence_keeper.commands.common import find_agents
from evidence_keeper.commands.kubectl.cluster import (
    add_kube,
    agent_port,
    ask_all,
    connect,
    on_node,
    warn,
)
from evidence_keeper.commands.render import format_gaps, json_doc
from evidence_keeper.timefmt import now_rfc3339

NAME: Final = "gaps"
EXIT_CODES: Final = """\
exit codes:
  0  every agent answered
  2  at least one agent did not answer (named on stderr; the others' gaps are shown),
     or the API server cannot be reached"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="list the gaps of every agent (through the API"
                                           " server's pod proxy)", exit_codes=EXIT_CODES)
    add_kube(p)
    p.add_argument("--node", help="only the agent on this node")
    local.add_filters(p)
    return p


def run(args: argparse.Namespace) -> int:
    api = connect(args)
    pods = on_node(find_agents(api, args), args.node)
    answers = ask_all(api, args, pods, "/gaps", params=gaps_params(args),
                      port=agent_port(args, api))
    rows: list[dict[str, Any]] = []
    for a in answers:
        if a.error is None:
            rows += [{"node": a.doc.get("node") or a.node, **g} for g in a.doc.get("gaps", [])]
    rows.sort(key=lambda g: (g["start"], g["node"], g["id"]))
    doc = {"nodes": len(answers), "generated_at": now_rfc3339(), "gaps": rows,
           "errors": [{"node": a.node, "pod": a.pod.name, "error": a.error}
                      for a in answers if a.error is not None]}
    print(json_doc(doc) if args.output == "json" else format_gaps(doc, node_column=True))
    return EXIT_ERROR if warn(answers) else EXIT_OK
