"""``evidence-keeper``: argument parsing and dispatch only.

Every command is a module of :mod:`evidence_keeper.commands` (``NAME``, ``add_parser``,
``run``); the demo, which drives the others, is its own module. A new command is one import
and one entry in :data:`COMMANDS`. Errors are one line on stderr and an exit code (listed in
``--help``; decided in :mod:`evidence_keeper.commands.base`), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Final

from evidence_keeper import demo
from evidence_keeper.commands import (
    archive,
    completion,
    export,
    gaps,
    preflight,
    replay,
    run,
    search,
    verify,
)
from evidence_keeper.commands.base import build_parser as _build
from evidence_keeper.commands.base import dispatch

PROG: Final = "evidence-keeper"
COMMANDS: Final[tuple[ModuleType, ...]] = (
    run,
    export,
    gaps,
    preflight,
    archive,
    verify,
    search,
    replay,
    demo,
    completion,
)


def build_parser() -> argparse.ArgumentParser:
    return _build(prog=PROG, description="Log-evidence preservation agent for Kubernetes nodes.",
                  commands=COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
