"""One agent per spool: an exclusive ``flock`` on the spool directory itself.

Two agents on one spool would each believe the other's segments are leftovers, write the
other's ledger (a false ``agent_down`` gap) and race on ``checkpoint.json``. The lock is taken
on the directory's own descriptor, before recovery and before the ledger is opened, so a
second agent fails having written nothing at all: no lock file is created, the directory
exists already. The kernel drops the lock when the process dies (kill -9 included), so a
crashed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class SpoolBusy(Exception):
    """Another process holds the spool directory."""


class SpoolLock:
    """The held lock; ``release()`` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> SpoolLock:
        """Lock ``path`` (a directory, created if missing) or raise :class:`SpoolBusy`."""
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolBusy(
                    f"spool_dir {path} is in use by another evidence-keeper agent"
                    " (one agent per spool)") from None
            raise
        return cls(path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock
