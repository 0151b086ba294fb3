"""Faults found in review: each one lost or duplicated evidence silently before its fix."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

from evidence_keeper.discover.logtree import LogTree
from evidence_keeper.fsio import FileSystem
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.spool.spool import Spool
from evidence_keeper.tail.tailer import Tailer
from tests.conftest import running_agent, wait_until


class Faults(FileSystem):
    def __init__(self) -> None:
        self.enospc_writes = 0
        self.eio_listdirs: set[str] = set()

    def pwrite(self, fd: int, data: bytes | memoryview, pos: int) -> int:
        if self.enospc_writes:
            self.enospc_writes -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().pwrite(fd, data, pos)

    def listdir(self, path: str) -> list[str]:
        if path in self.eio_listdirs:
            self.eio_listdirs.discard(path)
            raise OSError(errno.EIO, "Input/output error")
        return super().listdir(path)


def _pipeline(root: Path, fs: Faults, losses: list[Loss]) -> tuple[Spool, Tailer, LogTree]:
    spool = Spool(root / "spool", segment_max_bytes=1 << 20, flush_interval_s=5,
                  max_bytes=1 << 30, record_loss=losses.append, metrics=Metrics(), fs=fs,
                  error_backoff_s=0)
    spool.recover()
    return spool, Tailer(spool, metrics=Metrics(), fs=fs, retry_s=0), LogTree(
        str(root / "pods"), fs=fs)


def _spooled(spool: Spool, sim: KubeletSim) -> bytes:
    spool.seal_all()
    s = spool.streams[sim.streams()[0]]
    return b"".join(Path(seg.path).read_bytes() for seg in s.sealed)


def test_spool_error_while_reading_a_gz_rereads_exactly(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=5)
    sim.add_pod("shop", "orders-1")
    for i in range(3000):
        sim.write("shop", "orders-1", "app", f"order {i} PAYMENT_FAILED " + "x" * 40)
    sim.rotate("shop", "orders-1", "app")
    sim.write("shop", "orders-1", "app", "between rotations")
    sim.rotate("shop", "orders-1", "app")  # the first rotated file is now a .gz
    assert any(p.name.endswith(".gz") for p in sim.files_of(sim.streams()[0]))
    fs, losses = Faults(), list[Loss]()
    spool, tailer, tree = _pipeline(tmp_path, fs, losses)
    tailer.sync(tree.scan())
    fs.enospc_writes = 1  # the first write, from the .gz, fails: the disk is full
    for _ in range(6):
        tailer.pump()
    assert _spooled(spool, sim) == sim.record(sim.streams()[0])
    assert losses == []


def test_unreadable_directory_does_not_end_its_streams(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1")
    sim.write("shop", "orders-1", "app", "before the glitch")
    fs, losses = Faults(), list[Loss]()
    spool, tailer, tree = _pipeline(tmp_path, fs, losses)
    tailer.sync(tree.scan())
    tailer.pump()
    cdir = str(sim.path_of("shop", "orders-1", "app").parent)
    os.utime(cdir, (1, 1))  # the cached listing must be taken again
    fs.eio_listdirs.add(cdir)
    tailer.sync(tree.scan())  # EIO: the stream must not look deleted
    sim.write("shop", "orders-1", "app", "after the glitch")
    for _ in range(3):
        tailer.sync(tree.scan())
        tailer.pump()
    assert not tailer.tails[sim.streams()[0]].gone
    assert _spooled(spool, sim) == sim.record(sim.streams()[0])
    assert losses == []


async def test_a_damaged_spool_segment_is_recorded_and_does_not_stop_shipping(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1")
    sim.add_pod("shop", "payment-1")
    # A store that is down at first, so segments wait in the spool where one gets damaged.
    settings = make_settings(flush_interval_s=1, store_url=f"file://{tmp_path / 'store'}")
    async with running_agent(settings) as agent:
        real_put = agent.store.put
        gate = asyncio.Event()

        def put(*args: object, **kwargs: object) -> None:
            if not gate.is_set():
                raise OSError("store down")
            real_put(*args, **kwargs)  # type: ignore[arg-type]

        agent.store.put = put  # type: ignore[method-assign]
        sim.write("shop", "orders-1", "app", "this segment will be damaged on disk")
        sim.write("shop", "payment-1", "app", "this one ships")
        orders = sim.stream_of("shop", "orders-1", "app")
        def committed() -> bool:
            s = agent.spool.streams.get(orders)
            return s is not None and bool(s.sealed) and s.sealed[0].committed

        await wait_until(committed, within=20, what="the orders segment to be committed")
        seg = agent.spool.streams[orders].sealed[0]
        os.unlink(seg.path)
        agent.shipper.breaker.succeeded()
        gate.set()
        await wait_until(lambda: agent.spool.total_bytes() == 0, within=20,
                         what="the spool to drain")
        losses = agent.ledger.gaps(kind="loss")
        assert [(g.fields["reason"], g.fields["offset"], g.fields["bytes"]) for g in losses] == [
            ("spool_corrupt", seg.start, seg.length)]
        shipped = agent.metrics.registry.get_sample_value("evidence_keeper_shipped_bytes_total")
        payment = sim.record(sim.stream_of("shop", "payment-1", "app"))
        assert shipped == len(payment)
