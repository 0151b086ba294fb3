"""Change-driven tailing: inotify tells which log directories changed since the last look.

Polling every file every fraction of a second costs CPU in proportion to the node's files,
even when nothing is written. With inotify the agent watches every directory of the tree
(the root, pod and container directories, Docker target directories) and learns which ones
changed; the scan relists only those and the tailer reads only their streams (plus streams
with work of their own). The directory watch also reports writes to the files in it
(``IN_MODIFY``), so one watch per directory covers its files.

Safety nets: a queue overflow (``IN_Q_OVERFLOW``) asks for a full rescan and a full read
pass; the supervisor runs both every ``rescan_interval_s`` anyway. When inotify is
unavailable or out of watches (``max_user_watches``, ENOSPC) the watcher turns itself off and
the agent polls as before, which is slower but misses nothing.

A directory's changes are only trusted from the moment its watch exists: a newly watched
directory is reported changed once, so the listing taken before the watch is redone.

The kernel queue is read on the event loop (``add_reader``: one non-blocking ``read``); watches
are added and removed from the scan's worker thread; a lock guards the shared sets.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Collection
from typing import Final

from inotify_simple import INotify, parse_events

from evidence_keeper.logs import get_logger

log = get_logger("evidence_keeper.discover")

# Bits of <sys/inotify.h> (the same values inotify_simple.flags names).
IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ISDIR: Final = 0x40000000
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
TREE: Final = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
               | IN_DELETE_SELF | IN_MOVE_SELF)
DIR_MASK: Final = TREE | IN_MODIFY | IN_CLOSE_WRITE | IN_ONLYDIR | IN_DONT_FOLLOW


class ChangeWatcher:
    """Which directories changed: one set for the scan, one for the read pass."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._ino: INotify | None = None
        self._wds: dict[int, str] = {}
        self._paths: dict[str, int] = {}
        self._scan: set[str] = set()
        self._tail: set[str] = set()
        self._full_scan = True  # the first scan lists everything
        self._full_tail = True
        self.scan_wake = asyncio.Event()
        self.tail_wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Writes reported per directory (IN_MODIFY, IN_CLOSE_WRITE); after a queue overflow
        # every directory counts as written (events were lost).
        self._writes: dict[str, int] = {}
        self._retired: dict[str, int] = {}
        self._overflows = 0
        if enabled:
            try:
                self._ino = INotify(nonblocking=True)
            except OSError as exc:
                log.warning("inotify unavailable; polling the log tree", error=str(exc))

    @property
    def active(self) -> bool:
        return self._ino is not None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._ino is not None:
            self._loop = loop
            loop.add_reader(self._ino.fileno(), self._on_readable)

    def close(self) -> None:
        ino, self._ino = self._ino, None
        if ino is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(ino.fileno())
        ino.close()

    # ------------------------------------------------------------------ watches (thread)
    def watch(self, dirs: Collection[str]) -> None:
        """Watch exactly ``dirs`` (the last scan's directories). Runs in a worker thread."""
        ino = self._ino
        if ino is None:
            return
        want = set(dirs)
        with self._lock:
            gone = [(p, self._paths.pop(p)) for p in list(self._paths) if p not in want]
            for p, wd in gone:
                self._wds.pop(wd, None)
                self._writes.setdefault(p, 0)  # it was watched until now
            # Write counts of directories no longer watched stay one more round (the sync
            # after this scan asks for them), then go.
            self._retired = {p: self._writes.pop(p) for p in list(self._writes)
                             if p not in want}
            new = [p for p in want if p not in self._paths]
        for _path, wd in gone:
            try:
                ino.rm_watch(wd)
            except OSError:
                pass  # removed with its directory already
        for path in new:
            try:
                wd = ino.add_watch(path, DIR_MASK)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    self._exhausted(exc)
                    return
                continue  # gone meanwhile: the next scan says so
            with self._lock:
                self._wds[wd] = path
                self._paths[path] = wd
                # Changes before the watch existed were not reported: list it once more.
                self._scan.add(path)
                self._tail.add(path)

    def _exhausted(self, exc: OSError) -> None:
        log.error("out of inotify watches (fs.inotify.max_user_watches); polling instead",
                  error=str(exc), watches=len(self._paths))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close)
        else:
            self.close()

    # ------------------------------------------------------------------ events (loop)
    def _on_readable(self) -> None:
        ino = self._ino
        if ino is None:
            return
        try:
            data = os.read(ino.fileno(), 1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("inotify read failed; polling instead", error=str(exc))
            self.close()
            return
        self.take_events([(e.wd, e.mask, e.name) for e in parse_events(data)])

    def take_events(self, events: list[tuple[int, int, str]]) -> None:
        scan = tail = False
        with self._lock:
            for wd, mask, name in events:
                if mask & IN_Q_OVERFLOW:
                    self._full_scan = self._full_tail = scan = tail = True
                    self._overflows += 1
                    continue
                path = self._wds.get(wd)
                if path is None:
                    continue
                if mask & IN_IGNORED:
                    self._paths.pop(path, None)
                    self._wds.pop(wd, None)
                    self._writes.setdefault(path, 0)  # it was watched until now
                if mask & TREE or mask & IN_IGNORED:
                    self._scan.add(path)
                    scan = True
                    if name and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                        self._scan.add(f"{path}/{name}")  # a new pod or container directory
                if mask & (IN_MODIFY | IN_CLOSE_WRITE):
                    self._writes[path] = self._writes.get(path, 0) + 1
                self._tail.add(path)
                tail = True
        if scan:
            self.scan_wake.set()
        if tail:
            self.tail_wake.set()

    def take_scan(self) -> set[str] | None:
        """Directories to relist since the last call; None: relist everything."""
        self.scan_wake.clear()
        with self._lock:
            full, self._full_scan = self._full_scan or self._ino is None, False
            changed, self._scan = self._scan, set()
        return None if full else changed

    def take_tail(self) -> set[str] | None:
        """Directories whose streams to read since the last call; None: read them all."""
        self.tail_wake.clear()
        with self._lock:
            full, self._full_tail = self._full_tail or self._ino is None, False
            changed, self._tail = self._tail, set()
        return None if full else changed

    def write_seq(self, path: str) -> int:
        """A number that changes whenever a write in ``path`` was (or may have been) missed
        or reported; -1 when ``path`` is not watched by inotify (nothing can be concluded).

        Kept after the directory is removed, so a file closed there can tell whether it was
        written before its directory went."""
        with self._lock:
            if self._ino is None:
                return -1
            if path in self._writes:
                n = self._writes[path]
            elif path in self._retired:
                n = self._retired[path]
            elif path in self._paths:
                n = 0
            else:
                return -1
            return n + self._overflows * (1 << 40)

    def request_full(self) -> None:
        with self._lock:
            self._full_scan = self._full_tail = True

    def wake_full(self) -> None:
        """From any thread: a full scan and read pass now (e.g. the API reported exits,
        which only listings taken after them confirm; no file event may come for them)."""
        self.request_full()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.scan_wake.set)
            loop.call_soon_threadsafe(self.tail_wake.set)
