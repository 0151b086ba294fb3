"""Waits on the agent's own progress, for tests whose expectation depends on what the agent
has done by a given moment (never a fixed sleep: they fail loudly, naming what they waited for).
"""

from __future__ import annotations

from evidence_keeper.health.sinks import SinkMonitor
from tests.conftest import wait_until


async def probe_round_after(monitor: SinkMonitor, *, within: float = 30.0,
                            what: str = "a probe round") -> None:
    """Wait until a whole probe round that *started* after this call has been applied.

    A round dates what it sees (a gap's start or end) from its own start, so an event that
    must fall before a gap's edge needs a round that began after it: the round in flight at
    the call may have begun before, hence two increments of ``rounds``.
    """
    start = monitor.rounds
    await wait_until(lambda: monitor.rounds >= start + 2, within=within,
                     what=f"{what} (a sink probe round begun after the wait)", interval=0.02)
