"""The commit loop's health, as /readyz reports it: failing commits make the agent not ready."""

from __future__ import annotations

from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.spool.spool import COMMIT_FAILING_NOT_READY_S, Spool

SID = StreamId("shop", "orders-1", "uid-1", "app", 0)


class BrokenCheckpoints(FileSystem):
    """The checkpoint cannot be written (a read-only or full spool disk) while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def write_atomic(self, path: str, data: bytes) -> None:
        if self.broken:
            raise OSError(30, "Read-only file system")
        super().write_atomic(path, data)


def _spool(tmp_path: Path, fs: FileSystem) -> Spool:
    losses: list[Loss] = []
    spool = Spool(tmp_path / "spool", segment_max_bytes=1 << 20, flush_interval_s=5,
                  max_bytes=1 << 30, record_loss=losses.append, metrics=Metrics(), fs=fs)
    spool.recover()
    return spool


def test_commit_failures_are_reported_and_cleared(tmp_path: Path) -> None:
    fs = BrokenCheckpoints()
    spool = _spool(tmp_path, fs)
    assert spool.commit_health()["ok"] and spool.commit_health()["failing_for_s"] is None

    s = spool.stream(SID)
    spool.append(s, b"2025-11-10T00:00:00Z stdout F one\n", now_mono=0.0)
    fs.broken = True
    assert spool.commit() is False
    since = spool.commit_failing_since
    assert since is not None
    health = spool.commit_health(now_mono=since + 1)
    assert health["ok"] and health["failing_for_s"] == 1.0  # a blip: still ready
    late = spool.commit_health(now_mono=since + COMMIT_FAILING_NOT_READY_S + 0.5)
    assert not late["ok"]  # failing for long: not ready

    spool.append(s, b"2025-11-10T00:00:01Z stdout F two\n", now_mono=0.0)
    assert spool.commit() is False
    assert spool.commit_failing_since == since  # the first failure of the run is kept

    fs.broken = False
    assert spool.commit() is True
    healed = spool.commit_health()
    assert healed["ok"] and healed["failing_for_s"] is None
    assert healed["last_commit_age_s"] is not None and healed["commits"] == 1
    spool.close()
