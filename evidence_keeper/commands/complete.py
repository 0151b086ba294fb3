"""Completion for ``kubectl evidence …``, in the protocol kubectl speaks with plugins.

kubectl (1.26+) completes a plugin's arguments by running ``kubectl_complete-<plugin>`` with
them, the word being completed last (possibly empty), and reads cobra's ``__complete`` format:
one candidate per line (``value<TAB>description``) and a last line ``:<directive>`` (0: the
shell may also complete file names; 4: it must not). The candidates come from the plugin's own
argparse parser, so they never lag behind its flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final

FILES: Final = 0  # cobra ShellCompDirectiveDefault: the shell completes file names
NO_FILES: Final = 4  # cobra ShellCompDirectiveNoFileComp
PATH_METAVARS: Final = frozenset({"PATH", "FILE", "DIR"})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return parser._option_string_actions.get(flag)


def _values(action: argparse.Action) -> tuple[list[str], int]:
    """Candidates for the value of ``action``'s flag, and the directive."""
    if action.choices is not None:
        return [str(c) for c in action.choices], NO_FILES
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    return [], FILES if metavar in PATH_METAVARS else NO_FILES


def candidates(parser: argparse.ArgumentParser, words: Sequence[str]) -> tuple[list[str], int]:
    """Completions of ``words[-1]`` after ``words[:-1]`` (the plugin's arguments)."""
    current = words[-1] if words else ""
    before = list(words[:-1])
    subs = _subparsers(parser)
    command = next((w for w in before if w in subs), None)
    if command is None:
        if current.startswith("-"):
            flags = [f for f in parser._option_string_actions if f.startswith("--")]
            return sorted(f for f in flags if f.startswith(current)), NO_FILES
        helps = _helps(parser)
        return [f"{name}\t{helps.get(name, '')}".rstrip("\t") for name in subs
                if name.startswith(current)], NO_FILES
    sub = subs[command]
    previous = _option(sub, before[-1]) if before and before[-1].startswith("-") else None
    if previous is not None and previous.nargs != 0:
        values, directive = _values(previous)
        return [v for v in values if v.startswith(current)], directive
    if current.startswith("-"):
        return sorted(f for f in sub._option_string_actions if f.startswith(current)), NO_FILES
    return [], NO_FILES


def render(found: tuple[list[str], int]) -> str:
    values, directive = found
    return "".join(f"{v}\n" for v in values) + f":{directive}\n"
