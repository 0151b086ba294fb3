"""``evidence-keeper demo``: the Nov 10 incident replayed on a simulated node."""

from __future__ import annotations

import argparse
from typing import Any, Final

from evidence_keeper.commands.base import subcommand
from evidence_keeper.demo import run_demo

NAME: Final = "demo"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="replay the Nov 10 incident on a simulated node",
                   exit_codes="exit codes:\n  0  every stream byte-exact, the archive verified,"
                              " the evidence found\n  1  the story did not hold")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo files here")
    p.add_argument("--speed", type=float, default=1.0, help="scenario speed factor")
    return p


def run(args: argparse.Namespace) -> int:
    return run_demo(workdir=args.workdir, speed=args.speed)
