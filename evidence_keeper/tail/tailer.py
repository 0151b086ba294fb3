"""Tailing: turn the files of each stream into one ordered byte stream in the spool.

A stream's bytes are the concatenation of its files in rotation order: rotated files by their
timestamp name (plain or ``.gz``), then the live ``<restart>.log``. Each stream keeps a
*queue* of the files it still has to read, head first. Files are opened as soon as they are
seen, so kubelet deleting them (rotation beyond ``max_files``, a restart, a pod deletion) does
not take their bytes away: an open descriptor reads a deleted file to its end.

Identity. A plain file is identified by ``(dev, inode)``, which survives kubelet's rename; a
``.gz`` file (a new inode written by kubelet's compressor) by its rotation timestamp, or, when
the plain file it came from was never seen under that name, by a *fingerprint*: the SHA-256 of
its first up to 4 KiB, compared with the fingerprints of files already queued or consumed.

Finality. A plain file may still grow until the runtime reopens the live path: kubelet
renames ``N.log`` first, the runtime may append the first half of a line to the renamed file,
then creates the new ``N.log``. So a file is *final* only once a newer live file exists (or a
later restart, or the pod directory is gone) *at the time of a listing*; a read to EOF that
starts after that listing has everything. Only then does the reader move to the next file.

Truncation (copytruncate) is seen as a size below the read position, or a changed head
fingerprint when the file changed size; the stream continues at its current offset from the
file's start and a ``truncated`` loss of unknown length is recorded.

Holes. A queued file that vanishes before it could be opened, or a checkpointed file that is
gone at recovery, becomes a ``loss``: its exact length when the agent had seen its final size,
otherwise a hole of unknown length (``bytes`` null) that consumes no offsets.

Everything here runs in a worker thread under the spool lock.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, Final

from evidence_keeper.discover.logtree import Listed, Scan, StreamListing
from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import StreamId
from evidence_keeper.spool.spool import Spool, SpoolStream, SpoolWriteError

log = get_logger("evidence_keeper.tail")

FP_MAX: Final = 4096
# Below this many bytes a head identifies nothing: every CRI line of a second starts with the
# same 18-byte timestamp prefix. 48 bytes cover a full RFC3339Nano timestamp and the tag.
FP_MIN: Final = 48
CHUNK: Final = 1 << 20
CONSUMED_KEEP: Final = 16


def fingerprint(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


@dataclass(slots=True)
class TailFile:
    """One physical file of a stream."""

    name: str
    ts: str | None
    gz: bool
    dev: int = 0
    ino: int = 0
    pos: int = 0  # bytes of this file (uncompressed) already in the stream
    size: int = -1  # last observed size of a plain file, -1 unknown
    size_final: int = -1  # size observed after the file became final, -1 unknown
    final: bool = False
    fp_len: int = 0
    fp: str = ""
    fd: int | None = None
    gzf: gzip.GzipFile | None = None
    raw: IO[bytes] | None = None  # the .gz file itself (GzipFile does not close it)
    retry_at: float = 0.0  # monotonic: next open attempt after an error

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "ts": self.ts, "gz": self.gz, "dev": self.dev, "ino": self.ino,
            "pos": self.pos, "size": self.size, "final": self.final, "fp_len": self.fp_len,
            "fp": self.fp, "size_final": self.size_final,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TailFile:
        return cls(
            name=d["name"], ts=d["ts"], gz=d["gz"], dev=d["dev"], ino=d["ino"], pos=d["pos"],
            size=d["size"], final=d["final"], fp_len=d["fp_len"], fp=d["fp"],
            size_final=d.get("size_final", -1),
        )

    @property
    def is_open(self) -> bool:
        return self.fd is not None or self.gzf is not None


@dataclass(slots=True)
class StreamTail:
    """Read state of one stream; persisted through the spool checkpoint as its cursor."""

    id: StreamId
    dir: str
    queue: list[TailFile] = field(default_factory=list)
    consumed_ts: str = ""  # newest rotation timestamp fully consumed
    # Files read to their end: dev, ino, fingerprint length and hash, length (-1 unknown).
    consumed: list[tuple[int, int, int, str, int]] = field(default_factory=list)
    listing: StreamListing | None = None
    gone: bool = False  # the stream's files vanished from the tree
    ended_at: int = -1  # Tailer.syncs when the API reported the container exited, else -1
    rereads: ClassVar[bool] = True  # the spool may rewind it to its checkpoint (failed fsync)

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "queue": [f.to_json() for f in self.queue],
            "consumed_ts": self.consumed_ts,
            "consumed": [list(c) for c in self.consumed],
        }


class Tailer:
    def __init__(
        self,
        spool: Spool,
        *,
        metrics: Metrics,
        fs: FileSystem | None = None,
        retry_s: float = 1.0,
        per_stream_budget: int = 8 << 20,
    ) -> None:
        self.spool = spool
        self.fs = fs or FileSystem()
        self.metrics = metrics
        self.retry_s = retry_s
        self.per_stream_budget = per_stream_budget
        self.tails: dict[StreamId, StreamTail] = {}
        self.first_scan_done = False
        self._vanished_checked = False
        self.syncs = 0

    # ------------------------------------------------------------------ discovery input
    def sync(self, scan: Scan) -> None:
        """Apply a scan: new streams, new files, finality; streams whose files vanished.

        The spool lock is taken per stream (recovery and refreshes do file I/O), so the
        shipper and the API, which take it briefly, never wait for a whole scan.
        """
        if not scan.root_ok:
            return
        self.syncs += 1
        for sid, listing in scan.streams.items():
            with self.spool.lock:
                t = self.tails.get(sid)
                if t is None:
                    t = self._attach(sid, listing)
                if t.listing is not listing and t.listing != listing:
                    self._refresh(t, listing)
        with self.spool.lock:
            if not self._vanished_checked and scan.complete:
                self._vanished_checked = True
                self._recover_vanished(scan)
            for sid, t in self.tails.items():
                if scan.complete and sid not in scan.streams and not t.gone:
                    # Pod directory removed, or kubelet deleted this instance's logs: nothing
                    # will be written again; open descriptors still read to the end.
                    t.gone = True
                    t.listing = None
                    for f in t.queue:
                        f.final = True
                    self.spool.dirty = True
            self._forget_finished()
            self.first_scan_done = True
            self.metrics.tailed_files.set(sum(
                1 for t in self.tails.values() for f in t.queue if f.is_open))

    def _attach(self, sid: StreamId, listing: StreamListing) -> StreamTail:
        s = self.spool.stream(sid)
        t = StreamTail(id=sid, dir=listing.dir)
        if isinstance(s.cursor, dict):
            self._recover(t, s, s.cursor, listing)
        s.cursor = t
        self.tails[sid] = t
        return t

    def _recover(self, t: StreamTail, s: SpoolStream, saved: dict[str, Any],
                 listing: StreamListing) -> None:
        """Find the checkpointed files again after a restart of the agent."""
        t.consumed_ts = saved.get("consumed_ts", "")
        t.consumed = [(c[0], c[1], c[2], c[3], c[4] if len(c) > 4 else -1)
                      for c in saved.get("consumed", [])]
        fresh = self.relist(listing) or listing
        unknown: list[TailFile] = []
        saved_queue = saved.get("queue", [])
        known = max([t.consumed_ts, *(d["ts"] for d in saved_queue if d["ts"])])
        # Kubelet deletes oldest first: while a file from before the checkpoint is still on
        # disk, no file that was queued at the checkpoint can have been deleted.
        nothing_deleted = any(r.ts and r.ts <= known for r in fresh.rotated)
        after = known  # files live at the checkpoint follow, in queue order, after this
        for d in saved_queue:
            f = TailFile.from_json(d)
            found = self._reopen(t, f, fresh, after, nothing_deleted)
            for _ in range(5):
                # A miss may be a rotation between the listing and the stats: only a miss
                # that two listings agree on is a file really gone.
                if found:
                    break
                again = self.relist(listing)
                if again is None or again == fresh:
                    break
                fresh = again
                found = self._reopen(t, f, fresh, after, nothing_deleted)
            if found:
                t.queue.append(f)
                if d["ts"] is None and f.ts is not None:
                    after = max(after, f.ts)
            elif f.pos == 0 and f.fp_len == 0 and not f.final:
                unknown.append(f)  # nothing read, nothing to recognise it by: see below
            else:
                self._lost_while_down(t, s, f)
        for f in unknown:
            # An empty (or never readable) live file: if files newer than everything queued
            # exist, it is one of them and the next refresh queues it from its first byte.
            claimed = {q.ts for q in t.queue}
            ids = {(q.dev, q.ino) for q in t.queue if not q.gz}
            newer = [r for r in fresh.rotated if r.ts and r.ts > t.consumed_ts
                     and r.ts not in claimed]
            if not newer and not fresh.live:
                self._lost_while_down(t, s, f)
            elif not newer and fresh.live:
                try:
                    st = self.fs.stat(fresh.live_path)
                    if (st.st_dev, st.st_ino) in ids:
                        self._lost_while_down(t, s, f)
                except OSError:
                    self._lost_while_down(t, s, f)

    def _lost_while_down(self, t: StreamTail, s: SpoolStream, f: TailFile) -> None:
        known = f.size - f.pos if f.size >= 0 and not f.gz else 0
        if known > 0:
            self.spool.record_loss(
                s, known, "rotated_away",
                f"{f.name} was removed while the agent was not running; {known} bytes it"
                " had seen were not read")
        if not f.final or f.gz or f.size < 0:
            self.spool.record_loss(
                s, None, "rotated_away",
                f"{f.name} was rotated and removed while the agent was not running; bytes"
                " written after it was last seen, and any rotated file removed with it,"
                " are unknown")
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)

    def relist(self, listing: StreamListing) -> StreamListing | None:
        if not listing.dir:
            return None
        from evidence_keeper.discover.logtree import LogTree

        return LogTree(listing.dir, fs=self.fs).relist(listing)

    def _recover_vanished(self, scan: Scan) -> None:
        """Checkpointed streams whose files all vanished while the agent was not running."""
        for sid, s in list(self.spool.streams.items()):
            if sid in scan.streams or sid in self.tails or not isinstance(s.cursor, dict):
                continue
            t = StreamTail(id=sid, dir=s.cursor.get("dir", ""), gone=True)
            empty = StreamListing(stream=sid, dir=t.dir, rotated=(), live=False,
                                  superseded=True)
            self._recover(t, s, s.cursor, empty)
            s.cursor = t
            self.tails[sid] = t

    def _reopen(self, t: StreamTail, f: TailFile, listing: StreamListing,
                known_ts: str = "", nothing_deleted: bool = False) -> bool:
        """Open a checkpointed file again: by inode and head while plain, by its rotation
        name once compressed, or by its head fingerprint if it was compressed before the
        agent learnt that name. Candidates are probed on scratch records, so a rejected one
        never alters ``f``."""
        if f.fp_len == 0 and f.ts is None:
            # An empty live file: nothing can tell it from a newer file that reused its inode
            # number, so it is not recovered by identity but rediscovered by the next refresh,
            # from its first byte, in rotation order (see _recover). A rotated file keeps its
            # unique rotation name, which identifies it even unread.
            return False
        # A file live at the checkpoint was renamed at the first rotation after everything the
        # checkpoint knew before it (``known_ts``, advanced by the caller in queue order). With
        # a short head (every CRI head starts with the same timestamp prefix) only that one
        # candidate is considered, and only when no file can have been deleted meanwhile.
        newer = sorted(r.ts for r in listing.rotated if r.ts and r.ts > known_ts)
        short_candidate = newer[0] if newer and nothing_deleted else None
        plain = [(listing.path(r), r) for r in listing.rotated if not r.gz]
        if listing.live:
            plain.append((listing.live_path, Listed(f"{t.id.restart}.log", None, False)))
        if not f.gz:
            for path, r in plain:
                try:
                    st = self.fs.stat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) != (f.dev, f.ino) or (
                        f.fp_len == 0 and r.ts != f.ts):
                    continue
                if f.ts is None and f.fp_len < FP_MIN and not (
                        (r.ts is None and not newer) or r.ts == short_candidate):
                    continue  # a reused inode number with a look-alike short head
                probe = TailFile(name=r.name, ts=r.ts, gz=False)
                if not self._open_plain(t, probe, path):
                    continue
                if f.fp_len and (probe.size < f.fp_len
                                 or self._head_fp(probe, f.fp_len) != f.fp):
                    self._close(probe)
                    continue  # the inode number was reused by another file
                f.fd, f.size = probe.fd, probe.size
                if r.ts is not None:
                    f.ts, f.name = r.ts, r.name
                return True
        for r in listing.rotated:
            if not r.gz:
                continue
            if f.ts is not None:
                if r.ts != f.ts:
                    continue
            elif not f.fp_len or (r.ts is not None and r.ts <= t.consumed_ts):
                continue  # nothing to recognise it by: never guess
            elif f.fp_len < FP_MIN and r.ts != short_candidate:
                continue
            probe = TailFile(name=r.name, ts=r.ts, gz=True)
            if not self._open_gz(t, probe, listing.path(r), r):
                continue
            if f.fp_len and not self._gz_head_is(probe, f.fp_len, f.fp):
                self._close(probe)
                continue
            if not self._skip_gz(probe, f.pos):
                self._close(probe)
                continue  # damaged: the caller records the rest of the file as lost
            f.gzf, f.raw, f.gz, f.final = probe.gzf, probe.raw, True, True
            f.name, f.ts, f.dev, f.ino = probe.name, probe.ts, probe.dev, probe.ino
            return True
        return False

    def _refresh(self, t: StreamTail, listing: StreamListing) -> None:
        t.listing = listing
        t.dir = listing.dir
        s = self.spool.stream(t.id)
        # An unopened rotated file's inode number is only a hint: once kubelet deletes it, the
        # number can be reused by the next live file. Open descriptors pin their inode.
        queued_ids = {(f.dev, f.ino) for f in t.queue if not f.gz and (f.is_open or f.ts is None)}
        queued_ts = {f.ts for f in t.queue if f.ts}
        consumed_ids = {(c[0], c[1]) for c in t.consumed}
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
        for r in (self.relist(listing) or listing).rotated:
            path = listing.path(r)
            if not r.gz:
                try:
                    st = self.fs.stat(path)
                except OSError:
                    continue
                rid = (st.st_dev, st.st_ino)
                match = next((f for f in t.queue if not f.gz and (f.dev, f.ino) == rid
                              and (f.is_open or f.ts in (None, r.ts))), None)
                if match is not None:
                    match.ts, match.name = r.ts, r.name
                    queued_ts.add(r.ts or "")
                    continue
                if r.ts is not None and r.ts <= t.consumed_ts:
                    continue
                f = TailFile(name=r.name, ts=r.ts, gz=False, final=False)
                if self._open_plain(t, f, path, st=st):
                    if rid in consumed_ids and self._was_consumed(t, f):
                        self._close(f)
                        continue
                    t.queue.append(f)
                    queued_ts.add(r.ts or "")
                    queued_ids.add(rid)
                else:
                    self._queue_unopened(t, f, st)
            else:
                if r.ts in queued_ts or (r.ts is not None and r.ts <= t.consumed_ts):
                    continue
                f = TailFile(name=r.name, ts=r.ts, gz=True, final=True)
                if not self._open_gz(t, f, path, r):
                    self._queue_unopened(t, f, None)
                    continue
                twin = self._gz_twin(t, f)
                if twin == "consumed":
                    t.consumed_ts = max(t.consumed_ts, r.ts or "")
                    self._close(f)
                    continue
                if isinstance(twin, TailFile):
                    twin.ts = r.ts
                    queued_ts.add(r.ts or "")
                    self._close(f)
                    continue
                t.queue.append(f)
                queued_ts.add(r.ts or "")
        if listing.live and live_id is not None and live_id not in queued_ids:
            f = TailFile(name=f"{t.id.restart}.log", ts=None, gz=False)
            if self._open_plain(t, f, listing.live_path):
                if (f.dev, f.ino) != live_id or self._was_consumed(t, f):
                    self._close(f)  # rotated between stat and open, or read already
                else:
                    t.queue.append(f)
            elif live_id not in consumed_ids:
                # Unreadable for now (EACCES: the seeds' postmortem): keep its place in the
                # stream and retry; its bytes are lost only if it vanishes unread.
                self._queue_unopened(t, f, live_st)
        # Finality: every file but the live one is complete once a newer live file exists;
        # all are complete once a later restart exists (the container exited).
        for f in t.queue:
            if f.gz or listing.superseded or t.ended_at >= 0 or (
                live_id is not None and (f.dev, f.ino) != live_id
            ):
                f.final = True
        self.spool.dirty = True
        del s  # the spool stream exists from here on

    def _was_consumed(self, t: StreamTail, f: TailFile) -> bool:
        """Same inode and same head as a file read to its end before (inodes get reused)."""
        for dev, ino, fp_len, fp, size in t.consumed:
            if (dev, ino) != (f.dev, f.ino) or f.fd is None:
                continue
            # A consumed file was final: the same file has exactly its length. Without a
            # recorded length only a long head can tell (short heads are all timestamps).
            if (size == f.size if size >= 0 else fp_len >= FP_MIN) and (
                fp_len <= f.size and self._head_fp(f, fp_len) == fp
            ):
                return True
        return False

    def _queue_unopened(self, t: StreamTail, f: TailFile, st: os.stat_result | None) -> None:
        if st is not None:
            f.dev, f.ino, f.size = st.st_dev, st.st_ino, st.st_size
        f.retry_at = time.monotonic() + self.retry_s
        t.queue.append(f)

    def _gz_twin(self, t: StreamTail, f: TailFile) -> TailFile | str | None:
        """Is this .gz a compressed copy of a file already queued (no ts yet) or consumed?

        A head of at least FP_MIN bytes identifies a file. A shorter one is the whole file
        (heads are kept up to 4 KiB), so the .gz must then hold exactly those bytes.
        """
        head = self._gz_head(f)
        if head is None:
            return None

        def same(fp_len: int, fp: str, size: int) -> bool:
            if fp_len >= FP_MIN:
                return len(head) >= fp_len and fingerprint(head[:fp_len]) == fp
            return 0 < fp_len == size == len(head) and fingerprint(head) == fp

        for q in t.queue:
            if not q.gz and q.ts is None and q.fp_len and same(q.fp_len, q.fp, q.size):
                return q
        for _dev, _ino, fp_len, fp, size in t.consumed:
            if same(fp_len, fp, size):
                return "consumed"
        return None

    # ------------------------------------------------------------------ opening
    def _open_plain(self, t: StreamTail, f: TailFile, path: str,
                    st: os.stat_result | None = None) -> bool:
        try:
            fd = self.fs.open_read(path)
        except OSError as exc:
            self._read_error(t, f, exc)
            return False
        fst = self.fs.fstat(fd)
        f.fd, f.dev, f.ino, f.size = fd, fst.st_dev, fst.st_ino, fst.st_size
        if not f.fp_len:
            self._update_fp(f)
        return True

    def _open_gz(self, t: StreamTail, f: TailFile, path: str, r: Listed) -> bool:
        try:
            fd = self.fs.open_read(path)
        except OSError as exc:
            self._read_error(t, f, exc)
            return False
        fst = self.fs.fstat(fd)
        f.dev, f.ino = fst.st_dev, fst.st_ino
        f.raw = os.fdopen(fd, "rb")
        f.gzf = gzip.GzipFile(fileobj=f.raw, mode="rb")
        f.gz, f.final, f.name, f.ts = True, True, r.name, r.ts
        return True

    def _gz_head(self, f: TailFile) -> bytes | None:
        assert f.gzf is not None
        try:
            f.gzf.seek(0)
            head = f.gzf.read(FP_MAX)
            f.gzf.seek(0)
        except (OSError, EOFError, zlib.error):
            return None
        if not f.fp_len:
            f.fp_len, f.fp = len(head), fingerprint(head)
        return head

    def _gz_head_is(self, f: TailFile, want_len: int, want: str) -> bool:
        assert f.gzf is not None
        try:
            f.gzf.seek(0)
            head = f.gzf.read(want_len)
            f.gzf.seek(0)
        except (OSError, EOFError, zlib.error):
            return False
        return len(head) == want_len and fingerprint(head) == want

    def _skip_gz(self, f: TailFile, n: int) -> bool:
        """Position a .gz reader at uncompressed offset ``n``; False if the file is damaged."""
        assert f.gzf is not None
        try:
            f.gzf.seek(n)
        except (OSError, EOFError, zlib.error):
            return False
        return True

    def _corrupt_gz(self, t: StreamTail, s: SpoolStream, f: TailFile, why: str) -> None:
        self.spool.record_loss(s, None, "unreadable",
                               f"{f.name}: corrupt gzip after {f.pos} bytes: {why}")
        self._close(f)
        if f in t.queue:
            t.queue.remove(f)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)

    def _update_fp(self, f: TailFile) -> None:
        if f.fd is None or f.fp_len >= FP_MAX:
            return
        try:
            head = self.fs.pread(f.fd, FP_MAX, 0)
        except OSError:
            return
        if len(head) > f.fp_len:
            f.fp_len, f.fp = len(head), fingerprint(head)

    def _head_fp(self, f: TailFile, n: int) -> str:
        assert f.fd is not None
        return fingerprint(self.fs.pread(f.fd, n, 0))

    def _close(self, f: TailFile) -> None:
        try:
            if f.gzf is not None:
                f.gzf.close()
            if f.raw is not None:
                f.raw.close()
            if f.fd is not None:
                self.fs.close(f.fd)
        except OSError:
            pass
        f.fd = None
        f.gzf = None
        f.raw = None

    def _read_error(self, t: StreamTail, f: TailFile, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
        self.metrics.read_errors.labels(errno=name).inc()
        f.retry_at = time.monotonic() + self.retry_s
        log.warning("cannot read container log file; will retry", file=f.name, errno=name,
                    error=str(exc), **stream_fields(t.id))

    # ------------------------------------------------------------------ reading
    def pump(self) -> bool:
        """One read pass over all streams. Returns True when some stream had more to read."""
        more = False
        now = time.monotonic()
        for t in list(self.tails.values()):
            if not t.queue:
                continue
            # The lock is taken per stream so a commit never waits for a whole pass.
            with self.spool.lock:
                s = self.spool.stream(t.id)
                if s.cursor is not t and (s.cursor is None or isinstance(s.cursor, dict)):
                    self._rewound(t)  # the spool rewound it (a failed fsync)
                    continue
                if s.error_until > now:
                    continue
                if self._pump_stream(t, s, now):
                    more = True
        return more

    def _pump_stream(self, t: StreamTail, s: SpoolStream, now: float) -> bool:
        budget = self.per_stream_budget
        while t.queue and budget > 0:
            f = t.queue[0]
            if not f.is_open:
                if f.retry_at > now:
                    return False
                if not self._retry_open(t, s, f):
                    if f in t.queue:
                        return False  # still failing: retry after the back-off
                    continue  # vanished and recorded as loss: go on with the next file
            # Back-pressure: over the spool budget, bytes still in their source file wait there.
            endangered = self.spool.room() < CHUNK and self._endangered(t, f)
            want = min(CHUNK, budget) if endangered else min(CHUNK, budget, self.spool.room())
            if want <= 0:
                return False
            try:
                data = self._read(t, s, f, want)
            except OSError as exc:
                self._read_error(t, f, exc)
                self._close(f)
                return False
            if data is None:
                continue  # truncation or a damaged file handled: look at the queue again
            if data:
                try:
                    n = self.spool.append(s, data, now_mono=now, endangered=endangered)
                except SpoolWriteError:
                    n = 0
                f.pos += n
                budget -= n
                if n < len(data):
                    # Plain files are read at f.pos (pread); a decompressor has moved on and
                    # must be put back to what the spool accepted.
                    if f.gzf is not None and not self._skip_gz(f, f.pos):
                        self._corrupt_gz(t, s, f, "cannot seek back after a spool error")
                    return False
                if f.fp_len < FP_MAX and not f.gz:
                    self._update_fp(f)
                continue
            # EOF
            if f.final:
                self._done(t, f)
                continue
            return False
        return budget <= 0

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
        if t.listing is not None:
            self._refresh(nt, t.listing)
        for f in t.queue:
            self._close(f)

    def _read(self, t: StreamTail, s: SpoolStream, f: TailFile, n: int) -> bytes | None:
        if f.gzf is not None:
            try:
                return f.gzf.read(n)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                # A damaged .gz: the rest of this file cannot be recovered.
                self.spool.record_loss(s, None, "unreadable",
                                       f"{f.name}: corrupt gzip after {f.pos} bytes: {exc}")
                f.final = True
                self._close(f)
                t.queue.remove(f)
                return None  # the queue changed: the caller looks at its new head
        assert f.fd is not None
        # fstat first: an idle file costs one cheap syscall, not a 1 MiB read buffer.
        st = self.fs.fstat(f.fd)
        if st.st_size != f.size:
            truncated = st.st_size < f.pos or (
                f.fp_len > 0 and self._head_fp(f, f.fp_len) != f.fp)
            f.size = st.st_size
            if truncated:
                self.spool.record_loss(
                    s, None, "truncated",
                    f"{f.name} was truncated in place at file position {f.pos}; the stream"
                    " continues with the file's new content")
                f.pos, f.fp_len, f.fp = 0, 0, ""
                self._update_fp(f)
                return None
        want = min(n, f.size - f.pos)
        if want <= 0:
            return b""
        return self.fs.pread(f.fd, want, f.pos)

    def _retry_open(self, t: StreamTail, s: SpoolStream, f: TailFile) -> bool:
        """Open a queued file that could not be opened before, wherever it is now.

        A plain file is looked for by inode under the live name and every rotated name (it
        may have been renamed meanwhile); once compressed, by its rotation timestamp, which
        its ``.gz`` keeps (kubelet writes the .gz with its own, readable, permissions).
        """
        listing = t.listing
        if listing is not None:
            candidates = [(listing.path(r), r) for r in listing.rotated]
            if listing.live:
                candidates.append((listing.live_path, Listed(f"{t.id.restart}.log", None, False)))
            for path, r in candidates:
                if r.gz:
                    if f.ts is None or r.ts != f.ts:
                        continue
                    if not self._open_gz(t, f, path, r):
                        return False
                    if f.pos and not self._skip_gz(f, f.pos):
                        self._corrupt_gz(t, s, f, "cannot seek to the read position")
                        return False
                    return True
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
                if not self._open_plain(t, f, path):
                    return False
                if r.ts is not None:
                    f.ts, f.name = r.ts, r.name
                return True
        # Vanished before it could ever be read. Its length is known only if it was seen
        # after it became final (no writer could append any more).
        known = f.size_final - f.pos if (f.size_final >= 0 and not f.gz) else None
        self.spool.record_loss(
            s, known, "unreadable",
            f"{f.name} could not be read and then disappeared"
            + ("" if known is not None else "; its final length is unknown"))
        t.queue.remove(f)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)
        return False

    def _done(self, t: StreamTail, f: TailFile) -> None:
        self._close(f)
        t.queue.pop(0)
        if f.ts:
            t.consumed_ts = max(t.consumed_ts, f.ts)
        t.consumed.append((f.dev, f.ino, f.fp_len, f.fp, f.pos))
        del t.consumed[:-CONSUMED_KEEP]
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

    def prime_priority(self, streams: Iterable[StreamId]) -> None:
        with self.spool.lock:
            for sid in streams:
                if sid in self.spool.streams:
                    self.spool.streams[sid].priority = True

    def close(self) -> None:
        with self.spool.lock:
            for t in self.tails.values():
                for f in t.queue:
                    self._close(f)
