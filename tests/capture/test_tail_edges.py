"""Edges of tailing (CONTRACT.md sections 2 and 3), each compared byte for byte with the record.

Every test drives :class:`KubeletSim` against an agent running in this event loop and checks
the store (through ``export``) and the gap ledger: what was captured must equal what was
written, and whatever was not captured must be a ``loss`` gap at its exact offset.

Where a test has to put the reader in a precise state (behind the writer, or blocked between
two calls) it does so through the :class:`FileSystem` seam, never by patching the agent.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore, StoreError
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

NS, POD, APP = "shop", "orders-1", "app"


# ----------------------------------------------------------------------------- fault seams


class HeldBackReads(FileSystem):
    """Reads past ``limit`` bytes of a held file fail with EIO, so the reader falls behind.

    While armed, a newly opened file whose path ends with ``match`` is held, by inode: it stays
    held under any later name (kubelet renames it on rotation). The agent reads the first
    ``limit`` bytes, then keeps retrying; its fstat shows the real size.
    """

    def __init__(self, *, limit: int, match: str) -> None:
        super().__init__()
        self.limit = limit
        self.match = match
        self.armed = True
        self._held_inodes: set[tuple[int, int]] = set()
        self._held_fds: set[int] = set()
        self._lock = threading.Lock()
        self.refused = 0  # reads past the limit that failed

    def disarm(self) -> None:
        """Files opened from now on are not held (those held already stay held)."""
        self.armed = False

    def open_read(self, path: str) -> int:
        fd = super().open_read(path)
        st = os.fstat(fd)
        with self._lock:
            if self.armed and path.endswith(self.match):
                self._held_inodes.add((st.st_dev, st.st_ino))
            if (st.st_dev, st.st_ino) in self._held_inodes:
                self._held_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._held_fds.discard(fd)
        super().close(fd)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        with self._lock:
            held = fd in self._held_fds
        if held:
            if pos >= self.limit:
                with self._lock:
                    self.refused += 1
                raise OSError(errno.EIO, "held back by the test")
            n = min(n, self.limit - pos)
        return super().pread(fd, n, pos)


class GatedReads(FileSystem):
    """Looks at open container log files (fstat, pread) wait at a gate the test controls.

    A closed gate parks the tailer in its next look at a file (``parked`` is set), so the test
    can change the file between the tailer's decision to read and what it then sees.
    """

    def __init__(self, log_root: Path) -> None:
        super().__init__()
        self.log_root = str(log_root)
        self.gate = threading.Event()
        self.gate.set()
        self.parked = threading.Event()
        self._log_fds: set[int] = set()

    def open_read(self, path: str) -> int:
        fd = super().open_read(path)
        if path.startswith(self.log_root):
            self._log_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._log_fds.discard(fd)
        super().close(fd)

    def _wait_at_gate(self, fd: int) -> None:
        if fd in self._log_fds and not self.gate.is_set():
            self.parked.set()
            if not self.gate.wait(timeout=30):
                raise OSError(errno.EIO, "test gate left closed")

    def fstat(self, fd: int) -> os.stat_result:
        self._wait_at_gate(fd)
        return super().fstat(fd)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        self._wait_at_gate(fd)
        return super().pread(fd, n, pos)


class HookOnStat(FileSystem):
    """Runs ``hook`` once, right before the first ``stat`` of ``path``: the test can change the
    tree between a directory listing and the agent's look at one file of it."""

    def __init__(self, path: Path, hook: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.hook: Callable[[], object] | None = hook

    def stat(self, path: str) -> os.stat_result:
        if path == self.path and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return super().stat(path)


class SwitchableStore:
    """A FileStore whose ``put`` fails with a retryable StoreError while ``down``."""

    scheme = "file"
    check_name = "file"

    def __init__(self, inner: FileStore) -> None:
        self.inner = inner
        self.down = True
        self.failed_puts = 0

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        if self.down:
            self.failed_puts += 1
            raise StoreError("store unavailable (test)")
        self.inner.put(key, body, meta, retain_until=retain_until)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def head(self, key: str) -> dict[str, str] | None:
        return self.inner.head(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def check(self) -> None:
        self.inner.check()

    def describe(self) -> str:
        return f"switchable {self.inner.describe()}"


# ----------------------------------------------------------------------------- helpers


def lines(sim: KubeletSim, n: int, tag: str, *, container: str = APP, pod: str = POD) -> None:
    for i in range(n):
        sim.write(NS, pod, container, f"{tag} line {i:05d} status=ok latency_ms={i % 97}")


def spool_offset(agent: Agent, sid: StreamId) -> int:
    s = agent.spool.streams.get(sid)
    return -1 if s is None else s.next_offset


def queued_files(agent: Agent, sid: StreamId) -> list[tuple[str | None, bool]]:
    """(rotation ts, open) of the files the tailer still has to read for ``sid``."""
    t = agent.tailer.tails.get(sid)
    return [] if t is None else [(f.ts, f.is_open) for f in t.queue]


def sim_file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def gap_tuples(agent: Agent, sid: StreamId) -> list[tuple[int, int | None, str]]:
    return [(g.fields["offset"], g.fields["bytes"], g.fields["reason"])
            for g in loss_gaps(agent.ledger, sid)]


# ----------------------------------------------------------------------------- (a) overrun

async def test_rotation_overrun_while_stopped_is_one_unknown_hole_at_the_stop_offset(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=3)
    async with running_agent(settings):
        lines(sim, 40, "before")
        await wait_exported(store, sid, sim.record(sid))
    stopped_at = sim.record_len(sid)
    # While the agent is down: more than max_files rotations, so the file it had open and
    # everything written to it afterwards are deleted unseen.
    for r in range(5):
        lines(sim, 15, f"down-{r}")
        sim.rotate(NS, POD, APP)
    lines(sim, 10, "after")
    disk = sim.disk_bytes(sid)
    record = sim.record(sid)
    assert len(record) > stopped_at + len(disk), "the scenario must really lose bytes"
    assert any(p.name.endswith(".gz") for p in sim.files_of(sid))

    async with running_agent(settings) as agent:
        await wait_until(lambda: export_bytes(store, sid)[0].endswith(disk), within=10,
                         what="the files still on disk to be stored")
        gaps = gap_tuples(agent, sid)
        lines(sim, 5, "live")
        await wait_until(
            lambda: len(export_bytes(store, sid)[0]) == stopped_at + len(sim.disk_bytes(sid)),
            within=15, what="new writes to be stored")

    assert gaps == [(stopped_at, None, "rotated_away")]
    data, holes = export_bytes(store, sid)
    assert holes == []  # a hole of unknown length consumes no offsets
    assert_bytes_equal(data, record[:stopped_at] + sim.disk_bytes(sid))
    check_segments(stored_segments(store, sid))


async def test_rotation_overrun_after_reads_fell_behind_gives_a_hole_of_known_length(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The agent knew the file's size (S) but had read only N bytes: [N, S) is a hole of
    exactly S - N bytes, and what was written after S is a hole of unknown length."""
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=3)
    lines(sim, 300, "seen")  # present before the agent starts: it sees the size at open
    seen_size = sim.record_len(sid)
    read_limit = 8192
    assert seen_size > 2 * read_limit
    slow = HeldBackReads(limit=read_limit, match=f"/{APP}/0.log")
    async with running_agent(settings, fs=slow) as agent:
        await wait_until(lambda: spool_offset(agent, sid) == read_limit, within=10,
                         what="the first bytes to be captured")
        await wait_until(lambda: slow.refused >= 1, within=10,
                         what="a read past the limit tried (and refused)")
        assert spool_offset(agent, sid) == read_limit  # the reader stays behind
    for r in range(5):
        lines(sim, 15, f"down-{r}")
        sim.rotate(NS, POD, APP)
    lines(sim, 10, "after")
    disk = sim.disk_bytes(sid)
    record = sim.record(sid)

    async with running_agent(settings) as agent:
        await wait_until(lambda: export_bytes(store, sid)[0].endswith(disk), within=10,
                         what="the files still on disk to be stored")
        gaps = gap_tuples(agent, sid)

    assert gaps == [
        (read_limit, seen_size - read_limit, "rotated_away"),
        (seen_size, None, "rotated_away"),
    ]
    assert_stored(store, sid, record[:read_limit] + disk, holes=[(read_limit, seen_size)])
    segments = stored_segments(store, sid)
    assert segments[-1].sk.end == seen_size + len(disk)
    check_segments(segments)


# ----------------------------------------------------------------------------- (b) held back


async def test_held_back_rotated_file_and_empty_live_file_both_gzipped_while_stopped(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The agent stops while it still owes bytes of a rotated file and has the new, still empty
    live file queued; both are rotated and compressed while it is down. Nothing was deleted, so
    the export must equal the record with no loss."""
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=10)
    lines(sim, 300, "first")
    read_limit = 8192
    slow = HeldBackReads(limit=read_limit, match=f"/{APP}/0.log")
    async with running_agent(settings, fs=slow) as agent:
        await wait_until(lambda: spool_offset(agent, sid) == read_limit, within=10,
                         what="the first bytes to be captured")
        slow.disarm()
        sim.rotate(NS, POD, APP)  # the new 0.log stays empty until the agent is down
        await wait_until(lambda: [ts is None for ts, _ in queued_files(agent, sid)] ==
                         [False, True], within=10, what="the rotation to be seen")
    for r in range(2):
        lines(sim, 20, f"down-{r}")
        sim.rotate(NS, POD, APP)
    lines(sim, 10, "after")
    assert sim.disk_bytes(sid) == sim.record(sid)

    async with running_agent(settings) as agent:
        await wait_until(lambda: len(export_bytes(store, sid)[0]) >= sim.record_len(sid),
                         within=15, what="the whole stream to be stored")
        await settle(agent)  # a gap the agent would still record, it has recorded
        gaps = gap_tuples(agent, sid)
    # Nothing was deleted. The agent cannot tell that the empty live file it had queued was
    # compressed rather than deleted, so a hole of unknown length (no offsets) is tolerated.
    assert set(gaps) <= {(read_limit, None, "rotated_away")}
    assert_stored(store, sid, sim.record(sid))


async def test_rotation_between_the_recovery_listing_and_the_reopen(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD)
    async with running_agent(settings):
        lines(sim, 40, "before")
        await wait_exported(store, sid, sim.record(sid))
    lines(sim, 10, "while stopped")
    # The restarted agent lists the tree, then kubelet rotates before the agent looks for the
    # file it had open (found by inode under the live name, or under the rotated one).
    hooked = HookOnStat(sim.path_of(NS, POD, APP), lambda: sim.rotate(NS, POD, APP))
    async with running_agent(settings, fs=hooked) as agent:
        assert hooked.hook is None
        lines(sim, 10, "after")
        sim.rotate(NS, POD, APP)  # the live file becomes final: everything can be read
        lines(sim, 5, "last")
        await wait_until(lambda: len(export_bytes(store, sid)[0]) >= sim.record_len(sid),
                         within=10, what="the whole stream to be stored")
        await settle(agent)  # a gap the agent would still record, it has recorded
        gaps = gap_tuples(agent, sid)
    assert gaps == []
    assert_stored(store, sid, sim.record(sid))


async def test_rotation_between_a_listing_and_the_refresh_keeps_stream_order(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD)
    hooked = HookOnStat(sim.path_of(NS, POD, APP))

    def second_rotation() -> None:
        lines(sim, 7, "between")
        sim.rotate(NS, POD, APP)

    async with running_agent(settings, fs=hooked) as agent:
        lines(sim, 20, "first")
        await wait_exported(store, sid, sim.record(sid))
        hooked.hook = second_rotation  # runs when the agent looks at the new live file
        sim.rotate(NS, POD, APP)
        lines(sim, 5, "second")
        await wait_until(lambda: hooked.hook is None, within=10, what="the refresh")
        lines(sim, 10, "third")
        sim.rotate(NS, POD, APP)
        lines(sim, 5, "last")
        await wait_until(lambda: len(export_bytes(store, sid)[0]) >= sim.record_len(sid),
                         within=10, what="the whole stream to be stored")
        gaps = gap_tuples(agent, sid)
    assert_stored(store, sid, sim.record(sid))
    assert gaps == []


async def test_checkpointed_file_with_a_short_head_is_not_mistaken_for_another(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=3)
    async with running_agent(settings) as agent:
        lines(sim, 10, "first")
        sim.rotate(NS, POD, APP)  # a new, empty live file
        line = sim.render(NS, POD, APP, "a line the runtime flushed in two writes")
        head = line[:18]  # "2025-11-10T12:27:0": the timestamp prefix of every line here
        sim.write_raw(NS, POD, APP, head)
        await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid), within=10,
                         what="the short head to be captured")
    stopped_at = sim.record_len(sid)
    sim.write_raw(NS, POD, APP, line[18:])
    for r in range(4):  # the file with the short head is rotated, compressed and deleted
        lines(sim, 10, f"down-{r}")
        sim.rotate(NS, POD, APP)
    lines(sim, 5, "after")
    disk = sim.disk_bytes(sid)
    files = sim.files_of(sid)
    assert files[0].name.endswith(".gz")
    assert all(sim_file_bytes(f).startswith(head) for f in files), "scenario: same heads"

    async with running_agent(settings) as agent:
        await wait_until(lambda: export_bytes(store, sid)[0].endswith(disk[-200:]),
                         within=10, what="the last bytes on disk to be stored")
        gaps = gap_tuples(agent, sid)
    assert gaps == [(stopped_at, None, "rotated_away")]
    assert_stored(store, sid, sim.record(sid)[:stopped_at] + disk)


async def test_checkpointed_empty_file_whose_inode_number_was_reused(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=10)
    async with running_agent(settings):
        lines(sim, 10, "first")
        sim.rotate(NS, POD, APP)  # a new, empty live file
        await wait_exported(store, sid, sim.record(sid))
    with sim.path_of(NS, POD, APP).open("rb") as empty:
        was = os.fstat(empty.fileno())
        lines(sim, 10, "second")
        sim.rotate(NS, POD, APP)
        lines(sim, 10, "third")
        sim.rotate(NS, POD, APP)  # compresses (deletes) the file that was empty; a new 0.log
        lines(sim, 10, "fourth")
        assert sim.disk_bytes(sid) == sim.record(sid)
        reused = AliasedInodes()  # the new 0.log gets the deleted file's inode number
        now = sim.path_of(NS, POD, APP).stat()
        reused.alias[(now.st_dev, now.st_ino)] = was.st_ino
        async with running_agent(settings, fs=reused) as agent:
            sim.rotate(NS, POD, APP)  # everything is final now
            await wait_until(lambda: len(export_bytes(store, sid)[0]) >= sim.record_len(sid),
                             within=10, what="the whole stream to be stored")
            gaps = gap_tuples(agent, sid)
    assert {b for _, b, _ in gaps} <= {None}  # nothing was deleted
    assert_stored(store, sid, sim.record(sid))


# ----------------------------------------------------------------------------- (c) truncation


async def test_copytruncate_records_a_truncated_gap_and_keeps_the_new_bytes(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD)
    async with running_agent(settings) as agent:
        lines(sim, 40, "before")
        await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid), within=10,
                         what="capture before the truncation")
        at = sim.record_len(sid)
        sim.truncate(NS, POD, APP)
        lines(sim, 5, "after")
        await wait_exported(store, sid, sim.record(sid))
        at2 = sim.record_len(sid)
        sim.truncate(NS, POD, APP)
        lines(sim, 3, "again")
        await wait_exported(store, sid, sim.record(sid))
        gaps = gap_tuples(agent, sid)
    assert sim.truncations(sid) == [at, at2]
    assert gaps == [(at, None, "truncated"), (at2, None, "truncated")]
    check_segments(stored_segments(store, sid))


async def test_copytruncate_followed_by_a_burst_larger_than_one_read(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    # The parked look is the tailer's next look at the idle file: with inotify and no event,
    # the safety-net rescan's read pass (default every 10 s).
    settings = make_settings(rescan_interval_s=0.5)
    store, sim, sid = one_stream(tmp_path, NS, POD)
    gated = GatedReads(tmp_path / "pods")
    async with running_agent(settings, fs=gated) as agent:
        lines(sim, 40, "before")
        await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid), within=10,
                         what="capture before the truncation")
        at = sim.record_len(sid)
        gated.parked.clear()
        gated.gate.clear()
        try:
            await wait_until(gated.parked.is_set, within=10, what="the tailer to poll again")
            sim.truncate(NS, POD, APP)
            sim.write(NS, POD, APP, b"x" * (3 << 19))  # 1.5 MiB right after the truncation
        finally:
            gated.gate.set()
        await wait_exported(store, sid, sim.record(sid))
        gaps = gap_tuples(agent, sid)
    assert gaps == [(at, None, "truncated")]


# ----------------------------------------------------------------------------- (d) split line


async def test_line_split_across_rotation_stays_intact(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=5)
    split_records = []
    async with running_agent(settings) as agent:
        lines(sim, 20, "one")
        await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid), within=10,
                         what="capture before the rotation")
        for k in range(3):
            rec = sim.render(NS, POD, APP, f"PAYMENT_FAILED order={k} split across rotation")
            cut = len(rec) // 2 + k
            sim.rotate(NS, POD, APP, late_write=rec[:cut], then_write=rec[cut:])
            split_records.append(rec)
            lines(sim, 10, f"after-{k}")
            if k == 0:  # the agent follows this rotation; the others come before it looks again
                await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid),
                                 within=10, what="the first split rotation followed")
        await wait_exported(store, sid, sim.record(sid))
        gaps = gap_tuples(agent, sid)
    assert gaps == []
    data, _ = export_bytes(store, sid)
    for rec in split_records:
        assert data.count(rec) == 1
    check_segments(stored_segments(store, sid))


# ----------------------------------------------------------------------------- (e) deletion


async def test_bytes_written_just_before_pod_deletion_are_exported(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, POD, containers=("app", "sidecar"))
    sids = [sim.stream_of(NS, POD, c) for c in ("app", "sidecar")]
    async with running_agent(settings) as agent:
        for c in ("app", "sidecar"):
            lines(sim, 3, "hello", container=c)
        await wait_until(lambda: all(queued_files(agent, s) == [(None, True)] for s in sids),
                         within=10, what="the live files to be open")
        for c in ("app", "sidecar"):
            lines(sim, 2000, "last words", container=c)
        sim.write(NS, POD, APP, b"y" * (3 << 20))  # longer than one read pass
        sim.delete_pod(NS, POD)
        assert not (tmp_path / "pods" / sids[0].pod_dir).exists()
        for sid in sids:
            await wait_exported(store, sid, sim.record(sid))
        gaps = loss_gaps(agent.ledger)
    assert gaps == []
    for sid in sids:
        check_segments(stored_segments(store, sid))


# ----------------------------------------------------------------------------- (f) (g) bytes


async def test_huge_line_invalid_utf8_and_nul_bytes_are_byte_exact(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(segment_max_bytes="1MiB")
    store, sim, sid = one_stream(tmp_path, NS, POD)
    payload = bytes(range(256)).replace(b"\n", b"") * 12500  # NUL and invalid UTF-8 inside
    huge = b"2025-11-10T12:27:00.5Z stdout F " + payload[: 3 << 20] + b"\n"
    async with running_agent(settings):
        sim.write(NS, POD, APP, b"before \xff\xfe invalid \xc3( utf-8 \x00\x00 nul")
        sim.write_raw(NS, POD, APP, huge)
        sim.write(NS, POD, APP, "after: héllo 日本語 😀 \udcff")
        sim.write(NS, POD, APP, b"\x00" * 100)
        sim.write(NS, POD, APP, b"z" * 100_000)  # CRI splits this into P records
        await wait_exported(store, sid, sim.record(sid), within=20)
    segments = stored_segments(store, sid)
    check_segments(segments)
    assert segments[0].sk.offset == 0
    assert all(len(s.body) <= 1 << 20 for s in segments)
    assert len(segments) >= 3


async def test_lines_without_final_newline(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, POD)
    sid0 = sim.stream_of(NS, POD, APP)
    async with running_agent(settings):
        lines(sim, 5, "complete")
        sim.write_raw(NS, POD, APP, b"2025-11-10T12:27:01Z stdout P half a line, no newline")
        # Every captured byte is stored within flush_interval_s, also an unfinished line.
        await wait_exported(store, sid0, sim.record(sid0), within=5)
        sim.write_raw(NS, POD, APP, b" -- and its end\n")
        sim.write(NS, POD, APP, "partial record", partial=True)
        sim.write_raw(NS, POD, APP, sim.render(NS, POD, APP, "died mid-line")[:20])
        await wait_exported(store, sid0, sim.record(sid0), within=5)
        sim.restart(NS, POD, APP)
        sid1 = sim.stream_of(NS, POD, APP)
        sim.write_raw(NS, POD, APP, b"2025-11-10T12:28:00Z stderr F panic: no newline either")
        await wait_exported(store, sid1, sim.record(sid1), within=5)
    assert not sim.record(sid0).endswith(b"\n")
    for sid in (sid0, sid1):
        assert_stored(store, sid, sim.record(sid))


# ----------------------------------------------------------------------------- (h) docker


async def test_docker_json_file_format(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(compression="gzip")
    store, sim, sid = one_stream(tmp_path, NS, POD, max_files=5, fmt="docker")
    async with running_agent(settings):
        sim.write(NS, POD, APP, 'plain <html> & "quotes" \u2028 sep')
        sim.write(NS, POD, APP, b"invalid \xff\xfe utf-8 and \x00 nul", stream="stderr")
        sim.write(NS, POD, APP, "no newline yet", partial=True)
        sim.write(NS, POD, APP, b"q" * 40_000)  # 16 KiB partial messages
        rec = sim.render(NS, POD, APP, "split json line")
        sim.rotate(NS, POD, APP, late_write=rec[:17], then_write=rec[17:])
        lines(sim, 20, "after rotation")
        sim.rotate(NS, POD, APP)
        lines(sim, 5, "last")
        await wait_exported(store, sid, sim.record(sid))
    segments = stored_segments(store, sid)
    check_segments(segments)
    assert all(s.key.endswith(".log.gz") for s in segments)
    first_line = sim.record(sid).split(b"\n", 1)[0]
    first_ts = json.loads(first_line)["time"]  # 9-digit fraction; ek-first-ts has 6
    assert segments[0].meta["ek-first-ts"] == first_ts[:26] + "Z"


# ----------------------------------------------------------------------------- (i) eviction


async def test_spool_budget_evicts_endangered_bytes_as_exact_loss(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(spool_max_bytes="256KiB", segment_max_bytes="32KiB")
    store = SwitchableStore(FileStore(tmp_path / "store"))
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, POD)
    sid = sim.stream_of(NS, POD, APP)
    async with running_agent(settings, store=store) as agent:
        for k in range(10):
            lines(sim, 1000, f"burst-{k}")  # about 80 KiB each
            await asyncio.sleep(0.1)  # pacing: bursts over time, the agent reading between
        # Over the budget a live file waits (back-pressure); a deleted pod's bytes exist only
        # behind our descriptor, so they are read and the spool evicts (contract v2, §3).
        sim.delete_pod(NS, POD)
        await wait_until(lambda: spool_offset(agent, sid) == sim.record_len(sid), within=15,
                         what="the whole stream to be captured")
        await wait_until(lambda: agent.spool.total_bytes() <= 256 * 1024, within=5,
                         what="eviction down to the budget")
        assert store.failed_puts > 0
        store.down = False
        await wait_until(lambda: agent.spool.total_bytes() == 0, within=40,
                         what="the backlog to drain")
        gaps = gap_tuples(agent, sid)
        lost_metric = agent.metrics.registry.get_sample_value(
            "evidence_keeper_lost_bytes_total", {"reason": "evicted"})

    record = sim.record(sid)
    assert gaps, "the scenario must evict"
    assert {reason for _, _, reason in gaps} == {"evicted"}
    evicted = sorted((off, off + n) for off, n, _ in gaps if n is not None)
    assert len(evicted) == len(gaps), "evictions have exact lengths"
    assert lost_metric == sum(b - a for a, b in evicted)
    # The store holds exactly the record minus the evicted ranges.
    segments = stored_segments(store.inner, sid)
    check_segments(segments)
    covered = sorted([(s.sk.offset, s.sk.end) for s in segments] + evicted)
    pos = 0
    for a, b in covered:
        assert a == pos, f"offsets [{pos}, {a}) neither stored nor recorded as evicted"
        pos = b
    assert pos == len(record)
    for s in segments:
        assert s.body == record[s.sk.offset:s.sk.end], s.key
    merged: list[tuple[int, int]] = []
    for a, b in evicted:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    data, holes = export_bytes(store.inner, sid)
    assert holes == merged
    kept = b"".join(record[s.sk.offset:s.sk.end] for s in segments)
    assert_bytes_equal(data, kept)


# ----------------------------------------------------------------------------- (j) first start


async def test_files_present_at_first_start_are_read_from_offset_zero(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods", max_files=10)
    sim.add_pod(NS, POD)
    sim.add_pod(NS, "cart-1", fmt="docker")
    for r in range(4):
        lines(sim, 30, f"orders-{r}")
        rec = sim.render(NS, POD, APP, f"split {r}")
        sim.rotate(NS, POD, APP, late_write=rec[:9], then_write=rec[9:])
        lines(sim, 10, f"cart-{r}", pod="cart-1")
        sim.rotate(NS, "cart-1", APP)
    lines(sim, 5, "orders live")
    sim.restart(NS, "cart-1", APP)
    lines(sim, 5, "cart after restart", pod="cart-1")
    names = {p.name for p in sim.files_of(sim.stream_of(NS, POD, APP))}
    assert {n for n in names if n.endswith(".gz")} and {
        n for n in names if n != "0.log" and not n.endswith(".gz")}
    async with running_agent(settings) as agent:
        for sid in sim.streams():
            await wait_exported(store, sid, sim.record(sid))
        gaps = loss_gaps(agent.ledger)
    assert gaps == []
    assert len(sim.streams()) == 3
    for sid in sim.streams():
        check_segments(stored_segments(store, sid))
