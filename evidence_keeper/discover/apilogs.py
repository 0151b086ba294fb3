"""API fallback: container logs through ``pods/log`` when the node's log tree cannot be read.

Some nodes give the agent no readable ``log_root`` (no hostPath mount allowed, a different
runtime layout). There the watcher switches to this mode and says so: it is **weaker** than
reading kubelet's files, and ``/readyz`` detail and the agent's log state it.

How it works. For every container of every pod on the node one *feed* task streams
``GET pods/{name}/log?container=…&follow=true&timestamps=true`` for the current instance
(``restartCount``) and appends the bytes to that instance's spool stream
``(namespace, pod, uid, container, restart)``, exactly as the tailer would (under the spool
lock, ``Spool.append``); the shipper does not know the difference. When an instance has
exited, what is missing of it is fetched once more — ``previous=true`` for instance
``restartCount - 1``, or the current log while the container waits in CrashLoopBackOff — and
the stream is finished. A pod seen with ``restartCount > 0`` also gets its previous instance
fetched, as the tailer reads files already present at start.

Resuming. The API has no byte offsets. Each stream's cursor (persisted in the spool checkpoint
like the tailer's) keeps the timestamp and SHA-256 of the last complete line appended; after a
reconnect or an agent restart the response is read from its start and lines are skipped up to
and including that line (lines with an older timestamp, or the same timestamp before it). Only
complete lines are appended while a stream is live; a trailing partial line is appended when the
stream ends.

Why it is weaker, and what is said about it:

* the bytes are kubelet's rendering (``<RFC3339Nano> <message>``), not the raw CRI / json-file
  records: the stdout/stderr tag and partial-record markers are gone;
* kubelet serves only the live file of the current and the previous instance: bytes rotated
  away while a follow was disconnected are missing without a known length, and an instance more
  than one restart old cannot be fetched at all (recorded as a ``loss`` of unknown length);
* resuming by timestamp can skip lines that share the last line's timestamp;
* capture depends on the API server and kubelet being reachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aiohttp

from evidence_keeper.discover.lifecycle import PodView
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.model import StreamId
from evidence_keeper.spool.spool import Spool, SpoolWriteError

log = get_logger("evidence_keeper.apilogs")

WEAKER_DETAIL: Final = (
    "capturing through the Kubernetes API (pods/log), a weaker mode than reading the log tree:"
    " bytes are kubelet's rendering (timestamp + message, no stdout/stderr tag or partial-line"
    " markers), only the live file of the current and previous instance can be fetched (bytes"
    " rotated away during a disconnection, and instances older than the previous one, are lost),"
    " resumes are by timestamp, and capture depends on the API server")


class ApiError(Exception):
    """The API server answered a request with an error status (retried with back-off)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Backoff:
    """Exponential back-off with jitter: ``initial`` doubling to ``maximum``, reset on success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        delay: float = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        return delay

    def reset(self) -> None:
        self.failures = 0


def parse_ts_ns(line: bytes) -> int | None:
    """Nanoseconds since the epoch of the RFC3339(Nano) timestamp that starts ``line``."""
    sp = line.find(b" ", 0, 64)
    if sp < 20:
        return None
    raw = line[:sp].decode("ascii", "replace")
    head, dot, rest = raw.partition(".")
    frac = ""
    if dot:
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        frac, zone = rest[:i], rest[i:]
    else:
        head, zone = raw[:19], raw[19:]
    try:
        ts = datetime.fromisoformat(head + (zone.replace("Z", "+00:00") or "+00:00"))
    except ValueError:
        return None
    return int(ts.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)


@dataclass(slots=True)
class ApiStream:
    """Capture state of one container instance read through the API; the spool cursor."""

    sid: StreamId
    last_ts: int | None = None
    last_sha: str = ""
    size: int = 0  # bytes appended
    done: bool = False
    pending: bytes = b""  # after the last newline: not appended while the stream is live
    unappended: bytes = b""  # accepted from the API, refused by the spool (retried)
    skipping: bool = False  # resuming: dropping lines up to the last one appended
    clean_eof: bool = False  # the last follow ended cleanly (kubelet ends it at exit)

    def to_json(self) -> dict[str, Any]:
        return {"source": "api", "last_ts": self.last_ts, "last_sha": self.last_sha,
                "size": self.size, "done": self.done}

    @classmethod
    def from_json(cls, sid: StreamId, d: dict[str, Any]) -> ApiStream:
        return cls(sid=sid, last_ts=d.get("last_ts"), last_sha=str(d.get("last_sha", "")),
                   size=int(d.get("size", 0)), done=bool(d.get("done", False)))

    def begin(self) -> None:
        """A new response starts at the beginning of the log: skip what was appended."""
        self.pending = b""
        self.skipping = self.last_ts is not None

    def take(self, chunk: bytes) -> bytes:
        """Bytes of ``chunk`` to append now (complete lines not appended before)."""
        buf = self.pending + chunk
        cut = buf.rfind(b"\n") + 1
        lines, self.pending = buf[:cut], buf[cut:]
        if lines and self.skipping:
            lines = self._skip(lines)
        out, self.unappended = self.unappended + lines, b""
        return out

    def _skip(self, lines: bytes) -> bytes:
        pos = 0
        while pos < len(lines):
            end = lines.index(b"\n", pos) + 1
            line = lines[pos:end]
            ts = parse_ts_ns(line)
            if ts is None or self.last_ts is None or ts > self.last_ts:
                self.skipping = False
                return lines[pos:]
            if ts == self.last_ts and hashlib.sha256(line).hexdigest() == self.last_sha:
                self.skipping = False
                return lines[end:]
            pos = end
        return b""

    def appended(self, data: bytes) -> None:
        self.size += len(data)
        end = data.rfind(b"\n") + 1
        if end == 0:
            return
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start:end]
        ts = parse_ts_ns(line)
        if ts is not None:
            self.last_ts, self.last_sha = ts, hashlib.sha256(line).hexdigest()


@dataclass(slots=True)
class _Feed:
    uid: str
    container: str
    changed: asyncio.Event
    view: PodView | None = None
    deleted: bool = False
    streams: dict[int, ApiStream] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    forgotten: set[int] = field(default_factory=set)

    def finished(self) -> bool:
        return self.deleted and all(st.done for st in self.streams.values())


class ApiLogs:
    """Per-container ``pods/log`` followers feeding the spool (see the module docstring)."""

    def __init__(self, *, spool: Spool, core: Callable[[], Awaitable[Any]], stop: asyncio.Event,
                 request_timeout_s: float = 15.0, follow_timeout_s: float = 600.0,
                 fetch_timeout_s: float = 300.0, eof_settle_s: float = 2.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.spool = spool
        self._core = core
        self.stop = stop
        self.request_timeout_s = request_timeout_s
        self.follow_timeout_s = follow_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.eof_settle_s = eof_settle_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.feeds: dict[tuple[str, str], _Feed] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self.errors = 0

    # ------------------------------------------------------------------ input from the watcher
    def pod_changed(self, view: PodView, *, deleted: bool = False) -> None:
        for name, c in view.containers.items():
            feed = self.feeds.get((view.uid, name))
            if feed is None:
                if deleted:
                    continue  # never followed: nothing to fetch from a pod that is gone
                feed = _Feed(view.uid, name, asyncio.Event())
                self.feeds[(view.uid, name)] = feed
                if c.restart_count > 0:
                    # Seen for the first time after a restart: kubelet still serves the
                    # previous instance, like its files on disk.
                    feed.streams.setdefault(
                        c.restart_count - 1, ApiStream(view.stream(name, c.restart_count - 1)))
            feed.view = view
            feed.deleted = feed.deleted or deleted
            feed.changed.set()
            self._spawn(feed)
        if deleted:
            for (uid, _), feed in self.feeds.items():
                if uid == view.uid and not feed.deleted:
                    feed.deleted = True
                    feed.changed.set()

    def state(self, sid: StreamId) -> str | None:
        """``pending`` while this mode still works on the instance, ``done``, or None."""
        feed = self.feeds.get((sid.pod_uid, sid.container))
        st = feed.streams.get(sid.restart) if feed is not None else None
        if st is None:
            return None
        return "done" if st.done else "pending"

    def sync_done(self, present: set[str]) -> None:
        """After a relist: pods not listed are gone (deleted while nobody watched)."""
        for feed in self.feeds.values():
            if feed.uid not in present and not feed.deleted:
                feed.deleted = True
                feed.changed.set()

    def _spawn(self, feed: _Feed) -> None:
        if self._tg is None or (feed.task is not None and not feed.task.done()):
            return
        if feed.finished():
            return
        feed.task = self._tg.create_task(self._feed_loop(feed),
                                         name=f"apilogs:{feed.uid}/{feed.container}")

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        for st in await self._blocking(self._adopt):
            key = (st.sid.pod_uid, st.sid.container)
            feed = self.feeds.get(key)
            if feed is None:
                feed = self.feeds[key] = _Feed(st.sid.pod_uid, st.sid.container, asyncio.Event())
            feed.streams[st.sid.restart] = st  # no feed ran yet: the saved cursor wins
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for feed in list(self.feeds.values()):
                    self._spawn(feed)
                tg.create_task(self._sweep_loop(), name="apilogs:sweep")
                await self.stop.wait()
                for feed in self.feeds.values():
                    if feed.task is not None:
                        feed.task.cancel()
        finally:
            self._tg = None
            if self._inflight:
                await asyncio.wait(set(self._inflight))

    def _adopt(self) -> list[ApiStream]:
        """Streams this mode captured before the agent restarted (cursors in the checkpoint)."""
        out = []
        with self.spool.lock:
            for sid, s in self.spool.streams.items():
                cur = s.cursor
                if isinstance(cur, dict) and cur.get("source") == "api":
                    st = ApiStream.from_json(sid, cur)
                    s.cursor = st
                    out.append(st)
        return out

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work in a thread; it always completes, even if the caller is cancelled,
        and its state changes happen inside it (so cancellation cannot lose them)."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await asyncio.shield(fut)

    async def _sleep(self, seconds: float, feed: _Feed | None = None) -> None:
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.stop.wait())]
        if feed is not None:
            waits.append(asyncio.ensure_future(feed.changed.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _feed_loop(self, feed: _Feed) -> None:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while not self.stop.is_set() and not feed.finished():
            feed.changed.clear()
            try:
                progressed = await self._step(feed)
            except asyncio.CancelledError:
                raise
            except (ApiError, SpoolWriteError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                self.errors += 1
                delay = backoff.next()
                if backoff.failures in (1, 10, 100):
                    log.warning("API log stream failed; retrying", error=str(exc) or repr(exc),
                                retry_in_s=round(delay, 2), pod=feed.view and feed.view.name,
                                container=feed.container)
                await self._sleep(delay, feed)  # a change (exit, deletion) retries at once
                continue
            if progressed:
                backoff.reset()
            else:
                await self._sleep(5.0, feed)

    # ------------------------------------------------------------------ one step of a feed
    async def _step(self, feed: _Feed) -> bool:
        """One step of a container's feed: finish an exited instance, or follow the live one.
        True when it made progress."""
        view = feed.view
        if view is None:
            if feed.deleted:
                return await self._give_up_all(feed, "the pod was deleted while the agent was"
                                               " not running")
            return False
        c = view.containers.get(feed.container)
        if c is None:
            return False
        current = c.restart_count
        exited_now = c.current_terminated is not None
        if c.has_run and current not in feed.streams and not feed.deleted:
            # Also an instance that already exited (an init container, a quick crash).
            feed.streams[current] = ApiStream(view.stream(feed.container, current))
        if await self._finish_exited(feed, current, exited_now):
            return True
        live = feed.streams.get(current)
        if feed.deleted or not c.has_run or exited_now or live is None or live.done:
            return False
        if not await self._follow(feed, live):
            return False  # not available now (waiting to start, pod gone): wait for a change
        await self._settle_after_eof(feed, live, current)
        return True

    async def _finish_exited(self, feed: _Feed, current: int, exited_now: bool) -> bool:
        """Read (or give up on) the oldest exited instance that is not complete yet."""
        for r in sorted(feed.streams):
            old = feed.streams[r]
            if old.done or (r == current and not (exited_now or feed.deleted)) or r > current:
                continue
            if feed.deleted:
                await self._finish(old, None if old.clean_eof else (
                    "the pod was deleted before its log could be read to the end through the"
                    " API"))
            elif r == current - 1:
                await self._fetch(feed, old, previous=True)
            elif r == current:
                await self._fetch(feed, old, previous=False)
            else:
                await self._finish(old, None if old.clean_eof else (
                    f"restart {r} is more than one restart old: kubelet no longer serves its"
                    " log"))
            return True
        return False

    async def _settle_after_eof(self, feed: _Feed, st: ApiStream, current: int) -> None:
        """A clean end of a follow: kubelet ends it when the container exits. Wait for the
        status to say so; if it does not, the stream was cut for another reason: resume."""
        deadline = time.monotonic() + self.eof_settle_s
        while time.monotonic() < deadline and not self.stop.is_set():
            v = feed.view
            cc = v.containers.get(feed.container) if v is not None else None
            if feed.deleted or cc is None or cc.restart_count > current or (
                cc.current_terminated is not None
            ):
                await self._finish(st, None)
                return
            await self._sleep(deadline - time.monotonic(), feed)
            feed.changed.clear()

    async def _give_up_all(self, feed: _Feed, why: str) -> bool:
        for st in feed.streams.values():
            if not st.done:
                await self._finish(st, why)
        return True

    async def _request(self, feed: _Feed, *, follow: bool, previous: bool) -> Any:
        view = feed.view
        assert view is not None
        v1 = await self._core()
        resp = await asyncio.wait_for(v1.read_namespaced_pod_log_without_preload_content(
            view.name, view.namespace, container=feed.container, follow=follow or None,
            previous=previous or None, timestamps=True,
            _request_timeout=self.follow_timeout_s if follow else self.fetch_timeout_s,
        ), timeout=self.request_timeout_s)
        if resp.status == 200:
            return resp
        try:
            body = (await resp.content.read(4096)).decode("utf-8", "replace")
        finally:
            resp.release()
        if resp.status in (400, 404):
            return None  # not (or no longer) available: the caller decides what that means
        raise ApiError(resp.status, body)

    async def _read_into(self, resp: Any, st: ApiStream) -> None:
        st.begin()
        try:
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    return
                await self._blocking(self._append, st, chunk)
        finally:
            resp.release()

    async def _follow(self, feed: _Feed, st: ApiStream) -> bool:
        """Follow the live instance; True when the response ended cleanly."""
        resp = await self._request(feed, follow=True, previous=False)
        if resp is None:
            return False
        st.clean_eof = False
        await self._read_into(resp, st)
        st.clean_eof = True
        return True

    async def _fetch(self, feed: _Feed, st: ApiStream, *, previous: bool) -> None:
        """An exited instance: read its whole log once more (deduplicated), then finish."""
        resp = await self._request(feed, follow=False, previous=previous)
        if resp is None:
            await self._finish(st, "the API no longer serves this instance's log"
                               if st.size or st.last_ts is not None else None,
                               missing=not (st.size or st.last_ts is not None))
            return
        await self._read_into(resp, st)
        await self._finish(st, None)

    # ------------------------------------------------------------------ spool side (threads)
    def _append(self, st: ApiStream, chunk: bytes) -> None:
        with self.spool.lock:
            data = st.take(chunk)
            if data:
                self._put(st, data)

    def _put(self, st: ApiStream, data: bytes) -> None:
        s = self.spool.stream(st.sid)
        if s.cursor is not st:
            s.cursor = st
        try:
            n = self.spool.append(s, data, now_mono=time.monotonic())
        except SpoolWriteError:
            st.unappended = data
            raise
        st.appended(data[:n])
        if n < len(data):
            st.unappended = data[n:]
            raise SpoolWriteError(f"spool accepted {n} of {len(data)} bytes")

    async def _finish(self, st: ApiStream, loss: str | None, *, missing: bool = False) -> None:
        await self._blocking(self._finish_sync, st, loss, missing)

    def _finish_sync(self, st: ApiStream, loss: str | None, missing: bool) -> None:
        with self.spool.lock:
            if st.done:
                return
            if missing:
                # Never captured anything of it: no stream, so the watcher reports it missing.
                st.done = True
                log.warning("previous log not available through the API",
                            **stream_fields(st.sid))
                return
            tail = st.unappended + (b"" if st.skipping else st.pending)
            st.unappended, st.pending = b"", b""
            if tail:
                self._put(st, tail)
            s = self.spool.stream(st.sid)
            s.cursor = st
            if loss is not None:
                self.spool.record_loss(s, None, "unreadable", loss)
            st.done = True
            s.finished = True
            s.priority = True
            self.spool.dirty = True

    # ------------------------------------------------------------------ housekeeping
    async def _sweep_loop(self) -> None:
        while not self.stop.is_set():
            await self._sleep(2.0)
            await self._blocking(self._sweep)
            for key, feed in list(self.feeds.items()):
                if feed.finished() and (feed.task is None or feed.task.done()) and all(
                    r in feed.forgotten for r in feed.streams
                ):
                    del self.feeds[key]

    def _sweep(self) -> None:
        """Forget finished, fully shipped streams no longer needed for resuming."""
        with self.spool.lock:
            for feed in list(self.feeds.values()):
                view = feed.view
                c = view.containers.get(feed.container) if view is not None else None
                current = c.restart_count if c is not None else 0
                for r, st in feed.streams.items():
                    if not st.done or r in feed.forgotten:
                        continue
                    if not (feed.deleted or r < current - 1):
                        continue
                    s = self.spool.streams.get(st.sid)
                    if s is None:
                        feed.forgotten.add(r)
                    elif s.finished and s.open is None and not s.sealed:
                        self.spool.forget(st.sid)
                        feed.forgotten.add(r)

