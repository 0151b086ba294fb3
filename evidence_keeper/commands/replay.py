"""``evidence-keeper replay --to NAME``: put preserved lines back into a log sink.

Shaped like every command of the ``commands`` package: :func:`add_parser` adds the
subcommand, :func:`run` executes it and returns the exit code (0 complete, 1 partial or
failed, 2 bad input), printing one line on error. The evidence is read from the store
(``store_url``, or ``--from-store URL``); ``--gap ID`` takes the window of a ``sink_outage``
from the agent's ``/gaps`` (``--url``, default the configured listen address). Progress goes
to stderr, the summary to stdout (``-o json``: one JSON document).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from evidence_keeper.api.client import ApiError, call, default_url
from evidence_keeper.archive.manifest import ScopeError, check_glob, check_namespace
from evidence_keeper.commands.base import subcommand
from evidence_keeper.replay.checkpoint import Checkpoints
from evidence_keeper.replay.runner import Progress, Replayer, ReplayRequest, ReplaySummary
from evidence_keeper.settings import ConfigError, ReplayTarget, Settings, load_settings
from evidence_keeper.store import StoreError, open_store
from evidence_keeper.timefmt import TimeError, parse_time

NAME: Final = "replay"
EXIT_CODES: Final = """\
exit codes:
  0  every line of the scope acknowledged by the sink (or, --dry-run, counted)
  1  partial or failed: some lines were not delivered (the summary says which streams)
  2  bad input: flags, configuration, an unknown target or gap, the store unreachable"""


class ReplayUsageError(Exception):
    """Bad input: one line, exit code 2."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME,
                   help="replay preserved lines into a log sink (Datadog, Loki, OTLP)",
                   exit_codes=EXIT_CODES)
    p.add_argument("--config", metavar="PATH", help="YAML configuration file (or $EK_CONFIG)")
    p.add_argument("--to", required=True, metavar="NAME", help="a target of replay_targets")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("-n", "--namespace", help="one namespace (default: all)")
    p.add_argument("--pod", help="pod name or glob (* ? [...])")
    p.add_argument("--container", help="container name or glob")
    p.add_argument("--gap", type=int, metavar="ID",
                   help="replay the window of this sink_outage gap (from the agent's /gaps)")
    p.add_argument("--url", help="agent API for --gap (default: from the listen setting)")
    p.add_argument("--from-store", metavar="URL", help="read evidence from this store URL"
                   " (file:///dir or s3://bucket/prefix; default: store_url)")
    p.add_argument("--state", metavar="DIR",
                   help="where replay checkpoints live (default: <spool_dir>/replay)")
    p.add_argument("--dry-run", action="store_true",
                   help="count lines and bytes per stream; send nothing")
    p.add_argument("--resend", action="store_true",
                   help="ignore checkpoints: send again what was already acknowledged")
    p.add_argument("--concurrency", type=int, default=4, help="streams in flight (default 4)")
    p.add_argument("--rate", type=float, metavar="LINES_PER_S", help="rate limit in lines/s")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help="output format: text (default) or json (the summary)")
    p.add_argument("--json", dest="output", action="store_const", const="json",
                   help="alias of -o json")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        target = _target(settings, args.to)
        req = _request(args, settings)
        if args.concurrency < 1 or args.concurrency > 64:
            raise ReplayUsageError("--concurrency must be in 1..64")
        if args.rate is not None and args.rate <= 0:
            raise ReplayUsageError("--rate must be positive")
        store_url = args.from_store or settings.store_url
        s3: dict[str, Any] = {"endpoint_url": settings.s3_endpoint_url}
        store = open_store(store_url, **s3)
        state = Path(args.state) if args.state else Path(settings.spool_dir)
        if not req.dry_run:
            _check_state(state)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (ReplayUsageError, StoreError, ApiError) as exc:
        print(f"evidence-keeper: {exc}", file=sys.stderr)
        return 2
    progress = _ProgressLine()
    replayer = Replayer(store=store, cluster=settings.cluster, target=target,
                        checkpoints=Checkpoints(state), node_name=settings.node_name,
                        clock=lambda: datetime.now(UTC), concurrency=args.concurrency,
                        rate_lines_per_s=args.rate, progress=progress.update, s3_options=s3)
    try:
        summary = asyncio.run(replayer.run(req))
    except KeyboardInterrupt:
        print("\ninterrupted: acknowledged batches are checkpointed; run again to resume",
              file=sys.stderr)
        return 130
    progress.close()
    if args.output == "json":
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(format_summary(summary, target, store.describe()))
    if summary.error:
        print(f"evidence-keeper: replay to {target.name} stopped: {summary.error}",
              file=sys.stderr)
    return 0 if summary.status == "complete" else 1


def _target(settings: Settings, name: str) -> ReplayTarget:
    for t in settings.replay_targets:
        if t.name == name:
            return t
    known = ", ".join(t.name for t in settings.replay_targets) or "none configured"
    raise ReplayUsageError(f"--to {name}: no such replay target (replay_targets: {known})")


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, name, datetime.now(UTC))
    except TimeError as exc:
        raise ReplayUsageError(str(exc)) from None


def _request(args: argparse.Namespace, settings: Settings) -> ReplayRequest:
    try:
        ns = args.namespace and check_namespace(args.namespace, "--namespace")
        pod = args.pod and check_glob(args.pod, "--pod", subdomain=True)
        container = args.container and check_glob(args.container, "--container",
                                                  subdomain=False)
    except ScopeError as exc:
        raise ReplayUsageError(str(exc)) from None
    if (args.pod or args.container) and not ns:
        raise ReplayUsageError("--pod and --container need --namespace")
    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    if args.gap is not None:
        if since is not None or until is not None:
            raise ReplayUsageError("--gap sets the window: drop --since/--until")
        since, until = _gap_window(args, settings)
    if since is not None and until is not None and since > until:
        raise ReplayUsageError("--since is after --until")
    return ReplayRequest(namespace=ns or None, pod=pod or None, container=container or None,
                         since=since, until=until, dry_run=args.dry_run, resend=args.resend,
                         gap_id=args.gap)


def _gap_window(args: argparse.Namespace, settings: Settings) -> tuple[datetime, datetime]:
    url = args.url or default_url(settings.listen)
    _, doc = call(url, "/gaps", params={"kind": "sink_outage"})
    for g in doc.get("gaps", []):
        if g.get("id") == args.gap:
            if g.get("end") is None:
                raise ReplayUsageError(f"gap {args.gap} ({g.get('sink')}) is still open: the"
                                       " sink is down; replay once it has recovered")
            start = datetime.fromisoformat(str(g["start"]).replace("Z", "+00:00"))
            end = datetime.fromisoformat(str(g["end"]).replace("Z", "+00:00"))
            if g.get("sink") != args.to:
                print(f"note: gap {args.gap} is an outage of sink {g.get('sink')!r}, replaying"
                      f" its window to {args.to!r}", file=sys.stderr)
            return start, end
    raise ReplayUsageError(f"--gap {args.gap}: no sink_outage gap with that id at {url}")


def _check_state(state: Path) -> None:
    try:
        (state / "replay").mkdir(parents=True, exist_ok=True)
        probe = state / "replay" / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ReplayUsageError(f"cannot keep replay checkpoints in {state}/replay ({exc}):"
                               " pass --state DIR") from None


class _ProgressLine:
    """Progress on stderr: after 2 s, then every 0.5 s on a TTY or every 10 s otherwise."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self.started < 2.0 or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last, self.shown = now, True
        rate = p.lines / max(1e-9, now - self.started)
        text = (f"replayed {p.lines} lines ({p.bytes >> 20} MiB), streams"
                f" {p.streams_done}/{p.streams_total}, {rate:,.0f} lines/s"
                + (f", {p.retries} retries" if p.retries else ""))
        print(("\r" + text + " " * 8) if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown and self.tty:
            print(file=sys.stderr)


def format_summary(summary: ReplaySummary, target: ReplayTarget, source: str) -> str:
    rows = [("STREAM", "LINES", "BYTES", "DONE BEFORE", "NOTE")]
    for r in summary.streams:
        s = r.stream
        note = "; ".join(x for x in (
            r.error or "",
            f"{r.too_old} too old for the intake" if r.too_old else "",
            f"{r.invalid_utf8} not UTF-8 (escaped)" if r.invalid_utf8 else "",
            f"{r.partials_joined} partial lines joined" if r.partials_joined else "",
            ", ".join(f"{n} via {k}" for k, n in sorted(r.paths.items()))) if x)
        rows.append((f"{s.namespace}/{s.pod}/{s.container}#{s.restart}", str(r.lines),
                     str(r.bytes), str(r.skipped), note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    verb = "would replay" if summary.dry_run else "replayed"
    lines.append(f"{verb} {summary.lines} lines ({summary.bytes} bytes) of"
                 f" {len(summary.streams)} streams from {source} to {target.name}"
                 f" ({target.kind}) in {summary.elapsed_s:.1f}s: {summary.status}")
    paths = summary.paths()
    if target.kind == "datadog":
        lines.append(f"  intake path: {paths.get('intake', 0)} lines to {target.url}")
        if target.archive_url:
            lines.append(f"  archive path: {paths.get('archive', 0)} lines older than"
                         f" {target.max_age_s / 3600:g} h written in Datadog's log-archive"
                         f" format to {target.archive_url} ({len(summary.archive_objects)}"
                         " objects): load them with Log Rehydration")
        too_old = sum(r.too_old for r in summary.streams)
        if too_old:
            lines.append(f"  {too_old} lines are older than {target.max_age_s / 3600:g} h:"
                         " the intake would drop them; set archive_url on the target to write"
                         " them for Log Rehydration")
    return "\n".join(lines)
