"""``evidence-keeper export``: a stream's exact bytes, or a pod or an archive as a tar, from the
store. Progress goes to stderr (on a terminal, or always with ``--progress``); stdout carries
only the bytes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Final

from evidence_keeper.archive.export import (
    ExportError,
    StreamSegments,
    export_stream,
    find_streams,
)
from evidence_keeper.archive.manifest import (
    BundleError,
    ManifestError,
    SegmentEntry,
    write_archive_tar,
    write_streams_tar,
)
from evidence_keeper.commands.base import CliError, NoEvidence, subcommand
from evidence_keeper.commands.common import (
    Progress,
    add_config,
    add_namespace,
    read_store,
    settings,
    store_failure,
)
from evidence_keeper.settings import Settings
from evidence_keeper.store import ObjectMissing, Store, StoreError

NAME: Final = "export"
EXIT_CODES: Final = """\
exit codes:
  0  the bytes are written (holes the store lacks are named on stderr)
  1  the scope holds no evidence, or the store does not exist
  2  error: bad arguments, a missing or corrupt object, store unreachable"""


def add_flags(p: argparse.ArgumentParser) -> None:
    """The export flags (shared with ``kubectl evidence export``)."""
    add_namespace(p)
    p.add_argument("--pod")
    p.add_argument("--container", help="one container's stream (without it: the pod as a tar)")
    p.add_argument("--restart", type=int, help="container instance (default: all, in order)")
    p.add_argument("--pod-uid", help="pick one pod when a name was reused")
    p.add_argument("--archive", metavar="ID",
                   help="a whole archive as a tar: its manifest and the bytes it lists")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="write a stream's exact bytes (or a pod or an archive"
                                           " as a tar) from the store", exit_codes=EXIT_CODES)
    add_config(p)
    add_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    return export(args, settings(args))


def export(args: argparse.Namespace, cfg: Settings) -> int:
    if args.archive is not None:
        if any(getattr(args, k) is not None for k in ("namespace", "pod", "container", "restart",
                                                       "pod_uid")):
            raise CliError("--archive exports a whole archive: drop --namespace/--pod/...")
        return export_tar(args, cfg)
    if args.namespace is None or args.pod is None:
        raise CliError("export needs --namespace and --pod (and --container for one stream),"
                       " or --archive ID")
    if args.container is None:
        return export_tar(args, cfg)
    return export_streams(args, cfg)


def _progress(args: argparse.Namespace) -> Progress:
    return Progress("exported", unit="MiB", enabled=sys.stderr.isatty(), force=args.progress)


def _find(store: Store, args: argparse.Namespace, cfg: Settings) -> list[StreamSegments]:
    try:
        streams = find_streams(store, cluster=cfg.cluster, namespace=args.namespace,
                               pod=args.pod, container=args.container, restart=args.restart,
                               pod_uid=args.pod_uid)
    except StoreError as exc:
        raise store_failure(exc) from exc
    if not streams:
        what = "/".join(x for x in (args.namespace, args.pod, args.container) if x)
        raise NoEvidence(f"no evidence in {store.describe()} for {what}"
                         + (f" restart {args.restart}" if args.restart is not None else ""))
    uids = {ss.stream.pod_uid for ss in streams}
    if len(uids) > 1:
        raise CliError(f"pod name {args.pod!r} matches several pods; pick one with --pod-uid:"
                       f" {', '.join(sorted(uids))}")
    return streams


@contextmanager
def _sink(path: str | None) -> Iterator[BinaryIO]:
    """The output file (removed if the export fails) or stdout."""
    if not path:
        try:
            yield sys.stdout.buffer
        finally:
            sys.stdout.buffer.flush()
        return
    ok = False
    with Path(path).open("wb") as out:
        try:
            yield out
            ok = True
        finally:
            if not ok:
                Path(path).unlink(missing_ok=True)


def export_streams(args: argparse.Namespace, cfg: Settings) -> int:
    store = read_store(cfg)
    streams = _find(store, args, cfg)
    total = sum(sk.end - sk.offset for ss in streams for _, sk in ss.keys)
    progress = _progress(args)
    before = 0
    with _sink(args.output) as out:
        try:
            for ss in streams:
                def step(n: int, base: int = before) -> None:
                    progress.update((base + n) >> 20, total >> 20)

                report = export_stream(store, ss, out, progress=step)
                before += report.bytes
                note = (f"restart {ss.stream.restart}: {report.bytes} bytes"
                        f" in {report.segments} segments")
                for a, b in report.holes:
                    note += f"; hole [{a}, {b}) not in the store (see /gaps)"
                progress.close()
                print(note, file=sys.stderr)
        except (ExportError, StoreError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    return 0


def export_tar(args: argparse.Namespace, cfg: Settings) -> int:
    """A pod (every container and restart) or a whole archive as a tar."""
    if not args.output and sys.stdout.isatty():
        raise CliError("refusing to write a tar to a terminal: use -o FILE or redirect stdout")
    store = read_store(cfg, scope=args.archive is None)
    progress = _progress(args)
    done = [0, 0]  # segments, bytes

    def on_segment(entry: SegmentEntry) -> None:
        done[0] += 1
        done[1] += entry.length
        progress.update(done[1] >> 20, None, f"{done[0]} segments")

    streams = None if args.archive is not None else _find(store, args, cfg)
    with _sink(args.output) as out:
        try:
            if streams is None:
                n = write_archive_tar(store, cfg.cluster, args.archive, out,
                                      on_segment=on_segment)
                what = f"archive {args.archive}"
            else:
                n = write_streams_tar(store, {ss.stream: ss.keys for ss in streams}, out,
                                      on_segment=on_segment)
                what = f"pod {args.namespace}/{args.pod}: {len(streams)} streams"
        except ObjectMissing as exc:
            raise CliError(f"not in {store.describe()}: {exc.key}") from exc
        except (BundleError, ManifestError, StoreError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    progress.close()
    print(f"{what}: {n} segments written as a tar", file=sys.stderr)
    return 0
