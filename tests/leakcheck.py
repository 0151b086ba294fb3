"""A pytest plugin that fails any test leaving asyncio tasks running behind it.

kopf's conftest habit (``_no_asyncio_pending_tasks``), made to work with pytest-asyncio: the
fixture is *async*, so its teardown runs inside the test's own event loop, after the test body
and before pytest-asyncio closes that loop. A sync fixture would ask for the running loop after
the loop has stopped, find none and check nothing (the bug this module replaces).

Tasks alive before the test (a session-scoped server's, say) are not the test's. A task that is
merely finishing (cancelled at the end of the test body) gets a few loop turns to complete.
Leaked tasks are cancelled, so one leak does not cascade into the next test, and then reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

SETTLE_TURNS = 5


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    leaked: list[asyncio.Task[object]] = []
    for _ in range(SETTLE_TURNS):
        leaked = [t for t in asyncio.all_tasks() if t is not me and t not in before
                  and not t.done()]
        if not leaked:
            return
        await asyncio.sleep(0)
    for t in leaked:
        t.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    names = ", ".join(f"{t.get_name()} ({t.get_coro()!r})" for t in leaked)
    pytest.fail(f"the test leaked {len(leaked)} running asyncio task(s): {names}",
                pytrace=False)
