"""The spool: durable local segments and the one checkpoint that ties them to the sources.

Layout under ``<spool_dir>``::

    checkpoint.json                          # the single source of truth (atomic rewrite)
    spool/<ns>_<pod>_<uid>/<container>/<restart>/<start:020d>.seg   # raw stream bytes

Each stream has at most one *open* segment (appended to by the tailer) and a list of *sealed*
segments waiting for the shipper. A segment file holds the raw bytes ``[start, end)`` of its
stream, exactly the body of the store object it will become.

Durability argument (the first acknowledgement boundary):

1. The tailer appends bytes to the open segment file (``pwrite`` at an explicit length).
2. ``commit()`` snapshots, under the lock, the complete in-memory state: every stream's next
   offset, open segment length, sealed segments and the tailer's read cursors, all of which
   describe only bytes already written to segment files.
3. It then fsyncs every dirty segment file and directory, and only then atomically replaces
   ``checkpoint.json`` (temp, fsync, rename, fsync dir). So the checkpoint never runs ahead of
   fsynced data.
4. On recovery each open segment is cut back (``ftruncate``) to its checkpointed length: bytes
   written after the last commit are dropped and re-read from the source at the checkpointed
   cursor. Nothing is lost, nothing is duplicated. Segment files the checkpoint does not know
   are leftovers of an uncommitted seal or a finished upload and are removed.

5. A failed fsync of a segment abandons that commit and rewinds the stream to its last durable
   checkpoint (``_rewind``), as recovery would: the tailer re-reads from the checkpointed
   cursor. Linux may drop the dirty pages of a failed fsync, so a retry would prove nothing.

The second boundary: a sealed segment is offered to the shipper only once its seal is in a
committed checkpoint, and its file is deleted only after a checkpoint recording it as shipped
is committed. Its key's extension is fixed at seal and kept in the checkpoint; a segment whose
upload failed ambiguously is kept ``uncertain`` (never evicted) until the store was asked.

The budget: bytes still in their source file are not accepted over ``max_bytes``
(back-pressure, ``append``); endangered bytes are, and the commit then evicts captured,
unshipped segments from the stream with the largest share, oldest first, each recorded as an
exact ``evicted`` loss *before* the checkpoint forgets it.

All methods are blocking and run in worker threads; one lock guards the state.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId

CHECKPOINT_VERSION = 1
# Commits failing this long make the agent not ready: nothing it reads is durable any more.
COMMIT_FAILING_NOT_READY_S = 10.0

log = get_logger("evidence_keeper.spool")


class Cursor(Protocol):
    """The tailer's read state of one stream, persisted inside the spool checkpoint."""

    def to_json(self) -> dict[str, Any]: ...


LossRecorder = Callable[[Loss], None]


@dataclass(slots=True)
class OpenSegment:
    start: int
    path: str
    fd: int
    size: int = 0
    captured_at: float = 0.0  # wall time of the first byte (ship latency, flush deadline)
    first_mono: float = 0.0  # monotonic time of the first byte (age seal)
    synced_size: int = 0  # length covered by the last commit's fsync


@dataclass(slots=True)
class SealedSegment:
    start: int
    end: int
    path: str
    captured_at: float
    sealed_at: float
    fd: int | None = None  # held until a commit has fsynced the file
    committed: bool = False  # the seal is in a committed checkpoint: safe to ship
    synced: int = 0  # bytes of it already covered by a commit's fsync (captured)
    sha256: str | None = None  # set when shipped
    shipped: bool = False
    inflight: bool = False
    # The key's extension, fixed at seal and kept in the checkpoint: a re-upload after a crash
    # or a compression change uses the same key. None: sealed by an agent that did not record
    # it (the shipper then asks the store under every extension first).
    ext: str | None = None
    # A PUT of it failed after the request may have reached the store (timeout, reset, 5xx):
    # the store may hold it. It is never evicted, and the shipper asks the store (HEAD, same
    # ek-sha256) before putting it again or shipping its successor.
    uncertain: bool = False

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class SpoolStream:
    id: StreamId
    dir: str
    next_offset: int = 0
    open: OpenSegment | None = None
    sealed: list[SealedSegment] = field(default_factory=list)
    chain: str = ""  # sha256 of the last segment the store confirmed (ek-prev-sha256 of the next)
    cursor: Cursor | dict[str, Any] | None = None
    priority: bool = False  # restart or deletion: ship before the others
    finished: bool = False  # the tailer will never append again
    error_until: float = 0.0  # monotonic: back off after a spool write error

    def unshipped(self) -> Iterator[SealedSegment]:
        return (s for s in self.sealed if not s.shipped)

    def pending_bytes(self) -> int:
        n = self.open.size if self.open else 0
        return n + sum(s.length for s in self.sealed if not s.shipped)


@dataclass(slots=True)
class _CommitPlan:
    """One commit: what to fsync, the seals it commits, and the checkpoint that says so."""

    syncs: list[tuple[SpoolStream, int]] = field(default_factory=list)
    opens: list[tuple[SpoolStream, OpenSegment, int]] = field(default_factory=list)
    sealed_now: list[tuple[SpoolStream, SealedSegment]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)
    snapshot: bytes = b""
    records: dict[StreamId, dict[str, Any]] = field(default_factory=dict)


class SpoolWriteError(Exception):
    """Appending to the spool failed; the caller keeps its data and retries later."""


class _Abandoned(Exception):
    """A commit whose data sync failed: its snapshot is never written."""


def _open_record(op: OpenSegment | None) -> dict[str, Any] | None:
    if op is None or op.size == 0:
        return None
    return {"start": op.start, "size": op.size, "captured_at": op.captured_at}


def _sealed_record(g: SealedSegment) -> dict[str, Any]:
    rec: dict[str, Any] = {"start": g.start, "end": g.end, "captured_at": g.captured_at,
                           "sealed_at": g.sealed_at}
    if g.ext is not None:
        rec["ext"] = g.ext
    if g.uncertain:
        rec["uncertain"] = True
    return rec


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        segment_max_bytes: int,
        flush_interval_s: float,
        max_bytes: int,
        record_loss: LossRecorder,
        metrics: Metrics,
        fs: FileSystem | None = None,
        error_backoff_s: float = 1.0,
        segment_ext: str = "zst",
    ) -> None:
        self.root = root
        self.data_dir = root / "spool"
        self.checkpoint_path = root / "checkpoint.json"
        self.segment_max_bytes = segment_max_bytes
        self.flush_interval_s = flush_interval_s
        self.max_bytes = max_bytes
        self.fs = fs or FileSystem()
        self.metrics = metrics
        self.error_backoff_s = error_backoff_s
        self.segment_ext = segment_ext
        self._record_loss = record_loss
        self.lock = threading.RLock()
        self.streams: dict[StreamId, SpoolStream] = {}
        self._dirty_dirs: set[str] = set()
        self._deletions: list[str] = []  # files to unlink once the next checkpoint is durable
        self._seal_waiters: list[threading.Event] = []
        self._commit_lock = threading.Lock()
        self.traffic: dict[StreamId, list[int]] = {}
        self.commits = 0
        self.commit_failing_since: float | None = None  # monotonic: first failure in a row
        self.rewound = False  # a failed fsync rewound streams since the caller last looked
        self.last_commit_mono: float | None = None
        self.dirty = False  # state changed since the last checkpoint (cursor, offsets, seals)
        # Bytes held (open + unshipped sealed): exact after every change that frees bytes,
        # raised by appends in between. The budget and back-pressure read it.
        self._total = 0
        # Each stream's record in the last durable checkpoint: what a failed fsync rewinds to.
        self._saved: dict[StreamId, dict[str, Any]] = {}
        metrics.spool_max_bytes.set(max_bytes)

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Load the checkpoint, cut open segments back to their durable length, drop leftovers."""
        self.fs.makedirs(str(self.data_dir))
        state: dict[str, Any] = {"streams": []}
        if self.checkpoint_path.exists():
            state = json.loads(self.checkpoint_path.read_bytes())
            if state.get("version") != CHECKPOINT_VERSION:
                raise RuntimeError(
                    f"{self.checkpoint_path}: checkpoint version {state.get('version')!r} is not"
                    f" {CHECKPOINT_VERSION}"
                )
        known: set[str] = set()
        for rec in state["streams"]:
            s = self._load_stream(rec)
            self.streams[s.id] = s
            self._saved[s.id] = rec
            known.update(seg.path for seg in s.sealed)
            if s.open is not None:
                known.add(s.open.path)
        # Leftovers: segments created or sealed after the last commit, or already shipped.
        for path in self._segment_files():
            if path not in known:
                self._unlink_quiet(path)
        self._recount()
        self._update_gauges()

    def _load_stream(self, rec: dict[str, Any]) -> SpoolStream:
        sid = StreamId(**rec["id"])
        s = SpoolStream(
            id=sid,
            dir=str(self.data_dir / sid.key),
            next_offset=rec["next_offset"],
            chain=rec.get("chain", ""),
            cursor=rec.get("cursor"),
            priority=rec.get("priority", False),
            finished=rec.get("finished", False),
        )
        for seg in rec.get("sealed", []):
            sealed = SealedSegment(
                start=seg["start"], end=seg["end"], path=self._seg_path(s, seg["start"]),
                captured_at=seg["captured_at"], sealed_at=seg["sealed_at"], committed=True,
                ext=seg.get("ext"), uncertain=seg.get("uncertain", False),
            )
            if self._file_size(sealed.path) != sealed.length:
                # Damaged or missing after a crash of the disk, not of the agent: the data is
                # gone for good, so say so with its exact range and move on.
                self._lose(s, sealed.start, sealed.length, "spool_corrupt",
                           f"spool segment {sealed.path} missing or of the wrong size at recovery")
                continue
            s.sealed.append(sealed)
        op = rec.get("open")
        if op is not None:
            path = self._seg_path(s, op["start"])
            try:
                fd = self.fs.open_append(path)
                size = self.fs.fstat(fd).st_size
                if size < op["size"]:
                    self.fs.close(fd)
                    raise OSError(errno.EIO, f"open segment shorter than checkpoint ({size})")
                # Bytes past the checkpoint were never acknowledged to the tailer: drop them;
                # the tailer re-reads them from the source at its checkpointed cursor.
                self.fs.ftruncate(fd, op["size"])
                self.fs.fsync(fd)
                if op["size"] == 0:
                    self.fs.close(fd)
                    self._unlink_quiet(path)
                else:
                    s.open = OpenSegment(
                        start=op["start"], path=path, fd=fd, size=op["size"],
                        captured_at=op["captured_at"], first_mono=time.monotonic(),
                        synced_size=op["size"],
                    )
            except OSError as exc:
                self._lose(s, op["start"], op["size"], "spool_corrupt",
                           f"open spool segment unusable at recovery: {exc}")
        return s

    # ------------------------------------------------------------------ streams
    def stream(self, sid: StreamId) -> SpoolStream:
        s = self.streams.get(sid)
        if s is None:
            s = SpoolStream(id=sid, dir=str(self.data_dir / sid.key))
            self.streams[sid] = s
        return s

    def forget(self, sid: StreamId) -> None:
        """Drop a stream whose sources are gone and whose segments are all shipped."""
        s = self.streams.get(sid)
        if s is None or s.open is not None or s.sealed:
            return
        del self.streams[sid]
        for d in (s.dir, str(Path(s.dir).parent), str(Path(s.dir).parent.parent)):
            try:
                self.fs.rmdir(d)
            except OSError:
                break

    # ------------------------------------------------------------------ appending
    def room(self) -> int:
        """Bytes left before the budget (``<= 0``: over it; safe bytes wait in their source)."""
        return self.max_bytes - self._total

    def append(self, s: SpoolStream, data: bytes | memoryview, *, now_mono: float,
               endangered: bool = True) -> int:
        """Append stream bytes at ``s.next_offset``; returns how many bytes were accepted.

        Back-pressure: bytes that are not ``endangered`` (their source file still holds them)
        are accepted only up to the budget; the caller reads them again later from the same
        position. Endangered bytes (a deleted file, an ended stream, the API fallback) are
        always accepted; the next commit evicts to make room (see ``_evict_over_budget``).

        A size seal prefers the last newline that fits, so segments end on line boundaries
        unless a single line is larger than a segment. On a write error the bytes of the
        failed call are not accepted (the file is cut back) and the error is raised after
        any earlier part was accepted, so the caller advances exactly by the return value.
        """
        view = memoryview(data)
        if not endangered:
            view = view[:max(0, self.room())]
        accepted = 0
        while view:
            seg = s.open
            if seg is None:
                try:
                    seg = self._open_segment(s, now_mono)
                except OSError as exc:
                    self._write_error(s, "open", exc, now_mono)
                    if accepted:
                        return accepted
                    raise SpoolWriteError(str(exc)) from exc
            room = self.segment_max_bytes - seg.size
            if len(view) <= room:
                take = len(view)
            else:
                cut = bytes(view[:room]).rfind(b"\n") + 1 if room > 0 else 0
                if cut == 0 and seg.size > 0:
                    self._seal(s)
                    continue
                take = cut or room
            try:
                written = self._write_all(seg, view[:take])
            except OSError as exc:
                self._write_error(s, "write", exc, now_mono)
                if accepted:
                    return accepted
                raise SpoolWriteError(str(exc)) from exc
            accepted += written
            s.next_offset += written
            self._total += written
            self.dirty = True
            view = view[take:]
            if seg.size >= self.segment_max_bytes:
                self._seal(s)
        return accepted

    def _write_all(self, seg: OpenSegment, data: memoryview) -> int:
        pos = seg.size
        try:
            while data:
                n = self.fs.pwrite(seg.fd, data, pos)
                pos += n
                data = data[n:]
        except OSError:
            # A partial write (ENOSPC half-way) must not leave bytes the state does not count.
            try:
                self.fs.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            raise
        written = pos - seg.size
        seg.size = pos
        return written

    def _open_segment(self, s: SpoolStream, now_mono: float) -> OpenSegment:
        if not os.path.isdir(s.dir):
            self.fs.makedirs(s.dir)
            p = Path(s.dir)
            while p not in (self.data_dir.parent, p.parent):
                self._dirty_dirs.add(str(p.parent))
                p = p.parent
        path = self._seg_path(s, s.next_offset)
        fd = self.fs.open_append(path)
        try:
            self.fs.ftruncate(fd, 0)  # a leftover of an uncommitted seal may share the name
        except OSError:
            self.fs.close(fd)
            raise
        self._dirty_dirs.add(s.dir)
        seg = OpenSegment(start=s.next_offset, path=path, fd=fd, captured_at=time.time(),
                          first_mono=now_mono)
        s.open = seg
        return seg

    def _write_error(self, s: SpoolStream, op: str, exc: OSError, now_mono: float) -> None:
        self.metrics.spool_errors.labels(op=op).inc()
        s.error_until = now_mono + self.error_backoff_s
        log.warning("spool write failed; will retry", op=op, error=str(exc),
                    errno=errno.errorcode.get(exc.errno or 0, "?"), **stream_fields(s.id))

    # ------------------------------------------------------------------ sealing and loss
    def _seal(self, s: SpoolStream) -> None:
        seg = s.open
        if seg is None:
            return
        s.open = None
        if seg.size == 0:
            self.fs.close(seg.fd)
            self._unlink_quiet(seg.path)
            return
        s.sealed.append(SealedSegment(
            start=seg.start, end=seg.start + seg.size, path=seg.path,
            captured_at=seg.captured_at, sealed_at=time.time(), fd=seg.fd,
            synced=seg.synced_size, ext=self.segment_ext,
        ))
        self.dirty = True

    def seal(self, s: SpoolStream) -> None:
        with self.lock:
            self._seal(s)

    def seal_due(self, now_mono: float) -> int:
        """Seal open segments whose first byte is older than the flush deadline allows.

        The deadline leaves room for the commit that must precede shipping, so a byte is in
        the store within ``flush_interval_s`` of capture when the store is healthy.
        """
        limit = max(self.flush_interval_s * 0.6, self.flush_interval_s - 1.5)
        n = 0
        with self.lock:
            for s in self.streams.values():
                if s.open is not None and s.open.size and (
                    s.finished or s.priority or now_mono - s.open.first_mono >= limit
                ):
                    self._seal(s)
                    n += 1
        return n

    def seal_all(self, streams: Iterable[StreamId] | None = None) -> None:
        with self.lock:
            targets = self.streams.values() if streams is None else (
                self.streams[sid] for sid in streams if sid in self.streams)
            for s in targets:
                self._seal(s)

    def record_loss(self, s: SpoolStream, nbytes: int | None, reason: str, detail: str) -> None:
        """A hole at ``s.next_offset``: recorded durably first, then the offsets are consumed."""
        self._seal(s)
        self._lose(s, s.next_offset, nbytes, reason, detail)
        if nbytes:
            s.next_offset += nbytes
        self.dirty = True

    def _lose(self, s: SpoolStream, offset: int, nbytes: int | None, reason: str,
              detail: str) -> None:
        loss = Loss(stream=s.id, offset=offset, bytes=nbytes, reason=reason, detail=detail)
        self._record_loss(loss)  # durable before any checkpoint moves past the hole
        self.metrics.loss_events.labels(reason=reason).inc()
        if nbytes:
            self.metrics.lost_bytes.labels(reason=reason).inc(nbytes)
        log.warning("loss recorded", offset=offset, bytes=nbytes, reason=reason, detail=detail,
                    **stream_fields(s.id))

    # ------------------------------------------------------------------ commit
    def commit(self) -> bool:
        """Make everything appended so far durable and checkpoint it. Returns False if idle.

        Commits are serialised (the commit loop, shutdown and archive jobs may all ask for
        one): two writers of checkpoint.json could otherwise install an older snapshot last.
        """
        with self._commit_lock:
            return self._commit()

    def _commit(self) -> bool:
        plan = self._plan_commit()
        if plan is None:
            return False  # idle: no JSON is built (hundreds of streams, 4 times a second)
        if not self._write_commit(plan):
            self._commit_failed()
            return False
        captured, waiters = self._apply_commit(plan)
        self.commit_failing_since = None
        self.last_commit_mono = time.monotonic()
        self.metrics.captured_bytes.inc(captured)
        for path in plan.deletions:
            self._unlink_quiet(path)
        for w in waiters:
            w.set()
        self._update_gauges()
        return True

    def _plan_commit(self) -> _CommitPlan | None:
        """Under the lock: what this commit makes durable, and the checkpoint saying so."""
        with self.lock:
            self._evict_over_budget()
            plan = _CommitPlan()
            for s in self.streams.values():
                if s.open is not None and s.open.size > s.open.synced_size:
                    plan.syncs.append((s, s.open.fd))
                    plan.opens.append((s, s.open, s.open.size))
                for seg in s.sealed:
                    if not seg.committed:
                        plan.sealed_now.append((s, seg))
                        if seg.fd is not None:
                            plan.syncs.append((s, seg.fd))
            dirs = sorted(self._dirty_dirs, key=len, reverse=True)
            dirty = self.dirty
            if not (plan.syncs or dirs or self._deletions or plan.sealed_now or dirty):
                return None
            self._dirty_dirs.clear()
            self.dirty = False
            plan.dirs = dirs
            plan.deletions, self._deletions = self._deletions, []
            plan.snapshot, plan.records = self._snapshot()
            return plan

    def _write_commit(self, plan: _CommitPlan) -> bool:
        """fdatasync the data, fsync the directories, write the checkpoint. On failure nothing
        counts as captured and the plan's directories and deletions wait for the next commit."""
        failed = self._sync_data(plan.syncs)
        try:
            if failed:
                # This snapshot counts bytes that may not be on disk: it is never written.
                with self.lock:
                    for s in failed:
                        self._rewind(s)
                raise _Abandoned
            for d in plan.dirs:
                self.fs.fsync_dir(d)
            self.fs.write_atomic(str(self.checkpoint_path), plan.snapshot)
        except (OSError, _Abandoned) as exc:
            if not failed:
                self.metrics.spool_errors.labels(op="commit").inc()
                log.error("spool commit failed; will retry", error=str(exc))
            with self.lock:
                self._dirty_dirs.update(plan.dirs)
                self._deletions = plan.deletions + self._deletions
                self.dirty = True
            return False
        return True

    def _apply_commit(self, plan: _CommitPlan) -> tuple[int, list[threading.Event]]:
        """The checkpoint is on disk: its bytes are captured and its seals committed."""
        captured = 0
        with self.lock:
            self._saved = plan.records
            for s, oseg, size in plan.opens:
                n = size - oseg.synced_size
                captured += n
                self._traffic(s.id)[0] += n
                oseg.synced_size = size
                if s.open is not oseg:
                    # Sealed while we fsynced: the sealed record took the old synced size.
                    for sseg in s.sealed:
                        if sseg.start == oseg.start:
                            sseg.synced = max(sseg.synced, size)
            for s, sseg in plan.sealed_now:
                n = sseg.length - sseg.synced
                captured += n
                self._traffic(s.id)[0] += n
                sseg.synced = sseg.length
                sseg.committed = True
                if sseg.fd is not None:
                    self.fs.close(sseg.fd)
                    sseg.fd = None
            waiters, self._seal_waiters = self._seal_waiters, []
            self.commits += 1
        return captured, waiters

    def _commit_failed(self) -> None:
        if self.commit_failing_since is None:
            self.commit_failing_since = time.monotonic()

    def commit_health(self, now_mono: float | None = None) -> dict[str, Any]:
        """For ``/readyz``: whether commits succeed, and since when they fail."""
        now = time.monotonic() if now_mono is None else now_mono
        failing = self.commit_failing_since
        return {
            "ok": failing is None or now - failing < COMMIT_FAILING_NOT_READY_S,
            "failing_for_s": None if failing is None else round(now - failing, 3),
            "last_commit_age_s": (None if self.last_commit_mono is None
                                  else round(now - self.last_commit_mono, 3)),
            "commits": self.commits,
        }

    def _sync_data(self, syncs: list[tuple[SpoolStream, int]]) -> list[SpoolStream]:
        """fdatasync every dirty segment; the streams whose sync failed (each counted once)."""
        failed: list[SpoolStream] = []
        for s, fd in syncs:
            if s in failed:
                continue
            try:
                self.fs.fdatasync(fd)
            except OSError as exc:
                self.metrics.spool_errors.labels(op="fsync").inc()
                log.error("spool fsync failed; rewinding the stream to its last checkpoint",
                          error=str(exc), **stream_fields(s.id))
                failed.append(s)
        return failed

    def _rewind(self, s: SpoolStream) -> None:
        """Put ``s`` back to its last durable checkpoint after a failed fsync.

        Linux may drop the dirty pages of a failed fsync and report the error only once, so
        bytes written since the last successful sync cannot be trusted, even if a second
        fsync succeeds. As recovery does after a crash: the checkpointed open segment is cut
        back to its checkpointed length, segments sealed or opened since are dropped, the
        offset goes back, and the stream's cursor becomes the checkpointed one (a dict). The
        tailer sees a cursor that is not its own and re-reads from there (``Tailer._rewound``).
        A writer that cannot re-read (the API fallback) keeps its bytes and the sync is
        retried, as before.
        """
        if not (s.cursor is None or isinstance(s.cursor, dict)
                or getattr(s.cursor, "rereads", False)):
            return
        rec = self._saved.get(s.id)
        op = rec.get("open") if rec else None
        doomed = [g for g in s.sealed if not g.committed]
        s.sealed = [g for g in s.sealed if g.committed]
        fds = [g.fd for g in doomed if g.fd is not None]
        paths = [g.path for g in doomed]
        if s.open is not None:
            fds.append(s.open.fd)
            paths.append(s.open.path)
            s.open = None
        for fd in fds:
            self._close_quiet(fd)
        keep = self._seg_path(s, op["start"]) if op else None
        for path in paths:
            if path != keep:
                self._unlink_quiet(path)
        s.next_offset = rec["next_offset"] if rec else 0
        s.cursor = rec.get("cursor") if rec else None
        if op is not None:
            self._reopen_checkpointed(s, op)
        self._recount()
        self.dirty = True
        self.rewound = True

    def _reopen_checkpointed(self, s: SpoolStream, op: dict[str, Any]) -> None:
        path = self._seg_path(s, op["start"])
        try:
            fd = self.fs.open_append(path)
        except OSError as exc:
            self._lose(s, op["start"], op["size"], "spool_corrupt",
                       f"spool segment {path} cannot be reopened after a failed fsync: {exc}")
            return
        try:
            self.fs.ftruncate(fd, op["size"])
        except OSError as exc:
            self._close_quiet(fd)
            self._lose(s, op["start"], op["size"], "spool_corrupt",
                       f"spool segment {path} cannot be cut back after a failed fsync: {exc}")
            return
        s.open = OpenSegment(start=op["start"], path=path, fd=fd, size=op["size"],
                             captured_at=op["captured_at"], first_mono=time.monotonic(),
                             synced_size=op["size"])

    def _close_quiet(self, fd: int) -> None:
        try:
            self.fs.close(fd)
        except OSError:
            pass

    def _snapshot(self) -> tuple[bytes, dict[StreamId, dict[str, Any]]]:
        records: dict[StreamId, dict[str, Any]] = {}
        for s in self.streams.values():
            cursor = s.cursor.to_json() if hasattr(s.cursor, "to_json") else s.cursor  # type: ignore[union-attr]
            records[s.id] = {
                "id": {"namespace": s.id.namespace, "pod": s.id.pod, "pod_uid": s.id.pod_uid,
                       "container": s.id.container, "restart": s.id.restart},
                "next_offset": s.next_offset,
                "chain": s.chain,
                "priority": s.priority,
                "finished": s.finished,
                "open": _open_record(s.open),
                "sealed": [_sealed_record(g) for g in s.sealed if not g.shipped],
                "cursor": cursor,
            }
        doc = {"version": CHECKPOINT_VERSION, "streams": list(records.values())}
        return json.dumps(doc, separators=(",", ":")).encode(), records

    # ------------------------------------------------------------------ shipping side
    def ready_segments(self) -> list[tuple[SpoolStream, SealedSegment]]:
        """The next shippable segment of each stream: committed, not in flight, oldest first.

        One segment per stream at a time keeps the hash chain in order. Priority streams
        (restarted or deleted containers) come first, then by capture time.
        """
        out: list[tuple[SpoolStream, SealedSegment]] = []
        with self.lock:
            for s in self.streams.values():
                for seg in s.sealed:
                    if seg.shipped:
                        continue
                    if seg.committed and not seg.inflight:
                        out.append((s, seg))
                    break
        out.sort(key=lambda p: (not p[0].priority, p[1].captured_at))
        return out

    def claim_ready(self, limit: int) -> list[tuple[SpoolStream, SealedSegment]]:
        """Up to ``limit`` ready segments, marked in flight under the lock (so eviction can
        never take a segment an upload has started on)."""
        if limit <= 0:
            return []
        with self.lock:
            claimed = self.ready_segments()[:limit]
            for _s, seg in claimed:
                seg.inflight = True
        return claimed

    def drop_damaged(self, s: SpoolStream, seg: SealedSegment, detail: str) -> None:
        """A sealed segment whose spool file is damaged: record its exact range as lost."""
        with self.lock:
            seg.inflight = False
            if seg not in s.sealed:
                return
            self._lose(s, seg.start, seg.length, "spool_corrupt", detail)
            s.sealed.remove(seg)
            self._deletions.append(seg.path)
            self._recount()
            self.dirty = True

    def release(self, s: SpoolStream, seg: SealedSegment, *, uncertain: bool) -> None:
        """An upload of ``seg`` failed. ``uncertain``: the request may have reached the store
        (timeout, reset, 5xx after sending), so the store may hold it: it is kept from
        eviction and the store is asked before it is put again (see the shipper)."""
        with self.lock:
            seg.inflight = False
            if uncertain and not seg.uncertain:
                seg.uncertain = True
                self.dirty = True

    def fix_ext(self, s: SpoolStream, seg: SealedSegment, ext: str) -> None:
        """Fix the key of a segment sealed before keys were recorded (an older checkpoint)."""
        with self.lock:
            if seg.ext is None:
                seg.ext = ext
                self.dirty = True

    def acknowledge(self, s: SpoolStream, seg: SealedSegment, sha256: str) -> None:
        """The store confirmed ``seg``; its file goes after the next durable checkpoint."""
        with self.lock:
            seg.inflight = False
            seg.uncertain = False
            seg.shipped = True
            seg.sha256 = sha256
            s.chain = sha256
            self._traffic(s.id)[1] += seg.length
            # Drop acknowledged segments from the head of the list (they are in order).
            while s.sealed and s.sealed[0].shipped:
                done = s.sealed.pop(0)
                self._deletions.append(done.path)
            self._total -= seg.length
            self.dirty = True
            if not s.sealed and s.open is None and s.finished:
                s.priority = False
        self.metrics.shipped_bytes.inc(seg.length)
        self.metrics.segments_shipped.inc()
        self.metrics.ship_latency.observe(max(0.0, time.time() - seg.captured_at))

    def prev_sha(self, s: SpoolStream, seg: SealedSegment) -> str:
        """ek-prev-sha256 of ``seg``: the stream's chain tail (segments ship in order)."""
        with self.lock:
            return s.chain

    # ------------------------------------------------------------------ traffic
    def _traffic(self, sid: StreamId) -> list[int]:
        t = self.traffic.get(sid)
        if t is None:
            t = self.traffic[sid] = [0, 0]
        return t

    def take_traffic(self) -> dict[StreamId, list[int]]:
        """Bytes ``[captured, shipped]`` per stream since the last call (sink coverage)."""
        with self.lock:
            out, self.traffic = self.traffic, {}
        return out

    # ------------------------------------------------------------------ budget
    def total_bytes(self) -> int:
        with self.lock:
            return self._recount()

    def _recount(self) -> int:
        self._total = sum(s.pending_bytes() for s in self.streams.values())
        return self._total

    def _evict_over_budget(self) -> None:
        """Make room for endangered bytes: evict from the largest share, oldest first.

        Bytes whose source file still holds them are not read over the budget (see
        ``append``), so only endangered bytes push the spool past it. Eviction then takes
        captured, unshipped segments, which exist nowhere else, from the stream holding the
        most spool bytes, its oldest segment first, so one noisy pod never evicts a quiet
        pod's evidence. Each eviction is an exact ``loss``, durable in the ledger before the
        checkpoint forgets the segment. Never evicted: a segment in flight, one whose PUT
        may have been stored (``uncertain``: the store is asked first), one not yet captured.
        """
        total = self._recount()
        while total > self.max_bytes:
            victim = self._eviction_victim()
            if victim is None:
                break
            s, seg = victim
            self._lose(s, seg.start, seg.length, "evicted",
                       f"spool over its budget of {self.max_bytes} bytes; the oldest unshipped"
                       " segment of the stream holding the largest share was evicted")
            s.sealed.remove(seg)
            if seg.fd is not None:
                self.fs.close(seg.fd)
            self._deletions.append(seg.path)
            self.dirty = True
            total -= seg.length
        self._total = total

    def _eviction_victim(self) -> tuple[SpoolStream, SealedSegment] | None:
        """The oldest evictable segment of the stream holding the most spool bytes.

        If that stream's bytes are not captured yet (sealed in this very commit, or still in
        its open segment, which seals within ``flush_interval_s``), nothing is evicted before
        a later commit captures them: taking a smaller stream's captured segment instead would
        make a quiet pod pay for a noisy pod's burst. Only a stream whose bytes are all
        captured and pinned (in flight, or uncertain until the store is asked) passes its turn.
        """
        for s in sorted(self.streams.values(), key=SpoolStream.pending_bytes, reverse=True):
            seg = next((g for g in s.sealed if g.committed and not g.shipped
                        and not g.inflight and not g.uncertain), None)
            if seg is not None:
                return s, seg
            if any(not g.committed for g in s.sealed) or (s.open is not None and s.open.size):
                return None  # its bytes become evictable at the next commit
        return None

    # ------------------------------------------------------------------ helpers
    def oldest_unshipped_age(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        oldest = None
        with self.lock:
            for s in self.streams.values():
                for seg in s.sealed:
                    if not seg.shipped:
                        oldest = seg.captured_at if oldest is None else min(oldest, seg.captured_at)
                        break
                if s.open is not None and s.open.size:
                    c = s.open.captured_at
                    oldest = c if oldest is None else min(oldest, c)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def _update_gauges(self) -> None:
        with self.lock:
            total = self.total_bytes()
        self.metrics.unshipped_bytes.set(total)
        self.metrics.spool_bytes.set(total)
        self.metrics.oldest_unshipped_age.set(self.oldest_unshipped_age())
        self.metrics.streams.set(len(self.streams))

    def wait_committed(self) -> threading.Event:
        ev = threading.Event()
        with self.lock:
            self._seal_waiters.append(ev)
        return ev

    def close(self) -> None:
        with self.lock:
            for s in self.streams.values():
                if s.open is not None:
                    self.fs.close(s.open.fd)
                    s.open.fd = -1
                for seg in s.sealed:
                    if seg.fd is not None:
                        self.fs.close(seg.fd)
                        seg.fd = None

    def _seg_path(self, s: SpoolStream, start: int) -> str:
        return os.path.join(s.dir, f"{start:020d}.seg")

    def _segment_files(self) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(self.data_dir):
            for f in files:
                if f.endswith(".seg"):
                    yield os.path.join(dirpath, f)

    def _file_size(self, path: str) -> int:
        try:
            return self.fs.stat(path).st_size
        except OSError:
            return -1

    def _unlink_quiet(self, path: str) -> None:
        try:
            self.fs.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.metrics.spool_errors.labels(op="unlink").inc()
            log.warning("could not remove spool file", path=path, error=str(exc))


def utcnow() -> datetime:
    return datetime.now(UTC)
