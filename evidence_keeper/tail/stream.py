"""The read state of one stream: its queue of files, head first, and what it consumed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from evidence_keeper.discover.logtree import StreamListing
from evidence_keeper.model import StreamId
from evidence_keeper.tail.files import TailFile

CONSUMED_KEEP = 16


@dataclass(slots=True)
class StreamTail:
    """Read state of one stream; persisted through the spool checkpoint as its cursor."""

    # The spool may rewind this stream after a failed fsync: the tailer re-reads from its
    # checkpointed cursor (Tailer._rewound), so the spool may drop the unsynced bytes.
    rereads: ClassVar[bool] = True

    id: StreamId
    dir: str
    queue: list[TailFile] = field(default_factory=list)
    consumed_ts: str = ""  # newest rotation timestamp fully consumed
    # Files read to their end: dev, ino, fingerprint length and hash, length (-1 unknown).
    consumed: list[tuple[int, int, int, str, int]] = field(default_factory=list)
    listing: StreamListing | None = None
    gone: bool = False  # the stream's files vanished from the tree
    ended_at: int = -1  # Tailer.syncs when the API reported the container exited, else -1
    # Unread bytes whatever the change events say (held back by the spool budget, or rewound
    # after a failed fsync): read on every pass until a read goes through.
    held: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "queue": [f.to_json() for f in self.queue],
            "consumed_ts": self.consumed_ts,
            "consumed": [list(c) for c in self.consumed],
        }

    @property
    def endangered(self) -> int:
        """Read order when descriptors are short: 0 first (ended, deleted, rotated heads)."""
        if self.gone or self.ended_at >= 0:
            return 0
        if self.queue and self.queue[0].endangered:
            return 1
        return 2

    @property
    def dirs(self) -> tuple[str, ...]:
        """Directories whose changes concern this stream (a Docker target dir too)."""
        listing = self.listing
        if listing is not None and listing.target:
            return (self.dir, listing.target.rsplit("/", 1)[0])
        return (self.dir,)
