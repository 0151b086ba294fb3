"""The file-system seam: every system call the tailer and the spool make goes through here.

Production uses :class:`FileSystem` as it is (thin wrappers over :mod:`os`). Tests subclass it
to inject the faults a node really produces (EACCES on a new file, ENOSPC, EIO, a file that
vanishes between two calls) at a precise call, without patching globals. Only ``os`` calls that
can fail in interesting ways are wrapped; pure path arithmetic is not.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileSystem:
    """Blocking file operations. Called from worker threads, never from the event loop."""

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def open_append(self, path: str) -> int:
        # O_APPEND is not used: the spool writes at explicit lengths so that a failed partial
        # write can be cut back with ftruncate and retried without leaving a hole.
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        return os.pread(fd, n, pos)

    def pwrite(self, fd: int, data: bytes | memoryview, pos: int) -> int:
        return os.pwrite(fd, data, pos)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path, follow_symlinks=False)

    def close(self, fd: int) -> None:
        os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o750, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write temp, fsync, rename, fsync the directory: readers see the old or the new file."""
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            self.fsync(fd)
        finally:
            os.close(fd)
        self.rename(tmp, path)
        self.fsync_dir(str(Path(path).parent))
