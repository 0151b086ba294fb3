"""``kubectl evidence search``: grep the agents' store (read with the caller's credentials)."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands import search as local
from evidence_keeper.commands.base import subcommand
from evidence_keeper.commands.kubectl.cluster import (
    add_kube,
    cluster_settings,
    connect,
    readable_store,
)

NAME: Final = "search"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="search the agents' store for lines matching a"
                                           " pattern", exit_codes=local.EXIT_CODES)
    add_kube(p)
    local.add_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    local.scope_template(args)  # bad flags fail before any API call
    return local.search_with(args, readable_store(cluster_settings(connect(args), args)))
