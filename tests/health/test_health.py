"""Sink probes, sink_outage gaps with coverage, agent_down, /gaps and the gaps/preflight CLI.

Whole-agent tests stay where the whole agent is the point (coverage from the real pipeline, a
restart, the HTTP API and the CLI); they wait on conditions, never on the clock. The timing of
probes and debounce is checked on a fake clock: here (flapping) and in tests/unit/test_sinks.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from evidence_keeper.api.client import call
from evidence_keeper.cli import main as cli_main
from evidence_keeper.health.probes import Prober, ResolverPool
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.timefmt import parse_rfc3339
from tests.conftest import AgentThread, running_agent, wait_until
from tests.support.clock import FakeClock
from tests.support.dns import SINK_HOST, FlakyDNS
from tests.support.sinks import MonitorRig


@pytest.fixture
def tcp_sink() -> Iterator[int]:
    """A loopback TCP listener standing in for the sink's intake."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


async def test_dns_probe_fails_and_recovers(dns: FlakyDNS) -> None:
    pool = ResolverPool(dns)
    prober = Prober(pool, timeout=1.0)
    try:
        assert (await prober.dns(SINK_HOST)).ok
        dns.broken.add(SINK_HOST)
        res = await prober.dns(SINK_HOST)
        assert not res.ok and res.failed == "dns" and "not known" in (res.error or "")
    finally:
        pool.close()


async def test_tcp_probe_names_the_failing_check(dns: FlakyDNS, tcp_sink: int) -> None:
    pool = ResolverPool(dns)
    prober = Prober(pool, timeout=1.0)
    try:
        assert (await prober.tcp(SINK_HOST, tcp_sink)).ok
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        res = await prober.tcp(SINK_HOST, port)
        assert not res.ok and res.failed == "tcp"
        dns.broken.add(SINK_HOST)
        assert (await prober.tcp(SINK_HOST, tcp_sink)).failed == "dns"
    finally:
        pool.close()


async def test_http_probe_checks_status(dns: FlakyDNS) -> None:
    from aiohttp import web

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_get("/down", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = ResolverPool(dns)
    prober = Prober(pool, timeout=2.0)
    try:
        assert (await prober.http(f"http://{SINK_HOST}:{port}/")).ok
        res = await prober.http(f"http://{SINK_HOST}:{port}/down")
        assert not res.ok and res.failed == "http" and "503" in (res.error or "")
    finally:
        pool.close()
        await runner.cleanup()


async def test_hanging_resolver_answers_within_deadline(dns: FlakyDNS) -> None:
    dns.hang.add(SINK_HOST)
    pool = ResolverPool(dns, max_threads=2)
    prober = Prober(pool, timeout=0.5)
    try:
        started = time.monotonic()
        results = [await prober.dns(SINK_HOST) for _ in range(4)]
        elapsed = time.monotonic() - started
        assert elapsed < 4 * 0.5 + 1.0
        assert all(not r.ok and r.failed == "dns" for r in results)
        # Once every resolver thread is stuck, probes fail at once instead of queueing.
        assert "hung" in (results[-1].error or "")
    finally:
        dns.release.set()
        pool.close()


def _settings(make_settings: Callable[..., Settings], **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "sink_probes": f"datadog=dns:{SINK_HOST}",
        "probe_interval_s": 0.2,
        "probe_timeout_s": 1.0,
        "probe_failures_before_down": 2,
        "probe_successes_before_up": 1,
    }
    base.update(kw)
    return make_settings(**base)


def _gauge(agent: Any, name: str, **labels: str) -> float | None:
    value: float | None = agent.metrics.registry.get_sample_value(name, labels)
    return value


def _wait(cond: Callable[[], bool], *, within: float, what: str) -> None:
    """For the tests whose agent runs in a thread: poll ``cond``, fail loudly on timeout."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.02)


def _when(stamp: str) -> datetime:
    ts = parse_rfc3339(stamp)
    assert ts is not None, stamp
    return ts


async def test_dns_outage_opens_and_closes_gap_with_coverage(
    tmp_path: Path, make_settings: Callable[..., Settings], dns: FlakyDNS
) -> None:
    """The whole pipeline: what the agent captures and ships during a DNS outage is the gap's
    coverage, served by /gaps, and the gauges follow.

    The debounce's timing (down after N failures, the gap dated from the first failing probe,
    closed at the first success) is checked to the fake second in tests/unit/test_sinks.py;
    here only the order of events is, which no machine load can break.
    """
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("sock-shop", "orders-1", containers=("orders",))
    interval = timedelta(seconds=0.2)
    async with running_agent(_settings(make_settings), resolver=dns) as agent:
        await wait_until(lambda: _gauge(agent, "evidence_keeper_sink_up", sink="datadog",
                                        check="dns") == 1,
                         within=10, what="the first successful DNS probe")
        broken_at = datetime.now(UTC)
        dns.broken.add(SINK_HOST)
        await wait_until(lambda: bool(agent.ledger.gaps(kind="sink_outage", open_=True)),
                         within=10, what="the sink_outage gap to open")
        seen_open = datetime.now(UTC)
        assert _gauge(agent, "evidence_keeper_sink_up", sink="datadog", check="dns") == 0
        for i in range(20):
            sim.write("sock-shop", "orders-1", "orders", f"Order {i} status PAYMENT_FAILED")
        size = len(sim.record(sim.streams()[0]))

        def covered() -> bool:
            c = agent.sinks.states["datadog"].coverage
            return c.captured == size and c.shipped == size

        await wait_until(covered, within=30, what=f"{size} bytes captured and shipped")
        rows = await agent.gap_rows(kind="sink_outage", open_=True)
        assert len(rows) == 1
        gap = rows[0]
        assert gap["sink"] == "datadog" and gap["check"] == "dns" and gap["open"]
        assert gap["coverage"] == {"streams": 1, "namespaces": ["sock-shop"],
                                   "captured_bytes": size, "shipped_bytes": size}
        fixed_at = datetime.now(UTC)
        dns.broken.discard(SINK_HOST)
        await wait_until(lambda: not agent.ledger.gaps(kind="sink_outage", open_=True),
                         within=10, what="the sink_outage gap to close")
        seen_closed = datetime.now(UTC)
        closed = await agent.gap_rows(kind="sink_outage")
        assert len(closed) == 1 and not closed[0]["open"]
        # A round dates its results when it starts: at most one interval before the change.
        assert broken_at - interval <= _when(closed[0]["start"]) <= seen_open
        assert fixed_at - interval <= _when(closed[0]["end"]) <= seen_closed
        assert closed[0]["coverage"]["captured_bytes"] == size
        assert _gauge(agent, "evidence_keeper_sink_up", sink="datadog", check="dns") == 1
        assert _gauge(agent, "evidence_keeper_sink_up", sink="store", check="file") == 1


async def test_flapping_is_debounced(tmp_path: Path, clock: FakeClock, dns: FlakyDNS) -> None:
    """Two failed probes in every three, never three in a row: no outage, the sink stays up.

    The monitor's own loop with the real prober, on a fake clock: it must have probed the
    sink exactly 18 times, one every 0.2 fake seconds, so it cannot pass by probing nothing;
    the gauge, read at every tick of the loop, never showed the sink down. The same flapping
    with a debounce of two is an outage every cycle: the failures do reach the monitor.
    """
    dns.pattern[SINK_HOST] = [False, True, True]
    rig = MonitorRig(tmp_path / "three", clock, dns, interval_s=0.2, down=3, up=1)
    seen: list[float | None] = []
    t0 = clock()
    try:
        await rig.run(lambda: rig.monitor.rounds >= 18, within_s=60,
                      each_tick=lambda: seen.append(rig.up()))
        assert dns.pattern_calls.get(SINK_HOST, 0) == 18 and rig.monitor.rounds == 18
        assert clock() - t0 == pytest.approx(17 * 0.2)
        assert seen == [1.0] * 18
        assert rig.outages() == [] and rig.monitor.states["datadog"].up is True
    finally:
        rig.close()

    twice = FlakyDNS()
    twice.pattern[SINK_HOST] = [False, True, True]
    control = MonitorRig(tmp_path / "two", clock, twice, interval_s=0.2, down=2, up=1)
    try:
        await control.run(lambda: control.monitor.rounds >= 18, within_s=60)
        assert len(control.outages()) == 6
    finally:
        control.close()


def test_restart_records_agent_down_and_ledger_survives(
    tmp_path: Path, make_settings: Callable[..., Settings], dns: FlakyDNS
) -> None:
    settings = _settings(make_settings)
    dns.broken.add(SINK_HOST)
    with AgentThread(settings, resolver=dns) as t:
        ledger = t.agent.ledger
        _wait(lambda: len(ledger.gaps(kind="sink_outage", open_=True)) == 1, within=20,
              what="the sink_outage gap to open")
    dns.broken.discard(SINK_HOST)
    with AgentThread(settings, resolver=dns) as t:
        ledger = t.agent.ledger
        _wait(lambda: len(ledger.gaps(kind="sink_outage", open_=False)) == 1, within=20,
              what="the reattached outage to close")
        _, doc = call(t.url, "/gaps")
    kinds = [g["kind"] for g in doc["gaps"]]
    assert kinds.count("sink_outage") == 1 and kinds.count("agent_down") == 1
    down = next(g for g in doc["gaps"] if g["kind"] == "agent_down")
    assert down["reason"] == "stopped" and not down["open"]
    outage = next(g for g in doc["gaps"] if g["kind"] == "sink_outage")
    assert not outage["open"]  # the reattached outage closed when DNS worked again


def test_gaps_api_filters_and_errors(make_settings: Callable[..., Settings],
                                     dns: FlakyDNS) -> None:
    dns.broken.add(SINK_HOST)
    with AgentThread(_settings(make_settings), resolver=dns) as t:
        ledger = t.agent.ledger
        _wait(lambda: bool(ledger.gaps(kind="sink_outage", open_=True)), within=20,
              what="the sink_outage gap to open")
        _, doc = call(t.url, "/gaps", params={"kind": "sink_outage", "open": "true",
                                              "since": "10m"})
        assert doc["node"] == "node-1" and len(doc["gaps"]) == 1
        assert doc["gaps"][0]["end"] is None
        _, doc = call(t.url, "/gaps", params={"open": "false"})
        assert doc["gaps"] == []
        _, doc = call(t.url, "/gaps", params={"until": "2020-01-01T00:00:00Z"})
        assert doc["gaps"] == []
        for params, fragment in [
            ({"kind": "nope"}, "kind"), ({"since": "yesterday"}, "since"),
            ({"open": "maybe"}, "open"), ({"namespace": "Bad_NS"}, "namespace"),
            ({"bogus": "1"}, "unknown parameter"), ({"since": "1m", "until": "2h"}, "after"),
        ]:
            status, body = call(t.url, "/gaps", params=params, accept_status=(400,))
            assert status == 400 and fragment in body["error"], (params, body)
        status, body = call(t.url, "/nothing-here", accept_status=(404,))
        assert status == 404 and body == {"error": "not found"}
        status, ready = call(t.url, "/readyz")
        assert status == 200 and ready["ready"] is True
        assert {s["sink"] for s in ready["sinks"]} == {"datadog", "store"}


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    from evidence_keeper.settings import load_settings

    base = tmp_path_factory.mktemp("fuzz")
    (base / "pods").mkdir()
    settings = load_settings(None, environ={}, overrides={
        "log_root": str(base / "pods"), "spool_dir": str(base / "spool"),
        "listen": "127.0.0.1:0", "kubernetes": "off", "log_level": "error"})
    with AgentThread(settings) as t:
        yield t


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@hsettings(max_examples=150, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(
    st.sampled_from(["since", "until", "kind", "namespace", "open", "x", "since[]", ""]),
    st.one_of(_text, st.sampled_from(["30m", "2h", "true", "false", "loss", "0s",
                                      "2025-11-10T12:00:00Z", "9" * 30, "1e308", "-5m"])),
    max_size=4))
def test_gaps_query_fuzz_never_500(fuzz_agent: AgentThread, params: dict[str, str]) -> None:
    status, body = call(fuzz_agent.url, "/gaps", params=params, accept_status=(400,))
    assert status in (200, 400)
    assert isinstance(body, dict)
    assert ("gaps" in body) if status == 200 else ("error" in body)
    assert "Traceback" not in json.dumps(body)


def test_cli_gaps_and_preflight(make_settings: Callable[..., Settings], dns: FlakyDNS,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with AgentThread(_settings(make_settings), resolver=dns) as t:
        sinks = t.agent.sinks
        _wait(sinks.all_up, within=20, what="every sink to be up")
        assert cli_main(["preflight", "--url", t.url]) == 0
        assert "preflight passed" in capsys.readouterr().out
        dns.broken.add(SINK_HOST)
        _wait(lambda: sinks.states["datadog"].gap_id is not None, within=20,
              what="the datadog sink to go down (its outage recorded)")
        assert cli_main(["preflight", "--url", t.url]) == 1
        out = capsys.readouterr().out
        assert "FAIL" in out and "sink datadog" in out and "dns" in out
        assert cli_main(["gaps", "--url", t.url]) == 0
        table = capsys.readouterr().out
        assert "sink_outage" in table and "datadog dns" in table and "open" in table
        assert cli_main(["gaps", "--url", t.url, "--json", "--kind", "loss"]) == 0
        assert json.loads(capsys.readouterr().out)["gaps"] == []
    assert cli_main(["gaps", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the agent" in capsys.readouterr().err


async def test_metrics_endpoint_serves_contract_metrics(
    make_settings: Callable[..., Settings]
) -> None:
    async with running_agent(make_settings()) as agent, aiohttp.ClientSession() as http:
        assert agent.api_address is not None
        host, port = agent.api_address
        async with http.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for name in ("evidence_keeper_sink_up", "evidence_keeper_captured_bytes_total",
                 "evidence_keeper_shipped_bytes_total", "evidence_keeper_unshipped_bytes",
                 "evidence_keeper_oldest_unshipped_age_seconds",
                 "evidence_keeper_lost_bytes_total", "evidence_keeper_ship_latency_seconds",
                 "evidence_keeper_container_restarts_total", "evidence_keeper_previous_logs_total",
                 "evidence_keeper_open_gaps", "evidence_keeper_spool_errors_total",
                 "evidence_keeper_tailed_files"):
        assert f"# HELP {name.removesuffix('_total')}" in text, name
