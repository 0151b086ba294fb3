"""``evidence-keeper verify``: check an archive against the store (hashes, chains, presence,
digest)."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.archive.manifest import ManifestError
from evidence_keeper.archive.verify import format_report, verify_archive
from evidence_keeper.commands import cluster
from evidence_keeper.commands.base import EXIT_NEGATIVE, EXIT_OK, CliError, subcommand
from evidence_keeper.commands.common import Progress, add_config, add_output, read_store, settings
from evidence_keeper.commands.render import json_doc
from evidence_keeper.store import StoreError

NAME: Final = "verify"
EXIT_CODES: Final = """\
exit codes:
  0  every object present, every hash and chain link right, the digest matches
  1  at least one mismatch or missing object (all are listed), or no such archive
  2  error: bad archive id, store unreachable, bad configuration"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="check an archive: segments, hashes, chains, digest",
                   exit_codes=EXIT_CODES)
    add_config(p)
    p.add_argument("archive_id", metavar="ARCHIVE_ID", nargs="?",
                   help="the archive to check (none, or --ledger: the gap ledger's chains)")
    add_output(p, json_help="the report")
    cluster.add_verify_ledger_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.ledger or args.archive_id is None:
        return cluster.run_verify_ledger(args)
    cfg = settings(args)
    store = read_store(cfg, scope=False)
    progress = Progress("verified", unit="segments")
    try:
        report = verify_archive(store, cluster=cfg.cluster, archive_id=args.archive_id,
                                progress=progress.update)
    except (ManifestError, StoreError) as exc:
        raise CliError(str(exc)) from exc
    progress.close()
    print(json_doc(report.to_json()) if args.output == "json" else format_report(report))
    return EXIT_OK if report.ok else EXIT_NEGATIVE
