"""The file:// store's probe: agents sharing one store directory never fail each other's."""

from __future__ import annotations

import threading
from pathlib import Path

from evidence_keeper.store import FileStore, StoreError


def test_concurrent_probes_of_one_store_all_succeed(tmp_path: Path) -> None:
    stores = [FileStore(tmp_path / "store") for _ in range(4)]
    errors: list[StoreError] = []
    start = threading.Barrier(len(stores))

    def probe(store: FileStore) -> None:
        start.wait()
        for _ in range(200):
            try:
                store.check()
            except StoreError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=probe, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [p.name for p in (tmp_path / "store").iterdir()] == []  # no probe left behind
