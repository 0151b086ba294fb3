"""Shared fixtures: settings for a temporary node, an in-process agent, leak checks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.fsio import FileSystem
from evidence_keeper.health.ledger import GapRow, Ledger
from evidence_keeper.model import SegmentKey, StreamId, parse_segment_key
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.store import Store
from evidence_keeper.store.codec import decompress
from evidence_keeper.supervisor import Agent
from tests.support.node import node_settings

# The leaked-task check (an async autouse fixture) and pytester for the test that proves it.
pytest_plugins = [
    "tests.leakcheck",
    "pytester",
    "tests.support.archive",
    "tests.support.clock",
    "tests.support.dns",
    "tests.support.s3",
]


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        (tmp_path / "pods").mkdir(exist_ok=True)
        return load_settings(None, environ={}, overrides=node_settings(tmp_path, **overrides))

    return make


@contextlib.asynccontextmanager
async def running_agent(
    settings: Settings,
    *,
    prepare: Callable[[Agent], None] | None = None,
    ready: Callable[[Agent], bool] | None = None,
    within: float = 15.0,
    **kwargs: Any,
) -> AsyncIterator[Agent]:
    """An agent running in this event loop; stopped (ordered shutdown) on exit.

    ``prepare`` adjusts the agent before it starts; ``ready`` (default: tailing has begun)
    must hold within ``within`` seconds before the body runs.
    """
    agent = Agent(settings, **kwargs)
    if prepare is not None:
        prepare(agent)
    is_ready = ready or (lambda a: a.status.tailing)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        deadline = asyncio.get_running_loop().time() + within
        while not is_ready(agent) and not task.done():
            assert asyncio.get_running_loop().time() < deadline, "the agent never got ready"
            await asyncio.sleep(0.02)
        if task.done():
            task.result()
        yield agent
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=60)
        finally:
            agent.close()


# -------------------------------------------------------------------------------------------
# Helpers for the crash, fault and tailing-edge tests: read a stream back from the store and
# check it against the simulator's record, wait for the agent without fixed sleeps.


@dataclasses.dataclass(frozen=True)
class StoredSegment:
    key: str
    sk: SegmentKey
    body: bytes  # decompressed
    meta: dict[str, str]


def stored_segments(store: Store, sid: StreamId, *,
                    cluster: str = "default") -> list[StoredSegment]:
    """Every segment object of one stream, by offset, with its decompressed body and metadata."""
    prefix = f"{sid.store_dir(cluster)}/"
    out = []
    for key in store.list(prefix):
        sk = parse_segment_key(key)
        assert sk is not None, f"not a segment key: {key}"
        if sk.stream != sid:
            continue
        body = decompress(store.get(key), sk.ext)
        out.append(StoredSegment(key, sk, body, store.head(key) or {}))
    out.sort(key=lambda s: s.sk.offset)
    return out


def check_segments(segments: list[StoredSegment]) -> None:
    """Segments never overlap, bodies match key, ek-length and ek-sha256, the hash chain holds."""
    prev_end, prev_sha = -1, ""
    for seg in segments:
        assert seg.sk.offset >= prev_end, f"{seg.key} overlaps the previous segment"
        assert seg.sk.end > seg.sk.offset, f"{seg.key} is empty"
        assert len(seg.body) == seg.sk.end - seg.sk.offset, f"{seg.key}: body length"
        assert seg.meta.get("ek-offset") == str(seg.sk.offset), seg.key
        assert seg.meta.get("ek-length") == str(len(seg.body)), seg.key
        assert seg.meta.get("ek-sha256") == hashlib.sha256(seg.body).hexdigest(), (
            f"{seg.key}: ek-sha256 does not match the body")
        assert seg.meta.get("ek-prev-sha256") == prev_sha, f"{seg.key}: hash chain broken"
        prev_end, prev_sha = seg.sk.end, seg.meta["ek-sha256"]


def export_bytes(store: Store, sid: StreamId, *,
                 cluster: str = "default") -> tuple[bytes, list[tuple[int, int]]]:
    """The stream as ``evidence-keeper export`` writes it, and the holes it reports."""
    streams = find_streams(store, cluster=cluster, namespace=sid.namespace, pod=sid.pod,
                           container=sid.container, restart=sid.restart, pod_uid=sid.pod_uid)
    if not streams:
        return b"", []
    buf = io.BytesIO()
    report = export_stream(store, streams[0], buf)
    return buf.getvalue(), report.holes


def assert_bytes_equal(actual: bytes, expected: bytes, what: str = "stream") -> None:
    """Byte equality with a short message (pytest's diff of megabytes is slow and unreadable)."""
    if actual == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
              min(len(actual), len(expected)))
    raise AssertionError(
        f"{what}: {len(actual)} bytes, expected {len(expected)}; first difference at {at}:"
        f" got {actual[max(0, at - 40):at + 40]!r}, expected {expected[max(0, at - 40):at + 40]!r}")


async def wait_until(cond: Callable[[], bool], *, within: float, what: str,
                     interval: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def poll_until(cond: Callable[[], bool], *, within: float, what: str,
               interval: float = 0.05) -> None:
    """:func:`wait_until` for tests whose own thread blocks (an agent in a thread or a child
    process does the work meanwhile)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


def read_offset(agent: Agent, store: Store, sid: StreamId) -> int:
    """How far the agent has read ``sid``: its spool offset, or once the spool forgot the
    finished stream, what the store holds of it."""
    s = agent.spool.streams.get(sid)
    if s is not None:
        return s.next_offset
    data, _ = export_bytes(store, sid)
    return len(data)


async def wait_read(agent: Agent, store: Store, records: dict[StreamId, bytes], *,
                    within: float = 30.0) -> None:
    """Wait until the agent has read every byte of every stream in ``records``."""
    def done() -> bool:
        return all(read_offset(agent, store, sid) >= len(rec) for sid, rec in records.items())

    await wait_until(done, within=within,
                     what=f"the agent to read all {len(records)} streams to their end")


async def wait_exported(store: Store, sid: StreamId, expected: bytes, *,
                        within: float = 15.0) -> None:
    """Wait until the store holds exactly ``expected`` for ``sid`` (then check it strictly)."""
    def done() -> bool:
        data, _ = export_bytes(store, sid)
        return len(data) >= len(expected)

    await wait_until(done, within=within, what=f"{len(expected)} bytes of {sid.key} stored")
    data, holes = export_bytes(store, sid)
    assert holes == [], f"{sid.key}: holes {holes}"
    assert_bytes_equal(data, expected, sid.key)


async def settle(agent: Agent, *, passes: int = 2, within: float = 30.0) -> None:
    """Wait until the agent has looked at the tree as it is now: ``passes`` full scans begun
    after this call (the last of them still running), each followed by a full read pass.

    For negative checks ("no gap appears", "nothing more is read"): with inotify and no
    change a fixed sleep may contain no pass at all (the safety-net rescan comes every
    ``rescan_interval_s``), so the passes are asked for with ``ChangeWatcher.wake_full``,
    as that rescan would ask for them, only sooner.
    """
    # The scan under way may have listed the tree before this call: it does not count.
    target = agent.tailer.syncs + 1 + passes

    def done() -> bool:
        if agent.tailer.syncs >= target:
            return True
        agent.watcher.wake_full()
        return False

    await wait_until(done, within=within, what=f"{passes} full scans of the log tree")


def loss_gaps(ledger: Ledger, sid: StreamId | None = None) -> list[GapRow]:
    """``loss`` gaps of one stream (or all), oldest first."""
    rows = ledger.gaps(kind="loss")
    if sid is None:
        return rows
    return [g for g in rows if (g.fields["namespace"], g.fields["pod"], g.fields["pod_uid"],
                                g.fields["container"], g.fields["restart"]) == (
        sid.namespace, sid.pod, sid.pod_uid, sid.container, sid.restart)]


class AgentThread:
    """An agent running in a thread of its own with its own event loop.

    For tests whose client side is blocking (the CLI, urllib, hypothesis): the test thread
    makes real HTTP requests while the agent runs undisturbed.
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        import threading

        self.agent = Agent(settings, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="agent-thread", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.agent.run(self._stop))
        except BaseException as exc:  # surfaced to the test by stop()
            self._error = exc
        finally:
            self._loop.close()

    @property
    def url(self) -> str:
        assert self.agent.api_address is not None
        host, port = self.agent.api_address
        return f"http://{host}:{port}"

    def start(self) -> AgentThread:
        import time

        self._thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._error is not None:
                raise self._error
            if self.agent.api_address is not None and self.agent.status.tailing:
                return self
            time.sleep(0.02)
        raise AssertionError("agent thread did not start")

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=60)
        self.agent.close()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> AgentThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AliasedInodes(FileSystem):
    """Reports a chosen inode number for some files (``alias[(dev, ino)] = other_ino``).

    A busy file system gives a deleted file's inode number to the next new file; whether it
    does in a test run depends on the allocator. Aliasing makes that reuse deterministic as
    far as the agent can see (hold the old file open so its real number is not reused too).
    """

    def __init__(self) -> None:
        super().__init__()
        self.alias: dict[tuple[int, int], int] = {}

    def _aliased(self, st: os.stat_result) -> os.stat_result:
        ino = self.alias.get((st.st_dev, st.st_ino))
        if ino is None:
            return st
        fields = list(st[:10])
        fields[1] = ino
        extra = {k: getattr(st, k) for k in (
            "st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
            "st_blksize", "st_blocks")}
        return os.stat_result(fields, extra)

    def stat(self, path: str) -> os.stat_result:
        return self._aliased(super().stat(path))

    def fstat(self, fd: int) -> os.stat_result:
        return self._aliased(super().fstat(fd))
