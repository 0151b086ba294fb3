"""`make demo` is a deliverable: the replay must end with every stream byte-exact, the archive
verified, the PAYMENT_FAILED lines found in the store and backfilled into a local Datadog
intake once the DNS fix closes the outage."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from evidence_keeper.cli import main as cli_main
from evidence_keeper.demo import run_demo
from evidence_keeper.sim.scenario import PAYMENT_FAILED_MARKER


def test_demo_tells_the_story_end_to_end(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(workdir=str(tmp_path / "demo"), speed=4.0) == 0
    out = capsys.readouterr().out
    assert "cluster preflight FAILED: 2 of 2 nodes" in out
    assert ("node ip-10-0-1-57.ec2.internal: no evidence-keeper agent — logs on this node are"
            " not preserved") in out
    assert "node ip-10-0-1-23.ec2.internal: sink datadog" in out
    assert "gaps on 1 node " in out and "verified: 1 node," in out  # the ledger, from the store
    assert "sink_outage" in out and "coverage" in out
    # 12 found by search in the store, and the same 12 backfilled into the local Datadog.
    assert out.count("status updated to PAYMENT_FAILED") == 24
    assert "PAYMENT_FAILED lines in Datadog after the DNS fix: 12" in out
    assert "PAYMENT_FAILED lines backfilled into Datadog: 12 of 12; intake violations: 0" in out
    assert "every stream byte-exact: yes; archive verified: yes" in out
    assert "DIFFERS" not in out

    # The closing ``Try: evidence-keeper export --config …`` runs once the demo (and its S3
    # endpoint) is gone: the demo leaves a file:// copy of its evidence and points at it.
    # (In the same test: moto's S3 state is per process, a second demo would see the first's.)
    hint = next(ln for ln in out.splitlines() if ln.strip().startswith("Try: "))
    argv = shlex.split(hint.strip()[len("Try: "):])
    assert argv[0] == "evidence-keeper" and "<" not in hint, hint
    exported = tmp_path / "exported.log"
    assert cli_main([*argv[1:], "-o", str(exported)]) == 0
    assert PAYMENT_FAILED_MARKER in exported.read_bytes()
    config = argv[argv.index("--config") + 1]
    assert "store_url: file://" in Path(config).read_text()
    capsys.readouterr()
    assert cli_main(["search", "--config", config, "-F", "PAYMENT_FAILED", "-n",
                     "sock-shop"]) == 0
    assert capsys.readouterr().out.count("status updated to PAYMENT_FAILED") == 12
