"""Sink health: periodic probes, debounced up/down state, ``sink_outage`` gaps with coverage.

Every ``probe_interval_s`` each configured sink (``sink_probes``) and the store itself are
probed concurrently. State changes are debounced: ``probe_failures_before_down`` consecutive
failures mark a sink down, ``probe_successes_before_up`` successes mark it up again; the gap
is dated from the *first* failure (or success) of the streak, not from the moment the
debounce gave in, so its start and end are what really happened.

``evidence_keeper_sink_up{sink,check}`` shows, per check, the debounced view: while a sink is
down, the failing check and those after it are 0 and the checks before it (that passed) are 1.

Coverage is the point of the ledger: while an outage is open, every byte this agent captures
and ships is added to it (per stream, from the spool's traffic counters), so when someone asks
"the sink has nothing for Nov 10 — do we?", the gap itself answers: N streams in these
namespaces, X bytes captured, Y bytes shipped to the store during the outage. Coverage counts
from the gap's *start* (the first failing probe), not from the moment the debounce gave in:
traffic during a failing streak is kept aside (``SinkState.pending``) and becomes the gap's
coverage when the sink is declared down, or is dropped when a success ends the streak. The
spool's traffic is taken just before each probe round, so bytes from before the first
failing probe never count.

Time comes in as parameters (keyword-only, like the shipper's ``clock``): ``clock`` (monotonic
seconds: probe schedule, latency, coverage flushes), ``wall_clock`` (the UTC dates of gaps) and
:meth:`SinkMonitor.run`'s ``sleep``. Production passes nothing and gets ``time.monotonic``,
``datetime.now(UTC)`` and :func:`~evidence_keeper.aiotasks.sleep_until`; tests pass a fake
clock and check the schedule and the debounce to the fake second without waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from evidence_keeper.aiotasks import sleep_until
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.health.probes import Prober, ProbeResult
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.settings import SinkProbe
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import Store

log = get_logger("evidence_keeper.health")
COVERAGE_FLUSH_S = 10.0
# The probe loop wakes at least this often to add traffic to open outages (coverage), and
# never more often than the floor, however short the probe interval.
ACCOUNT_EVERY_S = 1.0
TICK_FLOOR_S = 0.05

# How the probe loop waits: (stop, seconds) -> True if stop was set (aiotasks.sleep_until).
Sleeper = Callable[[asyncio.Event, float], Awaitable[bool]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Coverage:
    streams: set[str] = field(default_factory=set)
    namespaces: set[str] = field(default_factory=set)
    captured: int = 0
    shipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "namespaces": sorted(self.namespaces),
            "captured_bytes": self.captured,
            "shipped_bytes": self.shipped,
        }

    def extra(self) -> str:
        return json.dumps({"coverage": self.to_json(), "stream_keys": sorted(self.streams)})

    @classmethod
    def from_extra(cls, extra: str | None) -> Coverage:
        if not extra:
            return cls()
        d = json.loads(extra)
        c = d.get("coverage", {})
        return cls(set(d.get("stream_keys", [])), set(c.get("namespaces", [])),
                   int(c.get("captured_bytes", 0)), int(c.get("shipped_bytes", 0)))


@dataclass
class SinkState:
    name: str
    kind: str  # dns | tcp | http | s3 | file
    target: str
    checks: tuple[str, ...]
    up: bool | None = None
    fails: int = 0
    oks: int = 0
    streak_start: datetime | None = None
    last: ProbeResult | None = None
    last_at: datetime | None = None
    gap_id: int | None = None
    coverage: Coverage = field(default_factory=Coverage)
    pending: Coverage = field(default_factory=Coverage)  # a failing streak not yet "down"

    def to_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "sink": self.name, "kind": self.kind, "target": self.target,
            "up": self.up, "checks": list(self.checks),
            "failed_check": None if last is None else last.failed,
            "error": None if last is None else last.error,
            "last_probe": None if self.last_at is None else self.last_at.isoformat(),
            "latency_s": None if last is None else round(last.latency_s, 4),
        }


class SinkMonitor:
    def __init__(
        self,
        probes: Sequence[SinkProbe],
        *,
        store: Store,
        ledger: Ledger,
        spool: Spool,
        metrics: Metrics,
        prober: Prober,
        interval_s: float,
        failures_before_down: int,
        successes_before_up: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.spool = spool
        self.metrics = metrics
        self.prober = prober
        self.interval_s = interval_s
        self.failures_before_down = failures_before_down
        self.successes_before_up = successes_before_up
        self.clock = clock
        self.wall_clock = wall_clock
        self._probes = {p.name: p for p in probes}
        self.states: dict[str, SinkState] = {}
        for p in probes:
            checks = {"dns": ("dns",), "tcp": ("dns", "tcp")}.get(
                p.kind, ("dns", "tcp", "tls", "http") if p.target.startswith("https")
                else ("dns", "tcp", "http"))
            self.states[p.name] = SinkState(p.name, p.kind, p.target, checks)
        self.states["store"] = SinkState("store", store.check_name, store.describe(),
                                         (store.check_name,))
        self.rounds = 0
        self._last_flush = clock()
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ek-store-probe")
        self._store_check: asyncio.Future[None] | None = None
        # Called as (sink, gap_id) from a worker thread once a sink_outage is closed (backfill).
        self.on_outage_closed: list[Callable[[str, int], None]] = []

    def close(self) -> None:
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    def restore(self) -> None:
        """Reattach outages that were open when the agent stopped."""
        for g in self.ledger.gaps(kind="sink_outage", open_=True):
            st = self.states.get(str(g.fields.get("sink")))
            if st is None:
                # The sink was removed from the configuration: its outage can no longer end.
                self.ledger.close_gap(g.id, at=self.wall_clock(),
                                      detail="sink no longer probed (removed from sink_probes)")
                continue
            st.gap_id, st.up = g.id, False
            st.coverage = Coverage.from_extra(g.fields.get("extra"))

    async def probe(self, st: SinkState) -> ProbeResult:
        if st.name == "store":
            start = self.clock()
            if self._store_check is not None and not self._store_check.done():
                # The last check is still stuck (a hung endpoint or NFS mount): fail at once
                # rather than pile up threads that the commit loop's fsync also needs.
                return ProbeResult(False, st.checks, st.checks[0],
                                   "the previous store check is still hanging",
                                   self.clock() - start)
            loop = asyncio.get_running_loop()
            self._store_check = loop.run_in_executor(self._store_pool, self.store.check)
            # A check that outlives its deadline still ends; its error is read here.
            self._store_check.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait_for(asyncio.shield(self._store_check), self.prober.timeout)
            except TimeoutError:
                return ProbeResult(False, st.checks, st.checks[0],
                                   f"store check timed out after {self.prober.timeout:g}s",
                                   self.clock() - start)
            except Exception as exc:  # any failure of the check is the store being down
                return ProbeResult(False, st.checks, st.checks[0], str(exc),
                                   self.clock() - start)
            return ProbeResult(True, st.checks, None, None, self.clock() - start)
        p = self._probes[st.name]
        if p.kind == "dns":
            return await self.prober.dns(p.host)
        if p.kind == "tcp":
            assert p.port is not None
            return await self.prober.tcp(p.host, p.port)
        return await self.prober.http(p.target)

    async def run(self, *, stop: asyncio.Event, sleep: Sleeper = sleep_until) -> None:
        """Probe every sink at once, then every ``interval_s``, until ``stop`` is set.

        Between rounds the loop wakes every ``ACCOUNT_EVERY_S`` (at most) to add the spool's
        traffic to open outages, so a long probe interval never delays coverage. The next
        round is due ``interval_s`` after the previous one *started*: a slow probe (a hung
        resolver, up to the probe timeout) does not push the schedule back.
        """
        next_probe = -math.inf  # the first round at once
        while not stop.is_set():
            if self.clock() >= next_probe:
                next_probe = self.clock() + self.interval_s
                await self.probe_round()
            await asyncio.to_thread(self.account)
            wait = min(ACCOUNT_EVERY_S, max(TICK_FLOOR_S, next_probe - self.clock()))
            if await sleep(stop, wait):
                return

    async def probe_round(self) -> None:
        # Traffic up to now belongs to the state before this round (a streak starts at `now`).
        await asyncio.to_thread(self.account)
        states = list(self.states.values())
        now = self.wall_clock()
        results = await asyncio.gather(*(self.probe(st) for st in states))
        for st, res in zip(states, results, strict=True):
            await asyncio.to_thread(self._apply, st, res, now)
        self.rounds += 1

    def _apply(self, st: SinkState, res: ProbeResult, now: datetime) -> None:
        st.last, st.last_at = res, now
        if res.ok:
            if st.oks == 0:
                st.streak_start = now
            st.oks, st.fails = st.oks + 1, 0
            st.pending = Coverage()  # the failing streak ended before the sink went down
            if st.up is not True and st.oks >= self.successes_before_up:
                self._went_up(st, st.streak_start or now)
        else:
            if st.fails == 0:
                st.streak_start = now
            st.fails, st.oks = st.fails + 1, 0
            if st.up is not False and st.fails >= self.failures_before_down:
                self._went_down(st, st.streak_start or now, res)
            elif st.up is False and st.gap_id is not None:
                pass  # still down: the gap stays open
        self._gauges(st)

    def _went_down(self, st: SinkState, at: datetime, res: ProbeResult) -> None:
        st.up = False
        st.coverage, st.pending = st.pending, Coverage()  # counted from the gap's start
        st.gap_id = self.ledger.open_gap(
            "sink_outage", dedup=f"sink_outage:{st.name}", at=at, sink=st.name,
            check=res.failed, reason=f"{res.failed}_failed", detail=res.error,
            extra=st.coverage.extra())
        log.error("sink down", sink=st.name, check=res.failed, error=res.error,
                  target=st.target)

    def _went_up(self, st: SinkState, at: datetime) -> None:
        was_down = st.up is False
        st.up = True
        if st.gap_id is not None:
            self.ledger.close_gap(st.gap_id, at=at, extra=st.coverage.extra())
            closed, st.gap_id = st.gap_id, None
            for hook in self.on_outage_closed:
                hook(st.name, closed)
        if was_down:
            log.info("sink up again", sink=st.name, target=st.target)

    def _gauges(self, st: SinkState) -> None:
        failed = st.last.failed if (st.up is False and st.last is not None) else None
        if st.up is False and failed is None:
            failed = st.checks[0]
        passed = True
        for check in st.checks:
            if check == failed:
                passed = False
            self.metrics.sink_up.labels(sink=st.name, check=check).set(1 if passed else 0)

    def account(self) -> None:
        """Add the spool's traffic since the last call to every open outage (coverage)."""
        traffic = self.spool.take_traffic()
        targets = [st.coverage if st.gap_id is not None else st.pending
                   for st in self.states.values() if st.gap_id is not None or st.fails > 0]
        if not targets or not traffic:
            return
        for c in targets:
            for sid, (captured, shipped) in traffic.items():
                c.streams.add(sid.key)
                c.namespaces.add(sid.namespace)
                c.captured += captured
                c.shipped += shipped
        if self.clock() - self._last_flush >= COVERAGE_FLUSH_S:
            self.flush_coverage()

    def flush_coverage(self) -> None:
        self._last_flush = self.clock()
        for st in self.states.values():
            if st.gap_id is not None:
                self.ledger.update_gap(st.gap_id, extra=st.coverage.extra())

    def open_count(self) -> int:
        return sum(1 for st in self.states.values() if st.gap_id is not None)

    def all_up(self) -> bool:
        return all(st.up for st in self.states.values())
