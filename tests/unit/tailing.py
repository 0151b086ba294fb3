"""A synchronous tail pipeline for unit tests: LogTree → Tailer → Spool, no event loop."""

from __future__ import annotations

from pathlib import Path

from evidence_keeper.discover.logtree import LogTree
from evidence_keeper.fsio import FileSystem
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.spool.spool import Spool
from evidence_keeper.tail.budget import FdBudget
from evidence_keeper.tail.tailer import Tailer


class Pipeline:
    def __init__(self, root: Path, *, budget: FdBudget | None = None,
                 fs: FileSystem | None = None, symlink_roots: tuple[str, ...] = ()) -> None:
        self.losses: list[Loss] = []
        self.metrics = Metrics()
        self.fs = fs or FileSystem()
        self.spool = Spool(root / "spool", segment_max_bytes=1 << 20, flush_interval_s=5,
                           max_bytes=1 << 30, record_loss=self.losses.append,
                           metrics=self.metrics, fs=self.fs, error_backoff_s=0)
        self.spool.recover()
        self.tree = LogTree(str(root / "pods"), fs=self.fs, symlink_roots=symlink_roots)
        self.tailer = Tailer(self.spool, metrics=self.metrics, fs=self.fs, retry_s=0,
                             budget=budget, tree=self.tree)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.tailer.sync(self.tree.scan())
            while self.tailer.pump():
                pass
            self.spool.seal_all()
            self.spool.commit()

    def spooled(self, sid: StreamId) -> bytes:
        self.spool.seal_all()
        s = self.spool.streams[sid]
        return b"".join(Path(seg.path).read_bytes() for seg in s.sealed)

    def close(self) -> None:
        self.tailer.close()
        self.spool.close()
