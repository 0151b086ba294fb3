"""Archive helpers: the token, settings for an archiving agent, calls to its API."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from evidence_keeper.api.client import call
from evidence_keeper.archive.manifest import SegmentEntry, fetch_verified
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore, Store
from tests.conftest import AgentThread

TOKEN = "ek-archive-token-0123456789abcdef"
NS = "sock-shop"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "archive-token"
    path.write_text(TOKEN + "\n")
    return path


def archive_settings(make_settings: Callable[..., Settings], token_file: Path,
                     **kw: Any) -> Settings:
    # A long flush interval: only the archive's own seal can get the newest bytes stored.
    base: dict[str, Any] = {"archive_token_file": str(token_file), "segment_max_bytes": "4KiB",
                            "flush_interval_s": 30}
    base.update(kw)
    return make_settings(**base)


def realtime_sim(root: Path) -> KubeletSim:
    return KubeletSim(root, clock=lambda: datetime.now(UTC))


def store_of(settings: Settings) -> FileStore:
    assert settings.store_dir is not None
    return FileStore(settings.store_dir)


def write_config(tmp_path: Path, settings: Settings, name: str = "cli.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"store_url: {settings.store_url}\ncluster: {settings.cluster}\n"
                    f"spool_dir: {tmp_path / 'cli-spool'}\n")
    return str(path)


def post_archive(url: str, body: dict[str, Any], token: str = TOKEN) -> dict[str, Any]:
    status, doc = call(url, "/archive", method="POST", body=body, token=token)
    assert status == 202, doc
    return dict(doc)


def wait_archive(url: str, archive_id: str, *, within: float = 30.0) -> dict[str, Any]:
    """The archive job once it is ``complete`` or ``failed``; raises on timeout."""
    deadline = time.monotonic() + within
    while True:
        _, doc = call(url, f"/archives/{archive_id}", token=TOKEN)
        if doc["status"] in ("complete", "failed"):
            return dict(doc)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for archive {archive_id}"
                                 f" to finish; last: {doc}")
        time.sleep(0.1)


def archive_orders(settings: Settings, sim_root: Path, *, lines: int, reason: str,
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """An agent archives ``NS`` (the last 5 minutes) after its pod ``orders-1`` wrote
    ``lines`` PAYMENT_FAILED lines: the accepted archive document and the complete one."""
    sim = realtime_sim(sim_root)
    sim.add_pod(NS, "orders-1", containers=("orders",))
    with AgentThread(settings) as t:
        for i in range(lines):
            sim.write(NS, "orders-1", "orders", f"Order {i} status updated to PAYMENT_FAILED")
        doc = post_archive(t.url, {"namespace": NS, "reason": reason, "since": "5m"})
        done = wait_archive(t.url, doc["id"])
    assert done["status"] == "complete", done
    return doc, done


def load(store: Store, key: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(store.get(key))
    return doc


def manifest_stream_bytes(store: Store, doc: dict[str, Any], sid: StreamId) -> bytes:
    entries = sorted((SegmentEntry.from_json(s) for s in doc["segments"]),
                     key=lambda e: e.offset)
    out = bytearray()
    for e in entries:
        if e.stream == sid:
            assert e.offset == len(out), f"{e.key}: not contiguous"
            out += fetch_verified(store, e)
    return bytes(out)


def raw_http(url: str, method: str, path: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A request exactly as given (no client-side encoding or validation)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data)
