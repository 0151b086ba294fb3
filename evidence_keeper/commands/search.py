"""``evidence-keeper search``: grep the store, like ``stern`` on logs that are gone.

Exit codes follow grep (CONTRACT.md section 8): 0 found, 1 not found, 2 error. "Not found"
has two causes a user must tell apart, so the second says so on stderr: no line matched, or
the scope holds no evidence at all (nothing shipped for it, every segment outside
``--since``/``--until``, or a store that does not exist).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from evidence_keeper.archive.export import store_namespaces
from evidence_keeper.archive.manifest import Scope
from evidence_keeper.archive.search import (
    Hit,
    Matcher,
    PatternError,
    SearchError,
    SearchStats,
    search,
)
from evidence_keeper.commands.base import (
    EXIT_ERROR,
    EXIT_NEGATIVE,
    EXIT_OK,
    CliError,
    NoEvidence,
    subcommand,
)
from evidence_keeper.commands.common import (
    Progress,
    add_config,
    add_namespace,
    add_output,
    flag_scope,
    read_store,
    settings,
    store_failure,
)
from evidence_keeper.commands.render import format_hit
from evidence_keeper.settings import Settings
from evidence_keeper.store import Store, StoreError

NAME: Final = "search"
EXIT_CODES: Final = """\
exit codes:
  0  at least one line matched
  1  no line matched; or the scope holds no evidence, or the store does not exist
     (then one line on stderr says so: "no evidence" is not "no match")
  2  error: bad pattern or scope, store unreachable, bad configuration"""


def add_flags(p: argparse.ArgumentParser) -> None:
    """The search flags (shared with ``kubectl evidence search``)."""
    p.add_argument("pattern", metavar="PATTERN", help="a regular expression (or -F: a string)")
    add_namespace(p, help="the namespace to search (or -A)")
    p.add_argument("-A", "--all-namespaces", action="store_true",
                   help="search every namespace of the cluster in the store")
    p.add_argument("--pod", help="pod name or glob (* ? [...])")
    p.add_argument("--container", help="container name or glob")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("-F", "--fixed-strings", action="store_true", help="PATTERN is a string")
    p.add_argument("-i", "--ignore-case", action="store_true")
    p.add_argument("--timestamps", action="store_true",
                   help="text output: each line's own timestamp first (RFC3339, UTC)")
    add_output(p, json_help="one object per matching line")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="search the store for lines matching a pattern",
                   exit_codes=EXIT_CODES)
    add_config(p)
    add_flags(p)
    return p


@dataclass
class Totals:
    """Search statistics summed over the namespaces searched."""

    namespaces: int = 0
    streams: int = 0
    segments: int = 0
    segments_total: int = 0
    skipped: int = 0
    bytes: int = 0
    bytes_total: int = 0
    matches: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)  # segments that could not be searched

    def add(self, st: SearchStats) -> None:
        self.errors.extend(st.errors)
        self.namespaces += 1
        self.streams += st.streams
        self.segments += st.segments
        self.segments_total += st.segments_total
        self.skipped += st.skipped
        self.bytes += st.bytes
        self.bytes_total += st.bytes_total
        self.matches += st.matches
        self.elapsed += st.elapsed


def scope_template(args: argparse.Namespace) -> Scope:
    """The scope from the flags (namespace empty with ``-A``), checked before any I/O."""
    if args.all_namespaces == (args.namespace is not None):
        raise CliError("search needs exactly one of -n NAMESPACE and -A (all namespaces)")
    return flag_scope(args, what="--namespace", all_namespaces=True)


def scopes(template: Scope, store: Store, cfg: Settings) -> list[Scope]:
    """One scope per namespace to search: the given one, or (``-A``) each in the store."""
    if template.namespace:
        return [template]
    names = store_namespaces(store, cfg.cluster)
    if not names:
        raise NoEvidence(f"no evidence in {store.describe()} for cluster {cfg.cluster}:"
                         " no segment of any namespace")
    return [replace(template, namespace=n) for n in names]


def describe(args: argparse.Namespace, cfg: Settings, store: Store) -> str:
    what = "every namespace" if args.all_namespaces else f"namespace {args.namespace}"
    for flag in ("pod", "container"):
        if getattr(args, flag):
            what += f" {flag} {getattr(args, flag)}"
    return f"{what} in {store.describe()} (cluster {cfg.cluster})"


def no_evidence(args: argparse.Namespace, cfg: Settings, store: Store, t: Totals) -> None:
    """Raise :class:`NoEvidence` when nothing could have matched (not "no match")."""
    if t.segments_total == 0:
        raise NoEvidence(f"no evidence for {describe(args, cfg, store)}: nothing was"
                         " shipped for this scope")
    if t.skipped == t.segments_total:
        window = f"--since {args.since or '-'} --until {args.until or '-'}"
        raise NoEvidence(f"no evidence for {describe(args, cfg, store)} in {window}:"
                         f" all {t.segments_total} segments lie outside the window")


def run(args: argparse.Namespace) -> int:
    return search_with(args, settings(args))


def search_with(args: argparse.Namespace, cfg: Settings) -> int:
    """Search with the given settings (the plugin's come from the agents' pod spec)."""
    template = scope_template(args)
    try:
        matcher = Matcher(args.pattern, fixed=args.fixed_strings, ignore_case=args.ignore_case)
    except PatternError as exc:
        raise CliError(str(exc)) from exc
    store = read_store(cfg)
    out = sys.stdout.buffer
    progress = Progress("searched", unit="MiB")
    totals = Totals()
    emit = _emitter(args, out.write)
    try:
        for scope in scopes(template, store, cfg):
            def report(st: SearchStats, done: Totals = totals) -> None:
                progress.update((done.bytes + st.bytes) >> 20,
                                (done.bytes_total + st.bytes_total) >> 20,
                                f"{done.segments + st.segments} segments,"
                                f" {done.matches + st.matches} matches")

            totals.add(search(store, matcher, cluster=cfg.cluster, scope=scope, emit=emit,
                              progress=report))
    except StoreError as exc:
        raise store_failure(exc) from exc
    except SearchError as exc:
        raise CliError(str(exc)) from exc
    except BrokenPipeError:
        return EXIT_OK  # `| head`: the reader has seen enough
    out.flush()
    for error in totals.errors:  # forged or damaged segments: reported, the rest searched
        print(f"evidence-keeper: {error}", file=sys.stderr)
    if progress.close():
        print(f"{totals.matches} matches in {totals.bytes / 2**20:.1f} MiB of {totals.streams}"
              f" streams ({totals.segments} segments read, {totals.skipped} skipped by time)"
              f" in {totals.elapsed:.1f}s", file=sys.stderr)
    if totals.errors:
        return EXIT_ERROR
    if not totals.matches:
        no_evidence(args, cfg, store, totals)
    return EXIT_OK if totals.matches else EXIT_NEGATIVE


def _emitter(args: argparse.Namespace, write: Callable[[bytes], object]) -> Callable[[Hit], None]:
    output, stamps, ns = args.output, args.timestamps, args.all_namespaces

    def emit(hit: Hit) -> None:
        write(format_hit(hit, output=output, timestamps=stamps, namespace=ns))

    return emit
