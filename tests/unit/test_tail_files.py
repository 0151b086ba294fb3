"""Opening and reading tail files within the descriptor budget (real files, faults through
the FileSystem seam)."""

from __future__ import annotations

import errno
import gzip
from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import StreamId
from evidence_keeper.tail.budget import FdBudget
from evidence_keeper.tail.files import FileReader, Opened, TailFile

SID = StreamId("ns", "pod", "uid", "app", 0)


class Emfile(FileSystem):
    def open_read(self, path: str) -> int:
        raise OSError(errno.EMFILE, "Too many open files")


def reader(budget: FdBudget, fs: FileSystem | None = None) -> tuple[FileReader, Metrics]:
    metrics = Metrics()
    return FileReader(fs=fs or FileSystem(), metrics=metrics, budget=budget, retry_s=1), metrics


def test_open_read_close_keeps_the_count(tmp_path: Path) -> None:
    p = tmp_path / "0.log"
    p.write_bytes(b"hello world\n")
    budget = FdBudget(limit=100, reserve=10, in_use=10)
    r, _ = reader(budget)
    f = TailFile(name="0.log", ts=None, gz=False)
    assert r.open_plain(SID, f, str(p)) is Opened.OK
    assert budget.in_use == 11 and f.fp_len == 12
    assert r.read_plain(f, 5) == b"hello"
    f.pos = 12
    assert r.read_plain(f, 5) == b""
    r.park(f)
    assert f.parked and not f.is_open and budget.in_use == 10


def test_a_refused_open_is_deferred_not_an_error(tmp_path: Path) -> None:
    p = tmp_path / "0.log"
    p.write_bytes(b"x")
    budget = FdBudget(limit=100, reserve=10, in_use=90)
    r, metrics = reader(budget)
    f = TailFile(name="0.log", ts=None, gz=False)
    assert r.open_plain(SID, f, str(p)) is Opened.DEFERRED
    assert f.deferred and budget.short
    r2, metrics2 = reader(FdBudget(limit=100, reserve=10), Emfile())
    g = TailFile(name="0.log", ts=None, gz=False)
    assert r2.open_plain(SID, g, str(p)) is Opened.DEFERRED  # EMFILE: wait, do not count
    for m in (metrics, metrics2):
        assert m.registry.get_sample_value("evidence_keeper_read_errors_total",
                                           {"errno": "EMFILE"}) is None


def test_a_missing_file_is_a_counted_error(tmp_path: Path) -> None:
    r, metrics = reader(FdBudget(limit=100, reserve=10))
    f = TailFile(name="0.log", ts=None, gz=False)
    assert r.open_plain(SID, f, str(tmp_path / "nope")) is Opened.FAILED
    assert metrics.registry.get_sample_value("evidence_keeper_read_errors_total",
                                             {"errno": "ENOENT"}) == 1
    assert f.retry_at > 0


def test_truncation_in_place_resets_the_file(tmp_path: Path) -> None:
    p = tmp_path / "0.log"
    p.write_bytes(b"a" * 100)
    r, _ = reader(FdBudget(limit=100, reserve=10))
    f = TailFile(name="0.log", ts=None, gz=False)
    r.open_plain(SID, f, str(p))
    f.pos = 100
    p.write_bytes(b"new")
    assert r.read_plain(f, 10) is None
    assert f.pos == 0 and r.read_plain(f, 10) == b"new"


def test_gz_reads_and_seeks(tmp_path: Path) -> None:
    p = tmp_path / "0.log.20251110-122700.gz"
    p.write_bytes(gzip.compress(b"0123456789" * 10))
    budget = FdBudget(limit=100, reserve=10, in_use=0)
    r, _ = reader(budget)
    f = TailFile(name=p.name, ts="20251110-122700", gz=True)
    assert r.open_gz(SID, f, str(p), name=p.name, ts="20251110-122700") is Opened.OK
    head = r.gz_head(f)
    assert head is not None and f.fp_len == 100
    assert r.read_gz(f, 4) == b"0123"
    assert r.skip_gz(f, 95) and r.read_gz(f, 10) == b"56789"
    r.close(f)
    assert budget.in_use == 0 and not f.is_open
