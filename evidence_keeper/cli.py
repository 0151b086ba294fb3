"""Command line: argument parsing only. Each subcommand hands validated settings to the code
that does the work, prints one clear line on error and exits non-zero (no tracebacks)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

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
        if args.command == "demo":
            from evidence_keeper.demo import run_demo

            return run_demo(workdir=args.workdir, speed=args.speed)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except CliError as exc:
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


if __name__ == "__main__":
    sys.exit(main())
