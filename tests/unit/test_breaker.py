"""The shipper's circuit breaker and back-off, on a fake clock: no sleeps, exact seconds.

Closed while the store works (every ready segment may start); open after a failure for a
jittered back-off (nothing starts); half-open once the back-off is over (exactly one upload
tries); a success closes it. The back-off doubles from ``backoff_initial_s`` up to
``backoff_max_s`` with full jitter in the upper half: ``[ceiling / 2, ceiling]``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.ship.shipper import Breaker, ShipConfig, Shipper
from evidence_keeper.store import StoreError
from tests.conftest import wait_until
from tests.support.clock import FakeClock
from tests.support.shipping import ScriptedStore, add_segment, make_spool, settle


class EdgeRandom(random.Random):
    """Jitter pinned to one end of its range (``high``: the full ceiling, else half of it)."""

    def __init__(self, *, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def delays(breaker: Breaker, clock: FakeClock, n: int) -> list[float]:
    return [breaker.failed(clock()) for _ in range(n)]


# ------------------------------------------------------------------------------ the breaker


def test_closed_allows_everything(clock: FakeClock) -> None:
    b = Breaker(0.5, 30.0)
    assert b.allows(clock(), 0) and b.allows(clock(), 7)


def test_open_then_half_open_lets_exactly_one_upload_try(clock: FakeClock) -> None:
    b = Breaker(0.5, 30.0, rng=EdgeRandom(high=True))
    assert b.failed(clock()) == 0.5
    assert b.open_until == clock() + 0.5
    assert not b.allows(clock(), 0)  # open
    clock.advance(0.49)
    assert not b.allows(clock(), 0)
    clock.advance(0.01)
    assert b.allows(clock(), 0)  # half-open: one probe upload
    assert not b.allows(clock(), 1)  # ... and only while nothing else is in flight
    # The probe fails: open again, for twice as long, counted from the probe's failure.
    clock.advance(0.2)
    assert b.failed(clock()) == 1.0 and b.open_until == clock() + 1.0
    assert not b.allows(clock() + 0.99, 0) and b.allows(clock() + 1.0, 0)


def test_a_success_closes_and_resets_the_backoff(clock: FakeClock) -> None:
    b = Breaker(0.5, 30.0, rng=EdgeRandom(high=True))
    assert delays(b, clock, 4) == [0.5, 1.0, 2.0, 4.0]
    b.succeeded()
    assert b.failures == 0 and b.open_until == 0.0
    assert b.allows(clock(), 3)
    assert b.failed(clock()) == 0.5  # starts over from the initial back-off


def test_backoff_doubles_up_to_the_cap(clock: FakeClock) -> None:
    high = Breaker(0.5, 30.0, rng=EdgeRandom(high=True))
    assert delays(high, clock, 9) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    low = Breaker(0.5, 30.0, rng=EdgeRandom(high=False))
    assert delays(low, clock, 9) == [0.25, 0.5, 1, 2, 4, 8, 15, 15, 15]
    # Hundreds of failures (a store down for a day) neither overflow nor exceed the cap.
    assert delays(Breaker(0.5, 30.0, rng=EdgeRandom(high=True)), clock, 2000)[-1] == 30


def test_jitter_stays_in_the_upper_half_and_spreads(clock: FakeClock) -> None:
    b = Breaker(0.5, 30.0, rng=random.Random(11))
    ds = delays(b, clock, 400)
    for i, d in enumerate(ds):
        ceiling = min(30.0, 0.5 * 2 ** i)
        assert ceiling / 2 <= d <= ceiling, (i, d)
    capped = ds[10:]
    # Full jitter: agents that failed together do not retry together.
    assert min(capped) < 17 and max(capped) > 28 and len(set(capped)) == len(capped)


# ------------------------------------------------------------------------------ the shipper

STREAMS = [StreamId("shop", f"pod-{i}", f"uid-{i}", "app", 0) for i in range(3)]


class Rig:
    def __init__(self, tmp_path: Path, clock: FakeClock) -> None:
        self.losses: list[Loss] = []
        self.spool = make_spool(tmp_path / "spool", self.losses)
        self.store = ScriptedStore()
        self.shipper = Shipper(self.spool, self.store,
                               ShipConfig(node="n", cluster="c", concurrency=4),
                               metrics=Metrics(), clock=clock)
        self.shipper.breaker = Breaker(0.5, 30.0, rng=EdgeRandom(high=True))
        for sid in STREAMS:
            add_segment(self.spool, sid, f"{sid.pod} line\n".encode())

    async def attempt(self) -> int:
        started = self.shipper.launch()
        await settle(self.shipper)
        return started


@pytest.fixture
def rig(tmp_path: Path, clock: FakeClock) -> Iterator[Rig]:
    r = Rig(tmp_path, clock)
    yield r
    r.shipper.close()


async def test_an_unreachable_store_gets_one_request_per_backoff(
        rig: Rig, clock: FakeClock) -> None:
    rig.store.down = StoreError("connect timeout")
    assert await rig.attempt() == 3  # closed: every stream tries at once
    assert len(rig.store.ops("put")) == 3 and rig.shipper.breaker.failures == 3
    # Three failures: open for 2 s (0.5 doubled twice, jitter pinned high).
    assert rig.shipper.breaker.open_until == clock() + 2.0
    assert await rig.attempt() == 0
    clock.advance(1.99)
    assert await rig.attempt() == 0
    clock.advance(0.01)
    assert await rig.attempt() == 1  # half-open: one request, not three
    assert len(rig.store.ops("put")) == 4
    assert rig.shipper.breaker.open_until == clock() + 4.0
    for backoff in (8.0, 16.0, 30.0, 30.0):
        clock.advance(rig.shipper.breaker.open_until - clock())
        assert await rig.attempt() == 1
        assert rig.shipper.breaker.open_until == clock() + backoff
    assert len(rig.store.ops("put")) == 8
    assert rig.shipper.store_up is False
    assert all(not seg.inflight and not seg.shipped
               for s in rig.spool.streams.values() for seg in s.sealed)


async def test_the_first_success_reopens_the_whole_queue(rig: Rig, clock: FakeClock) -> None:
    rig.store.down = StoreError("connect timeout")
    await rig.attempt()
    clock.advance(rig.shipper.breaker.open_until - clock())
    rig.store.down = None  # the store is back
    assert await rig.attempt() == 1  # still half-open: one upload finds out
    assert rig.shipper.breaker.failures == 0 and rig.shipper.store_up is True
    assert await rig.attempt() == 2  # closed: the rest at once, no waiting
    assert all(not s.sealed for s in rig.spool.streams.values())


async def test_the_idle_wait_follows_the_backoff(rig: Rig, clock: FakeClock) -> None:
    assert rig.shipper._idle_timeout() == 0.5  # closed: poll twice a second
    rig.store.down = StoreError("connect timeout")
    await rig.attempt()
    assert rig.shipper._idle_timeout() == 2.0  # open: sleep until the half-open probe
    clock.advance(1.98)
    assert rig.shipper._idle_timeout() == pytest.approx(0.05)  # never a busy loop
    clock.advance(5)
    assert rig.shipper._idle_timeout() == 0.05


async def test_a_store_down_all_night_keeps_its_backoff(rig: Rig, clock: FakeClock) -> None:
    """About 1000 failures in a row (seven hours at the cap) once overflowed ``2 ** n``: the
    error escaped the upload task, the breaker never closed its window again and the store
    got a request every 50 ms."""
    rig.store.down = StoreError("connect timeout")
    rig.shipper.breaker.failures = 3000
    assert await rig.attempt() == 1
    assert rig.shipper.breaker.failures == 3001
    assert rig.shipper.breaker.open_until == clock() + 30.0
    assert rig.shipper.last_error == "connect timeout"
    clock.advance(29.9)
    assert await rig.attempt() == 0


async def test_the_store_seen_back_ends_the_backoff_at_once(rig: Rig, clock: FakeClock) -> None:
    """The store probe closes the store's outage: one upload is tried now, not at the end of
    a 30 s back-off, and the whole queue follows once it succeeds. A store that answers the
    probe but still refuses uploads keeps its failure count and backs off further."""
    rig.store.down = StoreError("connect timeout")
    rig.shipper.breaker.failures = 20
    assert await rig.attempt() == 1
    assert rig.shipper.breaker.open_until == clock() + 30.0
    rig.shipper.retry_now()
    assert rig.shipper.wakeup.is_set()
    assert await rig.attempt() == 1  # half-open now: one request
    assert rig.shipper.breaker.failures == 22  # still refused: the back-off goes on
    rig.store.down = None
    rig.shipper.retry_now()
    assert await rig.attempt() == 1
    assert rig.shipper.breaker.failures == 0 and rig.shipper.store_up is True
    assert await rig.attempt() == 2


async def test_only_the_store_outage_wakes_the_shipper_from_the_monitor_thread(
        rig: Rig, clock: FakeClock) -> None:
    rig.store.down = StoreError("connect timeout")
    await rig.attempt()
    run = asyncio.create_task(rig.shipper.run(), name="ship")
    try:
        await asyncio.sleep(0)  # run() takes the loop
        await asyncio.to_thread(rig.shipper.outage_closed, "datadog", 1)
        await asyncio.sleep(0)
        assert rig.shipper.breaker.open_until > clock()  # another sink: nothing changes
        await asyncio.to_thread(rig.shipper.outage_closed, "store", 2)
        await wait_until(lambda: rig.shipper.breaker.open_until == 0.0 or
                         len(rig.store.ops("put")) > 3, within=5,
                         what="the store outage's close to reach the shipper")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
