"""The gap ledger in the store: shipping cost, reading the whole cluster back, verifying it.

Usage: ``python -m bench.ledger_bench [--nodes 10] [--objects 100] [--records 10]
[--workdir DIR]``. Results on stdout (copied into ``docs/benchmarks.md``).

1. **Ship**: per node, a real SQLite ledger records ``--records`` gap changes (loss records
   and coverage updates of one outage), then the ledger shipper ships them as one object;
   ``--objects`` times (a busy node: one object per flush interval). Measured: the time per
   object (a durable pending state, a put, a durable commit) into a ``file://`` store.
2. **Idle tick**: the cost of the shipper's tick when nothing changed (the agent runs it every
   ``min(1 s, flush_interval_s / 2)``).
3. **Read**: ``gaps --from-store``'s work (list, fetch and decompress every object in
   parallel, fold into the newest state per gap) over the whole cluster; then ``verify
   --ledger`` (bodies, hashes, chain links).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import describe
from evidence_keeper.archive.ledger import newest_gaps, read_ledger, verify_ledger
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.health.ledgership import LedgerShipConfig, LedgerShipper
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.store import FileStore


def ship_node(work: Path, store: FileStore, node: str, *, objects: int,
              records: int) -> tuple[float, float]:
    """Seconds spent recording and shipping one node's ledger."""
    ledger = Ledger(work / node / "ledger.sqlite")
    shipper = LedgerShipper(ledger, store, LedgerShipConfig(node=node, cluster="bench"),
                            metrics=Metrics())
    sid = StreamId("shop", "orders-1", "uid-1", "app", 0)
    gap = ledger.open_gap("sink_outage", dedup="o", at=datetime.now(UTC), sink="loki",
                          check="dns")
    recording = shipping = 0.0
    offset = 0
    for n in range(objects):
        t0 = time.perf_counter()
        for r in range(records):
            if r % 2:
                ledger.update_gap(gap, extra=json.dumps({"coverage": {"captured_bytes": offset}}))
            else:
                ledger.record_loss(Loss(sid, offset, 100, "evicted", f"bench {n}/{r}"),
                                   at=datetime.now(UTC))
            offset += 100
        t1 = time.perf_counter()
        shipper.ship_all()
        t2 = time.perf_counter()
        recording += t1 - t0
        shipping += t2 - t1
    ledger.close()
    return recording, shipping


def idle_tick_us(work: Path, store: FileStore) -> float:
    ledger = Ledger(work / "idle" / "ledger.sqlite")
    shipper = LedgerShipper(ledger, store, LedgerShipConfig(node="idle", cluster="bench"),
                            metrics=Metrics())

    async def ticks(n: int) -> float:
        await shipper.tick()  # the first one looks at the outbox
        t0 = time.perf_counter()
        for _ in range(n):
            await shipper.tick()
        return (time.perf_counter() - t0) / n * 1e6

    result = asyncio.run(ticks(10_000))
    ledger.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--objects", type=int, default=100, help="ledger objects per node")
    p.add_argument("--records", type=int, default=10, help="gap changes per object")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ek-ledger-bench-"))
    store = FileStore(work / "store")
    machine = describe(work, Path(__file__).resolve().parent.parent)
    print(f"# {machine}", flush=True)
    rec = ship = 0.0
    for i in range(args.nodes):
        r, s = ship_node(work, store, f"node-{i:03d}", objects=args.objects,
                         records=args.records)
        rec, ship = rec + r, ship + s
        print(f"node {i + 1}/{args.nodes} shipped", file=sys.stderr, flush=True)
    total_objects = args.nodes * args.objects
    total_records = total_objects * args.records
    t0 = time.perf_counter()
    objects = read_ledger(store, "bench")
    gaps = newest_gaps(objects)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = verify_ledger(store, "bench")
    verify_s = time.perf_counter() - t0
    assert report.ok, report.problems
    assert len(gaps) == args.nodes * (1 + args.objects * ((args.records + 1) // 2))
    print(f"ledger: {args.nodes} nodes, {total_objects} objects, {total_records} records")
    print(f"record a gap change (SQLite, synchronous=FULL): {rec / total_records * 1e3:.2f} ms")
    print(f"ship one object (pending, put, commit; file store): {ship / total_objects * 1e3:.2f}"
          " ms")
    print(f"idle tick (nothing changed): {idle_tick_us(work, store):.1f} us")
    print(f"gaps --from-store (list, fetch, fold {len(gaps)} gaps): {read_s:.2f} s,"
          f" {total_objects / read_s:.0f} objects/s")
    print(f"verify --ledger: {verify_s:.2f} s")
    if not args.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
