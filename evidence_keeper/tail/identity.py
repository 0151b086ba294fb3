"""File identity and continuity rules: pure functions, no file system.

Which physical file is which, when a file is complete, and when the agent may say that one
file of a stream directly follows another. Everything here takes plain values (inode pairs,
head hashes, lengths, rotation names), so each rule is unit-tested without a single file.

* A plain file is identified by ``(dev, inode)`` *and* its head: inode numbers are reused
  once a file is deleted, so a head of at least :data:`FP_MIN` bytes (or a recorded exact
  length) must agree too.
* A ``.gz`` (a new inode written by kubelet's compressor) is identified by its rotation name,
  or, when the plain file was never seen under that name, by its head fingerprint.
* A file is *final* once a newer live file exists, a later restart exists, or the container
  ended (:func:`is_final`).
* Continuity (:func:`lost_sight`): the file the agent last saw as live is followed by what it
  sees now only if that file can still be found under a rotated name (kubelet deletes oldest
  first, so then nothing newer was deleted). A file that is neither live nor listed any more
  was rotated *and* deleted unseen: files between it and the next one may be gone, a
  blind window that must be recorded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

FP_MAX: Final = 4096
# Below this many bytes a head identifies nothing: every CRI line of a second starts with the
# same 18-byte timestamp prefix. 48 bytes cover a full RFC3339Nano timestamp and the tag.
FP_MIN: Final = 48

FileId = tuple[int, int]  # (st_dev, st_ino)

# One whole CRI record: RFC3339Nano time with a fraction, the stream, the tag.
_CRI_RECORD: Final = re.compile(
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}(?:Z|[+-]\d\d:\d\d) (?:stdout|stderr) [PF] ")


def fingerprint(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


def head_is_whole_record(head: bytes) -> bool:
    """Does a head shorter than FP_MIN still name its file? It does when it is whole CRI
    records up to a newline: the first one's instant (to the nanosecond) and message start no
    other file of the stream, which only ever writes later instants. A fragment (a partial
    write, raw bytes) proves nothing, and a Docker JSON record is longer than FP_MIN anyway."""
    return head.endswith(b"\n") and _CRI_RECORD.match(head) is not None


def head_identifies(head: bytes, *, fp_len: int, fp: str, size: int) -> bool:
    """Is ``head`` (a file's first bytes, up to FP_MAX) the head recorded as ``fp_len``/``fp``?

    A recorded head of at least FP_MIN bytes identifies a file. A shorter one was the whole
    file (heads are kept up to 4 KiB), so the candidate must then hold exactly those bytes.
    """
    if fp_len >= FP_MIN:
        return len(head) >= fp_len and fingerprint(head[:fp_len]) == fp
    return 0 < fp_len == size == len(head) and fingerprint(head) == fp


def consumed_matches(*, recorded_len: int, fp_len: int, size: int) -> bool:
    """May a file of ``size`` bytes be a consumed one (before comparing heads)?

    A consumed file was final, so the same file has exactly its recorded length. Without a
    recorded length only a long head can tell (short heads are all timestamps).
    """
    if recorded_len >= 0:
        return size == recorded_len and fp_len <= size
    return fp_len >= FP_MIN and fp_len <= size


def is_final(*, gz: bool, file_id: FileId, live_id: FileId | None, superseded: bool,
             ended: bool) -> bool:
    """A file can no longer grow: compressed, not the live file, or the container is over."""
    return gz or superseded or ended or (live_id is not None and file_id != live_id)


def lost_sight(*, file_id: FileId, named: bool, live_id: FileId | None,
               listed_ids: Iterable[FileId], has_gz_twin: bool) -> bool:
    """A file last seen as live (``named`` False) that is neither live nor listed any more.

    Judged only on a fresh listing taken after the live file's stat: the file was renamed
    (a newer live file exists or the live name is gone) and then deleted, compressed to a
    ``.gz`` the caller could not match, or the whole stream vanished. Each is a window in
    which files may have been rotated away unseen.
    """
    if named or has_gz_twin:
        return False
    if live_id is not None and file_id == live_id:
        return False
    return file_id not in set(listed_ids)


def stamp_sorts_after(ts: str | None, known: str) -> bool:
    """Rotation names sort in time order (kubelet's timestamp, or the Docker ordering key)."""
    return ts is not None and ts > known


def plain_candidate(*, file_id: FileId, ts: str | None, fp_len: int, cand_id: FileId,
                    cand_ts: str | None, newer_exists: bool,
                    short_candidate: str | None, unchanged: bool = False) -> bool:
    """May a listed plain file be a checkpointed one (before its head is compared)?

    Same inode first. An unread file (no head) keeps only its rotation name. A live file with
    a head shorter than FP_MIN (timestamps only) is accepted as the live file when nothing
    newer was rotated, as the one rotation that must have renamed it (``short_candidate``),
    or wherever it is if it is ``unchanged``: the size and modification time the checkpoint
    recorded (a rename keeps both). A reused inode number is a new file, written later.
    """
    if cand_id != file_id or (fp_len == 0 and cand_ts != ts):
        return False
    if ts is None and fp_len < FP_MIN:
        # ``short_candidate`` None means no rotation can be proven to be it: the live file
        # is then accepted only when nothing newer exists (a reused inode number with the
        # same timestamp prefix is otherwise indistinguishable).
        return unchanged or (cand_ts is None and not newer_exists) or (
            cand_ts is not None and cand_ts == short_candidate)
    return True


def gz_candidate(*, ts: str | None, fp_len: int, cand_ts: str | None, consumed_ts: str,
                 short_candidate: str | None) -> bool:
    """May a listed .gz be a checkpointed file (before its head is compared)?

    A named file is its own rotation name. A file compressed before its name was learnt is
    recognised by its head only among rotations after everything consumed, and a short head
    only as ``short_candidate``; without a head nothing is guessed.
    """
    if ts is not None:
        return cand_ts == ts
    if not fp_len or (cand_ts is not None and cand_ts <= consumed_ts):
        return False
    return fp_len >= FP_MIN or (cand_ts is not None and cand_ts == short_candidate)
