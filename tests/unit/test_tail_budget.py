"""The descriptor budget: admission, the share kept for spool segments, the real count."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from evidence_keeper.tail.budget import FdBudget, count_open_fds, raise_nofile_limit


def test_files_leave_a_quarter_for_spool_segments() -> None:
    b = FdBudget(limit=1024, reserve=128, in_use=0)
    assert b.tail_max == 896
    b.in_use = 896 - 224
    assert not b.can_open()  # files stop at three quarters of the tail share
    assert b.can_open(segment=True)
    b.in_use = 896
    assert not b.can_open(segment=True)
    assert b.short and b.denied == 2


def test_pressure_and_measure(tmp_path: Path) -> None:
    b = FdBudget.from_process(reserve=64)
    start = b.in_use
    assert start == count_open_fds() > 0
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(5)]
    try:
        b.measure()
        assert b.in_use == start + 5
    finally:
        for fd in fds:
            os.close(fd)
    small = FdBudget(limit=100, reserve=20, in_use=10)
    assert not small.pressure
    small.opened(35)
    assert small.pressure  # more than half the tail share in use
    small.closed(40)
    assert small.in_use == 5


def test_the_reserve_is_capped_for_tiny_limits() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    b = FdBudget.from_process(reserve=10**9)
    assert b.reserve <= max(16, b.limit // 4)
    assert soft in (b.limit, resource.RLIM_INFINITY)


def test_start_up_raises_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from evidence_keeper.tail.budget import raise_nofile_limit\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=limit, check=True).stdout
    assert out.strip() == "(512, 512) (512, 512)"
    assert raise_nofile_limit()[0] >= 256  # idempotent in this process
