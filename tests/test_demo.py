"""`make demo` is a deliverable: the replay must end with every stream byte-exact, the archive
verified and the PAYMENT_FAILED lines found in the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from evidence_keeper.demo import run_demo


def test_demo_tells_the_story_end_to_end(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(workdir=str(tmp_path / "demo"), speed=4.0) == 0
    out = capsys.readouterr().out
    assert "preflight failed" in out or "FAIL  sink datadog" in out
    assert "sink_outage" in out and "coverage" in out
    assert out.count("status updated to PAYMENT_FAILED") == 12  # found by search
    assert "every stream byte-exact: yes; archive verified: yes" in out
    assert "DIFFERS" not in out
