"""A fake clock for tests where real time is not the point: back-off, probe intervals, debounce.

The agent's timing code takes its clocks as keyword-only parameters (``clock=`` a monotonic
``() -> float``, ``wall_clock=`` a ``() -> datetime``, and for loops a ``sleep=`` shaped like
:func:`evidence_keeper.aiotasks.sleep_until`). :class:`FakeClock` is all three at once, and its
time moves only when a test calls :meth:`FakeClock.advance` or the code under test sleeps on
it. A test then states exactly what must have happened at which fake second, and runs in
milliseconds.

Why our own and not ``looptime`` (the pytest plugin that fast-forwards the asyncio loop's
time), evaluated for issue 11 with looptime 0.9 and pytest-asyncio 1.5: it works — the probe
loop run with ``clock=loop.time`` probed at exactly 0, 10, 20 … 50 loop seconds in 0.08 s —
but it buys nothing here and costs three things:

- It fakes ``loop.time()`` only. Gaps are dated with the wall clock and the breaker is a pure
  function of ``now``, so the code needs its clocks injected either way; with them injected,
  a fake clock that also provides the wall clock and the loop's sleep is a few lines.
- While a thread runs, looptime waits for it in *real* time (it cannot see inside the
  executor). The probes exist to survive hung threads (a stuck resolver, a stuck store
  check): a probe with a hung resolver and a 5 s timeout took 5.0 s of real time under
  looptime too. With :class:`FakeClock` a test chooses: the probe's own timeout stays real
  (short, where a hang is the point), the schedule around it is fake.
- One more dependency in the hash-locked requirements (``make venv`` refuses a pyproject
  dependency the lock lacks), for a plugin that patches the event loop of every marked test,
  the leak check's included.

Fake time here moves only when the code under test sleeps on it or the test advances it, so
"the third round ran at t0 + 2 * interval" is exact, never a matter of machine load.

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
