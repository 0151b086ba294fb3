"""End to end on a simulated node: every stream exported from the store equals what was written."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Callable
from pathlib import Path

from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim, churn
from evidence_keeper.store import FileStore, Store
from tests.conftest import running_agent, wait_read


def exported(store: Store, sid: StreamId, cluster: str = "default") -> bytes:
    streams = find_streams(store, cluster=cluster, namespace=sid.namespace, pod=sid.pod,
                           container=sid.container, restart=sid.restart, pod_uid=sid.pod_uid)
    if not streams:
        return b""
    buf = io.BytesIO()
    report = export_stream(store, streams[0], buf)
    assert report.holes == []
    return buf.getvalue()


async def test_simple_stream_round_trip(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1", containers=("app",))
    store = FileStore(tmp_path / "store")

    async def caught_up() -> None:
        await wait_read(agent, store, {sid: sim.record(sid) for sid in sim.streams()})

    async with running_agent(settings) as agent:
        for i in range(50):
            sim.write("shop", "orders-1", "app", f"order {i} PAYMENT_FAILED")
        await caught_up()
        sim.rotate("shop", "orders-1", "app", late_write=b"2025-11-10T00:00:00Z stdout F hal",
                   then_write=b"f line\n")
        for i in range(50):
            sim.write("shop", "orders-1", "app", f"order {i} again")
        await caught_up()
        sim.restart("shop", "orders-1", "app")
        sim.write("shop", "orders-1", "app", "after restart")
        await caught_up()
        assert agent.spool.streams
    for sid in sim.streams():
        assert exported(store, sid) == sim.record(sid), sid


async def test_churn_byte_exact(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(segment_max_bytes="256KiB")
    sim = KubeletSim(tmp_path / "pods", max_files=4)
    rng = random.Random(20251110)
    churn(sim, rng, pods=12, steps=0)
    store = FileStore(tmp_path / "store")
    async with running_agent(settings) as agent:
        for _ in range(30):
            churn(sim, rng, pods=12, steps=40, rotate_p=0.08, restart_p=0.02)
            await asyncio.sleep(0.15)  # pacing: the agent reads while kubelet rotates (and
            # deletes the oldest of max_files): a node writes over time, not all at once
        churn(sim, rng, pods=12, steps=3, big_line_every=1)
        await wait_read(agent, store, {sid: sim.record(sid) for sid in sim.streams()},
                        within=60)
    assert len(sim.streams()) >= 20
    for sid in sim.streams():
        assert exported(store, sid) == sim.record(sid), sid
