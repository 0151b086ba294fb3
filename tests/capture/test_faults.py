"""Disk faults injected through the :class:`FileSystem` seam (``Agent(settings, fs=...)``).

Each fault is one a node really produces: a container log file with the wrong permissions
(seed 001's postmortem), a full disk under the spool, a segment file that cannot be created,
an fsync that fails once. The agent must keep running, count the error in its metrics, and
either capture every byte once the fault clears or record the exact hole as ``loss``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from evidence_keeper.supervisor import Agent
from tests.conftest import (
    AliasedInodes,
    assert_bytes_equal,
    check_segments,
    export_bytes,
    loss_gaps,
    running_agent,
    settle,
    stored_segments,
    wait_exported,
    wait_until,
)
from tests.support.stream import assert_stored, one_stream

NS, POD, APP = "shop", "payment-1", "app"


class FaultyFS(AliasedInodes):
    """A file system whose faults the test switches on and off while the agent runs.

    - ``deny_reads[path] = n``: the next ``n`` opens of ``path`` for reading fail with EACCES
      (``-1``: until the entry is removed);
    - ``disk_full``: every spool ``pwrite`` fails with ENOSPC;
    - ``partial_writes = n``: the next ``n`` spool writes write half their bytes, and the call
      after each fails with ENOSPC (a disk filling up half-way through a write);
    - ``deny_segment_opens = n``: the next ``n`` spool segment creations fail with EACCES;
    - ``fail_fdatasync`` / ``fail_fsync = n``: the next ``n`` calls fail with EIO.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.deny_reads: dict[str, int] = {}
        self.denied_reads = 0
        self.disk_full = False
        self.partial_writes = 0
        self._fail_next_write = False
        self.failed_writes = 0
        self.deny_segment_opens = 0
        self.fail_fdatasync = 0
        self.fail_fsync = 0

    def open_read(self, path: str) -> int:
        with self.lock:
            left = self.deny_reads.get(path, 0)
            if left:
                if left > 0:
                    self.deny_reads[path] = left - 1
                self.denied_reads += 1
                raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().open_read(path)

    def pwrite(self, fd: int, data: bytes | memoryview, pos: int) -> int:
        with self.lock:
            if self.disk_full or self._fail_next_write:
                self._fail_next_write = False
                self.failed_writes += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.partial_writes and len(data) > 1:
                self.partial_writes -= 1
                self._fail_next_write = True
                data = data[: len(data) // 2]
        return super().pwrite(fd, data, pos)

    def open_append(self, path: str) -> int:
        with self.lock:
            if self.deny_segment_opens:
                self.deny_segment_opens -= 1
                raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().open_append(path)

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            if self.fail_fdatasync:
                self.fail_fdatasync -= 1
                raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        with self.lock:
            if self.fail_fsync:
                self.fail_fsync -= 1
                raise OSError(errno.EIO, "Input/output error")
        super().fsync(fd)


def metric(agent: Agent, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def write_lines(sim: KubeletSim, n: int, tag: str, *, pod: str = POD) -> None:
    for i in range(n):
        sim.write(NS, pod, APP, f"{tag} {i:05d} charge card=**** amount={i * 7 % 1000}")


async def stream_writes(sim: KubeletSim, seconds: float, tag: str) -> None:
    """Keep writing for ``seconds`` (the agent reads concurrently): a fault has to meet
    writes in flight, so time passing while writing is the point."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    k = 0
    while loop.time() < end:
        write_lines(sim, 20, f"{tag}-{k}")
        k += 1
        await asyncio.sleep(0.02)


async def write_until(sim: KubeletSim, cond: Callable[[], bool], tag: str, *, what: str,
                      within: float = 20.0) -> None:
    """Keep writing (the agent reads concurrently) until ``cond`` holds: a spool fault only
    shows on a write, so the writes go on until the agent has met the fault as often as the
    test needs."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    k = 0
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {within}s of writes waiting for {what}")
        write_lines(sim, 20, f"{tag}-{k}")
        k += 1
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- unreadable logs


async def test_new_pod_log_unreadable_at_first_is_captured_once_readable(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    fs = FaultyFS()
    async with running_agent(settings, fs=fs) as agent:
        sim.add_pod(NS, POD)
        sid = sim.stream_of(NS, POD, APP)
        fs.deny_reads[str(sim.path_of(NS, POD, APP))] = 3
        write_lines(sim, 50, "first")
        await wait_exported(store, sid, sim.record(sid), within=15)
        write_lines(sim, 50, "then")
        await wait_exported(store, sid, sim.record(sid))
        assert fs.denied_reads == 3
        assert metric(agent, "evidence_keeper_read_errors_total", errno="EACCES") == 3
        assert loss_gaps(agent.ledger) == []


async def test_new_log_file_after_rotation_unreadable_at_first_is_captured_once_readable(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Seed 001: the new log file of the day was created with the wrong permissions."""
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD)
    fs = FaultyFS()
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, 50, "day-1")
        await wait_exported(store, sid, sim.record(sid))
        fs.deny_reads[str(sim.path_of(NS, POD, APP))] = 2  # the next file under that name
        sim.rotate(NS, POD, APP)
        write_lines(sim, 50, "day-2")
        await wait_exported(store, sid, sim.record(sid), within=15)
        assert fs.denied_reads == 2
        assert metric(agent, "evidence_keeper_read_errors_total", errno="EACCES") == 2
        assert loss_gaps(agent.ledger) == []


async def test_log_unreadable_until_its_pod_is_deleted_is_an_unreadable_loss(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, POD)
    sim.add_pod(NS, "healthy-1")
    sid = sim.stream_of(NS, POD, APP)
    ok = sim.stream_of(NS, "healthy-1", APP)
    fs = FaultyFS()
    fs.deny_reads[str(sim.path_of(NS, POD, APP))] = -1  # never readable
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, 30, "lost")
        write_lines(sim, 30, "kept", pod="healthy-1")
        await wait_exported(store, ok, sim.record(ok))
        await wait_until(lambda: fs.denied_reads >= 1, within=10, what="an open attempt")
        denied = fs.denied_reads  # a retry after this one sees the final size
        await wait_until(lambda: fs.denied_reads > denied, within=10, what="a retried open")
        sim.delete_pod(NS, POD)
        await wait_until(lambda: bool(loss_gaps(agent.ledger, sid)), within=10,
                         what="the loss to be recorded")
        await settle(agent)  # a second gap the agent would record, it has recorded
        gaps = loss_gaps(agent.ledger, sid)
        assert metric(agent, "evidence_keeper_read_errors_total", errno="EACCES") >= 1
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap.fields["reason"] == "unreadable"
    assert gap.fields["offset"] == 0
    # The agent never saw the file's final size: unknown, or exactly the size it had.
    assert gap.fields["bytes"] in (None, sim.record_len(sid))
    assert gap.fields["detail"]
    assert export_bytes(store, sid) == (b"", [])


def unreadable_rotated_file(sim: KubeletSim, fs: FaultyFS, *, gz_readable: bool) -> tuple[
        Path, int]:
    """An unreadable rotated file before the agent starts, then a readable live file.

    Returns the rotated file's path and its length (the stream offset where the live file
    starts). Its ``.gz``, once kubelet compresses it, is unreadable too unless ``gz_readable``.
    """
    sid = sim.stream_of(NS, POD, APP)
    write_lines(sim, 40, "unreadable")
    rotated = sim.path_of(NS, POD, APP).with_name(sim.rotate(NS, POD, APP))
    write_lines(sim, 20, "readable")
    fs.deny_reads[str(rotated)] = -1
    if not gz_readable:
        fs.deny_reads[f"{rotated}.gz"] = -1
    assert sim.files_of(sid)[0] == rotated
    return rotated, rotated.stat().st_size


async def test_rotated_file_unreadable_at_first_is_captured_once_readable(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=5)
    fs = FaultyFS()
    rotated, _ = unreadable_rotated_file(sim, fs, gz_readable=False)
    fs.deny_reads[str(rotated)] = 3
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, 20, "live")
        await wait_exported(store, sid, sim.record(sid), within=15)
        assert fs.denied_reads == 3
        assert metric(agent, "evidence_keeper_read_errors_total", errno="EACCES") == 3
        assert loss_gaps(agent.ledger) == []
    check_segments(stored_segments(store, sid))


async def test_rotated_file_unreadable_until_kubelet_removes_it_is_an_exact_loss(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=3)
    fs = FaultyFS()
    rotated, hole = unreadable_rotated_file(sim, fs, gz_readable=False)
    # Keep the inode alive after kubelet deletes the file, so the file system cannot hand its
    # number to the next new file (that case is the test below).
    with rotated.open("rb"):
        async with running_agent(settings, fs=fs) as agent:
            await wait_until(lambda: fs.denied_reads >= 2, within=10, what="a retried open")
            for r in range(2):  # the first compresses the unreadable file, the second removes it
                write_lines(sim, 20, f"rotation-{r}")
                sim.rotate(NS, POD, APP)
                await settle(agent, passes=1)  # each rotation seen on its own
            write_lines(sim, 20, "last")
            record = sim.record(sid)
            await wait_until(lambda: len(export_bytes(store, sid)[0]) >= len(record) - hole,
                             within=15, what="everything after the hole to be stored")
            gaps = [(g.fields["offset"], g.fields["bytes"], g.fields["reason"])
                    for g in loss_gaps(agent.ledger, sid)]
            assert metric(agent, "evidence_keeper_read_errors_total", errno="EACCES") >= 2
    assert gaps == [(0, hole, "unreadable")]
    assert_stored(store, sid, record[hole:], holes=[(0, hole)])
    check_segments(stored_segments(store, sid))


async def test_unreadable_file_compressed_into_a_readable_gz_is_read_from_the_gz(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=5)
    fs = FaultyFS()
    rotated, _ = unreadable_rotated_file(sim, fs, gz_readable=True)
    with rotated.open("rb"):
        async with running_agent(settings, fs=fs) as agent:
            await wait_until(lambda: fs.denied_reads >= 2, within=10, what="a retried open")
            write_lines(sim, 20, "rotation")
            sim.rotate(NS, POD, APP)  # compresses the unreadable file into a readable .gz
            write_lines(sim, 20, "last")
            await wait_until(lambda: len(export_bytes(store, sid)[0]) >= sim.record_len(sid)
                             or bool(loss_gaps(agent.ledger)), within=15, what="the stream")
            await settle(agent)  # a gap the agent would still record, it has recorded
            gaps = loss_gaps(agent.ledger)
    assert gaps == []
    assert_stored(store, sid, sim.record(sid))


async def test_unreadable_file_whose_inode_number_is_reused_by_the_next_log_file(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=3)
    fs = FaultyFS()
    rotated, hole = unreadable_rotated_file(sim, fs, gz_readable=False)
    with rotated.open("rb") as held:
        was = os.fstat(held.fileno())
        async with running_agent(settings, fs=fs) as agent:
            await wait_until(lambda: fs.denied_reads >= 2, within=10, what="a retried open")
            write_lines(sim, 20, "rotation-0")
            sim.rotate(NS, POD, APP)  # compresses and deletes the unreadable file
            now = sim.path_of(NS, POD, APP).stat()  # the new 0.log: same inode number
            fs.alias[(now.st_dev, now.st_ino)] = was.st_ino
            await settle(agent, passes=1)  # the new 0.log seen under the reused number
            write_lines(sim, 20, "rotation-1")
            sim.rotate(NS, POD, APP)  # removes its .gz
            await settle(agent, passes=1)
            write_lines(sim, 20, "last")
            record = sim.record(sid)
            await wait_until(lambda: export_bytes(store, sid)[0].endswith(record[-200:]),
                             within=15, what="the last bytes to be stored")
            gaps = [(g.fields["offset"], g.fields["bytes"], g.fields["reason"])
                    for g in loss_gaps(agent.ledger, sid)]
    data, holes = export_bytes(store, sid)
    assert_bytes_equal(data, record[hole:])
    assert gaps == [(0, hole, "unreadable")]
    assert holes == [(0, hole)]


# ----------------------------------------------------------------------------- spool faults


async def test_disk_full_under_the_spool_loses_nothing(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(segment_max_bytes="64KiB")
    store, sim, sid = one_stream(tmp_path, NS, POD)
    fs = FaultyFS()
    async with running_agent(settings, fs=fs) as agent:
        await write_until(sim, lambda: agent.spool.total_bytes() > 0, "before",
                          what="captured writes before the disk fills")
        fs.disk_full = True
        # A write, and its retry after the spool's back-off, both fail.
        await write_until(sim, lambda: fs.failed_writes >= 2, "full", what="two failed writes")
        fs.disk_full = False
        fs.partial_writes = 3
        failed = fs.failed_writes
        await write_until(sim, lambda: fs.partial_writes == 0 and fs.failed_writes >= failed + 3,
                          "filling", what="three half writes, each followed by a failure")
        write_lines(sim, 50, "after")
        await wait_exported(store, sid, sim.record(sid), within=20)
        assert fs.failed_writes >= 5
        assert metric(agent, "evidence_keeper_spool_errors_total", op="write") >= 4
        assert metric(agent, "evidence_keeper_lost_bytes_total", reason="spool_corrupt") == 0
        assert loss_gaps(agent.ledger) == []
    check_segments(stored_segments(store, sid))


async def test_spool_segment_creation_denied_is_retried(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    # A rescan far away: the retry after the spool's back-off (1 s) must come by itself, as
    # no change event announces the bytes the denied append left in the file.
    settings = make_settings(segment_max_bytes="32KiB", rescan_interval_s=60)
    store, sim, sid = one_stream(tmp_path, NS, POD)
    fs = FaultyFS()
    fs.deny_segment_opens = 2
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, 100, "first")
        await wait_until(lambda: fs.deny_segment_opens == 0, within=10, what="denied opens")
        await stream_writes(sim, 1.0, "more")
        fs.deny_segment_opens = 1  # also when a full segment is sealed and the next opened
        await write_until(sim, lambda: fs.deny_segment_opens == 0, "again",
                          what="a denied open after a size seal")
        write_lines(sim, 50, "after")
        await wait_exported(store, sid, sim.record(sid), within=15)
        assert metric(agent, "evidence_keeper_spool_errors_total", op="open") == 3
        assert loss_gaps(agent.ledger) == []
    segments = stored_segments(store, sid)
    assert len(segments) > 3
    check_segments(segments)


async def test_fsync_failing_once_in_commit_is_retried(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    # A rescan far away: the rewound bytes must be re-read at once, not by the safety net.
    settings = make_settings(rescan_interval_s=60)
    store, sim, sid = one_stream(tmp_path, NS, POD)
    fs = FaultyFS()
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, 50, "first")
        await wait_exported(store, sid, sim.record(sid))
        fs.fail_fdatasync = 1
        write_lines(sim, 50, "data fsync fails")
        await wait_until(lambda: fs.fail_fdatasync == 0, within=5, what="the failed fdatasync")
        await wait_exported(store, sid, sim.record(sid))
        fs.fail_fsync = 1  # the checkpoint's own fsync
        write_lines(sim, 50, "checkpoint fsync fails")
        await wait_until(lambda: fs.fail_fsync == 0, within=5, what="the failed fsync")
        await wait_exported(store, sid, sim.record(sid))
        # The data fsync rewinds the stream (op=fsync); the checkpoint's own is retried.
        assert metric(agent, "evidence_keeper_spool_errors_total", op="fsync") == 1
        assert metric(agent, "evidence_keeper_spool_errors_total", op="commit") == 1
        assert loss_gaps(agent.ledger) == []
    check_segments(stored_segments(store, sid))
