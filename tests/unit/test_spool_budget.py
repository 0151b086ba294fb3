"""The spool alone: back-pressure, largest-share eviction, keys fixed at seal, uncertain
uploads, and the rewind after a failed fsync (issue 12). No tailer, no store: the spool's
own contract, checked on its state and its checkpoint after a recovery."""

from __future__ import annotations

import errno
import hashlib
import time
from pathlib import Path
from typing import Any

from evidence_keeper.fsio import FileSystem
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.ship.shipper import ShipConfig, Shipper
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import FileStore

A = StreamId("shop", "quiet-1", "u1", "app", 0)
B = StreamId("shop", "noisy-1", "u2", "app", 0)
KiB = 1024


class FailingSync(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    def fdatasync(self, fd: int) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)


def make(root: Path, losses: list[Loss], *, max_bytes: int = 64 * KiB, ext: str = "zst",
         fs: FileSystem | None = None) -> Spool:
    spool = Spool(root, segment_max_bytes=8 * KiB, flush_interval_s=5, max_bytes=max_bytes,
                  record_loss=losses.append, metrics=Metrics(), fs=fs, segment_ext=ext)
    spool.recover()
    return spool


def fill(spool: Spool, sid: StreamId, n: int, *, endangered: bool = True) -> int:
    with spool.lock:
        return spool.append(spool.stream(sid), b"x" * (n - 1) + b"\n",
                            now_mono=time.monotonic(), endangered=endangered)


def test_bytes_still_in_their_source_wait_at_the_budget(tmp_path: Path) -> None:
    losses: list[Loss] = []
    spool = make(tmp_path, losses)
    assert fill(spool, A, 40 * KiB, endangered=False) == 40 * KiB
    assert fill(spool, B, 40 * KiB, endangered=False) == 24 * KiB  # up to the budget
    assert spool.room() == 0
    assert fill(spool, B, 4 * KiB, endangered=False) == 0
    spool.commit()
    assert losses == [] and spool.total_bytes() == 64 * KiB


def test_endangered_bytes_evict_from_the_largest_share_oldest_first(tmp_path: Path) -> None:
    losses: list[Loss] = []
    spool = make(tmp_path, losses)
    fill(spool, A, 8 * KiB, endangered=False)
    spool.seal_all()
    fill(spool, B, 56 * KiB, endangered=False)
    spool.seal_all()
    spool.commit()
    assert fill(spool, B, 16 * KiB) == 16 * KiB  # endangered: accepted past the budget
    spool.seal_all()
    spool.commit()  # captures the new seals
    spool.commit()  # evicts: only captured segments can go
    assert {loss.stream for loss in losses} == {B}
    assert [(loss.offset, loss.bytes, loss.reason) for loss in losses] == [
        (0, 8 * KiB, "evicted"), (8 * KiB, 8 * KiB, "evicted")]
    assert spool.total_bytes() <= 64 * KiB
    assert [(g.start, g.end) for g in spool.streams[A].sealed] == [(0, 8 * KiB)]


def test_a_burst_not_yet_captured_never_evicts_a_quiet_stream(tmp_path: Path) -> None:
    """A deleted noisy pod read past the budget between two commits: its segments are not
    captured yet, so the commit waits for them rather than evict the quiet pod's one."""
    losses: list[Loss] = []
    spool = make(tmp_path, losses)
    fill(spool, A, 2 * KiB, endangered=False)
    spool.seal_all()
    spool.commit()
    assert fill(spool, B, 80 * KiB) == 80 * KiB  # endangered, all since the last commit
    spool.commit()  # captures B's seals; nothing of B can be evicted yet
    assert losses == []
    spool.commit()
    assert {loss.stream for loss in losses} == {B}
    assert spool.total_bytes() <= 64 * KiB
    assert [(g.start, g.end) for g in spool.streams[A].sealed] == [(0, 2 * KiB)]


def test_uncertain_and_inflight_segments_are_never_evicted(tmp_path: Path) -> None:
    losses: list[Loss] = []
    spool = make(tmp_path, losses, max_bytes=16 * KiB)
    fill(spool, A, 8 * KiB)
    spool.seal_all()
    fill(spool, B, 8 * KiB)
    spool.seal_all()
    spool.commit()
    (sa, ga), (_sb, gb) = spool.claim_ready(2)
    spool.release(sa, ga, uncertain=True)  # its PUT may have been stored
    fill(spool, A, 8 * KiB)
    spool.seal_all()
    spool.commit()
    spool.commit()
    # Over budget, but the uncertain segment and the one in flight stay; the new one goes.
    assert [(loss.stream, loss.offset) for loss in losses] == [(A, 8 * KiB)]
    assert ga in spool.streams[A].sealed and gb in spool.streams[B].sealed


def test_key_and_uncertainty_survive_a_restart_with_another_compression(tmp_path: Path) -> None:
    losses: list[Loss] = []
    spool = make(tmp_path, losses, ext="zst")
    fill(spool, A, 4 * KiB)
    spool.seal_all()
    spool.commit()
    [(s, g)] = spool.claim_ready(1)
    spool.release(s, g, uncertain=True)
    spool.commit()
    spool.close()
    again = make(tmp_path, losses, ext="gz")
    [seg] = again.streams[A].sealed
    assert (seg.ext, seg.uncertain) == ("zst", True)


def test_shipper_finds_a_stored_segment_instead_of_putting_it_again(tmp_path: Path) -> None:
    """An uncertain segment the store holds (same ek-sha256) is acknowledged, not re-put;
    a segment of an older checkpoint (no key recorded) is looked for under every extension."""
    losses: list[Loss] = []
    spool = make(tmp_path / "spool", losses, ext="gz")
    store = FileStore(tmp_path / "store")
    shipper = Shipper(spool, store, ShipConfig(node="n", cluster="c", compression="gzip"),
                      metrics=Metrics())
    fill(spool, A, 4 * KiB)
    spool.seal_all()
    spool.commit()
    [(s, g)] = spool.claim_ready(1)
    g.ext = None  # sealed by an agent that did not record the key
    zst = Shipper(spool, store, ShipConfig(node="n", cluster="c", compression="zstd"),
                  metrics=Metrics())
    prepared = zst.prepare(s, g)
    store.put(prepared.key, prepared.body, prepared.meta)  # stored, the reply was lost
    puts: list[str] = []
    real_put = store.put
    def put(key: str, *a: Any, **k: Any) -> None:
        puts.append(key)
        real_put(key, *a, **k)

    store.put = put  # type: ignore[method-assign]
    sha = shipper._upload(s, g)
    assert puts == [] and g.ext == "zst"
    assert sha == hashlib.sha256(Path(g.path).read_bytes()).hexdigest()
    shipper.close()
    zst.close()


def test_failed_fsync_rewinds_to_the_last_checkpoint(tmp_path: Path) -> None:
    losses: list[Loss] = []
    fs = FailingSync()
    spool = make(tmp_path, losses, fs=fs)
    fill(spool, A, 3 * KiB)
    with spool.lock:
        spool.stream(A).cursor = {"queue": [], "mark": "checkpointed"}
    assert spool.commit()
    with spool.lock:
        spool.stream(A).cursor = {"queue": [], "mark": "later"}
    fill(spool, A, 20 * KiB)  # crosses two seals
    fs.fail = 1
    assert not spool.commit()
    s = spool.streams[A]
    assert s.next_offset == 3 * KiB and s.sealed == []
    assert s.open is not None and (s.open.start, s.open.size) == (0, 3 * KiB)
    assert s.cursor == {"queue": [], "mark": "checkpointed"}
    assert Path(s.open.path).stat().st_size == 3 * KiB
    assert sorted(p.name for p in Path(s.dir).iterdir()) == [f"{0:020d}.seg"]
    assert spool.metrics.spool_errors.labels(op="fsync")._value.get() == 1
    assert spool.commit() and losses == []
