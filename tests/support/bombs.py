"""Hostile objects for the store: decompression bombs planted as segments of a real store.

Shared by ``tests/store/test_bombs.py`` and ``bench/bomb_bench.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import zstandard

from evidence_keeper.archive.manifest import (
    MANIFEST_VERSION,
    SegmentEntry,
    encode,
    manifest_key,
    manifest_meta,
    seal,
)
from evidence_keeper.model import StreamId, parse_segment_key, segment_key
from evidence_keeper.store import FileStore
from evidence_keeper.store.codec import compress

NS = "bomb"
SID = StreamId(NS, "payment-1", "uid-1", "app", 0)
ARCHIVE = "b0" * 12
RSS_LIMIT_MB = 600
GIB = 1 << 30


def zstd_bomb() -> bytes:
    """One zstd frame of 2 GiB of zeros: 64 KiB."""
    c = zstandard.ZstdCompressor(level=1).compressobj(size=2 * GIB)
    zeros = bytes(1 << 20)
    return b"".join([*(c.compress(zeros) for _ in range(2048)), c.flush()])


def gzip_bomb() -> bytes:
    """32 gzip members of 64 MiB of zeros each (gzip readers concatenate them): 2 MiB."""
    return gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0) * 32


@dataclass(frozen=True)
class Planted:
    config: Path
    bomb_key: str


def line(i: int) -> bytes:
    return f"2025-11-10T12:27:{i % 60:02d}.000000000Z stdout F PAYMENT_FAILED order {i}\n".encode()


def plant(root: Path, *, ext: str, body: bytes, claimed: int) -> Planted:
    """A stream of three segments whose middle one is ``body`` claiming ``claimed`` bytes,
    and a (v2) node manifest listing all three, as an agent would have written them."""
    store = FileStore(root / "store")
    first = b"".join(line(i) for i in range(50))
    last = b"".join(line(i) for i in range(50, 80))
    fake = hashlib.sha256(b"what the bomb pretends to be").hexdigest()
    entries = []
    prev, offset = "", 0
    for data, length, seg_ext, stored, claimed_sha in (
            (first, len(first), "zst", compress(first, "zstd", 3), None),
            (None, claimed, ext, body, fake),
            (last, len(last), "zst", compress(last, "zstd", 3), None)):
        sha = claimed_sha or hashlib.sha256(data or b"").hexdigest()
        key = segment_key("", "default", SID, offset, offset + length, seg_ext)
        meta = {"ek-node": "node-1", "ek-namespace": NS, "ek-pod": SID.pod,
                "ek-pod-uid": SID.pod_uid, "ek-container": SID.container, "ek-restart": "0",
                "ek-offset": str(offset), "ek-length": str(length), "ek-sha256": sha,
                "ek-prev-sha256": prev, "ek-first-ts": "2025-11-10T12:27:00.000000Z",
                "ek-last-ts": "2025-11-10T12:27:59.000000Z"}
        store.put(key, stored, meta)
        sk = parse_segment_key(key)
        assert sk is not None
        entries.append(SegmentEntry.from_store(key, sk, meta))
        prev, offset = sha, offset + length
    doc = seal({"version": MANIFEST_VERSION, "kind": "node", "id": ARCHIVE,
                "created_at": "2025-11-10T12:30:00.000000Z", "node": "node-1",
                "cluster": "default", "store": store.describe(),
                "request": {"namespace": NS, "reason": "bomb"}, "window": {},
                "requester": {}, "accepted_at": "", "sealed": {},
                "segments": [e.to_json() for e in entries], "lifecycle": [], "gaps": []})
    store.put(manifest_key("default", ARCHIVE), encode(doc), manifest_meta(doc))
    config = root / "cli.yaml"
    config.write_text(f"store_url: file://{root / 'store'}\nspool_dir: {root / 'spool'}\n")
    return Planted(config, entries[1].key)


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str
    rss_mb: float


def run_cli(tmp_path: Path, *args: str) -> Run:
    """The CLI in a child process; its own peak RSS from ``os.wait4`` (not a running max)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * GIB, 4 * GIB))

    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evidence_keeper.cli", *args], stdout=o, stderr=e,
            preexec_fn=limit)  # noqa: PLW1509 - an rlimit must be set before exec
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
               usage.ru_maxrss / 1024)


BOMBS = {
    # name: (extension, body factory, claimed length)
    "zstd-64KiB-to-2GiB": ("zst", zstd_bomb, 4096),
    "zstd-as-8MiB-segment": ("zst", zstd_bomb, 8 << 20),
    "gzip-members-as-8MiB-segment": ("gz", gzip_bomb, 8 << 20),
    "key-claims-8GiB": ("zst", zstd_bomb, 8 * GIB),
}
