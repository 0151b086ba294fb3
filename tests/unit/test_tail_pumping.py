"""Queues and pumping: the descriptor budget, endangered streams first, parked files,
blind windows recorded at the right offset, change-driven passes."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.sim import KubeletSim
from evidence_keeper.tail.budget import FdBudget, count_open_fds
from tests.unit.tailing import Pipeline


def own_fds(root: Path) -> int:
    """Descriptors of this process open on files under ``root`` (the pipeline's own)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(root))
    return n


def tight_budget(files: int, root: Path) -> FdBudget:
    """A budget that lets the tail path open about ``files`` more descriptors.

    It counts the process as it was plus the pipeline's own descriptors, not the whole
    process: in a full test run other threads (the moto server, agents of other tests
    shutting down) open and close sockets, which would make the budget a lottery."""
    base = count_open_fds()
    # Files may bring the process up to three quarters of (limit - reserve): solve for the
    # limit that leaves about ``files`` above what is open now (the base is large in a full
    # run, so the quarter kept for spool segments must be taken of the whole, as the agent
    # does, not of the files' share alone).
    tail_max = -(-(base + files + 4) * 4 // 3)
    return FdBudget(limit=tail_max + 16, reserve=16, in_use=base,
                    counter=lambda: base + own_fds(root))


def test_more_files_than_descriptors_are_all_read(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=5)
    for i in range(30):
        sim.add_pod("ns", f"p{i}")
        sim.write("ns", f"p{i}", "app", f"rotated {i}")
        sim.rotate("ns", f"p{i}", "app")
        sim.write("ns", f"p{i}", "app", f"live {i}")
    p = Pipeline(tmp_path, budget=tight_budget(8, tmp_path))
    try:
        p.step(12)
        for sid in sim.streams():
            assert p.spooled(sid) == sim.record(sid)
        assert p.losses == []
        assert p.tailer.budget.in_use <= p.tailer.budget.tail_max
        held = sum(1 for t in p.tailer.tails.values() for f in t.queue if f.is_open)
        assert held <= 8  # idle live files were parked under pressure
    finally:
        p.close()


def test_a_tight_budget_holds_with_many_descriptors_already_open(tmp_path: Path) -> None:
    """A full test run (or an agent with many sockets) has hundreds of descriptors open
    already; the budget's files and segments shares still leave room to read everything."""
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(400)]
    try:
        test_a_parked_file_is_reopened_by_inode_when_it_grows(tmp_path)
    finally:
        for fd in held:
            os.close(fd)


def test_a_parked_file_is_reopened_by_inode_when_it_grows(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    for i in range(12):
        sim.add_pod("ns", f"p{i}")
        sim.write("ns", f"p{i}", "app", f"first {i}")
    p = Pipeline(tmp_path, budget=tight_budget(4, tmp_path))
    try:
        p.step(6)
        parked = [t for t in p.tailer.tails.values() if t.queue and t.queue[0].parked]
        assert parked
        sim.write("ns", "p0", "app", "grown while closed")
        sim.rotate("ns", "p1", "app")  # renamed while closed: found under its new name
        sim.write("ns", "p1", "app", "after the rotation")
        p.step(6)
        for sid in sim.streams():
            assert p.spooled(sid) == sim.record(sid)
        assert p.losses == []
    finally:
        p.close()


def test_a_live_file_rotated_away_unseen_is_a_hole_after_its_bytes(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    sim.write("ns", "p", "app", "seen " * 20)
    p = Pipeline(tmp_path)
    try:
        p.step()
        sim.write("ns", "p", "app", "written before the rotations " * 4)
        held = sim.record_len(sid)
        for r in range(4):  # the held file and its successor are deleted unseen
            sim.rotate("ns", "p", "app")
            sim.write("ns", "p", "app", f"rotation {r} " * 10)
        on_disk = sim.disk_bytes(sid)
        p.tailer.note_pause(12.0)
        p.step(2)
        assert p.spooled(sid) == sim.record(sid)[:held] + on_disk
        assert [(x.offset, x.bytes, x.reason) for x in p.losses] == [
            (held, None, "rotated_away")]
        assert "did not run for 12.0s" in p.losses[0].detail
    finally:
        p.close()


def test_rotations_the_agent_saw_are_not_a_window(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    p = Pipeline(tmp_path)
    try:
        for r in range(8):
            sim.write("ns", "p", "app", f"line {r} " * 12)
            sim.rotate("ns", "p", "app")
            p.step()
        assert p.spooled(sid) == sim.record(sid)
        assert p.losses == []
    finally:
        p.close()


def test_a_change_driven_pass_reads_only_changed_or_busy_streams(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "a")
    sim.add_pod("ns", "b")
    p = Pipeline(tmp_path)
    try:
        p.step()
        sim.write("ns", "a", "app", "in a")
        sim.write("ns", "b", "app", "in b")
        a_dir = str(sim.path_of("ns", "a", "app").parent)
        assert p.tailer.pump(dirs={a_dir}) is False
        a, b = sim.stream_of("ns", "a", "app"), sim.stream_of("ns", "b", "app")
        assert p.spool.streams[a].next_offset == sim.record_len(a)
        assert p.spool.streams[b].next_offset == 0  # not told, and nothing of its own to do
        p.tailer.pump(dirs=None)
        assert p.spool.streams[b].next_offset == sim.record_len(b)
    finally:
        p.close()


def test_endangered_streams_go_first_when_short(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "live")
    sim.add_pod("ns", "rotated")
    sim.write("ns", "live", "app", "live bytes")
    sim.write("ns", "rotated", "app", "rotated bytes")
    sim.rotate("ns", "rotated", "app")
    p = Pipeline(tmp_path)
    try:
        p.tailer.sync(p.tree.scan())
        tails = sorted(p.tailer.tails.values(), key=lambda t: t.endangered)
        assert tails[0].id.pod == "rotated" and tails[0].endangered == 1
        assert tails[-1].endangered == 2
    finally:
        p.close()


def test_the_last_pod_deleted_ends_its_stream_but_a_remount_ends_nothing(
        tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "only")
    p = Pipeline(tmp_path)
    try:
        p.step()
        sim.delete_pod("ns", "only")  # kubelet removes pods one by one: a real deletion
        p.step()
        assert all(t.gone for t in p.tailer.tails.values()) and not p.tailer.root_gone
        p.step()
        for i in range(3):
            sim.add_pod("ns", f"p{i}")
            sim.write("ns", f"p{i}", "app", f"pod {i}")
        p.step()
        away = tmp_path / "away"
        (tmp_path / "pods").rename(away)
        (tmp_path / "pods").mkdir()  # an empty mount point
        p.step(3)
        assert p.tailer.root_gone and len(p.tailer.tails) == 3
        assert not any(t.gone for t in p.tailer.tails.values())
        (tmp_path / "pods").rmdir()
        away.rename(tmp_path / "pods")
        for i in range(3):
            sim.write("ns", f"p{i}", "app", f"pod {i} again")
        p.step(2)
        assert not p.tailer.root_gone
        for sid in sim.streams()[1:]:
            assert p.spooled(sid) == sim.record(sid)
        assert p.losses == []
    finally:
        p.close()


def test_restart_with_more_checkpointed_files_than_descriptors(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=5)
    for i in range(24):
        sim.add_pod("ns", f"p{i}")
        sim.write("ns", f"p{i}", "app", f"first {i} " * 8)
    p = Pipeline(tmp_path)
    p.step()
    p.close()
    for i in range(24):  # while down: more bytes, and a rotation that gets compressed
        sim.write("ns", f"p{i}", "app", f"while down {i} " * 8)
        sim.rotate("ns", f"p{i}", "app")
        sim.write("ns", f"p{i}", "app", f"second {i} " * 8)
        if i % 2:
            sim.rotate("ns", f"p{i}", "app")  # the checkpointed file is now a .gz
    base = count_open_fds()
    # Room for a few files only, and nothing beyond the process limit but the reserve.
    q = Pipeline(tmp_path, budget=tight_budget(6, tmp_path))
    assert q.tailer.budget.in_use >= base
    try:
        q.step(20)
        for sid in sim.streams():
            assert q.spooled(sid) == sim.record(sid), sid
        assert q.losses == []
    finally:
        q.close()


class UnlistableDir(FileSystem):
    """Listing ``path`` fails with EIO while ``broken`` (a sick disk under one directory)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.broken = False

    def listdir(self, path: str) -> list[str]:
        if self.broken and path == self.path:
            raise OSError(errno.EIO, "Input/output error")
        return super().listdir(path)


def test_an_unlistable_directory_does_not_keep_deleted_pods_alive(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "sick")
    sim.add_pod("ns", "deleted")
    sim.write("ns", "deleted", "app", "last words")
    sick_dir = str(sim.path_of("ns", "sick", "app").parent)

    fs = UnlistableDir(sick_dir)
    p = Pipeline(tmp_path, fs=fs)
    try:
        p.step()
        fs.broken = True
        sick, deleted = sim.stream_of("ns", "sick", "app"), sim.stream_of("ns", "deleted", "app")
        record = sim.record(deleted)
        sim.delete_pod("ns", "deleted")
        p.step(3)
        # Ended, read to its end and finished (it ships first); main never ended it.
        assert p.tailer.tails[deleted].gone and not p.tailer.tails[deleted].queue
        assert p.spool.streams[deleted].finished
        assert p.spooled(deleted) == record
        assert not p.tailer.tails[sick].gone  # its directory only failed to list
        assert p.losses == []
    finally:
        p.close()


def test_a_failed_listing_is_named_as_the_window(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    cdir = str(sim.path_of("ns", "p", "app").parent)

    fs = UnlistableDir(cdir)
    p = Pipeline(tmp_path, fs=fs)
    try:
        sim.write("ns", "p", "app", "seen " * 20)
        p.step()
        fs.broken = True
        held = sim.record_len(sid)
        for r in range(4):
            sim.rotate("ns", "p", "app")
            sim.write("ns", "p", "app", f"unseen rotation {r} " * 8)
        p.step(2)
        fs.broken = False
        on_disk = sim.disk_bytes(sid)
        p.step(2)
        assert p.spooled(sid) == sim.record(sid)[:held] + on_disk
        assert [(x.offset, x.bytes) for x in p.losses] == [(held, None)]
        assert f"the listing of {cdir} failed" in p.losses[0].detail
    finally:
        p.close()


class Writes:
    """Stands in for ChangeWatcher.write_seq: a write counter per directory."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        return self.n.get(path, 0)


def test_idle_live_files_are_closed_while_watched_and_a_quiet_deletion_loses_nothing(
        tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "stays")  # (all pods vanishing at once would look like a remount)
    sim.add_pod("ns", "quiet")
    sim.add_pod("ns", "chatty")
    sim.write("ns", "quiet", "app", "said once")
    sim.write("ns", "chatty", "app", "said once")
    p = Pipeline(tmp_path)
    writes = Writes()
    p.tailer.write_seq = writes
    p.tailer.watching = True
    p.tailer.idle_close_s = 0.0
    try:
        p.step(2)
        assert all(t.queue[0].parked for t in p.tailer.tails.values())  # idle: closed
        quiet, chatty = sim.stream_of("ns", "quiet", "app"), sim.stream_of("ns", "chatty", "app")
        # A write inotify reported but the agent could not read before the pod went.
        sim.write("ns", "chatty", "app", "last words nobody read")
        writes.n[str(sim.path_of("ns", "chatty", "app").parent)] = 1
        seen = sim.record(chatty)[:len(p.spooled(chatty))]
        sim.delete_pod("ns", "quiet")
        sim.delete_pod("ns", "chatty")
        p.step(2)
        assert p.spooled(quiet) == sim.record(quiet)
        assert p.spooled(chatty) == seen
        assert [(x.stream, x.bytes, x.reason) for x in p.losses] == [
            (chatty, None, "rotated_away")]
    finally:
        p.close()


def test_a_parked_file_that_grows_is_reopened_on_its_directory_change(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "p")
    sim.write("ns", "p", "app", "first")
    p = Pipeline(tmp_path)
    writes = Writes()
    p.tailer.write_seq = writes
    p.tailer.watching = True
    p.tailer.idle_close_s = 0.0
    try:
        p.step(2)
        sid = sim.stream_of("ns", "p", "app")
        assert p.tailer.tails[sid].queue[0].parked
        sim.write("ns", "p", "app", "second")
        cdir = str(sim.path_of("ns", "p", "app").parent)
        writes.n[cdir] = 1
        p.tailer.pump(dirs={cdir})
        assert p.spool.streams[sid].next_offset == sim.record_len(sid)
        assert p.losses == []
    finally:
        p.close()
