"""Command line: argument parsing only. Each subcommand hands validated settings to the code
that does the work, prints one clear line on error and exits non-zero (no tracebacks)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from evidence_keeper.api.client import ApiError, call, default_url
from evidence_keeper.logs import configure_logging
from evidence_keeper.settings import ConfigError, Settings, load_settings


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(args.config, overrides=overrides)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="YAML configuration file (or $EK_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evidence-keeper",
        description="Log-evidence preservation agent for Kubernetes nodes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the agent on this node")
    _add_config(p)

    p = sub.add_parser("export", help="write a stream's exact bytes from the store")
    _add_config(p)
    p.add_argument("--namespace", required=True)
    p.add_argument("--pod", required=True)
    p.add_argument("--container", required=True)
    p.add_argument("--restart", type=int, help="container instance (default: all, in order)")
    p.add_argument("--pod-uid", help="pick one pod when a name was reused")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    p = sub.add_parser("gaps", help="list gaps from a running agent's ledger")
    _add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("--kind", choices=["sink_outage", "loss", "backlog", "agent_down"])
    p.add_argument("--namespace")
    p.add_argument("--open", action="store_true", help="only gaps still open")
    p.add_argument("--json", action="store_true", help="the API's JSON document")

    p = sub.add_parser("preflight",
                       help="exit 0 only if sinks are up and shipping is current (chaos gate)")
    _add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--since", default="1h",
                   help="fail on loss gaps newer than this (RFC3339 or duration; default 1h)")
    p.add_argument("--max-backlog-s", type=float,
                   help="largest acceptable oldest-unshipped age (default: backlog_threshold_s)")

    p = sub.add_parser("demo", help="replay the Nov 10 incident on a simulated node")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo files here")
    p.add_argument("--speed", type=float, default=1.0, help="scenario speed factor")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "gaps":
            return cmd_gaps(args)
        if args.command == "preflight":
            return cmd_preflight(args)
        if args.command == "demo":
            from evidence_keeper.demo import run_demo

            return run_demo(workdir=args.workdir, speed=args.speed)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (CliError, ApiError) as exc:
        print(f"evidence-keeper: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def cmd_run(args: argparse.Namespace) -> int:
    from evidence_keeper.supervisor import Agent, StartupError

    settings = _settings(args)
    configure_logging(settings.log_level)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(settings)
        try:
            await agent.run(stop)
        except StartupError as exc:
            raise CliError(str(exc)) from exc
        finally:
            agent.close()
        return 0

    return asyncio.run(_main())


def cmd_export(args: argparse.Namespace) -> int:
    from evidence_keeper.archive.export import ExportError, export_stream, find_streams
    from evidence_keeper.ship.store import StoreError, open_store

    settings = _settings(args)
    try:
        store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        streams = find_streams(
            store, cluster=settings.cluster, namespace=args.namespace, pod=args.pod,
            container=args.container, restart=args.restart, pod_uid=args.pod_uid,
        )
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    if not streams:
        raise CliError(
            f"no segments in {store.describe()} for {args.namespace}/{args.pod}/{args.container}"
            + (f" restart {args.restart}" if args.restart is not None else ""))
    uids = {ss.stream.pod_uid for ss in streams}
    if len(uids) > 1:
        raise CliError(f"pod name {args.pod!r} matches several pods; pick one with --pod-uid:"
                       f" {', '.join(sorted(uids))}")
    out: BinaryIO
    out = Path(args.output).open("wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    try:
        for ss in streams:
            report = export_stream(store, ss, out)
            note = (f"restart {ss.stream.restart}: {report.bytes} bytes"
                    f" in {report.segments} segments")
            for a, b in report.holes:
                note += f"; hole [{a}, {b}) not in the store (see /gaps)"
            print(note, file=sys.stderr)
    except (ExportError, StoreError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    return 0


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    return default_url(_settings(args).listen)


def format_gaps(doc: dict[str, Any]) -> str:
    rows = [("ID", "KIND", "START", "END", "WHAT", "DETAIL")]
    for g in doc["gaps"]:
        if g["kind"] == "loss":
            what = (f"{g.get('namespace')}/{g.get('pod')}/{g.get('container')}#{g.get('restart')}"
                    f" @{g.get('offset')} +{g.get('bytes') if g.get('bytes') is not None else '?'}"
                    f" {g.get('reason', '')}")
        else:
            what = " ".join(str(x) for x in (g.get("sink"), g.get("check"), g.get("reason"))
                            if x)
        detail = g.get("detail") or ""
        cov = g.get("coverage")
        if cov:
            detail = (f"coverage: {cov['streams']} streams, {cov['captured_bytes']} B captured,"
                      f" {cov['shipped_bytes']} B shipped; {detail}")
        rows.append((str(g["id"]), g["kind"], g["start"][:19], (g["end"] or "open")[:19],
                     what, detail[:90]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
             for r in rows]
    lines.append(f"{len(doc['gaps'])} gaps on node {doc['node']} (generated {doc['generated_at']})")
    return "\n".join(lines)


def cmd_gaps(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in ("since", "until", "kind", "namespace")
              if getattr(args, k)}
    if args.open:
        params["open"] = "true"
    _, doc = call(_url(args), "/gaps", params=params)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_gaps(doc))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """The gate a chaos test runs first: every sink up, store current, no recent loss."""
    url = _url(args)
    max_backlog = args.max_backlog_s
    if max_backlog is None:
        max_backlog = _settings(args).backlog_threshold_s if not args.url else 60.0
    _, ready = call(url, "/readyz", accept_status=(503,))
    _, loss = call(url, "/gaps", params={"kind": "loss", "since": args.since})
    problems: list[str] = []
    checks: list[tuple[bool, str]] = []
    checks.append((bool(ready.get("ready")), "agent ready (spool recovered, log root tailed)"))
    for s in ready.get("sinks", []):
        ok = s.get("up") is True
        why = "" if ok else f": {s.get('failed_check') or 'not probed yet'} {s.get('error') or ''}"
        checks.append((ok, f"sink {s['sink']} ({s['target']}) up{why}".rstrip()))
    age = float(ready.get("spool", {}).get("oldest_unshipped_age_s", 0))
    checks.append((age <= max_backlog,
                   f"shipping current (oldest unshipped {age:.1f}s <= {max_backlog:g}s)"))
    n_loss = len(loss.get("gaps", []))
    checks.append((n_loss == 0, f"no loss gaps since {args.since} ({n_loss} found)"))
    for ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {text}")
        if not ok:
            problems.append(text)
    if problems:
        print(f"preflight failed: {len(problems)} problem(s); evidence would be at risk",
              file=sys.stderr)
        return 1
    print("preflight passed: sinks up, shipping current, no recent loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
