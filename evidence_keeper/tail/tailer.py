"""Tailing: turn the files of each stream into one ordered byte stream in the spool.

A stream's bytes are the concatenation of its files in rotation order: rotated files by their
timestamp name (plain or ``.gz``), then the live ``<restart>.log``. Each stream keeps a
*queue* of the files it still has to read, head first (:class:`StreamTail`). This module is
the queues and the pumping; the pieces it uses live next to it:

* :mod:`~evidence_keeper.tail.identity` — pure identity, finality and continuity rules;
* :mod:`~evidence_keeper.tail.files` — opening and reading plain and ``.gz`` files;
* :mod:`~evidence_keeper.tail.recovery` — finding checkpointed files again after a restart;
* :mod:`~evidence_keeper.tail.budget` — the descriptor budget.

Descriptors. Files are opened when they are seen, within the descriptor budget, and held
where they protect bytes: a rotated file with unread bytes (kubelet may delete it), the files
of ended or deleted containers. A live file read to its end is *parked* (closed) when it has
been idle for ``idle_close_s`` (30 s, only while inotify watches its directory, so a write is
reported) or descriptors are short; it is reopened by path with an
inode and head check when it grows. When the budget is short the most endangered streams are
read first (ended or deleted, then rotated heads, then live files); a file that could not be
opened for lack of descriptors and vanished is a recorded loss, never a stall.

Identity. A plain file is identified by ``(dev, inode)``, which survives kubelet's rename; a
``.gz`` file (a new inode written by kubelet's compressor) by its rotation timestamp, or, when
the plain file it came from was never seen under that name, by a *fingerprint*: the SHA-256 of
its first up to 4 KiB, compared with the fingerprints of files already queued or consumed.

Finality. A plain file may still grow until the runtime reopens the live path: kubelet
renames ``N.log`` first, the runtime may append the first half of a line to the renamed file,
then creates the new ``N.log``. So a file is *final* only once a newer live file exists (or a
later restart, or the pod directory is gone) *at the time of a listing*; a read to EOF that
starts after that listing has everything. Only then does the reader move to the next file.

Continuity and blind windows. The next file of a stream is proven to follow the previous one
only if the previous one, last seen as the live file, is still listed under a rotated name
(kubelet deletes oldest first, so nothing newer was deleted). A file last seen live that is
neither live nor listed any more was rotated *and* deleted unseen — the agent was paused,
starved of CPU, short of descriptors, or a listing failed — so files between it and the next
one may be gone: once it is read to its end (its open descriptor still reads it) a ``loss``
with ``bytes`` null is recorded whose ``detail`` names the window.

Truncation (copytruncate) is seen as a size below the read position, or a changed head
fingerprint when the file changed size; the stream continues at its current offset from the
file's start and a ``truncated`` loss of unknown length is recorded.

Holes. A queued file that vanishes before it could be opened, or a checkpointed file that is
gone at recovery, becomes a ``loss``: its exact length when the agent had seen its final size,
otherwise a hole of unknown length (``bytes`` null) that consumes no offsets.

Everything here runs in a worker thread under the spool lock (taken per stream).
"""

from __future__ import annotations

import gzip
import os
import time
import zlib
from collections.abc import Callable, Collection, Iterable
from typing import Final

from evidence_keeper.discover.logtree import Listed, LogTree, Scan, StreamListing
from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import StreamId
from evidence_keeper.spool.spool import Spool, SpoolStream, SpoolWriteError
from evidence_keeper.tail.budget import FdBudget
from evidence_keeper.tail.files import FileReader, Opened, TailFile
from evidence_keeper.tail.identity import (
    FP_MAX,
    consumed_matches,
    head_identifies,
    is_final,
    lost_sight,
)
from evidence_keeper.tail.recovery import Recovery
from evidence_keeper.tail.stream import CONSUMED_KEEP, StreamTail

__all__ = ["CHUNK", "StreamTail", "TailFile", "Tailer"]

log = get_logger("evidence_keeper.tail")

CHUNK: Final = 1 << 20
# Two passes further apart than this (monotonic) mean the agent did not run: paused
# (SIGSTOP, a frozen cgroup) or starved of CPU. Named in the detail of any loss it explains.
STALL_S: Final = 3.0
# A live file idle this long is closed while inotify watches its directory (a write is then
# reported and the file reopened at once); without inotify only a descriptor shortage does.
IDLE_CLOSE_S: Final = 30.0


class Tailer:
    def __init__(
        self,
        spool: Spool,
        *,
        metrics: Metrics,
        fs: FileSystem | None = None,
        retry_s: float = 1.0,
        per_stream_budget: int = 8 << 20,
        budget: FdBudget | None = None,
        tree: LogTree | None = None,
        idle_close_s: float = IDLE_CLOSE_S,
    ) -> None:
        self.spool = spool
        self.fs = fs or FileSystem()
        self.metrics = metrics
        self.retry_s = retry_s
        self.per_stream_budget = per_stream_budget
        self.budget = budget or FdBudget.from_process(reserve=128)
        self.tree = tree
        self.idle_close_s = idle_close_s
        self.files = FileReader(fs=self.fs, metrics=metrics, budget=self.budget,
                                retry_s=retry_s)
        self.recovery = Recovery(spool=spool, files=self.files, fs=self.fs, relist=self.relist)
        self.tails: dict[StreamId, StreamTail] = {}
        self.first_scan_done = False
        self._vanished_checked = False
        self.syncs = 0
        self.window = ""  # the blind window the current pass follows ("" when none)
        self.pending = False  # the last pass left work that needs no change event
        # Writes inotify reported in a directory so far (-1: not watched): the supervisor
        # hands in ChangeWatcher.write_seq.
        self.write_seq: Callable[[str], int] = lambda _dir: -1
        self.watching = False  # inotify is active (set by the supervisor before each pass)
        self.beat = 0.0  # monotonic time of the supervisor's last heartbeat (0: none)
        self.root_gone = False  # the log root is empty as after a remount (see _root_gone)
        self._unlisted: set[str] = set()
        self._gauges_at = 0.0
        self._relisted: set[str] = set()
        self._pods_last = 0

    # ------------------------------------------------------------------ discovery input
    def sync(self, scan: Scan) -> None:
        """Apply a scan: new streams, new files, finality; streams whose files vanished.

        The spool lock is taken per stream (recovery and refreshes do file I/O), so the
        shipper and the API, which take it briefly, never wait for a whole scan. A missing
        or empty log root (a remount) ends nothing; a directory that could not be listed
        ends none of the streams below it.
        """
        if not scan.root_ok:
            return
        self.syncs += 1
        with self.spool.lock:  # the read pass may be opening files in its own thread
            self.budget.measure()
        # Directories listed again after failing: what changed meanwhile was not watched.
        self._relisted = self._unlisted - scan.unlisted
        self._unlisted = set(scan.unlisted)
        if self.beat:
            # The heartbeat has not run for a while: the process is just back from a pause.
            self.note_pause(time.monotonic() - self.beat)
        for sid, listing in scan.streams.items():
            with self.spool.lock:
                t = self.tails.get(sid)
                if t is None:
                    t = self._attach(sid, listing)
                if t.listing is not listing and t.listing != listing:
                    self._refresh(t, listing)
        with self.spool.lock:
            if not self._root_gone(scan):
                if not self._vanished_checked and scan.complete:
                    self._vanished_checked = True
                    self._recover_vanished(scan)
                self._end_vanished(scan)
            self._forget_finished()
            self.first_scan_done = True
            self._update_gauges()
        self.window = ""  # this listing has seen what the window hid

    def _root_gone(self, scan: Scan) -> bool:
        """Is an empty log root a remount (the tree will come back) rather than deletions?

        Kubelet removes pod directories one by one, and on a real node the agent's own pod
        logs are in the tree. So several pod directories vanishing in one scan, or an empty
        root at start-up while the checkpoint holds streams, is the tree being unavailable:
        nothing is ended and nothing recorded until it lists pods again.
        """
        if not scan.root_empty:
            self._pods_last = len({(s.namespace, s.pod, s.pod_uid) for s in scan.streams})
            if self.root_gone:
                log.info("log root lists pods again; continuing from checkpointed positions")
            self.root_gone = False
            return False
        if not self.root_gone and (self._pods_last >= 2 or (
                not self.first_scan_done and self.spool.streams)):
            self.root_gone = True
            log.warning("log root is empty: treated as unavailable (a remount), nothing is"
                        " ended", streams=len(self.spool.streams))
        return self.root_gone

    def note_pause(self, seconds: float) -> None:
        """A loop woke ``seconds`` later than it asked: the agent did not run meanwhile
        (SIGSTOP, a frozen cgroup, CPU starvation). Named in any loss the next listing finds."""
        if seconds < STALL_S:
            return
        self.window = f"the agent did not run for {seconds:.1f}s (paused or starved of CPU)"
        log.warning("blind window: the agent did not run", seconds=round(seconds, 1))

    def _end_vanished(self, scan: Scan) -> None:
        for sid, t in self.tails.items():
            if sid in scan.streams or t.gone or _under(t.dir, scan.unlisted):
                continue
            # Pod directory removed, or kubelet deleted this instance's logs: nothing will be
            # written again; open descriptors still read to the end.
            t.gone = True
            t.listing = None
            for f in list(t.queue):
                f.final = True
                if f.parked:
                    self._vanished_parked(t, f)
            self.spool.dirty = True

    def _vanished_parked(self, t: StreamTail, f: TailFile) -> None:
        """A closed live file whose directory went. If inotify watched it without a break
        since it was last checked and reported no change, nothing was written: it is done.
        Otherwise what was written after it was closed is unknown: a blind window."""
        if f.park_seq >= 0 and self.write_seq(t.dir) == f.park_seq:
            self.files.close(f)
            t.queue.remove(f)
            t.consumed.append((f.dev, f.ino, f.fp_len, f.fp, f.pos))
            del t.consumed[:-CONSUMED_KEEP]
            return
        f.blind = (f"{f.name} was removed while closed (idle, or no descriptor was free) and"
                   " a change to it could not be ruled out; bytes written to it after it was"
                   " closed are unknown")
        self._lost_parked(t, f)

    def _update_gauges(self) -> None:
        self.metrics.tailed_files.set(sum(len(t.queue) for t in self.tails.values()))
        self.metrics.open_files.set(max(self.budget.in_use, 0))
        self.metrics.fd_limit.set(self.budget.limit)
        self.metrics.fd_tail_budget.set(self.budget.tail_max)

    def _attach(self, sid: StreamId, listing: StreamListing) -> StreamTail:
        s = self.spool.stream(sid)
        t = StreamTail(id=sid, dir=listing.dir)
        if isinstance(s.cursor, dict):
            self.recovery.recover(t, s, s.cursor, listing)
            self._park_if_short(t)
        s.cursor = t
        self.tails[sid] = t
        return t

    def _park_if_short(self, t: StreamTail) -> None:
        """After recovery (probes may exceed the budget): idle live files give their
        descriptor back under pressure, every file does when the files' share is used up
        (reopened later by inode and head, or a .gz by its rotation name)."""
        if not self.budget.pressure:
            return
        short = not self.budget.can_open()
        for f in t.queue:
            if not f.is_open:
                continue
            if f.gz:
                if short:
                    self.files.close(f)
                    f.deferred = True
            elif short or (not f.final and f.ts is None):
                self.files.park(f)

    def relist(self, listing: StreamListing) -> StreamListing | None:
        if not listing.dir:
            return None
        tree = self.tree or LogTree(listing.dir, fs=self.fs)
        return tree.relist(listing)

    def _recover_vanished(self, scan: Scan) -> None:
        """Checkpointed streams whose files all vanished while the agent was not running."""
        for sid, s in list(self.spool.streams.items()):
            if sid in scan.streams or sid in self.tails or not isinstance(s.cursor, dict):
                continue
            t = StreamTail(id=sid, dir=s.cursor.get("dir", ""), gone=True)
            empty = StreamListing(stream=sid, dir=t.dir, rotated=(), live=False,
                                  superseded=True)
            self.recovery.recover(t, s, s.cursor, empty)
            s.cursor = t
            self.tails[sid] = t

    # ------------------------------------------------------------------ refresh
    def _refresh(self, t: StreamTail, listing: StreamListing) -> None:
        t.listing = listing
        t.dir = listing.dir
        s = self.spool.stream(t.id)
        live_id: tuple[int, int] | None = None
        live_st: os.stat_result | None = None
        if listing.live:
            try:
                live_st = self.fs.stat(listing.live_path)
                live_id = (live_st.st_dev, live_st.st_ino)
            except OSError:
                live_id = None
        # Names as they are after the live file's stat: a file renamed before that live file
        # was created is listed now, and is queued before it (the stream's order).
        fresh = self.relist(listing)
        complete = [fresh is not None]
        listed_ids = self._queue_rotated(t, listing, fresh or listing, complete)
        self._queue_live(t, listing, live_id, live_st)
        if complete[0]:
            self._check_sight(t, live_id, listed_ids)
        elif any(f.ts is None and not f.gz for f in t.queue):
            t.listing = None  # refresh again at the next scan, even if it lists the same
        # Finality: every file but the live one is complete once a newer live file exists;
        # all are complete once a later restart exists (the container exited).
        for f in t.queue:
            if is_final(gz=f.gz, file_id=(f.dev, f.ino), live_id=live_id,
                        superseded=listing.superseded, ended=t.ended_at >= 0):
                f.final = True
        self.spool.dirty = True
        del s  # the spool stream exists from here on

    def fs_exists(self, path: str) -> bool:
        try:
            self.fs.stat(path)
        except OSError:
            return False
        return True

    def _queue_rotated(self, t: StreamTail, listing: StreamListing, names: StreamListing,
                       complete: list[bool]) -> set[tuple[int, int]]:
        """Queue rotated files not seen before; returns the inodes of listed plain files.
        ``complete[0]`` turns False when a listed file could not be identified (renamed or
        compressed since the listing): continuity is then judged at the next refresh."""
        queued_ts: set[str | None] = {f.ts for f in t.queue if f.ts}
        listed: set[tuple[int, int]] = set()
        for r in names.rotated:
            path = listing.path(r)
            if r.gz:
                self._queue_gz(t, r, path, queued_ts)
                continue
            try:
                st = self.fs.stat(path)
            except OSError:
                # Compressed (or removed) since the listing: its .gz, if any, is that file.
                gz = Listed(f"{r.name}.gz", r.ts, True)
                if self.fs_exists(listing.path(gz)):
                    self._queue_gz(t, gz, listing.path(gz), queued_ts)
                else:
                    complete[0] = False
                continue
            rid = (st.st_dev, st.st_ino)
            listed.add(rid)
            # An unopened rotated file's inode number is only a hint: once kubelet deletes it,
            # the number can be reused by the next live file. Open descriptors pin their inode.
            match = next((f for f in t.queue if not f.gz and (f.dev, f.ino) == rid
                          and (f.is_open or f.parked or f.ts in (None, r.ts))), None)
            if match is not None:
                match.ts, match.name = r.ts, r.name
                queued_ts.add(r.ts or "")
                continue
            if r.ts is not None and r.ts <= t.consumed_ts:
                continue
            f = TailFile(name=r.name, ts=r.ts, gz=False, final=False)
            opened = self.files.open_plain(t.id, f, path)
            if opened is Opened.OK:
                if rid in {(c[0], c[1]) for c in t.consumed} and self._was_consumed(t, f):
                    self.files.close(f)
                    continue
                t.queue.append(f)
                queued_ts.add(r.ts or "")
            else:
                self._queue_unopened(t, f, st, deferred=opened is Opened.DEFERRED)
        return listed

    def _queue_gz(self, t: StreamTail, r: Listed, path: str, queued_ts: set[str | None]) -> None:
        if r.ts in queued_ts or (r.ts is not None and r.ts <= t.consumed_ts):
            return
        f = TailFile(name=r.name, ts=r.ts, gz=True, final=True)
        opened = self.files.open_gz(t.id, f, path, name=r.name, ts=r.ts)
        if opened is not Opened.OK:
            self._queue_unopened(t, f, None, deferred=opened is Opened.DEFERRED)
            queued_ts.add(r.ts)
            return
        if self._absorb_gz_twin(t, f):
            return
        t.queue.append(f)
        queued_ts.add(r.ts)

    def _absorb_gz_twin(self, t: StreamTail, f: TailFile) -> bool:
        """A .gz that is a compressed copy of a queued or consumed file gives it its name and
        is closed; True when that happened (``f`` is not queued)."""
        twin = self._gz_twin(t, f)
        if twin is None:
            return False
        if twin == "consumed":
            t.consumed_ts = max(t.consumed_ts, f.ts or "")
        elif isinstance(twin, TailFile):
            twin.ts = f.ts
        self.files.close(f)
        return True

    def _queue_live(self, t: StreamTail, listing: StreamListing,
                    live_id: tuple[int, int] | None, live_st: os.stat_result | None) -> None:
        queued_ids = {(f.dev, f.ino) for f in t.queue
                      if not f.gz and (f.is_open or f.parked or f.ts is None)}
        if not listing.live or live_id is None or live_id in queued_ids:
            return
        f = TailFile(name=f"{t.id.restart}.log", ts=None, gz=False)
        if self.budget.pressure and t.queue:
            # Short of descriptors: a live file behind others keeps its bytes on disk; it is
            # opened when it is the head (found again by inode if renamed meanwhile).
            self._queue_unopened(t, f, live_st, deferred=True)
            return
        opened = self.files.open_plain(t.id, f, listing.live_path)
        if opened is Opened.OK:
            if (f.dev, f.ino) != live_id or self._was_consumed(t, f):
                self.files.close(f)  # rotated between stat and open, or read already
            else:
                t.queue.append(f)
        elif live_id not in {(c[0], c[1]) for c in t.consumed}:
            # Unreadable for now (EACCES: the seeds' postmortem), or no descriptor free: keep
            # its place in the stream and retry; its bytes are lost only if it vanishes unread.
            self._queue_unopened(t, f, live_st, deferred=opened is Opened.DEFERRED)

    def _check_sight(self, t: StreamTail, live_id: tuple[int, int] | None,
                     listed: set[tuple[int, int]]) -> None:
        """Files last seen live that are neither live nor listed now: a blind window."""
        if any(f.gz and f.deferred for f in t.queue):
            return  # an unopened .gz may be the file's compressed copy: decide next time
        for f in list(t.queue):
            if f.blind or not (f.is_open or f.parked) or f.gz or self._empty(f):
                continue
            if not lost_sight(file_id=(f.dev, f.ino), named=f.ts is not None,
                              live_id=live_id, listed_ids=listed, has_gz_twin=False):
                continue
            why = self.window or self._listing_window(t) or (
                "its rotated name was removed before the agent listed it"
                + (" (the file was closed for lack of descriptors)" if f.parked else ""))
            f.blind = (f"{f.name} was rotated and removed without the agent seeing its"
                       f" successor ({why}); files rotated away meanwhile are unknown")
            f.final = True
            if f.parked:
                self._lost_parked(t, f)

    def _listing_window(self, t: StreamTail) -> str:
        failed = sorted(d for d in self._relisted if _under(t.dir, {d}))
        return f"the listing of {failed[0]} failed for a while" if failed else ""

    def _empty(self, f: TailFile) -> bool:
        """Nothing read and nothing in it: kubelet never rotates an empty file for size, and
        an empty file cannot be told from its compressed copy, so no window is claimed."""
        if f.pos or f.fd is None:
            return f.pos == 0 and f.size == 0
        try:
            return self.fs.fstat(f.fd).st_size == 0
        except OSError:
            return False

    def _lost_parked(self, t: StreamTail, f: TailFile) -> None:
        """A closed file that vanished: what it held after ``pos`` is lost (length unknown)."""
        s = self.spool.stream(t.id)
        self.spool.record_loss(s, None, "rotated_away",
                               f"{f.blind}; bytes written to it after offset {f.pos} of the"
                               " file were not read")
        t.queue.remove(f)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)

    def _was_consumed(self, t: StreamTail, f: TailFile) -> bool:
        """Same inode and same head as a file read to its end before (inodes get reused)."""
        for dev, ino, fp_len, fp, size in t.consumed:
            if (dev, ino) != (f.dev, f.ino) or f.fd is None:
                continue
            if consumed_matches(recorded_len=size, fp_len=fp_len, size=f.size) and (
                    self.files.head_fp(f, fp_len) == fp):
                return True
        return False

    def _queue_unopened(self, t: StreamTail, f: TailFile, st: os.stat_result | None, *,
                        deferred: bool = False) -> None:
        if st is not None:
            f.dev, f.ino, f.size = st.st_dev, st.st_ino, st.st_size
            f.mtime_ns = st.st_mtime_ns
        f.deferred = deferred
        f.retry_at = 0.0 if deferred else time.monotonic() + self.retry_s
        t.queue.append(f)

    def _gz_twin(self, t: StreamTail, f: TailFile) -> TailFile | str | None:
        """Is this .gz a compressed copy of a file already queued (no ts yet) or consumed?"""
        head = self.files.gz_head(f)
        if head is None:
            return None
        for q in t.queue:
            if not q.gz and q.ts is None and q.fd is not None:
                self.files.update_fp(q)  # its head now: it may have grown since it was read
            if not q.gz and q.ts is None and q.fp_len and head_identifies(
                    head, fp_len=q.fp_len, fp=q.fp, size=q.size):
                return q
        for _dev, _ino, fp_len, fp, size in t.consumed:
            if head_identifies(head, fp_len=fp_len, fp=fp, size=size):
                return "consumed"
        return None

    def _corrupt_gz(self, t: StreamTail, s: SpoolStream, f: TailFile, why: str) -> None:
        self.spool.record_loss(s, None, "unreadable",
                               f"{f.name}: corrupt gzip after {f.pos} bytes: {why}")
        self.files.close(f)
        if f in t.queue:
            t.queue.remove(f)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)

    # ------------------------------------------------------------------ reading
    def pump(self, dirs: Collection[str] | None = None) -> bool:
        """One read pass. Returns True when some stream had more to read.

        ``dirs``: only streams in these directories changed (inotify); None reads them all.
        Streams with work of their own (unread bytes, a deferred or failed open) are read
        either way. When descriptors are short the most endangered streams go first.
        """
        more = False
        now = time.monotonic()
        with self.spool.lock:
            self.budget.measure(now=now, every_s=1.0)
        tails = [t for t in self.tails.values() if t.queue and (
            dirs is None or _has_work(t) or any(d in dirs for d in t.dirs))]
        self.pending = any(_has_work(t) for t in tails)
        if self.budget.short:
            tails.sort(key=lambda t: t.endangered)
        for t in tails:
            # The lock is taken per stream so a commit never waits for a whole pass.
            with self.spool.lock:
                s = self.spool.stream(t.id)
                if s.cursor is not t and (s.cursor is None or isinstance(s.cursor, dict)):
                    self._rewound(t)  # the spool rewound it to its checkpoint (failed fsync)
                    more = True  # read it again at once: no change event will come for it
                    continue
                if s.error_until > now:
                    continue
                if self._pump_stream(t, s, now):
                    more = True
        # Work this pass left behind (a spool error held a stream back) needs no event either.
        self.pending = self.pending or any(_has_work(t) for t in tails)
        if now - self._gauges_at >= 1.0:
            self._gauges_at = now
            with self.spool.lock:
                self._update_gauges()
        return more

    def _pump_stream(self, t: StreamTail, s: SpoolStream, now: float) -> bool:
        budget = self.per_stream_budget
        while t.queue and budget > 0:
            f = t.queue[0]
            if not f.is_open and not self._ready_to_read(t, s, f, now):
                if f in t.queue:
                    if f.deferred:
                        self._release_behind(t)
                    return False  # still closed: retry later
                continue  # vanished and recorded as loss: go on with the next file
            if f.fd is not None and not f.final and f.size == f.pos and (
                    self.fs.fstat(f.fd).st_size == f.size):
                self._at_eof(t, f, now)  # idle: the cheap path of a polling pass
                return False
            n = self.read_into_spool(t, s, f, min(CHUNK, budget), now)
            if n is None:
                return False
            if n < 0:
                continue  # the queue changed (truncation, damage, a file done)
            budget -= n
            if n == 0:
                return False
        return budget <= 0

    def _release_behind(self, t: StreamTail) -> None:
        """The head waits for a descriptor: live files queued behind it give theirs back
        (they keep their bytes on disk), so held descriptors never block every head."""
        for f in t.queue[1:]:
            if f.is_open and not f.gz and f.ts is None and not f.final:
                self.files.park(f)

    def _ready_to_read(self, t: StreamTail, s: SpoolStream, f: TailFile, now: float) -> bool:
        """Open a closed head file when it may be read now; False while it stays closed."""
        if f.parked:
            return self._unpark(t, s, f)
        if f.retry_at > now:
            return False
        return self._retry_open(t, s, f)

    def read_into_spool(self, t: StreamTail, s: SpoolStream, f: TailFile, n: int,
                        now: float) -> int | None:
        """Read up to ``n`` bytes of the head file ``f`` into the spool.

        The one place where stream bytes move from a source file to the spool. Returns the
        bytes accepted; 0 at the end of a file that may still grow (nothing to do now), -1
        when the queue changed (a file done, truncated or damaged: look at the head again),
        None when the stream must wait (a read or spool error, no descriptor for a segment).
        """
        # Back-pressure (contract §3): over the spool budget, bytes still in their source file
        # wait there; only endangered bytes (a deleted file, an ended stream) are read.
        room = self.spool.room()
        endangered = room < CHUNK and self._endangered(t, f)
        if not endangered:
            n = min(n, room)
            if n <= 0:
                t.held = True  # read again on every pass until the budget has room
                return None
        t.held = False
        try:
            data = self._read(t, s, f, n)
        except OSError as exc:
            self.files.read_error(t.id, f, exc)
            self.files.close(f)
            return None
        if data is None:
            return -1
        if not data:
            return self._at_eof(t, f, now)
        if s.open is None and not self.budget.can_open(segment=True):
            # No descriptor for a spool segment: the file keeps its bytes for the next pass.
            if f.gzf is not None and not self.files.skip_gz(f, f.pos):
                self._corrupt_gz(t, s, f, "cannot seek back")
            return None
        had_segment = s.open is not None
        try:
            got = self.spool.append(s, data, now_mono=now, endangered=endangered)
        except SpoolWriteError:
            got = 0
        if not had_segment and s.open is not None:
            self.budget.opened()
        f.pos += got
        f.idle_since = 0.0
        if got < len(data):
            # Plain files are read at f.pos (pread); a decompressor has moved on and must be
            # put back to what the spool accepted. The rest is read again later.
            if f.gzf is not None and not self.files.skip_gz(f, f.pos):
                self._corrupt_gz(t, s, f, "cannot seek back after a spool error")
            return None
        if f.fp_len < FP_MAX and not f.gz:
            self.files.update_fp(f)
        return got

    def _endangered(self, t: StreamTail, f: TailFile) -> bool:
        """Would these bytes be lost by waiting? Once the stream is gone or ended, or the file
        is deleted (only our descriptor keeps it), yes; otherwise they wait in the file."""
        if t.gone or t.ended_at >= 0:
            return True
        fd = f.fd if f.fd is not None else f.raw.fileno() if f.raw is not None else None
        try:
            return fd is None or self.fs.fstat(fd).st_nlink == 0
        except OSError:
            return True

    def _rewound(self, t: StreamTail) -> None:
        """The spool rewound this stream to its last checkpoint (a failed fsync): drop the
        read state and recover from the checkpointed cursor, exactly as after a restart."""
        del self.tails[t.id]
        listing = t.listing or StreamListing(stream=t.id, dir=t.dir, rotated=(), live=False,
                                             superseded=True)
        nt = self._attach(t.id, listing)
        nt.gone, nt.ended_at = t.gone, t.ended_at
        nt.held = True  # re-read now: no change event will announce these bytes again
        if t.listing is not None:
            self._refresh(nt, t.listing)
        for f in t.queue:
            self.files.close(f)

    def _at_eof(self, t: StreamTail, f: TailFile, now: float) -> int:
        if f.final:
            self._done(t, f)
            return -1
        if not f.idle_since:
            f.idle_since = now
        if self.budget.pressure:
            self.files.park(f, seq=self.write_seq(t.dir))
        elif self.watching and now - f.idle_since >= self.idle_close_s:
            seq = self.write_seq(t.dir)
            if seq >= 0:
                self.files.park(f, seq=seq)
        return 0

    def _read(self, t: StreamTail, s: SpoolStream, f: TailFile, n: int) -> bytes | None:
        if f.gzf is not None:
            try:
                return self.files.read_gz(f, n)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                # A damaged .gz: the rest of this file cannot be recovered.
                self.spool.record_loss(s, None, "unreadable",
                                       f"{f.name}: corrupt gzip after {f.pos} bytes: {exc}")
                f.final = True
                self.files.close(f)
                t.queue.remove(f)
                return None  # the queue changed: the caller looks at its new head
        pos = f.pos
        data = self.files.read_plain(f, n)
        if data is None:
            self.spool.record_loss(
                s, None, "truncated",
                f"{f.name} was truncated in place at file position {pos}; the stream"
                " continues with the file's new content")
        return data

    def _unpark(self, t: StreamTail, s: SpoolStream, f: TailFile) -> bool:
        """Reopen a parked file when it has new bytes or became final.

        By path with an inode check: the live name while it is live, its rotated name once
        renamed (the refresh learnt it). Its head must still match: inode numbers are
        reused. A parked file that cannot be found is left to the next refresh, which
        decides with a fresh listing whether it was rotated away (:meth:`_check_sight`).
        """
        listing = t.listing
        if listing is None:
            return False
        path = listing.live_path if f.ts is None else listing.path(
            Listed(f.name, f.ts, False))
        seq = self.write_seq(t.dir)  # before the stat: a write after it shows as a change
        try:
            st = self.fs.stat(path)
        except OSError:
            if f.ts is not None:
                return self._unpark_rotated(t, s, f)
            return False
        if (st.st_dev, st.st_ino) != (f.dev, f.ino):
            return False
        if st.st_size == f.pos and not f.final:
            f.park_seq = seq if f.park_seq >= 0 else -1  # nothing new: stay closed
            return False
        if self.files.open_plain(t.id, f, path) is not Opened.OK:
            return False
        if (f.dev, f.ino) != (st.st_dev, st.st_ino) or (
                f.fp_len and self.files.head_fp(f, f.fp_len) != f.fp):
            # Renamed between the stat and the open, or a new file under a reused inode.
            self.files.park(f)
            return False
        del s
        return True

    def _unpark_rotated(self, t: StreamTail, s: SpoolStream, f: TailFile) -> bool:
        """A parked rotated file no longer under its plain name: compressed (its ``.gz``
        keeps the rotation name) or deleted, taking what was not read with it."""
        assert t.listing is not None and f.ts is not None
        listing = self.relist(t.listing)  # fresh: the .gz may be newer than the last scan
        if listing is None or any(r.ts == f.ts and not r.gz for r in listing.rotated):
            return False  # still listed plain: removed between listing and stat, look again
        gz = next((r for r in listing.rotated if r.gz and r.ts == f.ts), None)
        if gz is not None:
            f.parked = False
            return self._open_deferred_gz(t, s, f, listing.path(gz), gz)
        f.blind = (f"{f.name} was removed while closed for lack of descriptors; bytes"
                   " after the agent's position in it are unknown")
        self._lost_parked(t, f)
        return False

    def _retry_open(self, t: StreamTail, s: SpoolStream, f: TailFile) -> bool:
        """Open a queued file that could not be opened before, wherever it is now.

        A plain file is looked for by inode under the live name and every rotated name (it
        may have been renamed meanwhile); once compressed, by its rotation timestamp, which
        its ``.gz`` keeps (kubelet writes the .gz with its own, readable, permissions).
        """
        listing = t.listing
        if listing is not None:
            found = self._open_listed(t, s, f, listing)
            if found is not None:
                return found
        # Vanished before it could ever be read. Its length is known only if it was seen
        # after it became final (no writer could append any more).
        known = f.size_final - f.pos if (f.size_final >= 0 and not f.gz) else None
        why = (" (no descriptor was free: too many files for the descriptor limit)"
               if f.deferred else "")
        self.spool.record_loss(
            s, known, "unreadable",
            f"{f.name} could not be read and then disappeared{why}"
            + ("" if known is not None else "; its final length is unknown"))
        t.queue.remove(f)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)
        return False

    def _open_listed(self, t: StreamTail, s: SpoolStream, f: TailFile,
                     listing: StreamListing) -> bool | None:
        """True opened, False still failing (retry later), None not found anywhere."""
        candidates = [(listing.path(r), r) for r in listing.rotated]
        if listing.live:
            candidates.append((listing.live_path, Listed(f"{t.id.restart}.log", None, False)))
        for path, r in candidates:
            if r.gz:
                if f.ts is None or r.ts != f.ts:
                    continue
                return self._open_deferred_gz(t, s, f, path, r)
            if f.ts is not None and r.ts != f.ts:
                continue  # a rotated file keeps its unique name; its inode may be reused
            try:
                st = self.fs.stat(path)
            except OSError:
                continue
            if f.ino and (st.st_dev, st.st_ino) != (f.dev, f.ino):
                continue
            if f.final:
                f.size_final = st.st_size
            if self.files.open_plain(t.id, f, path) is not Opened.OK:
                return False
            if r.ts is not None:
                f.ts, f.name = r.ts, r.name
            if self._was_consumed(t, f):
                self.files.close(f)
                t.queue.remove(f)  # read already under its live name (opened late)
                return False
            return True
        return None

    def _open_deferred_gz(self, t: StreamTail, s: SpoolStream, f: TailFile, path: str,
                          r: Listed) -> bool:
        if self.files.open_gz(t.id, f, path, name=r.name, ts=r.ts) is not Opened.OK:
            return False
        if f.pos == 0 and self._absorb_gz_twin(t, f):
            t.queue.remove(f)  # opened late: a copy of a file queued or read already
            return False
        if f.pos and not self.files.skip_gz(f, f.pos):
            self._corrupt_gz(t, s, f, "cannot seek to the read position")
            return False
        return True

    def _done(self, t: StreamTail, f: TailFile) -> None:
        self.files.close(f)
        t.queue.pop(0)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)
        t.consumed.append((f.dev, f.ino, f.fp_len, f.fp, f.pos))
        del t.consumed[:-CONSUMED_KEEP]
        if f.blind:
            s = self.spool.stream(t.id)
            self.spool.record_loss(s, None, "rotated_away", f.blind)
        self.spool.dirty = True

    # ------------------------------------------------------------------ lifecycle
    def _forget_finished(self) -> None:
        for sid in [sid for sid, t in self.tails.items() if t.gone and not t.queue]:
            s = self.spool.streams.get(sid)
            if s is not None:
                if not s.finished:
                    # The pod is gone: what is left of it ships before everything else.
                    s.finished = s.priority = True
                    self.spool.dirty = True
                if s.open is None and not s.sealed:
                    self.spool.forget(sid)
                    del self.tails[sid]
                    continue
            if s is None:
                del self.tails[sid]
        for sid, t in self.tails.items():
            listing = t.listing
            # An API-reported exit finishes the stream only with a listing taken after it
            # (two syncs later), so a file created just before the exit is still queued.
            ended = t.ended_at >= 0 and self.syncs >= t.ended_at + 2
            if (ended or (listing is not None and listing.superseded)) and not t.queue:
                s = self.spool.streams.get(sid)
                if s is not None and not s.finished:
                    s.finished = True
                    s.priority = True
                    self.spool.dirty = True

    def end_streams(self, streams: Iterable[StreamId]) -> set[StreamId]:
        """The container instances exited (the API says so): every file of theirs is final, so
        each is read to EOF and the stream is finished. Returns the streams that had a tail."""
        done: set[StreamId] = set()
        with self.spool.lock:
            for sid in streams:
                t = self.tails.get(sid)
                if t is None:
                    continue
                done.add(sid)
                if t.ended_at < 0:
                    t.ended_at = self.syncs
                    for f in t.queue:
                        f.final = True
                    self.spool.dirty = True
        return done

    def awaits_listing(self) -> bool:
        """Some stream the API reported as exited waits for listings taken after the exit
        (see :meth:`end_streams`): change-driven discovery must not wait for an event."""
        syncs = self.syncs
        return any(t.ended_at >= 0 and syncs < t.ended_at + 2 for t in self.tails.values())

    def prime_priority(self, streams: Iterable[StreamId]) -> None:
        with self.spool.lock:
            for sid in streams:
                if sid in self.spool.streams:
                    self.spool.streams[sid].priority = True

    def close(self) -> None:
        with self.spool.lock:
            for t in self.tails.values():
                for f in t.queue:
                    self.files.close(f)


def _under(path: str, dirs: Collection[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _has_work(t: StreamTail) -> bool:
    """Work of its own, without a change event: a file to open, unread or final bytes."""
    if not t.queue:
        return False
    if t.held:
        return True
    head = t.queue[0]
    if head.deferred or (not head.is_open and not head.parked):
        return True
    if head.parked:
        return head.final  # ended (the API said so) or renamed: read it to its end now
    return head.final or head.size != head.pos

