"""Kubernetes watcher benchmarks (issue 5).

1. **Watch-event handling cost**: events per second one core handles, measured two ways:
   ``handle_line`` alone on pre-serialised watch lines (JSON decode, pod view, transition,
   lifecycle dedup, jobs), for no-op ``MODIFIED`` events and for restart events; and end to end
   through the official ``kubernetes.aio`` client reading a watch stream from the fake API server
   over loopback (the server runs in a thread of the same process, so this shares the core).
2. **Restart → previous log in the store**: an agent with production timings (flush 5 s,
   discover 0.5 s, tail 0.2 s, commit 0.25 s) on a simulated node; a container writes, then the
   fake API reports its restart while the simulator starts the next instance; the clock runs
   from the event until the previous instance's stream, exported from the file store, equals
   what was written. Goal: p99 <= 2 s on loopback.

Usage: ``python -m bench.kube_bench [--events 20000] [--restarts 100] [--quick]``.
Results go to stdout as a small table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.discover.kube import KubeTuning, KubeWatcher
from evidence_keeper.logs import configure_logging
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from evidence_keeper.supervisor import Agent
from tests.fakekube import FakeKube

NS = "bench"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings_for(work: Path, **over: Any) -> Settings:
    (work / "pods").mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "node_name": "node-1", "log_root": str(work / "pods"), "spool_dir": str(work / "spool"),
        "store_url": f"file://{work / 'store'}", "kubernetes": "on", "log_level": "warning",
        "listen": "127.0.0.1:0",
    }
    base.update(over)
    return load_settings(None, environ={}, overrides=base)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def poll_until(cond: Callable[[], bool], *, interval: float = 0.02,
                     within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish in time")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------ 1. events
def watch_lines(fake: FakeKube, *, pods: int, containers: int, events: int,
                restart_every: int) -> list[bytes]:
    """Watch event lines as the API server sends them (the fake's history, serialised)."""
    names = [f"c{i}" for i in range(containers)]
    for i in range(pods):
        fake.add_pod(NS, f"pod-{i}", uid=f"uid-{i:05d}", containers=names,
                     labels={"app": f"svc-{i % 7}", "team": "bench", "version": "1.2.3"})
    rng = random.Random(5)
    for n in range(events):
        pod = f"pod-{rng.randrange(pods)}"
        if restart_every and n % restart_every == 0:
            fake.restart_container(NS, pod, rng.choice(names))
        else:
            fake.touch(NS, pod)
    return [json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"
            for _rv, etype, obj in fake._history]


def handler_rate(work: Path, *, events: int, restart_every: int) -> tuple[float, int, int]:
    """(events/s, events, mean line bytes) of ``KubeWatcher.handle_line`` alone."""
    fake = FakeKube(node="node-1")  # never started: only its pod objects are used
    lines = watch_lines(fake, pods=110, containers=3, events=events,
                        restart_every=restart_every)
    agent = Agent(settings_for(work))
    try:
        watcher = agent.kube
        assert watcher is not None
        t0 = time.perf_counter()
        for line in lines:
            watcher.handle_line(line)
        dt = time.perf_counter() - t0
    finally:
        agent.close()
    return len(lines) / dt, len(lines), sum(map(len, lines)) // len(lines)


async def client_rate(work: Path, *, events: int) -> tuple[float, int]:
    """Events/s read through kubernetes.aio from the fake server over loopback."""
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    with FakeKube(node="node-1") as fake:
        os.environ["KUBECONFIG"] = str(fake.write_kubeconfig(work / "kubeconfig"))
        for i in range(110):
            fake.add_pod(NS, f"pod-{i}", uid=f"uid-{i:05d}", containers=("a", "b", "c"))
        agent = Agent(settings_for(work))
        watcher = agent.kube
        assert watcher is not None
        watcher.tuning = KubeTuning(watch_timeout_s=600)
        try:
            v1 = await watcher._core()
            rv = await watcher._relist(v1)
            task = asyncio.create_task(watcher._watch_once(v1, rv))
            await poll_until(lambda: fake.stats.watches >= 1)
            base = watcher.events

            def produce() -> None:
                for n in range(events):
                    fake.touch(NS, f"pod-{n % 110}")

            t0 = time.perf_counter()
            await asyncio.to_thread(produce)
            await poll_until(lambda: watcher.events - base >= events, interval=0.005)
            dt = time.perf_counter() - t0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            if watcher._api is not None:
                await watcher._api.close()
            agent.close()
    return events / dt, events


# ------------------------------------------------------------------------------ 2. latency
def exported(store: FileStore, sid: StreamId) -> bytes:
    streams = find_streams(store, cluster="default", namespace=sid.namespace, pod=sid.pod,
                           container=sid.container, restart=sid.restart, pod_uid=sid.pod_uid)
    if not streams:
        return b""
    buf = io.BytesIO()
    export_stream(store, streams[0], buf)
    return buf.getvalue()


async def restart_latency(work: Path, *, restarts: int, pods: int = 10,
                          containers: int = 2) -> list[float]:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    sim = KubeletSim(work / "pods")
    store = FileStore(work / "store")
    out: list[float] = []
    with FakeKube(node="node-1") as fake:
        os.environ["KUBECONFIG"] = str(fake.write_kubeconfig(work / "kubeconfig"))
        names = [f"c{i}" for i in range(containers)]
        for i in range(pods):
            sim.add_pod(NS, f"pod-{i}", containers=names)
            fake.add_pod(NS, f"pod-{i}", uid=sim.pod_uid(NS, f"pod-{i}"), containers=names)
        agent = Agent(settings_for(work))  # production timings
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        watcher: KubeWatcher | None = agent.kube
        assert watcher is not None
        await poll_until(lambda: watcher.synced)
        rng = random.Random(11)
        pending: dict[StreamId, float] = {}

        async def poll() -> None:
            while pending or not done.is_set():
                for sid, t0 in list(pending.items()):
                    if exported(store, sid) == sim.record(sid):
                        out.append(time.monotonic() - t0)
                        del pending[sid]
                await asyncio.sleep(0.01)

        done = asyncio.Event()
        poller = asyncio.create_task(poll())
        busy: dict[tuple[str, str], float] = {}
        for n in range(restarts):
            pod, c = f"pod-{rng.randrange(pods)}", rng.choice(names)
            # A container restarts at most every 2 s (kubelet's back-off is longer).
            await asyncio.sleep(max(0.0, busy.get((pod, c), 0.0) + 2.0 - time.monotonic()))
            for i in range(rng.randint(20, 200)):
                sim.write(NS, pod, c, f"{pod}/{c} event {n} line {i} " + "x" * rng.randint(0, 200))
            await asyncio.sleep(rng.uniform(0.05, 0.6))  # the crash comes a little later
            prev = sim.stream_of(NS, pod, c)
            t0 = time.monotonic()
            sim.restart(NS, pod, c)
            fake.restart_container(NS, pod, c)
            pending[prev] = t0
            busy[(pod, c)] = t0
            await asyncio.sleep(0.1)
            if n % 20 == 19:
                say(f"  {n + 1}/{restarts} restarts")
        done.set()
        await asyncio.wait_for(poller, timeout=60)
        stop.set()
        await task
        agent.close()
    return out


# ------------------------------------------------------------------------------ main
async def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kube_bench", description=__doc__)
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--restarts", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="2000 events, 20 restarts")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.restarts = 2000, 20
    configure_logging("warning")
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    with tempfile.TemporaryDirectory(prefix="ek-kube-bench-") as tmp:
        root = Path(tmp)
        say("handle_line: no-op MODIFIED events ...")
        noop_rate, noop_n, line_bytes = handler_rate(root / "h1", events=args.events,
                                                     restart_every=0)
        say("handle_line: restart events ...")
        rs_rate, rs_n, _ = handler_rate(root / "h2", events=max(200, args.events // 10),
                                        restart_every=1)
        say("watch stream through kubernetes.aio over loopback ...")
        wire_rate, wire_n = await client_rate(root / "w", events=args.events)
        say(f"restart -> previous log in store, {args.restarts} restarts ...")
        lat = await restart_latency(root / "r", restarts=args.restarts)
    print("| measurement | result |")
    print("|---|---|")
    print(f"| watch events handled, no-op MODIFIED ({noop_n} events, ~{line_bytes} B each, "
          f"one core) | {noop_rate:,.0f} events/s |")
    print(f"| watch events handled, restarts ({rs_n} events) | {rs_rate:,.0f} events/s |")
    print(f"| watch events through kubernetes.aio over loopback ({wire_n} events, fake server "
          f"in-process) | {wire_rate:,.0f} events/s |")
    print(f"| restart event -> previous log in store ({len(lat)} restarts) | "
          f"p50 {statistics.median(lat):.3f} s, p90 {percentile(lat, 90):.3f} s, "
          f"p99 {percentile(lat, 99):.3f} s, max {max(lat):.3f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
