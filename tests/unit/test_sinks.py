"""The sink monitor alone, on a fake clock: debounce, gap dating, coverage, the probe schedule.

Real prober and resolver pool (a scripted resolver), real ledger and spool; time is a
:class:`~tests.support.clock.FakeClock`, so each assertion names the exact fake second or
wall time a transition must carry, and nothing waits for an interval to pass.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.health.sinks import COVERAGE_FLUSH_S, Coverage
from evidence_keeper.model import StreamId
from evidence_keeper.settings import SinkProbe
from evidence_keeper.timefmt import rfc3339
from tests.support.clock import FakeClock
from tests.support.dns import SINK_HOST, FlakyDNS
from tests.support.sinks import MonitorRig

A = StreamId("shop", "orders-1", "uid-a", "orders", 0)
B = StreamId("billing", "invoice-1", "uid-b", "invoice", 0)


Factory = Callable[..., MonitorRig]


def iso(wall: datetime, plus_s: float = 0.0) -> str:
    """A time as the ledger stores it."""
    return rfc3339(wall + timedelta(seconds=plus_s))


@pytest.fixture
def rig_factory(tmp_path: Path, clock: FakeClock,
                dns: FlakyDNS) -> Iterator[Callable[..., MonitorRig]]:
    rigs: list[MonitorRig] = []

    def make(**kw: Any) -> MonitorRig:
        r = MonitorRig(tmp_path / str(len(rigs)), clock, kw.pop("resolver", dns), **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


# ------------------------------------------------------------------------------ debounce


async def test_down_after_n_failures_dated_from_the_first(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    rig = rig_factory(down=3)
    await rig.round()
    st = rig.monitor.states["datadog"]
    assert st.up is True and rig.up() == 1 and rig.outages() == []
    dns.broken.add(SINK_HOST)
    first_failure = clock.wall()
    for _ in range(2):
        await rig.round()
        # Not yet: a short blip is no outage, and the gauge keeps the debounced view.
        assert st.up is True and rig.up() == 1 and rig.outages() == []
    await rig.round()
    assert st.up is False and rig.up() == 0 and not rig.monitor.all_up()
    [gap] = rig.outages(open_=True)
    assert gap.start == iso(first_failure)  # what happened, not when the debounce gave in
    assert gap.fields["check"] == "dns" and gap.fields["reason"] == "dns_failed"
    assert "not known" in gap.fields["detail"] and gap.fields["sink"] == "datadog"
    assert rig.monitor.open_count() == 1 and dns.calls == 4


async def test_up_after_n_successes_dated_from_the_first_of_the_streak(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    rig = rig_factory(down=1, up=2)
    dns.broken.add(SINK_HOST)
    await rig.round()
    [gap] = rig.outages(open_=True)
    dns.broken.discard(SINK_HOST)
    await rig.round()  # one success: still down
    dns.broken.add(SINK_HOST)
    await rig.round()  # a failure ends that streak
    dns.broken.discard(SINK_HOST)
    streak = clock.wall()
    await rig.round()
    assert rig.outages(open_=True) == [gap] and rig.closed == []
    await rig.round()
    [closed] = rig.outages()
    assert closed.id == gap.id and closed.end == iso(streak)
    assert rig.closed == [("datadog", gap.id)]  # the backfill hook hears of it once
    assert rig.monitor.states["datadog"].up is True and rig.up() == 1


async def test_every_debounced_transition_opens_and_closes_exactly_one_gap(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    """Failing twice in every three with ``down=2``: each cycle is one outage, opened at its
    first failure and closed at the success after it."""
    rig = rig_factory(down=2, up=1)
    dns.pattern[SINK_HOST] = [True, True, False]
    t0 = clock.wall()
    for _ in range(9):
        await rig.round()
    gaps = rig.outages()
    step = rig.interval_s
    assert [(g.start, g.end) for g in gaps] == [
        (iso(t0, 3 * i * step), iso(t0, (3 * i + 2) * step)) for i in range(3)]
    assert dns.pattern_calls[SINK_HOST] == 9 and len(rig.closed) == 3


# ------------------------------------------------------------------------------ gauges


async def test_gauges_name_the_failing_check_and_pass_the_ones_before(
        rig_factory: Factory) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: the TCP check is refused at once
    sink = SinkProbe(name="loki", kind="http", target=f"http://{SINK_HOST}:{port}/ready",
                     host=SINK_HOST, port=port)
    rig = rig_factory(probes=[sink], down=1)
    await rig.round()
    assert [rig.up(c, "loki") for c in ("dns", "tcp", "http")] == [1, 0, 0]
    [gap] = rig.outages()
    assert gap.fields["check"] == "tcp" and gap.fields["reason"] == "tcp_failed"
    assert rig.up("file", "store") == 1


async def test_a_store_check_that_hangs_fails_at_once_the_next_time(
        rig_factory: Factory) -> None:
    release = threading.Event()
    calls = 0

    def hang() -> None:
        nonlocal calls
        calls += 1
        release.wait(30)

    rig = rig_factory(probes=(), down=2, timeout_s=0.2)  # the store alone: no DNS deadline
    rig.store.check = hang  # type: ignore[method-assign]
    try:
        await rig.round()
        first = rig.monitor.states["store"].last
        assert first is not None and first.error == "store check timed out after 0.2s"
        await rig.round()
        second = rig.monitor.states["store"].last
        assert second is not None and second.error == "the previous store check is still hanging"
        assert calls == 1  # no second thread piled up behind the stuck one
        [gap] = rig.outages()
        assert gap.fields["sink"] == "store" and gap.fields["check"] == "file"
    finally:
        release.set()


# ------------------------------------------------------------------------------ coverage


async def test_coverage_counts_from_the_first_failing_probe(
        rig_factory: Factory, dns: FlakyDNS) -> None:
    rig = rig_factory(down=2)
    await rig.round()
    rig.capture(A, 100)  # before the first failing probe: never counted
    dns.broken.add(SINK_HOST)
    await rig.round()
    rig.capture(B, 50)  # during the failing streak: kept aside, then the gap's
    await rig.round()
    st = rig.monitor.states["datadog"]
    assert st.gap_id is not None and st.coverage.captured == 50
    rig.capture(A, 30)  # while down
    await rig.round()
    assert (st.coverage.captured, sorted(st.coverage.namespaces), len(st.coverage.streams)) == (
        80, ["billing", "shop"], 2)
    dns.broken.discard(SINK_HOST)
    await rig.round()
    [gap] = rig.outages()
    assert not gap.open
    assert Coverage.from_extra(gap.fields["extra"]).to_json() == {
        "streams": 2, "namespaces": ["billing", "shop"], "captured_bytes": 80,
        "shipped_bytes": 0}


async def test_a_streak_that_ends_before_down_drops_its_traffic(
        rig_factory: Factory, dns: FlakyDNS) -> None:
    rig = rig_factory(down=2)
    await rig.round()
    dns.broken.add(SINK_HOST)
    await rig.round()
    rig.capture(A, 70)
    dns.broken.discard(SINK_HOST)
    await rig.round()  # the streak ended: its 70 bytes belong to no outage
    dns.broken.add(SINK_HOST)
    await rig.round()
    rig.capture(B, 5)
    await rig.round()
    st = rig.monitor.states["datadog"]
    assert st.gap_id is not None and st.coverage.captured == 5
    assert st.coverage.namespaces == {"billing"}


async def test_coverage_reaches_the_ledger_every_flush_period(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    rig = rig_factory(down=1)
    rig.monitor.flush_coverage()  # the period starts now
    dns.broken.add(SINK_HOST)
    await rig.monitor.probe_round()

    def stored() -> int:
        [gap] = rig.outages()
        return int(json.loads(gap.fields["extra"])["coverage"]["captured_bytes"])

    rig.capture(A, 40)
    clock.advance(COVERAGE_FLUSH_S - 0.5)
    rig.monitor.account()
    assert rig.monitor.states["datadog"].coverage.captured == 40
    assert stored() == 0  # held in memory (one write per period, not per tick)
    clock.advance(0.5)
    rig.capture(A, 2)
    rig.monitor.account()
    assert stored() == 42


# ------------------------------------------------------------------------------ restart


async def test_restore_reattaches_open_outages_and_ends_removed_ones(
        rig_factory: Factory, clock: FakeClock) -> None:
    rig = rig_factory()
    cov = Coverage({A.key}, {"shop"}, 123, 100)
    kept = rig.ledger.open_gap("sink_outage", dedup="sink_outage:datadog", at=clock.wall(),
                               sink="datadog", check="dns", extra=cov.extra())
    gone = rig.ledger.open_gap("sink_outage", dedup="sink_outage:old", at=clock.wall(),
                               sink="old", check="tcp")
    clock.advance(30)
    rig.monitor.restore()
    st = rig.monitor.states["datadog"]
    assert (st.gap_id, st.up, st.coverage) == (kept, False, cov)
    [removed] = [g for g in rig.outages() if g.id == gone]
    assert removed.end == iso(clock.wall())
    assert removed.fields["detail"] == "sink no longer probed (removed from sink_probes)"
    # The reattached outage ends with the first success, keeping its coverage.
    await rig.round()
    [closed] = [g for g in rig.outages() if g.id == kept]
    assert not closed.open and Coverage.from_extra(closed.fields["extra"]) == cov


# ------------------------------------------------------------------------------ the schedule


async def test_rounds_run_every_interval_and_coverage_every_second(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    rig = rig_factory(interval_s=10.0)
    t0 = clock()
    rounds_at: list[float] = []

    def tick() -> None:
        if len(rounds_at) < rig.monitor.rounds:
            rounds_at.append(clock())

    await rig.run(lambda: rig.monitor.rounds >= 4, each_tick=tick)
    assert rounds_at == [t0, t0 + 10, t0 + 20, t0 + 30]
    assert dns.calls == 4
    # Between rounds the loop wakes every second (coverage), and never later than a round.
    assert clock.sleeps == [1.0] * 30


@pytest.mark.parametrize(("interval", "sleep"), [(0.2, 0.2), (0.01, 0.05)])
async def test_short_intervals_sleep_until_the_next_round_never_below_the_floor(
        rig_factory: Factory, clock: FakeClock, interval: float, sleep: float) -> None:
    rig = rig_factory(interval_s=interval)
    await rig.run(lambda: rig.monitor.rounds >= 5)
    assert clock.sleeps == pytest.approx([sleep] * 4)


async def test_a_slow_round_does_not_push_the_schedule_back(
        rig_factory: Factory, clock: FakeClock, dns: FlakyDNS) -> None:
    def slow(host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        clock.advance(3.0)  # a resolver answering after three seconds
        return dns(host, port, *args, **kwargs)

    rig = rig_factory(interval_s=10.0, resolver=slow)
    t0 = clock()
    rounds_at: list[float] = []

    def tick() -> None:
        if len(rounds_at) < rig.monitor.rounds:
            rounds_at.append(clock())

    await rig.run(lambda: rig.monitor.rounds >= 3, each_tick=tick)
    # Each round ends 3 s after it started; the next still starts 10 s after the last start.
    assert rounds_at == [t0 + 3, t0 + 13, t0 + 23]
    assert rig.monitor.states["datadog"].last is not None
    assert rig.monitor.states["datadog"].last.latency_s == 3.0


async def test_a_stop_ends_the_loop_without_another_round(
        rig_factory: Factory, clock: FakeClock) -> None:
    rig = rig_factory(interval_s=10.0)
    await rig.run(lambda: True)
    assert rig.monitor.rounds == 1 and clock.sleeps == []

