"""Recovery: find a stream's checkpointed files again after the agent restarted.

The checkpoint holds each stream's queue (inode, head fingerprint, rotation name, position of
every file) and what it consumed. On restart each queued file is looked for in a fresh
listing: a plain file by inode *and* head (inode numbers are reused), a ``.gz`` by its
rotation name or, if it was compressed before the agent learnt that name, by its head. A file
that cannot be found is a hole: its exact length when the agent had seen its final size, else
``bytes`` null (files created and deleted while the agent was down are unknown).

Candidates are opened as *probes* (scratch :class:`TailFile` records) so a rejected candidate
never alters the checkpointed record. Probes may use a descriptor beyond the tail budget for
the moment they are checked; the tailer parks recovered files again when descriptors are short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evidence_keeper.discover.logtree import Listed, StreamListing
from evidence_keeper.fsio import FileSystem
from evidence_keeper.spool.spool import Spool, SpoolStream
from evidence_keeper.tail.files import FileReader, Opened, TailFile
from evidence_keeper.tail.identity import (
    FP_MIN,
    gz_candidate,
    head_is_whole_record,
    plain_candidate,
)
from evidence_keeper.tail.stream import StreamTail


class Recovery:
    """Re-attaches checkpointed cursors to the files on disk (runs under the spool lock)."""

    def __init__(self, *, spool: Spool, files: FileReader, fs: FileSystem,
                 relist: Callable[[StreamListing], StreamListing | None]) -> None:
        self.spool = spool
        self.files = files
        self.fs = fs
        self.relist = relist
        self.short = False  # a probe found no free descriptor (EMFILE) during this reopen

    def recover(self, t: StreamTail, s: SpoolStream, saved: dict[str, Any],
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
            self.short = False
            found = self.reopen(t, f, fresh, after, nothing_deleted)
            for _ in range(5):
                # A miss may be a rotation between the listing and the stats: only a miss
                # that two listings agree on is a file really gone.
                if found:
                    break
                again = self.relist(listing)
                if again is None or again == fresh:
                    break
                fresh = again
                found = self.reopen(t, f, fresh, after, nothing_deleted)
            if not found and not self.short and self._reopen_unproven(t, s, f, fresh, after):
                found = True
            if found:
                t.queue.append(f)
                if d["ts"] is None and f.ts is not None:
                    after = max(after, f.ts)
            elif self.short:
                # Not a miss: no descriptor to look with. Keep the file by its identity; it
                # is reopened by inode and head (plain) or rotation name (.gz) later, and
                # judged rotated away only on evidence (see Tailer._check_sight).
                f.parked, f.deferred = not f.gz, f.gz
                t.queue.append(f)
            elif f.pos == 0 and f.fp_len == 0 and not f.final:
                unknown.append(f)  # nothing read, nothing to recognise it by: see below
            else:
                self.lost_while_down(t, s, f)
        for f in unknown:
            self._settle_unknown(t, s, f, fresh)

    def _reopen_unproven(self, t: StreamTail, s: SpoolStream, f: TailFile,
                         fresh: StreamListing, after: str) -> bool:
        """A live file with a short head, rotated while the agent was down: nothing on disk
        from before the checkpoint proves that no file was deleted since. The first rotation
        after everything the checkpoint knew renamed it, so if that file is still plain and
        carries its inode number and head, it is continued from its position. If the head is
        whole CRI records (a timestamp with a fraction) that names it; a fragment does not,
        and an unknown-length loss says that files between may be gone (another file would
        skip only bytes equal to the head already captured). Read from its start instead,
        the same file would put its head in the stream twice.

        A compressed file has no inode number left to compare: by a fragment of a head alone
        it is not taken (a later file of the stream may start with the same bytes), so it is
        read from its start after the loss, as any file that cannot be recognised."""
        if f.gz or f.ts is not None or not 0 < f.fp_len < FP_MIN:
            return False
        newer = sorted(r.ts for r in fresh.rotated if r.ts and r.ts > after)
        if not newer or not self._reopen_plain(t, f, fresh, True, newer[0]):
            return False
        assert f.fd is not None
        if not head_is_whole_record(self.fs.pread(f.fd, f.fp_len, 0)):
            self.spool.record_loss(
                s, None, "rotated_away",
                f"{f.name} was rotated while the agent was not running and its {f.fp_len}-byte"
                " head cannot prove which file it became; continued in the first rotation"
                " after it, which has its inode number; files rotated and removed meanwhile,"
                " if any, are unknown")
        return True

    def _settle_unknown(self, t: StreamTail, s: SpoolStream, f: TailFile,
                        fresh: StreamListing) -> None:
        """An empty (or never readable) live file: if files newer than everything queued
        exist, it is one of them and the next refresh queues it from its first byte."""
        claimed = {q.ts for q in t.queue}
        ids = {(q.dev, q.ino) for q in t.queue if not q.gz}
        newer = [r for r in fresh.rotated if r.ts and r.ts > t.consumed_ts
                 and r.ts not in claimed]
        if not newer and not fresh.live:
            self.lost_while_down(t, s, f)
        elif not newer and fresh.live:
            try:
                st = self.fs.stat(fresh.live_path)
                if (st.st_dev, st.st_ino) in ids:
                    self.lost_while_down(t, s, f)
            except OSError:
                self.lost_while_down(t, s, f)

    def lost_while_down(self, t: StreamTail, s: SpoolStream, f: TailFile) -> None:
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

    def reopen(self, t: StreamTail, f: TailFile, listing: StreamListing,
               known_ts: str = "", nothing_deleted: bool = False) -> bool:
        """Open a checkpointed file again: by inode and head while plain, by its rotation
        name once compressed, or by its head fingerprint if it was compressed before the
        agent learnt that name. Candidates are probed on scratch records, so a rejected one
        never alters ``f``."""
        if f.fp_len == 0 and f.ts is None:
            # An empty live file: nothing can tell it from a newer file that reused its inode
            # number, so it is not recovered by identity but rediscovered by the next refresh,
            # from its first byte, in rotation order (see recover). A rotated file keeps its
            # unique rotation name, which identifies it even unread.
            return False
        # A file live at the checkpoint was renamed at the first rotation after everything the
        # checkpoint knew before it (``known_ts``, advanced by the caller in queue order). With
        # a short head (every CRI head starts with the same timestamp prefix) only that one
        # candidate is considered, and only when no file can have been deleted meanwhile.
        newer = sorted(r.ts for r in listing.rotated if r.ts and r.ts > known_ts)
        short_candidate = newer[0] if newer and nothing_deleted else None
        if not f.gz and self._reopen_plain(t, f, listing, bool(newer), short_candidate):
            return True
        return self._reopen_gz(t, f, listing, short_candidate)

    def _reopen_plain(self, t: StreamTail, f: TailFile, listing: StreamListing,
                      newer: bool, short_candidate: str | None) -> bool:
        plain = [(listing.path(r), r) for r in listing.rotated if not r.gz]
        if listing.live:
            plain.append((listing.live_path, Listed(f"{t.id.restart}.log", None, False)))
        for path, r in plain:
            try:
                st = self.fs.stat(path)
            except OSError:
                continue
            unchanged = (f.mtime_ns >= 0 and st.st_size == f.size
                         and st.st_mtime_ns == f.mtime_ns)
            if not plain_candidate(file_id=(f.dev, f.ino), ts=f.ts, fp_len=f.fp_len,
                                   cand_id=(st.st_dev, st.st_ino), cand_ts=r.ts,
                                   newer_exists=newer, short_candidate=short_candidate,
                                   unchanged=unchanged):
                continue
            probe = TailFile(name=r.name, ts=r.ts, gz=False)
            opened = self.files.open_plain(t.id, probe, path, force=True)
            if opened is not Opened.OK:
                self.short |= opened is Opened.DEFERRED
                continue
            if f.fp_len and (probe.size < f.fp_len
                             or self.files.head_fp(probe, f.fp_len) != f.fp):
                self.files.close(probe)
                continue  # the inode number was reused by another file
            f.fd, f.size, f.mtime_ns = probe.fd, probe.size, probe.mtime_ns
            if r.ts is not None:
                f.ts, f.name = r.ts, r.name
            return True
        return False

    def _reopen_gz(self, t: StreamTail, f: TailFile, listing: StreamListing,
                   short_candidate: str | None) -> bool:
        for r in listing.rotated:
            if not r.gz or not gz_candidate(ts=f.ts, fp_len=f.fp_len, cand_ts=r.ts,
                                            consumed_ts=t.consumed_ts,
                                            short_candidate=short_candidate):
                continue
            probe = TailFile(name=r.name, ts=r.ts, gz=True)
            opened = self.files.open_gz(t.id, probe, listing.path(r), name=r.name, ts=r.ts,
                                        force=True)
            if opened is not Opened.OK:
                self.short |= opened is Opened.DEFERRED
                continue
            if f.fp_len and not self.files.gz_head_is(probe, f.fp_len, f.fp):
                self.files.close(probe)
                continue
            if not self.files.skip_gz(probe, f.pos):
                self.files.close(probe)
                continue  # damaged: the caller records the rest of the file as lost
            f.gzf, f.raw, f.gz, f.final = probe.gzf, probe.raw, True, True
            f.name, f.ts, f.dev, f.ino = probe.name, probe.ts, probe.dev, probe.ino
            return True
        return False
