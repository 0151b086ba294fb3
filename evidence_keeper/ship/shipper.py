"""The shipper: sealed spool segments into the store, in order, exactly once per key.

Per stream, segments ship strictly in offset order, one at a time, because each object names
its predecessor's SHA-256 (``ek-prev-sha256``): the chain is only known once the previous
segment has been hashed. Across streams, uploads run concurrently (``ship_concurrency``);
streams marked *priority* (a restarted container, a deleted pod) go first, then the oldest
capture first.

An upload reads the spool file, hashes and compresses it in a worker thread, ``put``s it with
its metadata and then acknowledges it to the spool, which deletes the file only after a
checkpoint recording the acknowledgement is durable. A crash between the ``put`` and that
checkpoint re-uploads the same bytes under the same key with the same metadata: keys and
bodies are functions of the stream bytes alone, and the key's compression is the one fixed
in the checkpoint when the segment was sealed, so a restart with another ``compression``
never stores a range twice (``.zst`` and ``.gz``).

An *ambiguous* failure (timeout, reset connection, 5xx: the store may have kept the object)
marks the segment uncertain in the spool. Before it is put again — and so before its
successor is chained to anything — the shipper asks the store (HEAD): an object under its key
with the same ``ek-sha256`` is acknowledged as shipped, so the chain always links to what the
store holds and no stored byte is ever recorded as lost. Segments sealed by an agent that did
not record their key are looked for under every extension the same way.

Failures back off exponentially with full jitter (0.5 s doubling to 30 s) behind a circuit
breaker: after a failed upload the shipper waits for the back-off before trying again, once,
and only a success lets the whole queue flow again, so an unreachable store costs one request
per back-off period, not a retry storm. Errors are logged on state changes, not per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from evidence_keeper.formats import EDGE_WINDOW, edge_timestamps, rfc3339
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import SEGMENT_EXTENSIONS, segment_key
from evidence_keeper.spool.spool import SealedSegment, Spool, SpoolStream
from evidence_keeper.store import Store, StoreError
from evidence_keeper.store.codec import compress, extension

log = get_logger("evidence_keeper.ship")


@dataclass(frozen=True, slots=True)
class ShipConfig:
    node: str
    cluster: str
    compression: str = "zstd"
    level: int = 3
    concurrency: int = 4
    object_lock_days: int = 0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class PreparedSegment:
    key: str
    body: bytes
    meta: dict[str, str]
    sha256: str


class StoreNotAsked(StoreError):
    """The store could not say whether it holds an uncertain segment (HEAD failed)."""


class SpoolSegmentDamaged(Exception):
    """A sealed segment's spool file is gone or of the wrong size: its bytes are lost."""


_MAX_DOUBLINGS = 64  # far past any cap: 0.001 s doubled 64 times is 585 million years


class Breaker:
    """Closed while the store works; open (waiting) after a failure, for a jittered back-off."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.open_until = 0.0
        self._rng = rng or random.Random()

    def failed(self, now: float) -> float:
        self.failures += 1
        # The exponent is bounded: a store down all night fails a thousand times in a row,
        # and 2 ** 1024 does not fit a float (the error escaped the upload task and the
        # breaker stopped opening: a request every 50 ms).
        doublings = min(self.failures - 1, _MAX_DOUBLINGS)
        ceiling = min(self.maximum, self.initial * 2.0 ** doublings)
        delay: float = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        self.open_until = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def allows(self, now: float, inflight: int) -> bool:
        """While failing, only one probe upload at a time, after the back-off."""
        if self.failures == 0:
            return True
        return now >= self.open_until and inflight == 0


class Shipper:
    def __init__(self, spool: Spool, store: Store, config: ShipConfig, *, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.breaker = Breaker(config.backoff_initial_s, config.backoff_max_s)
        self.wakeup = asyncio.Event()
        self.store_up: bool | None = None
        self.last_error: str | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run (for thread hooks)
        # Uploads get threads of their own: a slow store must never make the commit loop
        # (the within-one-second fsync) queue behind it in the default executor.
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency,
                                        thread_name_prefix="ek-ship")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def outage_closed(self, sink: str, gap_id: int) -> None:
        """Sink-monitor hook (called from a worker thread): the store probe sees the store
        again, so one upload is tried now instead of at the end of a back-off that may be
        ``backoff_max_s`` long; the backlog then drains within a probe interval. The failure
        count stays: a store that answers probes but refuses uploads keeps backing off."""
        loop = self._loop
        if sink == "store" and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                loop.call_soon_threadsafe(self.retry_now)

    def retry_now(self) -> None:
        """Half-open at once (in the loop): the next launch tries one upload."""
        if self.breaker.failures:
            self.breaker.open_until = 0.0
            self.wakeup.set()

    def prepare(self, s: SpoolStream, seg: SealedSegment) -> PreparedSegment:
        """Read, hash and compress one sealed segment (blocking: runs in a thread)."""
        try:
            with open(seg.path, "rb") as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise SpoolSegmentDamaged(f"spool segment {seg.path} is missing") from exc
        if len(data) != seg.length:
            raise SpoolSegmentDamaged(
                f"spool segment {seg.path} has {len(data)} bytes, expected {seg.length}")
        sha = hashlib.sha256(data).hexdigest()
        first, last = edge_timestamps(data[:EDGE_WINDOW], data[-EDGE_WINDOW:])
        ext = seg.ext or extension(self.config.compression)
        key = segment_key("", self.config.cluster, s.id, seg.start, seg.end, ext)
        meta = {
            "ek-node": self.config.node,
            "ek-namespace": s.id.namespace,
            "ek-pod": s.id.pod,
            "ek-pod-uid": s.id.pod_uid,
            "ek-container": s.id.container,
            "ek-restart": str(s.id.restart),
            "ek-offset": str(seg.start),
            "ek-length": str(seg.length),
            "ek-sha256": sha,
            "ek-prev-sha256": self.spool.prev_sha(s, seg),
            "ek-first-ts": rfc3339(first),
            "ek-last-ts": rfc3339(last),
        }
        compression = next(c for c, e in SEGMENT_EXTENSIONS.items() if e == ext)
        body = compress(data, compression, self.config.level)
        return PreparedSegment(key=key, body=body, meta=meta, sha256=sha)

    def _stored(self, s: SpoolStream, seg: SealedSegment, prepared: PreparedSegment) -> bool:
        """Does the store already hold this segment (same key, same ``ek-sha256``)?

        Asked after an ambiguous PUT failure, and for segments whose key was not recorded at
        seal (then under every extension; the one found is fixed for good). A store that
        cannot answer raises, and the segment stays uncertain: never evicted, never skipped.
        """
        exts = [seg.ext] if seg.ext else list(SEGMENT_EXTENSIONS.values())
        for ext in exts:
            key = segment_key("", self.config.cluster, s.id, seg.start, seg.end, ext)
            try:
                meta = self.store.head(key)
            except StoreError as exc:
                raise StoreNotAsked(str(exc), retryable=exc.retryable) from exc
            if meta is None:
                continue
            if meta.get("ek-sha256") == prepared.sha256:
                self.spool.fix_ext(s, seg, ext)
                log.info("segment found stored after an unanswered upload", key=key,
                         **stream_fields(s.id))
                return True
            log.warning("store holds other bytes under a segment key; replacing them",
                        key=key, stored_sha256=meta.get("ek-sha256"),
                        sha256=prepared.sha256, **stream_fields(s.id))
        if seg.ext is None:
            self.spool.fix_ext(s, seg, extension(self.config.compression))
        return False

    def _upload(self, s: SpoolStream, seg: SealedSegment) -> str:
        prepared = self.prepare(s, seg)
        if (seg.uncertain or seg.ext is None) and self._stored(s, seg, prepared):
            return prepared.sha256
        retain = None
        if self.config.object_lock_days > 0:
            retain = datetime.now(UTC) + timedelta(days=self.config.object_lock_days)
        self.store.put(prepared.key, prepared.body, prepared.meta, retain_until=retain)
        return prepared.sha256

    async def _ship_one(self, s: SpoolStream, seg: SealedSegment) -> None:
        try:
            loop = asyncio.get_running_loop()
            sha = await loop.run_in_executor(self._pool, self._upload, s, seg)
        except SpoolSegmentDamaged as exc:
            # The spool lost this segment (disk fault, manual deletion): say so with its
            # exact range and go on; it is not the store's fault, so no back-off.
            await asyncio.to_thread(self.spool.drop_damaged, s, seg, str(exc))
            return
        except Exception as exc:  # any failure of one upload is retried, never fatal
            # Unless the store said no for sure, it may hold the object: ask before anything.
            ambiguous = not isinstance(exc, StoreError) or exc.ambiguous
            await asyncio.to_thread(self.spool.release, s, seg, uncertain=ambiguous)
            op = "head" if isinstance(exc, StoreNotAsked) else "put"
            self.metrics.ship_errors.labels(op=op).inc()
            delay = self.breaker.failed(self.clock())
            if self.store_up is not False or self.breaker.failures in (1, 10, 100):
                log.error("store upload failed; backing off", error=str(exc),
                          backoff_s=round(delay, 2), failures=self.breaker.failures,
                          store=self.store.describe(), **stream_fields(s.id))
            self.store_up = False
            self.last_error = str(exc)
            return
        await asyncio.to_thread(self.spool.acknowledge, s, seg, sha)
        if self.store_up is False:
            log.info("store reachable again; draining backlog", store=self.store.describe())
        self.store_up = True
        self.last_error = None
        self.breaker.succeeded()

    def pending(self) -> int:
        return len(self._inflight)

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Ship forever (cancel to stop); with ``stop``, return once it is set and idle."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                self.launch()
                if stop is not None and stop.is_set() and not self._inflight:
                    return
                waiters: list[asyncio.Future[object]] = [
                    asyncio.ensure_future(self.wakeup.wait())]
                waiters.extend(self._inflight)  # type: ignore[arg-type]
                try:
                    await asyncio.wait(waiters, timeout=self._idle_timeout(),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiters[0].cancel()
                self.wakeup.clear()
        finally:
            for t in self._inflight:
                t.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)

    def _idle_timeout(self) -> float:
        now = self.clock()
        if self.breaker.failures:
            return max(0.05, self.breaker.open_until - now)
        return 0.5

    def launch(self) -> int:
        """Start uploads for ready segments, up to the concurrency limit."""
        started = 0
        now = self.clock()
        free = self.config.concurrency - len(self._inflight)
        if self.breaker.failures:
            free = 1 if self.breaker.allows(now, len(self._inflight)) else 0
        for s, seg in self.spool.claim_ready(free):
            task = asyncio.create_task(self._ship_one(s, seg), name=f"ship:{s.id.key}@{seg.start}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            started += 1
        return started

    async def drain(self, deadline: float) -> bool:
        """Ship everything sealed and committed, until done or ``deadline`` (monotonic)."""
        while True:
            self.launch()
            if not self._inflight and not self.spool.ready_segments():
                return True
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(min(remaining, max(0.05, self._idle_timeout())))
