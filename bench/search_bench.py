"""Search throughput over a ~1 GiB store, against ``zstdcat | grep``; archive latency.

Usage: ``python -m bench.search_bench [--gib 1.0] [--archive-segments 10000] [--workdir DIR]
[--keep] [--quick]``. Progress on stderr, results on stdout (the lead copies them into
``docs/benchmarks.md``).

1. **Store**: the CRI lines of :mod:`bench.datagen` (access logs, logfmt order events with
   ``PAYMENT_FAILED`` among them, JSON lines, errors), cut into 8 MiB segments at line ends and
   written to a ``file://`` store exactly as the shipper writes them (zstd level 3, ``ek-*``
   metadata, hash chain), 24 streams in one namespace.
2. **Search**: :func:`evidence_keeper.archive.search.search` in this process pinned to one CPU
   (``sched_setaffinity``), for a common fixed string, a rare one, a regular expression and a
   one-minute time window; MB/s of raw log scanned (decompressed bytes), and the CPU seconds.
   The same objects through ``zstdcat FILES | LC_ALL=C grep -F`` (and ``grep -E``), pinned to
   the same single CPU with ``taskset`` and unpinned, in the same run; match counts must agree.
3. **Archive latency**: ``--archive-segments`` small segments (4 KiB, 100 per stream) of one
   node in a fresh store; the real agent (``evidence-keeper run`` subprocess) gets
   ``POST /archive`` for the namespace, and the time to ``complete`` is measured, with and
   without the one-second capture bound the job waits out first. Then ``verify`` of that
   archive (every segment fetched, decompressed and hashed; chains checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from bench import datagen
from bench.machine import _cpu_model
from evidence_keeper.api.client import ApiError, call
from evidence_keeper.archive.manifest import Scope
from evidence_keeper.archive.search import Hit, Matcher, search
from evidence_keeper.archive.verify import verify_archive
from evidence_keeper.formats import EDGE_WINDOW, edge_timestamps, rfc3339
from evidence_keeper.model import StreamId, segment_key
from evidence_keeper.store import FileStore
from evidence_keeper.store.codec import compress

CLUSTER: Final = "bench"
NAMESPACE: Final = "shop"
SEGMENT: Final = 8 << 20
NODE: Final = "bench-node"
TOKEN: Final = "bench-archive-token"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the store
def _put_stream(args: tuple[str, int, int, int, int]) -> tuple[int, int]:
    """Generate one stream of ``size`` bytes and store it as segments (runs in a process)."""
    root, index, size, seed, segment = args
    store = FileStore(Path(root))
    sid = StreamId(NAMESPACE, f"orders-{index:02d}", f"uid-{index:04d}-bench", "app", 0)
    gen = datagen._Lines(seed)
    pending = b""
    offset = written = objects = 0
    prev = ""
    while written < size or pending:
        while len(pending) < segment and written < size:
            chunk = gen.chunk()
            pending += chunk
            written += len(chunk)
        cut = pending.rfind(b"\n", 0, segment) + 1 if len(pending) > segment else len(pending)
        data, pending = pending[:cut], pending[cut:]
        sha = hashlib.sha256(data).hexdigest()
        first, last = edge_timestamps(data[:EDGE_WINDOW], data[-EDGE_WINDOW:])
        meta = {"ek-node": NODE, "ek-namespace": sid.namespace, "ek-pod": sid.pod,
                "ek-pod-uid": sid.pod_uid, "ek-container": sid.container, "ek-restart": "0",
                "ek-offset": str(offset), "ek-length": str(len(data)), "ek-sha256": sha,
                "ek-prev-sha256": prev, "ek-first-ts": rfc3339(first),
                "ek-last-ts": rfc3339(last)}
        key = segment_key("", CLUSTER, sid, offset, offset + len(data), "zst")
        store.put(key, compress(data, "zstd", 3), meta)
        prev, offset, objects = sha, offset + len(data), objects + 1
    return offset, objects


def build_store(root: Path, *, total: int, streams: int, seed: int) -> tuple[int, int]:
    """A store of ``streams`` streams, ``total`` raw bytes; reused when already complete."""
    stamp = root / "bench-store.json"
    want = {"total": total, "streams": streams, "seed": seed, "segment": SEGMENT}
    if stamp.exists() and json.loads(stamp.read_text()).get("want") == want:
        doc = json.loads(stamp.read_text())
        return int(doc["bytes"]), int(doc["objects"])
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tasks = [(str(root), i, total // streams, seed + i, SEGMENT) for i in range(streams)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(_put_stream, tasks))
    nbytes, objects = sum(r[0] for r in results), sum(r[1] for r in results)
    stamp.write_text(json.dumps({"want": want, "bytes": nbytes, "objects": objects}))
    return nbytes, objects


# ------------------------------------------------------------------------------ search
@dataclass
class Measure:
    name: str
    seconds: float
    cpu_seconds: float | None
    scanned: int  # raw bytes
    matches: int
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.scanned / self.seconds / 1e6


def our_search(store: FileStore, pattern: str, *, fixed: bool, scope: Scope,
               name: str) -> Measure:
    count = 0

    def emit(_hit: Hit) -> None:
        nonlocal count
        count += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    stats = search(store, Matcher(pattern, fixed=fixed), cluster=CLUSTER, scope=scope, emit=emit)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    note = f"{stats.segments} of {stats.segments_total} segments read"
    return Measure(name, seconds, cpu, stats.bytes, count, note)


def shell_search(files: Sequence[Path], grep: str, pattern: str, *, cpus: str | None,
                 name: str, scanned: int) -> Measure:
    pin = f"taskset -c {cpus} " if cpus is not None else ""
    cmd = (f"{pin}zstdcat -q {' '.join(shlex.quote(str(f)) for f in files)} | "
           f"LC_ALL=C {pin}grep {grep} -c -- {shlex.quote(pattern)}")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        raise RuntimeError(f"{cmd}: {out.stderr.strip()}")
    return Measure(name, seconds, None, scanned, int(out.stdout.strip() or 0),
                   "1 CPU (taskset)" if cpus is not None else "2 processes, unpinned")


# ------------------------------------------------------------------------------ archive
def archive_store(root: Path, *, segments: int, per_stream: int = 100) -> None:
    """``segments`` small segments (4 KiB) of node ``NODE`` in namespace ``archive``."""
    store = FileStore(root)
    now = datetime.now(UTC)
    gen = datagen._Lines(7)
    block = gen.chunk()
    for s in range(-(-segments // per_stream)):
        sid = StreamId("archive", f"pod-{s:03d}", f"uid-{s:04d}", "app", 0)
        prev, offset = "", 0
        for i in range(min(per_stream, segments - s * per_stream)):
            start = (s * 7919 + i * 4096) % (len(block) - 8192)
            start = block.index(b"\n", start) + 1
            data = block[start:block.rindex(b"\n", start, start + 4096) + 1]
            sha = hashlib.sha256(data).hexdigest()
            ts = rfc3339(now - timedelta(minutes=10) + timedelta(milliseconds=i))
            meta = {"ek-node": NODE, "ek-namespace": sid.namespace, "ek-pod": sid.pod,
                    "ek-pod-uid": sid.pod_uid, "ek-container": "app", "ek-restart": "0",
                    "ek-offset": str(offset), "ek-length": str(len(data)), "ek-sha256": sha,
                    "ek-prev-sha256": prev, "ek-first-ts": ts, "ek-last-ts": ts}
            key = segment_key("", CLUSTER, sid, offset, offset + len(data), "zst")
            store.put(key, compress(data, "zstd", 3), meta)
            prev, offset = sha, offset + len(data)


def measure_archive(work: Path, segments: int) -> list[tuple[str, float, str]]:
    store_dir, spool, pods = work / "archive-store", work / "archive-spool", work / "pods"
    for d in (store_dir, spool, pods):
        if d.exists():
            shutil.rmtree(d)
    pods.mkdir(parents=True)
    say(f"archive: writing {segments} segments ...")
    archive_store(store_dir, segments=segments)
    token = work / "token"
    token.write_text(TOKEN)
    config = work / "agent.yaml"
    config.write_text(
        f"node_name: {NODE}\ncluster: {CLUSTER}\nlog_root: {pods}\nspool_dir: {spool}\n"
        f"store_url: file://{store_dir}\nkubernetes: 'off'\nlisten: 127.0.0.1:19395\n"
        f"archive_token_file: {token}\nlog_level: warning\n")
    proc = subprocess.Popen([sys.executable, "-m", "evidence_keeper.cli", "run", "--config",
                             str(config)], stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:19395"
    rows: list[tuple[str, float, str]] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if call(url, "/readyz", accept_status=(503,))[0] == 200:
                    break
            except ApiError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not become ready")
            time.sleep(0.1)
        say("archive: POST /archive ...")
        t0 = time.perf_counter()
        _, doc = call(url, "/archive", method="POST", token=TOKEN,
                      body={"namespace": "archive", "reason": "benchmark"})
        while doc["status"] not in ("complete", "failed"):
            time.sleep(0.05)
            _, doc = call(url, f"/archives/{doc['id']}", token=TOKEN)
        seconds = time.perf_counter() - t0
        if doc["status"] != "complete":
            raise RuntimeError(f"archive failed: {doc['error']}")
        m = json.loads((store_dir / doc["manifest_key"]).read_bytes())
        n = len(m["segments"])
        rows.append((f"POST /archive -> complete, {n} segments", seconds,
                     "includes the 1 s capture bound the job waits out first"))
        rows.append((f"  of which listing, {n} heads, manifest", max(0.0, seconds - 1.0),
                     "file:// store, 16 head threads"))
        t0 = time.perf_counter()
        report = verify_archive(FileStore(store_dir), cluster=CLUSTER, archive_id=doc["id"])
        rows.append((f"verify, {report.segments} segments", time.perf_counter() - t0,
                     "ok" if report.ok else f"{len(report.problems)} problems"))
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


# ------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search_bench", description=__doc__)
    p.add_argument("--gib", type=float, default=1.0, help="raw size of the store (default 1)")
    p.add_argument("--streams", type=int, default=24)
    p.add_argument("--archive-segments", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=20251110)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the work directory")
    p.add_argument("--quick", action="store_true", help="0.1 GiB and 1000 archive segments")
    args = p.parse_args(argv)
    if args.quick:
        args.gib, args.archive_segments = 0.1, 1000
    if shutil.which("zstdcat") is None:
        say("zstdcat not found: apt-get install zstd")
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ek-search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    root = work / "store"
    say(f"store: {args.gib:g} GiB in {args.streams} streams at {root} ...")
    t0 = time.perf_counter()
    nbytes, objects = build_store(root, total=int(args.gib * 2**30), streams=args.streams,
                                  seed=args.seed)
    say(f"  {nbytes / 2**20:.0f} MiB raw in {objects} objects ({time.perf_counter() - t0:.0f} s)")
    files = sorted(root.rglob("*.log.zst"))
    compressed = sum(f.stat().st_size for f in files)
    store = FileStore(root)
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    everything = Scope(NAMESPACE)
    # A one-minute window in the middle of the data's hour.
    start = datetime.fromtimestamp(datagen.START_EPOCH, UTC) + timedelta(minutes=3)
    window = Scope(NAMESPACE, since=start, until=start + timedelta(minutes=1))
    os.sync()
    measures: list[Measure] = []
    cases = [("PAYMENT_FAILED", True, "-F", "common fixed string"),
             ("ORD-0000004242", True, "-F", "rare fixed string"),
             (r"amount=[0-9]{4}\.[0-9]{2} currency=EUR", False, "-E", "regex")]
    for pattern, fixed, flag, what in cases:
        for f in files:  # same page-cache state for both sides
            f.read_bytes()
        os.sched_setaffinity(0, {cpu})
        try:
            say(f"search {what}: evidence-keeper ...")
            ours = our_search(store, pattern, fixed=fixed, scope=everything,
                              name=f"evidence-keeper search ({what}), 1 CPU")
        finally:
            os.sched_setaffinity(0, allowed)
        say(f"  {ours.mb_s:.0f} MB/s, {ours.matches} matches")
        one = shell_search(files, flag, pattern, cpus=str(cpu),
                           name=f"zstdcat | grep {flag} ({what})", scanned=nbytes)
        two = shell_search(files, flag, pattern, cpus=None,
                           name=f"zstdcat | grep {flag} ({what})", scanned=nbytes)
        for m in (one, two):
            if m.matches != ours.matches:
                m.note += f"; COUNT DIFFERS ({m.matches} vs {ours.matches})"
        say(f"  zstdcat|grep {one.mb_s:.0f} MB/s (1 CPU), {two.mb_s:.0f} MB/s (unpinned)")
        measures += [ours, one, two]
    say("search in a one-minute window ...")
    windowed = our_search(store, "PAYMENT_FAILED", fixed=True, scope=window,
                          name="evidence-keeper search, 1-minute --since/--until")
    windowed.note += f"; {nbytes / windowed.seconds / 1e6:.0f} MB/s of the whole store"
    measures.append(windowed)
    archive_rows = measure_archive(work, args.archive_segments)

    print(f"\nSearch: {nbytes / 2**30:.2f} GiB raw ({nbytes / compressed:.1f}x zstd, {objects}"
          f" objects of 8 MiB) in a file:// store; page cache warm; "
          f"{os.cpu_count()} CPUs ({_cpu_model()}).\n")
    print("| what | time | raw MB/s | CPU s | matches | note |")
    print("|---|---:|---:|---:|---:|---|")
    for m in measures:
        cpu_s = f"{m.cpu_seconds:.1f}" if m.cpu_seconds is not None else "-"
        print(f"| {m.name} | {m.seconds:.2f} s | {m.mb_s:.0f} | {cpu_s} | {m.matches} |"
              f" {m.note} |")
    print(f"\nArchive latency ({args.archive_segments} segments of 4 KiB, one node,"
          " file:// store, agent as a subprocess):\n")
    print("| what | time | note |")
    print("|---|---:|---|")
    for name, seconds, note in archive_rows:
        print(f"| {name} | {seconds:.2f} s | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
