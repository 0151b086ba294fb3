"""``kubectl-evidence``: the kubectl plugin (``kubectl evidence …``), parsing and dispatch only.

Installed next to ``evidence-keeper``; kubectl finds it on ``PATH`` (``kubectl plugin list``),
and completes its arguments with ``kubectl_complete-evidence`` (:func:`complete_main`).
The commands are modules of :mod:`evidence_keeper.commands.kubectl`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Final

from evidence_keeper.commands import complete, completion
from evidence_keeper.commands.base import build_parser as _build
from evidence_keeper.commands.base import dispatch
from evidence_keeper.commands.kubectl import archive, export, gaps, preflight, search

PROG: Final = "kubectl-evidence"
COMMANDS: Final[tuple[ModuleType, ...]] = (
    gaps,
    preflight,
    archive,
    search,
    export,
    completion,
)


def build_parser() -> argparse.ArgumentParser:
    return _build(prog=PROG, commands=COMMANDS,
                  description="evidence-keeper through the API server: the gaps, preflight and"
                              " archives of every agent, and search and export of their store.")


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


def complete_main(argv: Sequence[str] | None = None) -> int:
    """``kubectl_complete-evidence``: kubectl's completion hook for the plugin."""
    words = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(complete.render(complete.candidates(build_parser(), words)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
