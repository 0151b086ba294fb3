"""A parser from command modules, and the one place exit codes are decided.

Exit codes (also printed by ``--help``):

* ``0`` — success; for ``search``, at least one line matched;
* ``1`` — a negative answer: ``preflight`` found a problem, ``verify`` a mismatch, ``search``
  no match, an archive failed — or the scope holds no evidence / the store does not exist
  (then one stderr line says so, so "no evidence" never looks like "no match");
* ``2`` — an error: bad arguments or configuration, an unreachable agent or store;
* ``130`` — interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Final

from evidence_keeper.api.client import ApiError
from evidence_keeper.settings import ConfigError
from evidence_keeper.version import BuildInfo, build_info

EXIT_OK: Final = 0
EXIT_NEGATIVE: Final = 1
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

EXIT_CODES_HELP: Final = """\
exit codes:
  0    success (search: at least one line matched)
  1    a negative answer: preflight found a problem, verify a mismatch, search no match,
       an archive failed; or the scope holds no evidence or the store does not exist
       (one line on stderr says which)
  2    error: bad arguments or configuration, agent or store unreachable
  130  interrupted"""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


class NoEvidence(Exception):
    """The scope holds no evidence, or the store does not exist: one line, exit code 1."""


Runner = Callable[[argparse.Namespace], int]


def build_parser(*, prog: str, description: str, commands: Sequence[ModuleType],
                 build: BuildInfo | None = None) -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and one subcommand per module of ``commands``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    info = build or build_info()
    parser.add_argument("--version", action="version", version=info.line(prog),
                        help="print the version and the source revision, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in commands:
        p = module.add_parser(sub)
        p.set_defaults(handler=module.run)
    return parser


def subcommand(subparsers: Any, name: str, *, help: str,
               exit_codes: str | None = None) -> argparse.ArgumentParser:
    """A subparser with the command's exit codes in its ``--help``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=help[:1].upper() + help[1:] + ".",
        epilog=exit_codes or EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
             prog: str | None = None) -> int:
    """Parse ``argv``, run the chosen command, map failures to one line and an exit code."""
    args = parser.parse_args(argv)
    args.root_parser = parser
    name = prog or parser.prog
    handler: Runner = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_ERROR
    except NoEvidence as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_NEGATIVE
    except (CliError, ApiError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
