"""Shared fixtures: settings for a temporary node, an in-process agent, leak checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.supervisor import Agent


@pytest.fixture(autouse=True)
def _no_leaked_tasks() -> Iterator[None]:
    """Fail a test that leaves asyncio tasks running behind it (kopf's conftest habit)."""
    yield
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    current = asyncio.current_task(loop)
    leaked = [t for t in asyncio.all_tasks(loop) if t is not current and not t.done()]
    assert not leaked, f"leaked tasks: {leaked}"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "node_name": "node-1",
            "log_root": str(tmp_path / "pods"),
            "spool_dir": str(tmp_path / "spool"),
            "store_url": f"file://{tmp_path / 'store'}",
            "kubernetes": "off",
            "flush_interval_s": 1.0,
            "discover_interval_s": 0.2,
            "tail_interval_s": 0.05,
            "commit_interval_s": 0.1,
            "shutdown_timeout_s": 20,
            "log_level": "warning",
        }
        base.update(overrides)
        (tmp_path / "pods").mkdir(exist_ok=True)
        return load_settings(None, environ={}, overrides=base)

    return make


@contextlib.asynccontextmanager
async def running_agent(settings: Settings, **kwargs: Any) -> AsyncIterator[Agent]:
    """An agent running in this event loop; stopped (ordered shutdown) on exit."""
    agent = Agent(settings, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        for _ in range(200):
            if agent.status.tailing or task.done():
                break
            await asyncio.sleep(0.02)
        if task.done():
            task.result()
        yield agent
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=60)
        finally:
            agent.close()
