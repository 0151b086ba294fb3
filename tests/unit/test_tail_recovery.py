"""Recovery after a restart: checkpointed files found again by inode and head."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from evidence_keeper.model import Loss
from evidence_keeper.sim import KubeletSim
from evidence_keeper.tail.identity import FP_MIN
from tests.conftest import AliasedInodes
from tests.unit.tailing import Pipeline


def test_a_renamed_file_is_continued_from_its_checkpoint(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    sim.write("ns", "p", "app", "before the restart " * 5)
    p = Pipeline(tmp_path)
    p.step()
    p.close()
    sim.write("ns", "p", "app", "while down, same file " * 3)
    sim.rotate("ns", "p", "app")
    sim.write("ns", "p", "app", "while down, new file")
    q = Pipeline(tmp_path)
    try:
        q.step(2)
        assert q.spooled(sid) == sim.record(sid)
        assert q.losses == []
    finally:
        q.close()


def test_a_reused_inode_with_another_head_is_not_the_checkpointed_file(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=2)
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    sim.write("ns", "p", "app", "the first file, long enough to identify it by its head")
    first = sim.record_len(sid)
    p = Pipeline(tmp_path)
    p.step()
    old = sim.path_of("ns", "p", "app").stat()
    p.close()
    sim.rotate("ns", "p", "app")
    sim.rotate("ns", "p", "app")  # max_files 2: the checkpointed file is deleted
    sim.write("ns", "p", "app", "a different file that got the same inode number " * 2)
    fs = AliasedInodes()
    fs.alias[(old.st_dev, sim.path_of("ns", "p", "app").stat().st_ino)] = old.st_ino
    q = Pipeline(tmp_path, fs=fs)
    try:
        q.step(2)
        # Unknown: rotated away while down; the new file is read from its start, not from
        # the old file's position.
        assert [(x.offset, x.bytes) for x in q.losses] == [(first, None)]
        new = sim.path_of("ns", "p", "app").read_bytes()
        assert q.spooled(sid) == sim.record(sid)[:first] + new
    finally:
        q.close()


def short_head_across_a_restart(tmp_path: Path, sim: KubeletSim, first: bytes | str, *,
                                grow: bool) -> tuple[list[Loss], bytes, bytes]:
    """A live file holding only ``first`` (raw bytes, or a line the container printed), shorter
    than a fingerprint, is captured; while the agent is down it grows (``grow``) and is
    rotated; then the agent recovers. Returns the losses, the stream as spooled, and the
    stream as written."""
    sim.add_pod("ns", "p")
    sid = sim.stream_of("ns", "p", "app")
    if isinstance(first, bytes):
        sim.write_raw("ns", "p", "app", first)
    else:
        sim.write("ns", "p", "app", first)
    assert sim.record_len(sid) < FP_MIN
    p = Pipeline(tmp_path)
    p.step()
    p.close()
    if grow:
        sim.write("ns", "p", "app", "written while the agent was down")
    sim.rotate("ns", "p", "app")
    if grow:
        sim.write("ns", "p", "app", "after the rotation")
    q = Pipeline(tmp_path)
    try:
        q.step(2)
        return list(q.losses), q.spooled(sid), sim.record(sid)
    finally:
        q.close()


def test_a_short_file_renamed_while_down_is_continued_not_read_twice(tmp_path: Path) -> None:
    """A live file shorter than a fingerprint (a partial write) was rotated while the agent
    was down, and nothing tells the rotations apart. Its size and modification time are the
    checkpoint's (a rename keeps both): it is the same file, continued, with no loss record
    and its bytes not read a second time (hypothesis found both)."""
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    losses, spooled, record = short_head_across_a_restart(tmp_path, sim, b"\x00", grow=False)
    assert losses == []
    assert spooled == record == b"\x00"


def test_a_short_file_grown_and_renamed_while_down_is_continued_after_an_unknown_loss(
        tmp_path: Path) -> None:
    """The same, but it grew before the rotation: nothing proves it is the same file (a
    reused inode number may start with the same byte). It is continued after a loss of
    unknown length, never read again from its start."""
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    losses, spooled, record = short_head_across_a_restart(tmp_path, sim, b"\x00", grow=True)
    assert [(x.offset, x.bytes, x.reason) for x in losses] == [(1, None, "rotated_away")]
    assert spooled == record


def test_a_short_whole_record_grown_and_renamed_while_down_names_its_file(
        tmp_path: Path) -> None:
    """A head of one short CRI record (under the fingerprint length) still names its file:
    its nanosecond timestamp starts no other file. Grown and rotated while the agent was
    down, it is continued with no loss recorded."""
    sim = KubeletSim(tmp_path / "pods", max_files=3, clock=lambda: datetime(
        2025, 11, 10, 12, 27, 0, 123456, tzinfo=UTC))
    losses, spooled, record = short_head_across_a_restart(tmp_path, sim, "ok", grow=True)
    assert losses == []
    assert spooled == record
