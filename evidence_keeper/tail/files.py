"""Opening and reading one stream's files: plain files by ``pread``, ``.gz`` by a decompressor.

:class:`TailFile` is one physical file with its read position and identity (inode, head
fingerprint, rotation name). :class:`FileReader` does the system calls for it through the
:class:`~evidence_keeper.fsio.FileSystem` seam and keeps the descriptor budget's count
right: every open asks :class:`~evidence_keeper.tail.budget.FdBudget` first (a refused open
is *deferred*, not an error: the file stays queued and is opened when descriptors free up),
every close gives one back.

A plain file is read at its position with ``pread`` after an ``fstat`` (an idle file costs
one cheap system call). Truncation in place shows as a size below the position, or a changed
head when the size changed. A ``.gz`` is read through :class:`gzip.GzipFile`; seeking it back
after the spool accepted fewer bytes than offered is a re-decompression from its start.
"""

from __future__ import annotations

import errno
import gzip
import os
import time
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import IO, Any

from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import StreamId
from evidence_keeper.tail.budget import FdBudget
from evidence_keeper.tail.identity import FP_MAX, fingerprint

log = get_logger("evidence_keeper.tail")


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
    mtime_ns: int = -1  # its modification time at that observation, -1 unknown
    size_final: int = -1  # size observed after the file became final, -1 unknown
    final: bool = False
    fp_len: int = 0
    fp: str = ""
    fd: int | None = None
    gzf: gzip.GzipFile | None = None
    raw: IO[bytes] | None = None  # the .gz file itself (GzipFile does not close it)
    retry_at: float = 0.0  # monotonic: next open attempt after an error
    # Closed on purpose with its identity known (an idle live file, or no descriptor free):
    # reopened by path with an inode and head check, never treated as unreadable.
    parked: bool = False
    deferred: bool = False  # never opened yet for lack of a descriptor
    blind: str = ""  # a blind window follows this file: recorded once it is read to its end
    idle_since: float = 0.0  # monotonic: last time this file grew (0: unknown)
    # Writes inotify had reported in its directory when the file was last seen unchanged
    # (-1: not watched): a parked file whose directory vanished with no write since is done.
    park_seq: int = -1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "ts": self.ts, "gz": self.gz, "dev": self.dev, "ino": self.ino,
            "pos": self.pos, "size": self.size, "final": self.final, "fp_len": self.fp_len,
            "fp": self.fp, "size_final": self.size_final, "mtime_ns": self.mtime_ns,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TailFile:
        return cls(
            name=d["name"], ts=d["ts"], gz=d["gz"], dev=d["dev"], ino=d["ino"], pos=d["pos"],
            size=d["size"], final=d["final"], fp_len=d["fp_len"], fp=d["fp"],
            size_final=d.get("size_final", -1), mtime_ns=d.get("mtime_ns", -1),
        )

    @property
    def is_open(self) -> bool:
        return self.fd is not None or self.gzf is not None

    @property
    def endangered(self) -> bool:
        """Kubelet may delete this file: a rotated or compressed one (its bytes go with it)."""
        return self.gz or self.ts is not None or self.final


class Opened(Enum):
    OK = "ok"
    DEFERRED = "deferred"  # no descriptor free: try again next pass
    FAILED = "failed"  # an error (EACCES, ENOENT...): counted, retried after a back-off


class FileReader:
    """System calls for tail files, within the descriptor budget."""

    def __init__(self, *, fs: FileSystem, metrics: Metrics, budget: FdBudget,
                 retry_s: float) -> None:
        self.fs = fs
        self.metrics = metrics
        self.budget = budget
        self.retry_s = retry_s

    # ------------------------------------------------------------------ opening
    def _open_fd(self, sid: StreamId, f: TailFile, path: str, *, force: bool) -> int | Opened:
        if not force and not self.budget.can_open():
            f.deferred = f.deferred or not f.parked
            return Opened.DEFERRED
        try:
            fd = self.fs.open_read(path)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The process limit, not the file: wait for descriptors like a refusal.
                self.budget.short = True
                return Opened.DEFERRED
            self.read_error(sid, f, exc)
            return Opened.FAILED
        self.budget.opened()
        return fd

    def open_plain(self, sid: StreamId, f: TailFile, path: str, *,
                   force: bool = False) -> Opened:
        fd = self._open_fd(sid, f, path, force=force)
        if isinstance(fd, Opened):
            return fd
        fst = self.fs.fstat(fd)
        f.fd, f.dev, f.ino, f.size = fd, fst.st_dev, fst.st_ino, fst.st_size
        f.mtime_ns = fst.st_mtime_ns
        f.deferred = f.parked = False
        if not f.fp_len:
            self.update_fp(f)
        return Opened.OK

    def open_gz(self, sid: StreamId, f: TailFile, path: str, *, name: str, ts: str | None,
                force: bool = False) -> Opened:
        fd = self._open_fd(sid, f, path, force=force)
        if isinstance(fd, Opened):
            return fd
        fst = self.fs.fstat(fd)
        f.dev, f.ino = fst.st_dev, fst.st_ino
        f.raw = os.fdopen(fd, "rb")
        f.gzf = gzip.GzipFile(fileobj=f.raw, mode="rb")
        f.gz, f.final, f.name, f.ts = True, True, name, ts
        f.deferred = f.parked = False
        return Opened.OK

    def close(self, f: TailFile) -> None:
        was_open = f.is_open
        try:
            if f.gzf is not None:
                f.gzf.close()
            if f.raw is not None:
                f.raw.close()
            elif f.fd is not None:
                self.fs.close(f.fd)
        except OSError:
            pass
        f.fd = None
        f.gzf = None
        f.raw = None
        if was_open:
            self.budget.closed()

    def park(self, f: TailFile, *, seq: int = -1) -> None:
        """Give the descriptor back; the file is found again by path, inode and head."""
        if f.is_open and not f.gz:
            self.close(f)
            f.parked, f.park_seq = True, seq

    def read_error(self, sid: StreamId, f: TailFile, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
        self.metrics.read_errors.labels(errno=name).inc()
        f.retry_at = time.monotonic() + self.retry_s
        log.warning("cannot read container log file; will retry", file=f.name, errno=name,
                    error=str(exc), **stream_fields(sid))

    # ------------------------------------------------------------------ heads
    @staticmethod
    def _gz_read_head(f: TailFile, n: int) -> bytes | None:
        """The first ``n`` decompressed bytes (the reader left at the start), None if broken."""
        assert f.gzf is not None
        try:
            f.gzf.seek(0)
            head = f.gzf.read(n)
            f.gzf.seek(0)
        except (OSError, EOFError, zlib.error):
            return None
        return head

    def gz_head(self, f: TailFile) -> bytes | None:
        head = self._gz_read_head(f, FP_MAX)
        if head is not None and not f.fp_len:
            f.fp_len, f.fp = len(head), fingerprint(head)
        return head

    def gz_head_is(self, f: TailFile, want_len: int, want: str) -> bool:
        head = self._gz_read_head(f, want_len)
        return head is not None and len(head) == want_len and fingerprint(head) == want

    def skip_gz(self, f: TailFile, n: int) -> bool:
        """Position a .gz reader at uncompressed offset ``n``; False if the file is damaged."""
        assert f.gzf is not None
        try:
            f.gzf.seek(n)
        except (OSError, EOFError, zlib.error):
            return False
        return True

    def update_fp(self, f: TailFile) -> None:
        if f.fd is None or f.fp_len >= FP_MAX:
            return
        try:
            head = self.fs.pread(f.fd, FP_MAX, 0)
        except OSError:
            return
        if len(head) > f.fp_len:
            f.fp_len, f.fp = len(head), fingerprint(head)

    def head_fp(self, f: TailFile, n: int) -> str:
        assert f.fd is not None
        return fingerprint(self.fs.pread(f.fd, n, 0))

    # ------------------------------------------------------------------ reading
    def read_gz(self, f: TailFile, n: int) -> bytes:
        """Raises EOFError, zlib.error or BadGzipFile on a damaged file."""
        assert f.gzf is not None
        return f.gzf.read(n)

    def read_plain(self, f: TailFile, n: int) -> bytes | None:
        """Up to ``n`` bytes at ``f.pos``; None when the file was truncated in place (the
        caller records it; ``f`` is reset to the new content's start)."""
        assert f.fd is not None
        # fstat first: an idle file costs one cheap syscall, not a 1 MiB read buffer.
        st = self.fs.fstat(f.fd)
        if st.st_size != f.size:
            truncated = st.st_size < f.pos or (
                f.fp_len > 0 and self.head_fp(f, f.fp_len) != f.fp)
            f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
            f.idle_since = 0.0
            if truncated:
                f.pos, f.fp_len, f.fp = 0, 0, ""
                self.update_fp(f)
                return None
        want = min(n, f.size - f.pos)
        if want <= 0:
            return b""
        return self.fs.pread(f.fd, want, f.pos)
