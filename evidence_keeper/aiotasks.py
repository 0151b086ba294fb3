"""A small task kit: every long-lived coroutine of the agent runs through it.

Modelled on kopf's ``_cogs/aiokits/aiotasks.py``:

- :func:`guard` runs an *eternal* loop. Eternal means that returning is a bug, unless the
  agent is stopping: an unexpected normal finish is logged as an error and counted exactly
  like a failure (``evidence_keeper_task_restarts_total{task}``), and the loop is started again
  after a back-off (1 s doubling to 30 s). A loop that raises is logged with its traceback and
  restarted the same way, so one bad file or a full disk never stops capture.
- :func:`sleep_until` is the one way loops wait: it wakes early when the stop event is set and
  says which happened, so no loop sleeps through a shutdown.
- :func:`stop_tasks` cancels a set of tasks and waits for them, logging every ``interval``
  the ones that still hang, up to a deadline: a shutdown that stalls names the culprit.

Nothing here knows about the pipeline; the supervisor decides which tasks exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Final, Protocol

from evidence_keeper.logs import get_logger

log = get_logger("evidence_keeper.tasks")

BACKOFF_START_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0


class RestartCounter(Protocol):
    """What :func:`guard` needs of a metric: a counter labelled by task name."""

    def labels(self, *, task: str) -> _Incrementable: ...


class _Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


async def sleep_until(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set (now or meanwhile)."""
    if stop.is_set():
        return True
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def guard(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    stop: asyncio.Event,
    restarts: RestartCounter | None = None,
    backoff_s: float = BACKOFF_START_S,
    backoff_max_s: float = BACKOFF_MAX_S,
) -> None:
    """Run ``loop`` until ``stop`` is set, restarting it after a failure or early return.

    Cancellation propagates at once (the supervisor cancels only what is past its deadline).
    """
    delay = backoff_s
    while not stop.is_set():
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task failed; restarting", task=name, retry_in_s=delay)
        else:
            if stop.is_set():
                return
            log.error("task finished unexpectedly (a bug); restarting", task=name,
                      retry_in_s=delay)
        if restarts is not None:
            restarts.labels(task=name).inc()
        if await sleep_until(stop, delay):
            return
        delay = min(delay * 2, backoff_max_s)


async def stop_tasks(
    tasks: Collection[asyncio.Task[None]],
    *,
    within: float,
    interval: float = 5.0,
    cancel: bool = True,
) -> set[asyncio.Task[None]]:
    """Cancel (if ``cancel``) and wait for ``tasks`` up to ``within`` seconds.

    Every ``interval`` the tasks still running are logged by name. Returns the tasks that did
    not finish in time (they have been cancelled, but may still be unwinding).
    """
    pending = {t for t in tasks if not t.done()}
    if cancel:
        for t in pending:
            t.cancel()
    deadline = time.monotonic() + within
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(interval, left))
        if pending:
            log.warning("tasks still running", tasks=sorted(t.get_name() for t in pending),
                        left_s=round(max(0.0, deadline - time.monotonic()), 1))
    for t in pending:
        log.error("task did not stop in time", task=t.get_name())
        t.cancel()
    return pending
