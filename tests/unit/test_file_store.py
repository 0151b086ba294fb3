"""The file:// store: its probe (agents sharing one store directory never fail each
other's) and listing by prefix."""

from __future__ import annotations

import itertools
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


def test_list_by_prefix_walks_only_what_can_match(tmp_path: Path) -> None:
    """Prefixes that end inside a name, at a slash, or deeper than a key: the same keys as
    filtering the whole listing."""
    store = FileStore(tmp_path / "store")
    keys = [f"c/ns/{pod}_{uid}/app/0/{off:020d}-{off + 5:020d}.log.zst"
            for pod, uid, off in itertools.product(("p1", "p12", "q1"), ("u1", "u2"), (0, 5))]
    keys += ["c/ns2/p1_u1/app/0/00000000000000000000-00000000000000000005.log.zst",
             "c/_archives/a1/manifest.json", "top.json"]
    for key in keys:
        store.put(key, b"x", {})
    every = sorted(keys)
    assert list(store.list("")) == every
    for prefix in ("c/", "c/ns", "c/ns/", "c/ns/p1", "c/ns/p1_", "c/ns/p12_u2/", "c/ns/p1_u1/app",
                   "c/ns/p1_u1/app/0/0000000000000000000", "c/_archives/a1/manifest.json",
                   "c/ns/p1_u1/app/0/00000000000000000000-00000000000000000005.log.zst.x",
                   "t", "x/"):
        assert list(store.list(prefix)) == [k for k in every if k.startswith(prefix)], prefix
