"""``kubectl evidence export``: exact stream bytes (or a pod or an archive as a tar) from the
agents' store, read with the caller's credentials."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands import export as local
from evidence_keeper.commands.base import subcommand
from evidence_keeper.commands.kubectl.cluster import (
    add_kube,
    cluster_settings,
    connect,
    readable_store,
)

NAME: Final = "export"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="write a stream's exact bytes (or a pod or an archive"
                                           " as a tar) from the agents' store",
                   exit_codes=local.EXIT_CODES)
    add_kube(p)
    local.add_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    return local.export(args, readable_store(cluster_settings(connect(args), args)))
