"""The usual subject of a capture test: one container's stream on a simulated node, its store,
and the byte-exact check of what the store holds against the simulator's record."""

from __future__ import annotations

from pathlib import Path

from evidence_keeper.model import StreamId
from evidence_keeper.sim import KubeletSim, LogFormat
from evidence_keeper.store import FileStore, Store
from tests.conftest import assert_bytes_equal, export_bytes


def one_stream(tmp_path: Path, namespace: str, pod: str, *, container: str = "app",
               max_files: int = 5, fmt: LogFormat = "cri",
               ) -> tuple[FileStore, KubeletSim, StreamId]:
    """The ``file://`` store ``make_settings`` points at (``tmp_path/store``), a simulated
    log tree under ``tmp_path/pods`` with one pod of one container, and that stream."""
    sim = KubeletSim(tmp_path / "pods", max_files=max_files)
    sim.add_pod(namespace, pod, containers=(container,), fmt=fmt)
    return FileStore(tmp_path / "store"), sim, sim.stream_of(namespace, pod, container)


def assert_stored(store: Store, sid: StreamId, expected: bytes, *,
                  holes: list[tuple[int, int]] | None = None) -> None:
    """The store holds exactly ``expected`` for ``sid`` (as ``export`` writes it), with
    exactly these ``holes`` (none by default)."""
    data, found = export_bytes(store, sid)
    assert found == (holes or [])
    assert_bytes_equal(data, expected, sid.key)
