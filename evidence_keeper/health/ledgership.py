"""The gap ledger in the store: append-only, hash-chained objects per node.

Evidence of loss is evidence too, so it must outlive the node it describes. Every change of a
gap is a record in the ledger's outbox (``health/ledger.py``); this shipper batches the
outbox into objects::

    <cluster>/_ledger/<node>/<seq:020d>.jsonl.<zst|gz>

one JSON record per line (``seq``, ``recorded_at``, ``node``, ``ledger_id``, ``gap``: the
gap's whole state as ``/gaps`` shows it). ``seq`` in the key numbers the node's objects
0, 1, 2, ... without holes, and each object names its predecessor's SHA-256 in
``ek-prev-sha256`` (of the raw JSONL, like segments), so a reader can tell a missing, altered
or reordered object. Objects are never rewritten; with ``object_lock_days`` they are under
COMPLIANCE retention like segments.

Exactly once, across crashes and lost replies:

1. the next batch is built once, *with its key, body and metadata*, and saved as ``pending``
   in the ledger's SQLite ``meta`` (fsynced) before the first ``put``;
2. a ``put`` that fails (or whose reply was lost) leaves ``pending`` as it is; the next
   attempt first ``head``s the key: an object with the pending SHA-256 means the earlier put
   landed, and it is committed without a second put;
3. commit = one SQLite transaction that deletes the shipped records and saves the new
   position (next seq, previous SHA-256, last record shipped) with no pending batch.

A crash anywhere re-puts the very same bytes under the same key, or finds them stored: no
record is skipped or shipped twice. A ledger without a position (first start, or a spool
that was lost) continues the node's chain after the last object the store holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from evidence_keeper.health.ledger import Ledger, LedgerRecord
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.store import Store, StoreError
from evidence_keeper.store.codec import compress, extension

log = get_logger("evidence_keeper.health.ledgership")

LEDGER_DIR: Final = "_ledger"
STATE_KEY: Final = "ledger_ship"
MAX_RECORDS: Final = 2000  # per object: small objects, quick to read back
LEDGER_KEY: Final = re.compile(
    r"^(?P<cluster>[^/]+)/_ledger/(?P<node>[^/]+)/(?P<seq>\d{20})\.jsonl\.(?P<ext>zst|gz)$")


def ledger_prefix(cluster: str, node: str | None = None) -> str:
    """Where a cluster's (or one node's) ledger objects live, relative to the store prefix."""
    return f"{cluster}/{LEDGER_DIR}/" + (f"{node}/" if node else "")


def ledger_key(cluster: str, node: str, seq: int, ext: str) -> str:
    return f"{ledger_prefix(cluster, node)}{seq:020d}.jsonl.{ext}"


@dataclass(frozen=True, slots=True)
class LedgerKey:
    cluster: str
    node: str
    seq: int
    ext: str


def parse_ledger_key(key: str) -> LedgerKey | None:
    m = LEDGER_KEY.match(key)
    if m is None:
        return None
    return LedgerKey(m["cluster"], m["node"], int(m["seq"]), m["ext"])


@dataclass(frozen=True, slots=True)
class Pending:
    """A batch saved before its first put: re-put byte for byte, or found stored."""

    key: str
    body_hex: str  # compressed body (hex: ``meta`` holds text)
    meta: dict[str, str]
    sha256: str
    last_record: int


@dataclass(frozen=True, slots=True)
class ShipState:
    next_seq: int
    prev_sha256: str
    shipped_through: int  # the last outbox record in the store
    pending: Pending | None = None

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> ShipState:
        d = json.loads(text)
        p = d.get("pending")
        return cls(int(d["next_seq"]), str(d["prev_sha256"]), int(d["shipped_through"]),
                   Pending(**p) if p else None)


@dataclass(frozen=True, slots=True)
class LedgerShipConfig:
    node: str
    cluster: str
    compression: str = "zstd"
    level: int = 3
    object_lock_days: int = 0
    flush_interval_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


def encode_records(records: list[LedgerRecord], *, node: str, ledger_id: str) -> bytes:
    """The raw JSONL of a batch (what ``ek-sha256`` hashes)."""
    lines = [json.dumps({"seq": r.seq, "recorded_at": r.recorded_at, "node": node,
                         "ledger_id": ledger_id, "gap": r.gap},
                        sort_keys=True, separators=(",", ":")) for r in records]
    return ("\n".join(lines) + "\n").encode("utf-8")


class LedgerShipper:
    """Ships the ledger's outbox to the store (blocking steps run in a thread)."""

    def __init__(self, ledger: Ledger, store: Store, config: LedgerShipConfig, *,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.last_error: str | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._seen = -1  # ledger.changes when the outbox was last found empty
        # The loop and the shutdown drain may overlap: one batch in flight at a time.
        self._lock = threading.Lock()
        # A thread of its own: a store call that hangs must not hold the default executor
        # (or its shutdown at exit), nor the shutdown past its deadline.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ek-ledger")
        self._step: asyncio.Task[bool] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ blocking steps
    def _state(self) -> ShipState:
        text = self.ledger.get_meta(STATE_KEY)
        if text is not None:
            return ShipState.load(text)
        return self._anchor()

    def _anchor(self) -> ShipState:
        """No position yet: continue the node's chain after the store's last object."""
        last: LedgerKey | None = None
        last_key = ""
        for key in self.store.list(ledger_prefix(self.config.cluster, self.config.node)):
            lk = parse_ledger_key(key)
            if lk is not None and lk.node == self.config.node and (last is None
                                                                   or lk.seq > last.seq):
                last, last_key = lk, key
        prev = ""
        if last is not None:
            meta = self.store.head(last_key) or {}
            prev = meta.get("ek-sha256", "")
            log.info("ledger continues the node's chain in the store", after=last_key)
        # Records from before this point were never shipped by anyone: ship them all.
        state = ShipState(next_seq=0 if last is None else last.seq + 1, prev_sha256=prev,
                          shipped_through=0)
        self.ledger.set_meta(STATE_KEY, state.dump())
        return state

    def unshipped(self) -> int:
        state = self.ledger.get_meta(STATE_KEY)
        through = ShipState.load(state).shipped_through if state else 0
        return self.ledger.count_records_after(through)

    def _prepare(self, state: ShipState) -> Pending | None:
        records = self.ledger.records_after(state.shipped_through, limit=MAX_RECORDS)
        if not records:
            return None
        cfg = self.config
        raw = encode_records(records, node=cfg.node, ledger_id=self.ledger.ledger_id)
        sha = hashlib.sha256(raw).hexdigest()
        ext = extension(cfg.compression)
        key = ledger_key(cfg.cluster, cfg.node, state.next_seq, ext)
        times = [r.recorded_at for r in records]
        meta = {
            "ek-kind": "ledger", "ek-node": cfg.node, "ek-ledger-id": self.ledger.ledger_id,
            "ek-ledger-seq": str(state.next_seq), "ek-records": str(len(records)),
            "ek-first-record": str(records[0].seq), "ek-last-record": str(records[-1].seq),
            "ek-length": str(len(raw)), "ek-sha256": sha, "ek-prev-sha256": state.prev_sha256,
            "ek-first-ts": min(times), "ek-last-ts": max(times),
        }
        body = compress(raw, cfg.compression, cfg.level)
        return Pending(key=key, body_hex=body.hex(), meta=meta, sha256=sha,
                       last_record=records[-1].seq)

    def ship_once(self) -> int:
        """Ship one batch (or finish the pending one); returns records shipped (0: none)."""
        state = self._state()
        pending = state.pending
        if pending is None:
            pending = self._prepare(state)
            if pending is None:
                return 0
            state = ShipState(state.next_seq, state.prev_sha256, state.shipped_through, pending)
            self.ledger.set_meta(STATE_KEY, state.dump())  # durable before the first put
        elif self._stored(pending):
            return self._commit(state, pending)
        retain = None
        if self.config.object_lock_days > 0:
            retain = datetime.now(UTC) + timedelta(days=self.config.object_lock_days)
        self.store.put(pending.key, bytes.fromhex(pending.body_hex), pending.meta,
                       retain_until=retain)
        return self._commit(state, pending)

    def _stored(self, pending: Pending) -> bool:
        """After a crash or a lost reply: did the earlier put land? (head before re-put)"""
        meta = self.store.head(pending.key)
        if meta is None:
            return False
        if meta.get("ek-sha256") == pending.sha256:
            return True
        # Someone else's object under our key (two agents with one node_name?): never
        # overwrite evidence; stop shipping and say so until an operator looks.
        raise StoreError(f"ledger object {pending.key} exists with another ek-sha256"
                         f" ({meta.get('ek-sha256', '')[:16]}...): is node_name"
                         f" {self.config.node!r} used by two agents?", retryable=True)

    def _commit(self, state: ShipState, pending: Pending) -> int:
        n = int(pending.meta["ek-records"])
        done = ShipState(next_seq=state.next_seq + 1, prev_sha256=pending.sha256,
                         shipped_through=pending.last_record)
        self.ledger.shipped(through=pending.last_record, state_key=STATE_KEY, state=done.dump())
        return n

    def ship_all(self) -> int:
        """Ship until the outbox is empty (blocking); returns records shipped."""
        total = 0
        try:
            while True:
                with self._lock:
                    n = self.ship_once()
                if n == 0:
                    return total
                total += n
        finally:
            self.metrics.ledger_unshipped_records.set(self.unshipped())

    # ------------------------------------------------------------------ async side
    async def tick(self) -> bool:
        """Ship what is waiting unless backing off; True when the outbox is empty."""
        if self.clock() < self._retry_at:
            return False
        if not self.failures and self.ledger.changes == self._seen:
            return True  # nothing recorded since the outbox was last empty: no thread hop
        seen = self.ledger.changes
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.ship_all)
        except StoreError as exc:
            self._failed(exc)
            return False
        except Exception as exc:  # a store client failure of any kind is retried
            self._failed(exc)
            return False
        if self.failures:
            log.info("ledger shipping works again")
        self.failures, self.last_error = 0, None
        self._seen = seen
        return True

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.metrics.ship_errors.labels(op="ledger").inc()
        delay = min(self.config.backoff_max_s,
                    self.config.backoff_initial_s * 2 ** (self.failures - 1))
        self._retry_at = self.clock() + delay
        if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
            log.error("ledger shipping failed; retrying", error=str(exc),
                      failures=self.failures, retry_in_s=round(delay, 2))
        self.last_error = str(exc)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Ship within ``flush_interval_s`` of a change, until ``stop`` is set."""
        period = max(0.05, min(1.0, self.config.flush_interval_s / 2))
        while not stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(stop.wait(), timeout=period)
            except TimeoutError:
                pass

    async def drain(self, deadline: float) -> bool:
        """Ship everything recorded so far, retrying until ``deadline`` (monotonic).

        A store call that hangs does not hold the caller past the deadline: the step keeps
        running (its thread cannot be interrupted) and the next drain waits for it again.
        """
        self._retry_at = 0.0
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return False
            if self._step is None or self._step.done():
                self._step = asyncio.create_task(self.tick(), name="ledger-drain")
            done, _ = await asyncio.wait({self._step}, timeout=left)
            if not done:
                return False
            if self._step.result():
                return True
            left = deadline - self.clock()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, max(0.05, self._retry_at - self.clock())))

    async def abandon(self) -> None:
        """At the end of shutdown: stop waiting for a drain step stuck in the store."""
        step, self._step = self._step, None
        if step is not None and not step.done():
            log.error("ledger shipping still waits for the store at the deadline; the records"
                      " ship on the next start", unshipped_records=self.unshipped())
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step


def describe_state(ledger: Ledger) -> dict[str, Any]:
    """The shipping position, for ``/readyz``."""
    text = ledger.get_meta(STATE_KEY)
    if text is None:
        return {"next_seq": None, "shipped_through": 0}
    st = ShipState.load(text)
    return {"next_seq": st.next_seq, "shipped_through": st.shipped_through,
            "pending": st.pending.key if st.pending else None}
