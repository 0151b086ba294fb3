"""Automatic backfill: a DNS outage of the Datadog intake closes, the agent replays its window.

The whole agent is the point here: a real agent tails a simulated node (line timestamps from
the wall clock, as on a node), probes the sink through a resolver whose DNS breaks and is
fixed, and replays the outage window into a strict local Datadog intake once the outage
closes. What arrives must be exactly the lines whose timestamps fall in the gap.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.api.client import call
from evidence_keeper.cli import main as cli_main
from evidence_keeper.settings import Settings
from evidence_keeper.sim.intakes import DatadogIntake
from evidence_keeper.sim.kubelet import KubeletSim
from tests.conftest import running_agent, wait_until
from tests.support.replay import as_json_text, expected_lines
from tests.support.waits import probe_round_after

SINK_HOST = "http-intake.logs.example.test"
API_KEY = "backfill-key-0123456789"


class BrokenDNS:
    def __init__(self) -> None:
        self.broken = False
        self.lock = threading.Lock()

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if self.broken and host == SINK_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]


def _ns(ts: str) -> int:
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def _backfill_settings(make_settings: Callable[..., Settings], tmp_path: Path, url: str, *,
                       on_recovery: str | list[str]) -> Settings:
    """An agent probing the Datadog sink's DNS quickly, backfilling into the intake at ``url``
    when it recovers (``replay_on_recovery`` in either form the settings take)."""
    key = tmp_path / "dd-api-key"
    key.write_text(API_KEY)
    return make_settings(
        sink_probes=f"datadog=dns:{SINK_HOST}", probe_interval_s=0.2, probe_timeout_s=1.0,
        probe_failures_before_down=2, probe_successes_before_up=1,
        replay_targets={"datadog": {"kind": "datadog", "url": url,
                                    "credentials_file": str(key)}},
        replay_on_recovery=on_recovery)


def backfill_state(agent: Any) -> dict[str, Any]:
    """The ``backfill`` of the newest sink outage, as ``/gaps`` shows it ({} before one)."""
    rows = agent.ledger.gaps(kind="sink_outage")
    return dict(rows[-1].to_json().get("backfill", {})) if rows else {}


async def test_backfill_after_a_dns_outage_closes(
        tmp_path: Path, make_settings: Callable[..., Settings],
        capsys: pytest.CaptureFixture[str]) -> None:
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    settings = _backfill_settings(make_settings, tmp_path, url, on_recovery=["datadog"])
    sim = KubeletSim(tmp_path / "pods", clock=lambda: datetime.now(UTC))
    sim.add_pod("sock-shop", "orders-1", containers=("orders",))
    sim.add_pod("sock-shop", "payment-1", containers=("payment",), fmt="docker")
    dns = BrokenDNS()
    try:
        async with running_agent(settings, resolver=dns) as agent:
            await wait_until(lambda: agent.sinks.states["datadog"].up is True, within=10,
                             what="the sink probed up")
            sim.write("sock-shop", "orders-1", "orders", "before the outage: already in Datadog")
            # The gap starts at the first failing probe round, dated from the round's start: a
            # round begun before this line was written, but resolving after the break, would
            # put the line inside the window. A round begun after it must pass first.
            await probe_round_after(agent.sinks, what="the line before the outage")
            assert agent.sinks.states["datadog"].up is True
            dns.broken = True
            await wait_until(lambda: bool(agent.ledger.gaps(kind="sink_outage", open_=True)),
                             within=10, what="the outage opened")
            for i in range(300):
                sim.write("sock-shop", "orders-1", "orders",
                          f"Order {i} status updated to PAYMENT_FAILED")
                if i % 10 == 0:
                    sim.write("sock-shop", "payment-1", "payment", f"refused {i}",
                              stream="stderr")
                if i % 100 == 0:
                    sim.write("sock-shop", "orders-1", "orders", b"bad \xff byte")
            # Likewise the end: the round that sees the sink again must have begun after the
            # last line, or the window would end before it. (Whether the agent has read the
            # lines yet is not the test's business: the backfill waits for their capture.)
            await probe_round_after(agent.sinks, what="the last line of the outage")
            assert agent.ledger.gaps(kind="sink_outage", open_=True)
            dns.broken = False

            def backfilled() -> bool:
                rows = agent.ledger.gaps(kind="sink_outage")
                return bool(rows) and rows[-1].to_json().get("backfill", {}).get(
                    "status") == "complete"

            await wait_until(backfilled, within=60, what="the backfill completed")
            sim.write("sock-shop", "orders-1", "orders", "after the fix: the agent ships it")
            assert agent.api_address is not None
            api = f"http://{agent.api_address[0]}:{agent.api_address[1]}"
            _, doc = await asyncio.to_thread(call, api, "/gaps", params={"kind": "sink_outage"})
            metrics = agent.metrics.registry.get_sample_value(
                "evidence_keeper_replayed_lines_total", {"target": "datadog"})
            # A manual replay of the same gap shares the backfill's checkpoints: nothing again.
            cfg = tmp_path / "cli.yaml"
            cfg.write_text(
                f"spool_dir: {settings.spool_dir}\nstore_url: {settings.store_url}\n"
                f"node_name: node-1\nreplay_targets:\n  datadog:\n    kind: datadog\n"
                f"    url: {url}\n    credentials_file: {tmp_path / 'dd-api-key'}\n")
            gap_id = str(doc["gaps"][-1]["id"])
            before = len(intake.entries)
            rc = await asyncio.to_thread(cli_main, [
                "replay", "--config", str(cfg), "--to", "datadog", "--gap", gap_id, "--url", api,
                "-o", "json"])
            assert rc == 0 and len(intake.entries) == before
            manual = json.loads(capsys.readouterr().out)
    finally:
        await intake.stop()
    gap = doc["gaps"][-1]
    start, end = _ns(gap["start"]), _ns(gap["end"])
    want: Counter[Any] = Counter()
    for sid in sim.streams():
        for stream, ts, msg in expected_lines(sim.record(sid)):
            if start <= ts <= end:
                want[(sid.pod, stream, ts // 1_000_000, as_json_text(msg))] += 1
    got = Counter((dict(t.split(":", 1) for t in e["ddtags"].split(","))["pod_name"],
                   e["evidence_keeper"]["stream"], e["timestamp"], e["message"])
                  for e in intake.entries)
    assert intake.violations == []
    assert sum(want.values()) >= 330
    assert got == want
    assert gap["backfill"]["status"] == "complete"
    assert gap["backfill"]["lines"] == sum(want.values()) == metrics
    assert manual["lines"] == 0 and manual["already_replayed"] == metrics
    assert gap["backfill"]["bytes"] > 0 and gap["backfill"]["paths"] == {"intake": metrics}
    assert not any("before the outage" in e["message"] or "after the fix" in e["message"]
                   for e in intake.entries)


async def test_backfill_interrupted_by_a_restart_resumes_once(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    settings = _backfill_settings(make_settings, tmp_path, url, on_recovery="datadog")
    sim = KubeletSim(tmp_path / "pods", clock=lambda: datetime.now(UTC))
    sim.add_pod("sock-shop", "orders-1", containers=("orders",))
    dns = BrokenDNS()
    dns.broken = True
    intake.drop_request = lambda n: n >= 2  # the sink falters again after one batch

    try:
        async with running_agent(settings, resolver=dns) as agent:
            await wait_until(lambda: bool(agent.ledger.gaps(kind="sink_outage", open_=True)),
                             within=10, what="the outage opened")
            for i in range(2500):
                sim.write("sock-shop", "orders-1", "orders", f"Order {i} PAYMENT_FAILED")
            await probe_round_after(agent.sinks, what="the last line of the outage")
            dns.broken = False
            await wait_until(lambda: intake.requests >= 3, within=60,
                             what="the backfill delivered one batch, then met a faltering sink")
            assert backfill_state(agent)["status"] == "running"
        # Stopped mid-backfill: the ledger says so; the next start resumes it.
        intake.drop_request = lambda n: False
        async with running_agent(settings, resolver=dns) as agent:
            await wait_until(lambda: backfill_state(agent).get("status") == "complete", within=60,
                             what="the resumed backfill completed")
            doc = backfill_state(agent)
            gap = agent.ledger.gaps(kind="sink_outage")[-1].to_json()
    finally:
        await intake.stop()
    start, end = _ns(gap["start"]), _ns(gap["end"])
    want = Counter(msg.decode() for sid in sim.streams()
                   for _s, ts, msg in expected_lines(sim.record(sid)) if start <= ts <= end)
    got = Counter(e["message"] for e in intake.entries)
    assert intake.violations == []
    assert sum(want.values()) == 2500
    assert got == want  # every line once: the first run's batch was not sent again
    assert doc["lines"] == 2500 - 1000  # the resumed run sent what the first had not
    assert doc["already_replayed"] == 1000


async def test_lines_still_unread_when_the_outage_closes_are_backfilled(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """The window's last lines may be on the node but not yet captured when the probe sees the
    sink again (here a polling tailer, 0.9 s between reads): the backfill waits for the
    capture bound before it seals, instead of calling itself complete without them."""
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    key = tmp_path / "dd-api-key"
    key.write_text(API_KEY)
    settings = make_settings(
        sink_probes=f"datadog=dns:{SINK_HOST}", probe_interval_s=0.2, probe_timeout_s=1.0,
        probe_failures_before_down=2, probe_successes_before_up=1,
        watch_mode="poll", tail_interval_s=0.9,
        replay_targets={"datadog": {"kind": "datadog", "url": url,
                                    "credentials_file": str(key)}},
        replay_on_recovery=["datadog"])
    sim = KubeletSim(tmp_path / "pods", clock=lambda: datetime.now(UTC))
    sim.add_pod("sock-shop", "orders-1", containers=("orders",))
    dns = BrokenDNS()
    dns.broken = True

    try:
        async with running_agent(settings, resolver=dns) as agent:
            await wait_until(lambda: bool(agent.ledger.gaps(kind="sink_outage", open_=True)),
                             within=10, what="the outage opened")
            for i in range(100):
                sim.write("sock-shop", "orders-1", "orders", f"Order {i} PAYMENT_FAILED")
            await probe_round_after(agent.sinks, what="the last line of the outage")
            dns.broken = False
            await wait_until(lambda: backfill_state(agent).get("status") == "complete", within=60,
                             what="the backfill completed")
            gap = agent.ledger.gaps(kind="sink_outage")[-1].to_json()
    finally:
        await intake.stop()
    start, end = _ns(gap["start"]), _ns(gap["end"])
    want = Counter(msg.decode() for sid in sim.streams()
                   for _s, ts, msg in expected_lines(sim.record(sid)) if start <= ts <= end)
    assert sum(want.values()) == 100
    assert Counter(e["message"] for e in intake.entries) == want
    assert gap["backfill"]["lines"] == 100
