"""The task kit: guarded loops restart and are counted, stops are prompt, hangs are named."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter

from evidence_keeper.aiotasks import guard, sleep_until, stop_tasks


def restarts_counter() -> Counter:
    return Counter("t_task_restarts", "test", ["task"], registry=CollectorRegistry())


def restarts_of(counter: Counter, task: str) -> float:
    return float(counter.labels(task=task)._value.get())


async def test_guard_restarts_a_failing_loop_and_counts_it() -> None:
    stop = asyncio.Event()
    calls = 0
    counter = restarts_counter()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("boom")
        stop.set()

    await asyncio.wait_for(guard("flaky", flaky, stop=stop, restarts=counter,
                                 backoff_s=0.001), timeout=10)
    assert calls == 3
    assert restarts_of(counter, "flaky") == 2


async def test_guard_treats_an_early_return_as_a_bug() -> None:
    stop = asyncio.Event()
    calls = 0
    counter = restarts_counter()

    async def returns_early() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()

    await asyncio.wait_for(guard("early", returns_early, stop=stop, restarts=counter,
                                 backoff_s=0.001), timeout=10)
    assert calls == 2
    assert restarts_of(counter, "early") == 1  # the first return; the second was on stop


async def test_guard_returns_at_once_when_stopped_during_backoff() -> None:
    stop = asyncio.Event()

    async def fails() -> None:
        stop.set()
        raise RuntimeError("fails while stopping")

    # A 1000 s back-off would hang the test if the stop were not honoured.
    await asyncio.wait_for(guard("fails", fails, stop=stop, backoff_s=1000), timeout=10)


async def test_guard_propagates_cancellation() -> None:
    stop = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(guard("forever", forever, stop=stop))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sleep_until_wakes_on_stop_and_times_out() -> None:
    stop = asyncio.Event()
    assert await sleep_until(stop, 0.001) is False
    asyncio.get_running_loop().call_soon(stop.set)
    assert await asyncio.wait_for(sleep_until(stop, 1000), timeout=10) is True
    assert await sleep_until(stop, 1000) is True  # already set: no wait at all


async def test_stop_tasks_names_the_task_that_hangs() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # ignores cancellation until released

    async def polite() -> None:
        await asyncio.sleep(3600)

    hang = asyncio.create_task(stubborn(), name="stubborn")
    ok = asyncio.create_task(polite(), name="polite")
    await asyncio.sleep(0)
    pending = await stop_tasks([hang, ok], within=0.2, interval=0.05)
    assert pending == {hang}
    assert ok.cancelled()
    release.set()
    hang.cancel()
    await asyncio.gather(hang, return_exceptions=True)
    assert hang.done()


async def test_stop_tasks_without_cancel_waits_for_a_natural_finish() -> None:
    done = asyncio.Event()

    async def finishes() -> None:
        await done.wait()

    task = asyncio.create_task(finishes(), name="finishes")
    asyncio.get_running_loop().call_later(0.05, done.set)
    pending = await stop_tasks([task], within=10, cancel=False)
    assert pending == set()
    assert not task.cancelled()
