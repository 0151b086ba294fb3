"""The leaked-task check really runs: a test that leaks a task fails, a clean one passes."""

from __future__ import annotations

import os

import pytest

from tests.support.paths import REPO

LEAKY = '''
import asyncio

async def test_leaks_a_task():
    asyncio.create_task(asyncio.sleep(3600), name="forgotten-sleeper")

async def test_cleans_up():
    t = asyncio.create_task(asyncio.sleep(3600))
    t.cancel()

async def test_awaits_its_task():
    await asyncio.create_task(asyncio.sleep(0))

def test_sync_is_untouched():
    assert True
'''


def test_a_leaking_test_fails(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    root = REPO
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    pytester.makepyfile(test_leaky=LEAKY)
    pytester.makeini("[pytest]\nasyncio_mode = auto\n"
                     "asyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-p", "tests.leakcheck", "-q")
    result.assert_outcomes(passed=4, errors=1)  # teardown of the leaker errors
    result.stdout.fnmatch_lines(["*leaked 1 running asyncio task(s): forgotten-sleeper*"])
