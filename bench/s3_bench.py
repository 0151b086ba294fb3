"""S3 shipping benchmark (issue 3): the agent against a plain boto3 loop, PUT cost, latency.

Against moto's S3 server on loopback (the only S3 reachable here; it bounds what can be
measured, which is why the agent is compared with a plain ``put_object`` loop of the same
segments in the same run rather than with an absolute number):

1. **Drain ratio.** A spool is filled with ``--mib`` of CRI lines while the store is
   unreachable; then the agent starts with the store reachable and drains it. Its throughput
   (raw MB/s shipped) is compared with a plain sequential ``put_object`` loop of the same
   compressed segment bodies. Goal: ratio ≥ 0.8.
2. **Cost.** PUT requests per GiB shipped at default settings (8 MiB segments).
3. **Latency under a steady 5 MB/s load** for ``--seconds``: p50/p99 of capture → stored,
   per segment (the definition of ``evidence_keeper_ship_latency_seconds``).

Run: ``.venv/bin/python -m bench.s3_bench [--mib 256] [--seconds 30] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from evidence_keeper.logs import configure_logging
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.spool.spool import SealedSegment, SpoolStream
from evidence_keeper.store.codec import compress
from evidence_keeper.supervisor import Agent

WORDS = ("order", "payment", "PAYMENT_FAILED", "cart", "user", "shipping", "refused", "ok",
         "latency", "retry", "stripe", "timeout", "GET", "POST", "/orders", "200", "503")


def _line(rng: random.Random, n: int) -> bytes:
    msg = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
    return (f"2025-11-10T12:{n // 60000 % 60:02d}:{n // 1000 % 60:02d}.{n % 1000:03d}000000Z"
            f" stdout F {msg} id={rng.getrandbits(64):016x} amount={rng.randint(1, 99999) / 100}"
            "\n").encode()


def _fill(path: Path, size: int, seed: int) -> int:
    rng = random.Random(seed)
    written, n = 0, 0
    with path.open("ab") as f:
        while written < size:
            block = b"".join(_line(rng, n + i) for i in range(2000))
            n += 2000
            f.write(block)
            written += len(block)
    return written


def _settings(work: Path, url: str, bucket: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "node_name": "bench", "log_root": str(work / "pods"), "spool_dir": str(work / "spool"),
        "store_url": f"s3://{bucket}/bench", "s3_endpoint_url": url, "kubernetes": "off",
        "listen": "127.0.0.1:0", "log_level": "error", "spool_max_bytes": "8GiB",
    }
    base.update(kw)
    return load_settings(None, environ={}, overrides=base)


async def _run_until(agent: Agent, done: Any, timeout_s: float) -> float:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    start = time.monotonic()
    try:
        while not done():
            if task.done():
                task.result()
            if time.monotonic() - start > timeout_s:
                raise TimeoutError("benchmark phase timed out")
            await asyncio.sleep(0.05)
        return time.monotonic() - start
    finally:
        stop.set()
        await task


def drain_ratio(work: Path, url: str, mib: int) -> dict[str, Any]:
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="drain")
    sim = KubeletSim(work / "pods")
    files = 8
    for i in range(files):
        sim.add_pod("bench", f"writer-{i}", containers=("app",))
    total = sum(_fill(sim.path_of("bench", f"writer-{i}", "app"), mib * 2**20 // files, i)
                for i in range(files))
    # Phase A: capture with the store unreachable (nothing ships), so the spool holds it all.
    down = _settings(work, "http://127.0.0.1:9", "drain", shutdown_timeout_s=1)
    agent = Agent(down)
    captured = agent.metrics.registry
    asyncio.run(_run_until(agent, lambda: (captured.get_sample_value(
        "evidence_keeper_captured_bytes_total") or 0) >= total, 600))
    agent.close()
    # The same segments: the plain loops' input.
    raws = [p.read_bytes() for p in sorted((work / "spool" / "spool").rglob("*.seg"))]
    # Phase B: the agent drains the spool into S3.
    agent = Agent(_settings(work, url, "drain"))
    reg = agent.metrics.registry
    started: list[float] = []

    def drained() -> bool:
        if not started and agent.status.recovered:
            started.append(time.monotonic())  # the drain clock starts once recovery is done
        return (reg.get_sample_value("evidence_keeper_shipped_bytes_total") or 0) >= total

    asyncio.run(_run_until(agent, drained, 600))
    agent_s = time.monotonic() - started[0]
    puts = reg.get_sample_value("evidence_keeper_segments_shipped_total") or 0
    agent.close()
    # Baseline: a plain put_object loop of the same compressed bodies.
    client.create_bucket(Bucket="plain")
    # (a) what a hand-written shipper must do too: hash, compress, PUT — one at a time.
    start = time.monotonic()
    bodies = []
    for i, raw in enumerate(raws):
        digest = hashlib.sha256(raw).hexdigest()
        body = compress(raw, "zstd", 3)
        bodies.append(body)
        client.put_object(Bucket="plain", Key=f"a/{i:06d}", Body=body,
                          Metadata={"ek-sha256": digest}, ChecksumAlgorithm="SHA256")
    loop_s = time.monotonic() - start
    # (b) PUTs alone of the already-compressed bodies: the endpoint's ceiling.
    start = time.monotonic()
    for i, body in enumerate(bodies):
        client.put_object(Bucket="plain", Key=f"b/{i:06d}", Body=body,
                          ChecksumAlgorithm="SHA256")
    put_s = time.monotonic() - start
    mbs = {k: total / v / 1e6 for k, v in (("agent", agent_s), ("loop", loop_s),
                                             ("put", put_s))}
    return {"raw_bytes": total, "segments": len(raws), "agent_s": round(agent_s, 2),
            "agent_MBps": round(mbs["agent"], 1),
            "plain_loop_s": round(loop_s, 2), "plain_loop_MBps": round(mbs["loop"], 1),
            "put_only_s": round(put_s, 2), "put_only_MBps": round(mbs["put"], 1),
            "ratio_vs_plain_loop": round(mbs["agent"] / mbs["loop"], 2),
            "ratio_vs_put_only": round(mbs["agent"] / mbs["put"], 2),
            "objects": int(puts), "puts_per_GiB": round(puts / (total / 2**30), 1)}


def steady_latency(work: Path, url: str, seconds: float, rate_mbs: float) -> dict[str, Any]:
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="steady")
    sim = KubeletSim(work / "pods")
    writers = 4
    for i in range(writers):
        sim.add_pod("steady", f"w-{i}", containers=("app",))
    agent = Agent(_settings(work, url, "steady"))
    latencies: list[float] = []
    ack = agent.spool.acknowledge

    def timed_ack(s: SpoolStream, seg: SealedSegment, sha256: str) -> None:
        latencies.append(time.time() - seg.captured_at)
        ack(s, seg, sha256)

    agent.spool.acknowledge = timed_ack  # type: ignore[method-assign]
    stop_writing = threading.Event()
    written = [0]

    def writer() -> None:
        rng = random.Random(7)
        chunk = rate_mbs * 1e6 / 10 / writers  # ten ticks a second, per writer
        start, tick = time.monotonic(), 0
        while not stop_writing.is_set():
            for i in range(writers):
                block, n = b"", 0
                while len(block) < chunk:
                    block += _line(rng, n)
                    n += 1
                with sim.path_of("steady", f"w-{i}", "app").open("ab") as f:
                    f.write(block)
                written[0] += len(block)
            tick += 1
            time.sleep(max(0.0, start + tick / 10 - time.monotonic()))

    t = threading.Thread(target=writer, daemon=True)
    reg = agent.metrics.registry

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(1)
        t.start()
        await asyncio.sleep(seconds)
        stop_writing.set()
        t.join()
        deadline = time.monotonic() + 60
        while (reg.get_sample_value("evidence_keeper_shipped_bytes_total") or 0) < written[0]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(main())
    agent.close()
    q = statistics.quantiles(latencies, n=100)
    return {"seconds": seconds, "rate_MBps": rate_mbs, "bytes": written[0],
            "segments": len(latencies), "p50_s": round(q[49], 2), "p99_s": round(q[98], 2),
            "max_s": round(max(latencies), 2), "flush_interval_s": 5.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=5.0, help="steady load, MB/s")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    configure_logging("critical")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ek-s3bench-") as d:
            print(f"drain: filling a spool with {args.mib} MiB, then shipping it ...",
                  flush=True)
            results["drain"] = drain_ratio(Path(d) / "drain", url, args.mib)
            print(json.dumps(results["drain"]), flush=True)
            print(f"steady: {args.rate} MB/s for {args.seconds:g} s ...", flush=True)
            results["steady"] = steady_latency(Path(d) / "steady", url, args.seconds, args.rate)
            print(json.dumps(results["steady"]), flush=True)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
