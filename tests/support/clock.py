"""A fake clock for tests where real time is not the point: back-off, probe intervals, debounce.

The agent's timing code takes its clocks as keyword-only parameters (``clock=`` a monotonic
``() -> float``, ``wall_clock=`` a ``() -> datetime``, and for loops a ``sleep=`` shaped like
:func:`evidence_keeper.aiotasks.sleep_until`). :class:`FakeClock` is all three at once, and its
time moves only when a test calls :meth:`FakeClock.advance` or the code under test sleeps on
it. A test then states exactly what must have happened at which fake second, and runs in
milliseconds.

Why our own and not ``looptime`` (the pytest plugin that fast-forwards the asyncio loop's
time; evaluated for issue 11):

- looptime fakes ``loop.time()`` only. The code under test measures time with injected
  monotonic clocks (the shipper's breaker, the sink monitor) and dates gaps with the wall
  clock, so it would need injection anyway, just with ``loop.time`` as the clock.
- The probe round and the shipper hand their blocking work (SQLite ledger, store calls, file
  reads) to threads. While an executor runs, looptime moves fake time forward in real-time
  ``idle_step`` slices, so the fake time seen at each probe would grow by however long the
  threads took on a loaded machine: an assertion like "the second round ran at exactly
  t0 + interval" would be a lottery again. Here fake time moves only when the code sleeps.
- It would be one more test dependency in the hash-locked requirements (and a plugin that
  patches every marked test's event loop, the leak check's included) for a few lines here.

Anything that really waits on sockets or threads keeps the real clock; only the schedule is
fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

# A start far from zero: code that forgets to use the injected clock (or assumes it starts at
# 0) shows up at once.
START_MONO = 5000.0
START_WALL = datetime(2025, 11, 10, 12, 0, tzinfo=UTC)


class FakeClock:
    """Monotonic seconds and a matching UTC wall clock that move only when told to."""

    def __init__(self, *, start: float = START_MONO, wall: datetime = START_WALL) -> None:
        self.now = start
        self._start = start
        self._wall = wall
        self.sleeps: list[float] = []  # every sleep asked for, in order (what a loop waited)

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        """The wall clock: ``wall`` at the start, moved by exactly the fake seconds since."""
        return self._wall + timedelta(seconds=self.now - self._start)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock never goes back ({seconds})")
        self.now += seconds

    async def sleep_until(self, stop: asyncio.Event, seconds: float) -> bool:
        """:func:`evidence_keeper.aiotasks.sleep_until` on fake time: True if ``stop`` is set.

        The sleep is recorded, the clock jumps by it and the loop turns once, so other tasks
        (the test driving the loop) run between two ticks.
        """
        if stop.is_set():
            return True
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
        return stop.is_set()


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()
