"""``kubectl evidence archive``: ``evidence-keeper archive --all-nodes`` through the API
server's pod proxy — every agent archives its part, then the cluster manifest is written with
the caller's store access. The archive token is read from the Secret the agents mount (like
``kubectl get secret``), unless ``--token-file`` names one."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands import archive as local
from evidence_keeper.commands.base import subcommand
from evidence_keeper.commands.common import flag_scope, token
from evidence_keeper.commands.kubectl.cluster import (
    add_kube,
    archive_token,
    cluster_settings,
    connect,
    readable_store,
)

NAME: Final = "archive"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="archive a scope's evidence on every node, then a"
                                           " cluster manifest", exit_codes=local.EXIT_CODES)
    add_kube(p)
    local.add_scope(p, token_help="default: $EK_ARCHIVE_TOKEN_FILE, else the Secret the"
                                  " agents mount (needs get on it)")
    return p


def run(args: argparse.Namespace) -> int:
    api = connect(args)
    cfg = readable_store(cluster_settings(api, args))
    # --token-file or $EK_ARCHIVE_TOKEN_FILE first; else the Secret the agents mount.
    secret = (token(args, cfg) if args.token_file or cfg.archive_token_file
              else archive_token(api, args))
    return local.all_nodes(args, cfg, local.request_body(args), secret, flag_scope(args),
                           api=api, via="proxy")
