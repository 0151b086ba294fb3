"""Byte-exact checks of a whole simulated node against its store."""

from __future__ import annotations

import time
from pathlib import Path

from evidence_keeper.health.ledger import Ledger
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from tests.conftest import assert_bytes_equal, check_segments, export_bytes, stored_segments


def spool_segment_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.rglob("*.seg"))


def wait_all_stored(store: FileStore, sim: KubeletSim, timeout: float) -> bool:
    """Wait until the store holds as many bytes of every stream as the simulator wrote.

    Raises ``AssertionError`` naming the streams still short on timeout; returns True (so
    ``assert wait_all_stored(...)`` reads naturally), never False.
    """
    deadline = time.monotonic() + timeout
    while True:
        short = {sid.key: (stored, sim.record_len(sid)) for sid in sim.streams()
                 if (stored := len(export_bytes(store, sid)[0])) < sim.record_len(sid)}
        if not short:
            return True
        if time.monotonic() > deadline:
            detail = ", ".join(f"{k} {got}/{want} bytes" for k, (got, want) in short.items())
            raise AssertionError(f"timed out after {timeout}s waiting for every stream to be"
                                 f" stored; {len(short)} short: {detail}")
        time.sleep(0.25)


def assert_streams_exact(store: FileStore, sim: KubeletSim, spool_dir: Path) -> None:
    for sid in sim.streams():
        record = sim.record(sid)
        segments = stored_segments(store, sid)
        check_segments(segments)
        pos = 0
        for seg in segments:
            assert seg.sk.offset == pos, f"{seg.key}: expected a segment starting at {pos}"
            pos = seg.sk.end
        assert pos == len(record), f"{sid.key}: segments end at {pos}, record has {len(record)}"
        data, holes = export_bytes(store, sid)
        assert holes == []
        assert_bytes_equal(data, record, sid.key)
    ledger = Ledger(spool_dir / "ledger.sqlite")
    try:
        losses = [g.to_json() for g in ledger.gaps(kind="loss")]
    finally:
        ledger.close()
    assert losses == []


