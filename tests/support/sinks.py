"""A sink monitor on a fake clock with real parts: the real prober and resolver pool (fed by
:class:`~tests.support.dns.FlakyDNS`), a real SQLite ledger and spool, a scripted store.

Rounds are driven one at a time (:meth:`MonitorRig.round`) or by the monitor's own loop
(:meth:`MonitorRig.run`, which sleeps on the fake clock): either way no test waits for a
probe interval or a debounce window to pass in real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from evidence_keeper.health.ledger import GapRow, Ledger
from evidence_keeper.health.probes import Prober, Resolver, ResolverPool
from evidence_keeper.health.sinks import SinkMonitor
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.settings import SinkProbe
from tests.support.clock import FakeClock
from tests.support.dns import SINK_HOST
from tests.support.shipping import ScriptedStore, make_spool

DNS_SINK = SinkProbe(name="datadog", kind="dns", target=SINK_HOST, host=SINK_HOST, port=None)


class MonitorRig:
    def __init__(self, tmp_path: Path, clock: FakeClock, resolver: Resolver, *,
                 probes: Sequence[SinkProbe] = (DNS_SINK,), interval_s: float = 10.0,
                 down: int = 2, up: int = 1, timeout_s: float = 2.0) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.metrics = Metrics()
        self.losses: list[Loss] = []
        self.spool = make_spool(tmp_path / "spool", self.losses, metrics=self.metrics)
        self.ledger = Ledger(tmp_path / "ledger.db")
        self.store = ScriptedStore()
        self.resolvers = ResolverPool(resolver)
        self.monitor = SinkMonitor(
            probes, store=self.store, ledger=self.ledger, spool=self.spool,
            metrics=self.metrics, prober=Prober(self.resolvers, timeout_s, clock=clock),
            interval_s=interval_s, failures_before_down=down, successes_before_up=up,
            clock=clock, wall_clock=clock.wall)
        self.closed: list[tuple[str, int]] = []  # (sink, gap id) of every outage closed
        self.monitor.on_outage_closed.append(lambda sink, gap: self.closed.append((sink, gap)))

    async def round(self) -> None:
        """One probe round now, then the clock moves on by one probe interval."""
        await self.monitor.probe_round()
        self.clock.advance(self.interval_s)

    async def run(self, until: Callable[[], bool], *,
                  each_tick: Callable[[], None] | None = None,
                  within_s: float = 3600.0) -> None:
        """The monitor's own loop on the fake clock, stopped once ``until()`` holds or after
        ``within_s`` fake seconds (a loop that never probes ends too; the test's assertions
        then say what is missing)."""
        stop = asyncio.Event()
        give_up = self.clock() + within_s

        def sleep(ev: asyncio.Event, seconds: float) -> Awaitable[bool]:
            if each_tick is not None:
                each_tick()
            if until() or self.clock() >= give_up:
                ev.set()
            return self.clock.sleep_until(ev, seconds)

        await asyncio.wait_for(self.monitor.run(stop=stop, sleep=sleep), timeout=60)

    def up(self, check: str = "dns", sink: str = "datadog") -> float | None:
        value: float | None = self.metrics.registry.get_sample_value(
            "evidence_keeper_sink_up", {"sink": sink, "check": check})
        return value

    def outages(self, *, open_: bool | None = None) -> list[GapRow]:
        return self.ledger.gaps(kind="sink_outage", open_=open_)

    def capture(self, sid: StreamId, n: int) -> None:
        """``n`` bytes of ``sid`` made durable (captured) in the spool, as the tailer would."""
        with self.spool.lock:
            s = self.spool.stream(sid)
            assert self.spool.append(s, b"x" * (n - 1) + b"\n", now_mono=self.clock()) == n
        assert self.spool.commit()

    def close(self) -> None:
        self.monitor.close()
        self.resolvers.close()
        self.spool.close()
        self.ledger.close()
