"""``make bench``: raw I/O loop vs. tail -> spool vs. tail -> spool -> file store, then RSS and
idle CPU with 200 quiet files. Prints a table; a full run also updates ``docs/benchmarks.md``.

Usage: ``python -m bench.run [--gib 1.0] [--files 24] [--quick] [--workdir DIR] [--keep]``.
Progress goes to stderr, the result table to stdout. The data is generated once per run in a
temporary directory under /tmp (or ``--workdir``) and removed at the end unless ``--keep``; a
kept directory is reused by the next run with the same ``--gib``/``--files``/``--seed``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench import datagen, machine, phases, report

REPO: Final = Path(__file__).resolve().parent.parent
DEFAULT_DOC: Final = REPO / "docs" / "benchmarks.md"
# Everything the benchmark creates inside a work directory (removed unless --keep).
OUTPUTS: Final = ("pods", "raw-out", "spool-capture", "spool-ship", "store", "quiet", "logs")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Raw I/O loop vs. the agent's tail -> spool and tail -> spool -> file "
                    "store on the same data, then RSS and idle CPU with 200 quiet files.")
    p.add_argument("--gib", type=float, default=None,
                   help="size of the data set in GiB (default 1.0; 0.1 with --quick)")
    p.add_argument("--files", type=int, default=24, help="number of log files (default 24)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.1 GiB, 1 round, 10 s idle window, docs not updated "
                        "(throughput is then dominated by start-up and the age seal)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of the throughput phases, median reported "
                        "(default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=20251110, help="data generator seed")
    p.add_argument("--idle-seconds", type=float, default=None,
                   help="idle CPU measurement window (default 20; 10 with --quick)")
    p.add_argument("--skip-quiet", action="store_true", help="skip the RSS / idle CPU phase")
    p.add_argument("--workdir", type=Path, help="work directory (default: a new one in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory and data")
    p.add_argument("--doc", type=Path, default=None,
                   help=f"markdown file to update (default {DEFAULT_DOC.relative_to(REPO)} "
                        "for full runs, none for --quick)")
    p.add_argument("--no-doc", action="store_true", help="do not update any document")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    args = p.parse_args(argv)
    if args.gib is None:
        args.gib = 0.1 if args.quick else 1.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.idle_seconds is None:
        args.idle_seconds = 10.0 if args.quick else 20.0
    if args.gib <= 0 or args.files < 1 or args.idle_seconds <= 0 or args.rounds < 1:
        p.error("--gib, --files, --rounds and --idle-seconds must be positive")
    return args


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args and os.environ.get("MAKELEVEL"):
        return "make bench"
    return shlex.join([".venv/bin/python", "-m", "bench.run", *args])


def _fresh(path: Path) -> Path:
    """Remove a previous phase's output and flush dirty pages so phases do not overlap."""
    if path.exists():
        shutil.rmtree(path)
    os.sync()
    return path


def agent_run(tree: datagen.Tree, workdir: Path, rnd: int, *, ship: bool) -> phases.AgentRun:
    """One in-process agent measurement on fresh spool (and store) directories."""
    total = tree.total_bytes
    timeout = 60 + total / 2e6
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    if ship:
        spool_dir, store_dir = _fresh(workdir / "spool-ship"), _fresh(workdir / "store")
        settings = phases.throughput_settings(tree, spool_dir, store_dir)
        name, until, store, log_path = ("tail -> spool -> file store", phases.SHIPPED, None,
                                        logs / f"ship-{rnd}.log")
    else:
        spool_dir, store_dir = _fresh(workdir / "spool-capture"), None
        # The store refuses uploads: do not wait for a drain that cannot happen on stop.
        settings = phases.throughput_settings(tree, spool_dir, None, shutdown_timeout_s=2)
        name, until, store, log_path = ("tail -> spool", phases.CAPTURED,
                                        phases.DiscardStore(), logs / f"capture-{rnd}.log")
    say(f"{name} ...")
    with open(log_path, "w", encoding="utf-8") as log_stream:
        result = asyncio.run(phases.measure_agent(
            name, settings, total=total, until=until, store=store, log_stream=log_stream,
            timeout_s=timeout))
    result.log_levels = phases.count_levels(log_path)
    say(f"  {result.result.mb_s:.0f} MB/s")
    shutil.rmtree(spool_dir)
    return result


def raw_run(tree: datagen.Tree, workdir: Path, *, fsync_every: int | None
            ) -> phases.Throughput:
    say("raw loop ..." if fsync_every else "raw loop, one fsync per file (reference) ...")
    result = phases.raw_loop(tree, _fresh(workdir / "raw-out"), fsync_every=fsync_every)
    say(f"  {result.mb_s:.0f} MB/s")
    shutil.rmtree(workdir / "raw-out")
    return result


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> report.Results:
    started = time.perf_counter()
    load = machine.loadavg()
    workdir: Path = args.workdir
    total = int(args.gib * 2**30)
    say(f"work directory: {workdir}")
    say(f"generating {total / 2**30:.2f} GiB of CRI lines in {args.files} files ...")
    t0 = time.perf_counter()
    tree = datagen.generate(workdir / "pods", total_bytes=total, n_files=args.files,
                            seed=args.seed)
    gen_s = time.perf_counter() - t0
    os.sync()
    say(f"  {tree.total_bytes / 2**20:.0f} MiB in {gen_s:.1f} s"
        + (" (reused)" if tree.reused else ""))

    # Rounds interleave the phases, so a neighbour's burst of I/O or CPU on a shared machine
    # hits all of them alike; the report takes the median of each.
    raw: list[phases.Throughput] = []
    raw_stream: list[phases.Throughput] = []
    capture: list[phases.AgentRun] = []
    ship: list[phases.AgentRun] = []
    for rnd in range(1, args.rounds + 1):
        say(f"--- round {rnd} of {args.rounds}")
        raw.append(raw_run(tree, workdir, fsync_every=phases.RAW_FSYNC_EVERY))
        raw_stream.append(raw_run(tree, workdir, fsync_every=None))
        capture.append(agent_run(tree, workdir, rnd, ship=False))
        ship.append(agent_run(tree, workdir, rnd, ship=True))

    store_dir = workdir / "store"  # of the last round
    objects, stored = phases.store_stats(store_dir)
    try:
        verified: bool | None = phases.verify_stream(tree, store_dir)
    except OSError as exc:
        say(f"  verification failed: {exc}")
        verified = False
    shutil.rmtree(store_dir, ignore_errors=True)

    quiet = None
    if not args.skip_quiet:
        say("quiet files: RSS and idle CPU of `evidence-keeper run` ...")
        quiet = phases.quiet_footprint(_fresh(workdir / "quiet"), idle_s=args.idle_seconds)

    return report.Results(
        machine=machine.describe(workdir, REPO), command=command_line(argv), quick=args.quick,
        load_before=load, load_after=machine.loadavg(), n_files=len(tree.files),
        total_bytes=tree.total_bytes,
        gen_seconds=gen_s, gen_reused=tree.reused, raw=raw, raw_stream=raw_stream,
        spool=capture, e2e=ship, store_objects=objects, store_bytes=stored, verified=verified,
        quiet=quiet, runtime_s=time.perf_counter() - started,
    )


def cleanup(workdir: Path, *, created: bool) -> None:
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for name in OUTPUTS:
        p = workdir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    created = args.workdir is None
    if created:
        args.workdir = Path(tempfile.mkdtemp(prefix="ek-bench-", dir="/tmp"))
    else:
        args.workdir = args.workdir.resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, argv)
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            say(f"kept {args.workdir}")
        else:
            cleanup(args.workdir, created=created)
    print()
    print(report.console_table(results))
    doc = None if args.no_doc else args.doc or (None if args.quick else DEFAULT_DOC)
    if doc is not None:
        report.write_doc(doc, results)
        say(f"updated {doc}")
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(results), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
