"""The inotify change watcher: real kernel events, overflow, exhaustion."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import termios
from pathlib import Path

from evidence_keeper.discover.changes import IN_Q_OVERFLOW, ChangeWatcher


async def _events(w: ChangeWatcher, within: float = 5.0) -> None:
    """Until the kernel's events so far are taken in: reported (a wake-up), and nothing left
    unread in the inotify queue (the reader runs on this loop)."""
    await asyncio.wait_for(w.tail_wake.wait(), timeout=within)
    await _drained(w, within)


async def _drained(w: ChangeWatcher, within: float = 5.0) -> None:
    """Until the watcher's reader has read every event queued so far (FIONREAD is 0)."""
    assert w._ino is not None
    fd = w._ino.fileno()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        await asyncio.sleep(0)  # the reader runs when the loop polls
        queued = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, queued)
        if queued[0] == 0:
            return
        assert loop.time() < deadline, f"{queued[0]} bytes of events left unread"
        await asyncio.sleep(0.005)


async def test_changes_are_reported_per_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = ChangeWatcher()
    assert w.active
    w.attach(asyncio.get_running_loop())
    try:
        assert w.take_scan() is None and w.take_tail() is None  # the first pass is full
        w.watch({str(a), str(b)})
        assert w.take_scan() == {str(a), str(b)}  # listed again once watched
        w.take_tail()
        (a / "0.log").write_bytes(b"x")
        await _events(w)
        assert w.take_tail() == {str(a)}
        assert w.take_scan() == {str(a)}
        with (a / "0.log").open("ab") as f:
            f.write(b"more")
        await _events(w)
        assert w.take_tail() == {str(a)}
        assert w.take_scan() == set()  # a write is not a listing change
        w.watch({str(b)})  # a no longer part of the tree
        (a / "1.log").write_bytes(b"y")
        (b / "1.log").write_bytes(b"y")
        await _events(w)
        assert w.take_tail() == {str(b)}
    finally:
        w.close()


async def test_overflow_asks_for_a_full_pass(tmp_path: Path) -> None:
    w = ChangeWatcher()
    try:
        w.take_scan()
        w.take_tail()
        w.take_events([(-1, IN_Q_OVERFLOW, "")])
        assert w.take_scan() is None and w.take_tail() is None
    finally:
        w.close()


class _NoWatches:
    def add_watch(self, path: str, mask: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def rm_watch(self, wd: int) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def test_out_of_watches_falls_back_to_polling(tmp_path: Path) -> None:
    w = ChangeWatcher()
    w.close()
    w._ino = _NoWatches()
    w.watch({str(tmp_path)})
    assert not w.active
    assert w.take_scan() is None and w.take_tail() is None  # polling: always a full pass
    assert not ChangeWatcher(enabled=False).active


async def test_write_counts_survive_the_directory_for_one_round(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    w = ChangeWatcher()
    w.attach(asyncio.get_running_loop())
    try:
        assert w.write_seq(str(a)) == -1  # not watched: nothing can be concluded
        w.watch({str(a)})
        assert w.write_seq(str(a)) == 0
        w.take_tail()
        (a / "0.log").write_bytes(b"x")
        await _events(w)
        first = w.write_seq(str(a))
        assert first > 0
        (a / "0.log").unlink()
        a.rmdir()
        await _drained(w)  # the directory's last events (its watch is gone) taken in
        w.watch(set())  # the scan no longer lists it
        assert w.write_seq(str(a)) == first  # the sync after that scan can still ask
        w.watch(set())
        assert w.write_seq(str(a)) == -1
    finally:
        w.close()
    assert ChangeWatcher(enabled=False).write_seq(str(a)) == -1
