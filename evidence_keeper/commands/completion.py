"""``evidence-keeper completion bash|zsh|tcsh``: a shell completion script (shtab), generated
from the same parser the command uses, so it never lags behind the flags.

    source <(evidence-keeper completion bash)
    evidence-keeper completion zsh > "${fpath[1]}/_evidence-keeper"
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

import shtab

from evidence_keeper.commands.base import subcommand

NAME: Final = "completion"
SHELLS: Final = ("bash", "zsh", "tcsh")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="print a shell completion script",
                   exit_codes="exit codes:\n  0  the script is on stdout\n  2  unknown shell")
    p.add_argument("shell", choices=SHELLS)
    return p


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.root_parser
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0
