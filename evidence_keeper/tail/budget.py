"""The descriptor budget: how many files the tail path may hold open, and who goes first.

A container runtime may give the agent a soft ``RLIMIT_NOFILE`` of 1024 while a node holds
thousands of log files. At start-up the soft limit is raised to the hard one
(:func:`raise_nofile_limit`); what remains is split in two:

* a *reserve* (``fd_reserve``) for everything that must never fail for lack of a descriptor:
  the spool's segment files, the checkpoint's temp file, the ledger, the store, HTTP
  connections, inotify;
* the rest for the tail path: open log files and the spool segments of streams being read.

The tail path asks :meth:`FdBudget.can_open` before opening anything. The count it compares
against is the process's real number of open descriptors (``/proc/self/fd``), measured once
per pass (:meth:`FdBudget.measure`) and advanced by the opens and closes the tailer makes
in between, so descriptors taken by other components are counted too.

Descriptors are held only where they protect bytes: a rotated file with unread bytes (kubelet
may delete it), a file of an ended or deleted container. An idle live file is closed and
reopened by path with an inode check (see :mod:`evidence_keeper.tail.files`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from evidence_keeper.logs import get_logger

log = get_logger("evidence_keeper.tail")

# Above this a soft limit is not raised further: nothing here needs more, and some kernels
# allocate the descriptor table eagerly.
NOFILE_CAP: Final = 1 << 20


def raise_nofile_limit(*, cap: int = NOFILE_CAP) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``cap``); returns both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else cap, cap)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the descriptor limit", soft=soft, hard=hard, error=str(exc))
        return soft, hard
    log.info("descriptor limit raised", soft_before=soft, soft=want, hard=hard)
    return want, hard


def count_open_fds() -> int:
    """Open descriptors of this process (``/proc/self/fd``); -1 where that is not available."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return -1


@dataclass(slots=True)
class FdBudget:
    """Admission for the tail path's descriptors. Not thread-safe: used under the spool lock."""

    limit: int  # the soft RLIMIT_NOFILE
    reserve: int
    in_use: int = 0  # measured process-wide count plus the tail path's changes since
    denied: int = 0  # opens refused since the last measurement (a shortage this pass)
    short: bool = False  # the last pass ran out of descriptors
    measured_at: float = 0.0  # monotonic time of the last real count
    # The real count (tests count only their own files: other threads' sockets come and go).
    counter: Callable[[], int] = count_open_fds

    @classmethod
    def from_process(cls, *, reserve: int) -> FdBudget:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = NOFILE_CAP if soft == resource.RLIM_INFINITY else int(soft)
        b = cls(limit=limit, reserve=min(reserve, max(16, limit // 4)))
        b.measure()
        return b

    @property
    def tail_max(self) -> int:
        """Process-wide descriptor count the tail path may bring the process up to."""
        return self.limit - self.reserve

    def measure(self, *, now: float | None = None, every_s: float = 0.0) -> None:
        """Re-read the real count (at most every ``every_s`` seconds of ``now``, so an idle
        polling pass does not list thousands of descriptors); a pass that was denied anything
        is marked short."""
        if now is None or now - self.measured_at >= every_s or self.denied:
            n = self.counter()
            if n >= 0:
                self.in_use = n
            self.measured_at = now or 0.0
        self.short = self.denied > 0
        self.denied = 0

    def can_open(self, n: int = 1, *, segment: bool = False) -> bool:
        """May the tail path open ``n`` more descriptors? A quarter of its share is kept for
        spool segments (``segment=True``), so files held open can always be read on."""
        limit = self.tail_max if segment else self.tail_max - self.tail_max // 4
        if self.in_use + n <= limit:
            return True
        self.denied += 1
        self.short = True
        return False

    def opened(self, n: int = 1) -> None:
        self.in_use += n

    def closed(self, n: int = 1) -> None:
        self.in_use = max(0, self.in_use - n)

    @property
    def pressure(self) -> bool:
        """More than half the tail share is in use: idle live files give theirs back."""
        return self.short or 2 * self.in_use > self.tail_max
