"""Replay throughput: a ``file://`` store into a local Datadog-compatible intake.

Usage: ``python -m bench.replay_bench [--mib 256] [--streams 8] [--workdir DIR] [--keep]``.
Progress on stderr, results on stdout (copied into ``docs/benchmarks.md``).

1. **Store**: :func:`bench.search_bench.build_store` — the CRI lines of :mod:`bench.datagen`
   (about 190 bytes a line, 1 % long lines as ``P`` + ``F`` records), cut into 8 MiB zstd
   segments with ``ek-*`` metadata and hash chains, ``--streams`` streams in one namespace.
2. **Intake**: the strict :class:`evidence_keeper.sim.intakes.DatadogIntake` (gzip, JSON
   shape, 1000 entries / 5 MB per request, 1 MB per entry, tags, the 18 h rule) in a
   *separate process*, so its CPU does not count as the replayer's; its clock is set an hour
   after the data so every line takes the intake path.
3. **Replay**: :class:`evidence_keeper.replay.runner.Replayer` in this process, 4 streams in
   flight, checkpoints in a fresh directory; lines/s and MB/s of raw log (the stream bytes of
   the lines sent), CPU seconds of this process (all its threads) and of the intake process.
   A ``--dry-run`` pass (read, decompress, verify, parse; no encoding, no HTTP) is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench import datagen
from bench.machine import _cpu_model
from bench.search_bench import CLUSTER, build_store
from evidence_keeper.replay.checkpoint import Checkpoints
from evidence_keeper.replay.runner import Replayer, ReplayRequest
from evidence_keeper.settings import load_settings
from evidence_keeper.sim.intakes import DatadogIntake
from evidence_keeper.store import FileStore

API_KEY: Final = "bench-datadog-key"
DATA_NOW: Final = datagen.START_EPOCH + 2 * 3600  # an hour after the last line


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the intake
async def _serve(now: float) -> None:
    intake = DatadogIntake(api_key=API_KEY, now=lambda: now)
    url = await intake.start()
    print(url, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # until the parent closes stdin
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"entries": len(intake.entries), "requests": intake.requests,
                      "violations": intake.violations[:5],
                      "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
    intake.entries.clear()
    await intake.stop()


def start_intake() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.replay_bench", "--serve-intake"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"the intake did not start: {url!r}")
    return proc, url


def stop_intake(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    doc: dict[str, object] = json.loads(proc.stdout.readline())
    proc.stdin.close()
    proc.wait(timeout=60)
    return doc


# ------------------------------------------------------------------------------ replay
def replay(store: FileStore, url: str, state: Path, *, dry_run: bool,
           concurrency: int) -> dict[str, float]:
    key = state / "dd.key"
    state.mkdir(parents=True, exist_ok=True)
    key.write_text(API_KEY)
    target = load_settings(None, environ={}, overrides={"replay_targets": {"datadog": {
        "kind": "datadog", "url": url, "credentials_file": str(key)}}}).replay_targets[0]
    replayer = Replayer(store=store, cluster=CLUSTER, target=target,
                        checkpoints=Checkpoints(state), node_name="bench-node",
                        clock=lambda: datetime.fromtimestamp(DATA_NOW, UTC),
                        concurrency=concurrency)
    cpu0, t0 = time.process_time(), time.monotonic()
    summary = asyncio.run(replayer.run(ReplayRequest(dry_run=dry_run)))
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if summary.status != "complete":
        raise RuntimeError(f"replay {summary.status}: {summary.error}")
    return {"lines": summary.lines, "bytes": summary.bytes, "wall_s": wall, "cpu_s": cpu,
            "requests": summary.requests}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay_bench", description=__doc__)
    p.add_argument("--mib", type=int, default=256, help="raw log in the store (default 256)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--serve-intake", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_intake:
        asyncio.run(_serve(float(DATA_NOW)))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ek-replay-bench-"))
    try:
        return _run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    say(f"building a {args.mib} MiB store of {args.streams} streams in {work} ...")
    nbytes, objects = build_store(work / "store", total=args.mib << 20, streams=args.streams,
                                  seed=20251110)
    store = FileStore(work / "store")
    load0 = os.getloadavg()
    say("dry run (read, decompress, verify, parse) ...")
    dry = replay(store, "http://127.0.0.1:9", work / "state-dry", dry_run=True,
                 concurrency=args.concurrency)
    say("replay to the local Datadog intake ...")
    proc, url = start_intake()
    try:
        real = replay(store, url, work / "state", dry_run=False, concurrency=args.concurrency)
    finally:
        intake = stop_intake(proc)
    load1 = os.getloadavg()
    if intake["violations"] or intake["entries"] != real["lines"]:
        say(f"intake disagrees: {intake}")
        return 1
    mb = real["bytes"] / 1e6
    print(f"replay benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {_cpu_model()},"
          f" {os.cpu_count()} CPUs; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"store: {nbytes / 2**20:.0f} MiB raw in {objects} segments, {args.streams} streams;"
          f" concurrency {args.concurrency}")
    print("| phase | lines | raw MB | wall s | lines/s | MB/s | CPU s (replayer) |"
          " CPU s (intake) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r, icpu in (("dry run (parse only)", dry, "-"),
                          ("replay → Datadog intake", real, f"{intake['cpu_s']:.1f}")):
        print(f"| {name} | {r['lines']:,.0f} | {r['bytes'] / 1e6:,.0f} | {r['wall_s']:.1f} |"
              f" {r['lines'] / r['wall_s']:,.0f} | {r['bytes'] / 1e6 / r['wall_s']:.1f} |"
              f" {r['cpu_s']:.1f} | {icpu} |")
    print(f"requests: {real['requests']:.0f} ({real['lines'] / max(1, real['requests']):.0f}"
          f" lines each); replayer CPU per line {real['cpu_s'] / real['lines'] * 1e6:.1f} µs;"
          f" {mb:.0f} MB of raw log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
