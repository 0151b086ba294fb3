"""``evidence-keeper gaps``: the gap ledger of a running agent (``GET /gaps``), of every node
(``--all-nodes``) or of the store (``--from-store``, see :mod:`.cluster`)."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.api.client import call
from evidence_keeper.commands import cluster
from evidence_keeper.commands.base import subcommand
from evidence_keeper.commands.common import add_config, add_namespace, add_output, agent_url
from evidence_keeper.commands.render import format_gaps, json_doc
from evidence_keeper.model import GAP_KINDS

NAME: Final = "gaps"


def add_filters(p: argparse.ArgumentParser) -> None:
    """The ``/gaps`` filters (shared with ``kubectl evidence gaps``)."""
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("--kind", choices=list(GAP_KINDS))
    add_namespace(p, help="only gaps of this namespace")
    p.add_argument("--open", action="store_true", help="only gaps still open")
    add_output(p, json_help="the API's JSON document")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME,
                   help="list gaps: one agent's ledger, every node's, or the store's")
    add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    add_filters(p)
    p.add_argument("--from-store", action="store_true",
                   help="read the ledger the agents shipped to the store (no agent needed)")
    p.add_argument("--node", help="with --from-store: only this node's ledger")
    cluster.add_fleet(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.from_store or args.all_nodes or args.node or args.exclude_node or (
            args.node_selector):
        return cluster.run_gaps(args)
    _, doc = call(agent_url(args), "/gaps", params=cluster.gaps_params(args))
    print(json_doc(doc) if args.output == "json" else format_gaps(doc))
    return 0
