"""Kubernetes awareness (issue 5) against a fake API server speaking the real wire protocol.

Every test drives :class:`KubeletSim` (the node's files) and :class:`FakeKube` (the API's view
of the same pods) together, runs a real agent with ``kubernetes: on`` and the official
``kubernetes.aio`` client pointed at the fake through a kubeconfig, and judges the store: each
stream exported from it must equal what was written, and outcomes, gaps and lifecycle records
must say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.discover.apilogs import ApiStream, parse_ts_ns
from evidence_keeper.discover.kube import KubeTuning
from evidence_keeper.discover.lifecycle import (
    LifecycleLedger,
    lifecycle_key,
    observe,
    parse_lines,
    parse_pod,
    read_lifecycle,
)
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from evidence_keeper.supervisor import Agent
from tests.conftest import (
    assert_bytes_equal,
    check_segments,
    export_bytes,
    loss_gaps,
    running_agent,
    stored_segments,
    wait_read,
    wait_until,
)
from tests.fakekube import FakeKube, render_kubelet_log

NS = "shop"
FAST = KubeTuning(
    watch_timeout_s=5, request_timeout_s=2.0, list_timeout_s=5.0, backoff_initial_s=0.2,
    backoff_max_s=1.0, poll_s=0.05, missing_after_s=2.0, lifecycle_flush_s=0.1,
    lifecycle_upload_s=0.3, release_after_s=3600.0, fallback_probe_s=0.5,
    follow_timeout_s=30.0, eof_settle_s=1.0,
)


# ------------------------------------------------------------------------------ harness
class Node:
    """The simulated node's files and the fake API's pod objects, changed in step."""

    def __init__(self, sim: KubeletSim, fake: FakeKube) -> None:
        self.sim = sim
        self.fake = fake

    def add_pod(self, pod: str, containers: tuple[str, ...] = ("app",), *,
                labels: dict[str, str] | None = None) -> str:
        self.sim.add_pod(NS, pod, containers=containers)
        uid = self.sim.pod_uid(NS, pod)
        self.fake.add_pod(NS, pod, uid=uid, containers=containers, labels=labels)
        return uid

    def restart(self, pod: str, container: str, *, reason: str = "Error",
                exit_code: int = 1) -> int:
        new = self.sim.restart(NS, pod, container)
        assert self.fake.restart_container(NS, pod, container, reason=reason,
                                           exit_code=exit_code) == new
        return new


@pytest.fixture
def kubeconfig_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[FakeKube], None]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    def point(fake: FakeKube) -> None:
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))

    return point


@pytest.fixture
def fake(kubeconfig_env: Callable[[FakeKube], None]) -> Iterator[FakeKube]:
    with FakeKube(node="node-1") as server:
        kubeconfig_env(server)
        yield server


@contextlib.asynccontextmanager
async def kube_agent(settings: Settings, *, tuning: KubeTuning = FAST) -> AsyncIterator[Agent]:
    """A running agent with the watcher's timings shortened; waits for the first list."""

    def prepare(agent: Agent) -> None:
        assert agent.kube is not None, "kubernetes: on must start the watcher"
        agent.kube.tuning = tuning

    async with running_agent(settings, prepare=prepare,
                             ready=lambda a: a.kube is not None and a.kube.synced) as agent:
        yield agent


def sample(agent: Agent, name: str, **labels: str) -> float:
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


def outcomes(agent: Agent, outcome: str) -> float:
    return sample(agent, "evidence_keeper_previous_logs_total", outcome=outcome)


def stored_exactly(store: FileStore, sid: StreamId, expected: bytes) -> bool:
    data, holes = export_bytes(store, sid)
    return data == expected and not holes


async def wait_all_stored(store: FileStore, expected: dict[StreamId, bytes], *,
                          within: float) -> None:
    def done() -> bool:
        return all(stored_exactly(store, sid, want) for sid, want in expected.items())

    try:
        await wait_until(done, within=within, what=f"{len(expected)} streams stored exactly",
                         interval=0.2)
    except AssertionError:
        for sid, want in expected.items():
            data, holes = export_bytes(store, sid)
            assert holes == [], f"{sid.key}: holes {holes}"
            assert_bytes_equal(data, want, sid.key)
        raise
    for sid in expected:
        check_segments(stored_segments(store, sid))


def following(agent: Agent, sim: KubeletSim, sid: StreamId) -> bool:
    """The API fallback has brought every line of ``sid`` written so far (as kubelet renders
    them with timestamps) into the spool."""
    s = agent.spool.streams.get(sid)
    want = len(render_kubelet_log(sim.record(sid), timestamps=True))
    return s is not None and s.next_offset >= want


def lifecycle_of(store: FileStore, uid: str, pod: str) -> list[dict[str, Any]]:
    return parse_lines(store.get(lifecycle_key("default", NS, pod, uid)))


# ------------------------------------------------------------------------------ end to end
async def test_restart_storm_every_previous_instance_complete(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    """20 containers restart 3 times each within a minute; kubelet deletes instance N-1 at
    every restart. Every instance is in the store byte for byte, and all 60 outcomes are
    ``complete``."""
    settings = make_settings(kubernetes="on")
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    pods = [f"web-{i}" for i in range(5)]
    containers = ("app", "sidecar", "proxy", "worker")
    for pod in pods:
        node.add_pod(pod, containers)
    started = time.monotonic()
    store = FileStore(tmp_path / "store")
    async with kube_agent(settings) as agent:
        for rnd in range(3):
            for pod in pods:
                for c in containers:
                    for i in range(15):
                        node.sim.write(NS, pod, c, f"{pod}/{c} instance {rnd} line {i}")
            # Kubelet deletes instance N-1 at restart N+1: as on a node (where CrashLoopBackOff
            # leaves seconds between restarts), the agent has read every instance by then.
            await wait_read(agent, store, {sid: node.sim.record(sid)
                                           for sid in node.sim.streams()}, within=30)
            for pod in pods:
                for c in containers:
                    node.restart(pod, c, exit_code=rnd + 1)
        for pod in pods:
            for c in containers:
                node.sim.write(NS, pod, c, f"{pod}/{c} final instance")
        assert time.monotonic() - started < 60, "the storm must fit in a minute"
        await wait_until(lambda: outcomes(agent, "complete") >= 60, within=20,
                         what="60 complete previous logs")
        await wait_all_stored(store, {sid: node.sim.record(sid) for sid in node.sim.streams()},
                              within=15)
        await wait_until(lambda: not agent.kube or not agent.kube.lifecycle.dirty()[1],
                         within=5, what="lifecycle uploaded")
        assert outcomes(agent, "partial") == outcomes(agent, "missing") == 0
        assert sample(agent, "evidence_keeper_container_restarts_total") == 60
        assert loss_gaps(agent.ledger) == []
    assert len(node.sim.streams()) == 80
    # Lifecycle evidence: each restart with the last state's reason and exit code.
    uid = node.sim.pod_uid(NS, "web-0")
    recs = lifecycle_of(store, uid, "web-0")
    restarted = [r for r in recs if r["event"] == "restarted" and r["container"] == "app"]
    assert [(r["restart"], r["last_state"]["exit_code"], r["last_state"]["reason"])
            for r in restarted] == [(1, 1, "Error"), (2, 2, "Error"), (3, 3, "Error")]
    prev = [r for r in recs if r["event"] == "previous_logs" and r["container"] == "app"]
    assert sorted((r["restart"], r["outcome"]) for r in prev) == [
        (0, "complete"), (1, "complete"), (2, "complete")]
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


async def test_deleted_pod_drains_before_its_directory_vanishes(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    """Deleted 1 s after its last write, directory removed 2 s later: the stream is complete
    in the store before the directory goes, although flush_interval_s is 30 s."""
    settings = make_settings(kubernetes="on", flush_interval_s=30)
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    uid = node.add_pod("cart-1", ("app", "envoy"))
    node.add_pod("cart-2")
    async with kube_agent(settings) as agent:
        for i in range(200):
            node.sim.write(NS, "cart-1", "app", f"order {i} PAYMENT_FAILED")
            node.sim.write(NS, "cart-1", "envoy", f"upstream {i} 503")
            if i % 50 == 0:
                await asyncio.sleep(0.1)  # a live pod writes over time, read in several rounds
        node.sim.write(NS, "cart-2", "app", "unrelated pod: waits for its flush interval")
        # The timeline is the point (issue 5): deleted 1 s after its last write.
        await asyncio.sleep(1.0)
        fake.mark_deleting(NS, "cart-1", grace_s=30)
        fake.terminate_container(NS, "cart-1", "app", reason="Completed", exit_code=0)
        fake.terminate_container(NS, "cart-1", "envoy", reason="Error", exit_code=137)
        fake.delete_pod(NS, "cart-1")
        deleted_at = time.monotonic()
        store = FileStore(tmp_path / "store")
        sids = [StreamId(NS, "cart-1", uid, c, 0) for c in ("app", "envoy")]
        await wait_all_stored(store, {sid: node.sim.record(sid) for sid in sids}, within=2.0)
        assert time.monotonic() - deleted_at < 2.0
        cart2 = node.sim.stream_of(NS, "cart-2", "app")
        assert export_bytes(store, cart2)[0] == b"", "only the deleted pod was drained early"
        # ... and its directory removed 2 s after the deletion (the timeline again).
        await asyncio.sleep(max(0.0, deleted_at + 2.0 - time.monotonic()))
        node.sim.delete_pod(NS, "cart-1")  # kubelet removes the directory
        await wait_until(lambda: all(sid not in agent.spool.streams for sid in sids), within=5,
                         what="drained streams forgotten")
        for sid in sids:
            assert stored_exactly(store, sid, node.sim.record(sid))
            assert loss_gaps(agent.ledger, sid) == []
        await wait_until(lambda: not agent.kube or not agent.kube.lifecycle.dirty()[1],
                         within=5, what="lifecycle uploaded")
    events = [(r["event"], r.get("container")) for r in lifecycle_of(store, uid, "cart-1")]
    for want in [("created", None), ("started", "app"), ("deletion_requested", None),
                 ("terminated", "app"), ("terminated", "envoy"), ("deleted", None)]:
        assert want in events, (want, events)


# "API server down for 30 s" (issue 5) is 30 s of a node's watcher, whose reconnect back-off
# starts at 0.5 s and doubles to 30 s: the outage outlasts the whole climb of the back-off to its
# cap. The test keeps that proportion on a shorter clock: the watcher's back-off and the outage
# are both scaled by API_DOWN_SCALE, so the watcher fails through the same part of its back-off
# curve as on a node (and the outage still outlasts FAST's list and request timeouts).
API_DOWN_SCALE = 0.1
API_DOWN_S = 30 * API_DOWN_SCALE
API_DOWN_TUNING = dataclasses.replace(
    FAST, backoff_initial_s=KubeTuning().backoff_initial_s * API_DOWN_SCALE,
    backoff_max_s=KubeTuning().backoff_max_s * API_DOWN_SCALE)


async def test_api_down_30s_then_410_relists_without_missing_a_restart(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    """The API server is unreachable for 30 s (scaled, see API_DOWN_SCALE) while the container
    restarts twice; on its return the old resourceVersion is expired (410), the agent lists
    again and sees both restarts. Capture from the files never pauses."""
    settings = make_settings(kubernetes="on")
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    node.add_pod("api-1")
    store = FileStore(tmp_path / "store")
    async with kube_agent(settings, tuning=API_DOWN_TUNING) as agent:
        kube = agent.kube
        assert kube is not None
        node.sim.write(NS, "api-1", "app", "before the outage")
        # The outage cuts a live watch (resumed later from its resourceVersion: 410).
        await wait_until(lambda: fake.stats.watches >= 1 and kube.connected, within=10,
                         what="the watch established")
        relists_before = kube.relists
        fake.down()
        down_at, down_wall = time.monotonic(), time.time()
        for i in range(50):
            node.sim.write(NS, "api-1", "app", f"instance 0 during the outage {i}")
        node.restart("api-1", "app", reason="OOMKilled", exit_code=137)
        for i in range(50):
            node.sim.write(NS, "api-1", "app", f"instance 1 during the outage {i}")
        # The next restart deletes instance 0's file: the agent has read all of it by then.
        await wait_read(agent, store, {sid: node.sim.record(sid) for sid in node.sim.streams()},
                        within=10)
        node.restart("api-1", "app")  # kubelet deletes instance 0's file now
        for i in range(50):
            node.sim.write(NS, "api-1", "app", f"instance 2 during the outage {i}")
        fake.compact()  # the history the watch would resume from is gone
        # Capture never paused: every instance is in the store while the API is still down.
        await wait_all_stored(store, {sid: node.sim.record(sid) for sid in node.sim.streams()},
                              within=10)
        assert not kube.connected
        assert agent.status.kube_detail is not None
        assert "unreachable" in agent.status.kube_detail
        assert sample(agent, "evidence_keeper_container_restarts_total") == 0
        # The length of the outage is the point here: time passes (scaled, see above).
        await asyncio.sleep(max(0.0, down_at + API_DOWN_S - time.monotonic()))
        # One outage, noticed at its start and never interrupted by a reconnection.
        assert not kube.connected and kube.down_since is not None
        assert kube.down_since < down_wall + 2.0
        fake.up()
        await wait_until(lambda: outcomes(agent, "complete") >= 2, within=15,
                         what="both restarts seen after the relist")
        assert fake.stats.expired >= 1, "the resumed watch must have been told 410"
        assert kube.expired >= 1 and kube.relists > relists_before
        assert sample(agent, "evidence_keeper_container_restarts_total") == 2
        assert outcomes(agent, "partial") == outcomes(agent, "missing") == 0
        node.sim.write(NS, "api-1", "app", "after the outage")
        await wait_all_stored(store, {sid: node.sim.record(sid) for sid in node.sim.streams()},
                              within=10)
        await wait_until(lambda: not kube.lifecycle.dirty()[1], within=5, what="uploaded")
    recs = lifecycle_of(store, node.sim.pod_uid(NS, "api-1"), "api-1")
    restarted = {r["restart"]: r for r in recs if r["event"] == "restarted"}
    assert sorted(restarted) == [1, 2]
    assert restarted[2]["last_state"]["exit_code"] == 1
    assert "detail" in restarted[1]  # only seen as a count change: its last state is unknown
    assert not any(r["event"] == "oom_killed" for r in recs)  # lastState was overwritten
    assert len({r["id"] for r in recs}) == len(recs)


async def test_watch_faults_503_hang_drop_and_http_410(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    settings = make_settings(kubernetes="on")
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    node.add_pod("w-1")
    # A hung watch is given up after request_timeout_s, and five faults in a row back off:
    # both shorter here, the faults and their order are the point.
    tuning = dataclasses.replace(FAST, request_timeout_s=0.75, backoff_max_s=0.4)
    async with kube_agent(settings, tuning=tuning) as agent:
        kube = agent.kube
        assert kube is not None
        await wait_until(lambda: fake.stats.watches >= 1, within=5, what="watch established")
        fake.expired_as_http = True
        fake.inject("drop", on="watch")
        fake.inject("503", on="watch", times=2)
        fake.inject("hang", on="watch")
        fake.inject("410", on="watch")
        fake.inject("503", on="list")
        watches = fake.stats.requests["watch"]
        fake.cut("watch")
        node.sim.write(NS, "w-1", "app", "still captured")
        node.restart("w-1", "app", reason="OOMKilled", exit_code=137)
        await wait_until(lambda: outcomes(agent, "complete") >= 1, within=20,
                         what="the restart, seen through the faults")
        assert fake.stats.requests["watch"] >= watches + 5  # drop, 503 x2, hang, 410, ok
        assert fake.stats.requests["list"] >= 3  # first list, the 503, the relist
        assert kube.expired >= 1
        assert sample(agent, "evidence_keeper_container_restarts_total") == 1
        await wait_until(lambda: not kube.lifecycle.dirty()[1], within=5, what="uploaded")
    recs = lifecycle_of(FileStore(tmp_path / "store"), node.sim.pod_uid(NS, "w-1"), "w-1")
    oom = [r for r in recs if r["event"] == "oom_killed"]
    assert len(oom) == 1 and oom[0]["restart"] == 0 and oom[0]["exit_code"] == 137


async def test_missing_and_partial_previous_logs_open_loss_gaps(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    settings = make_settings(kubernetes="on")
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    secret = "payments-team-label-value"
    node.add_pod("trunc-1", labels={"team": secret})
    # A container the agent never had a file for (kubelet GC'd it, or it lived < one scan).
    ghost_uid = "ghost-uid-1"
    fake.add_pod(NS, "ghost-1", uid=ghost_uid, containers=("app",), labels={"team": secret})
    async with kube_agent(settings) as agent:
        node.sim.write(NS, "trunc-1", "app", "written before copytruncate")
        sid0 = node.sim.stream_of(NS, "trunc-1", "app")
        await wait_until(lambda: sid0 in agent.spool.streams
                         and agent.spool.streams[sid0].next_offset > 0, within=5,
                         what="first bytes read")
        node.sim.truncate(NS, "trunc-1", "app")
        node.sim.write(NS, "trunc-1", "app", "after truncation")
        await wait_until(lambda: bool(loss_gaps(agent.ledger, sid0)), within=5,
                         what="truncation recorded")
        node.restart("trunc-1", "app")
        fake.restart_container(NS, "ghost-1", "app", reason="OOMKilled", exit_code=137)
        await wait_until(lambda: outcomes(agent, "partial") == 1
                         and outcomes(agent, "missing") == 1, within=10, what="outcomes")
        ghost = StreamId(NS, "ghost-1", ghost_uid, "app", 0)
        gaps = loss_gaps(agent.ledger, ghost)
        assert len(gaps) == 1
        assert gaps[0].fields["bytes"] is None and gaps[0].fields["reason"] == "deleted"
        assert "restart 0" in gaps[0].fields["detail"]
        assert [g.fields["reason"] for g in loss_gaps(agent.ledger, sid0)] == ["truncated"]
        metrics_text = agent.metrics.registry
        from prometheus_client import generate_latest

        text = generate_latest(metrics_text).decode()
        assert secret not in text and "trunc-1" not in text and "ghost-1" not in text
        await wait_until(lambda: not agent.kube or not agent.kube.lifecycle.dirty()[1],
                         within=5, what="lifecycle uploaded")
        # Idempotent: a relist (410 on resume) adds no record twice.
        kube = agent.kube
        assert kube is not None
        before = {uid: len(kube.lifecycle.records(uid)) for uid in kube.lifecycle.pods}
        relists, watches = kube.relists, fake.stats.watches
        fake.compact()
        fake.cut("watch")
        # The resumed watch is told 410, the agent lists again and watches from the new list:
        # by then every record the relist could add is in the ledger.
        await wait_until(lambda: kube.relists > relists and fake.stats.watches >= watches + 2,
                         within=10, what="the relist and the watch after it")
        after = {uid: len(kube.lifecycle.records(uid)) for uid in kube.lifecycle.pods}
        assert after == before
    store = FileStore(tmp_path / "store")
    for key in store.list(""):
        assert secret not in key
    uid = node.sim.pod_uid(NS, "trunc-1")
    recs = read_lifecycle(store, cluster="default", namespace=NS, pod="trunc-1")
    assert {r["pod_uid"] for r in recs} == {uid}
    assert all(r["labels"] == {"team": secret} for r in recs)
    prev = [r for r in recs if r["event"] == "previous_logs"]
    assert [(p["restart"], p["outcome"]) for p in prev] == [(0, "partial")]
    assert prev[0]["loss_gap_ids"]
    ghost_recs = read_lifecycle(store, cluster="default", namespace=NS, pod="ghost-1")
    assert {r["event"] for r in ghost_recs} >= {"created", "restarted", "oom_killed",
                                               "previous_logs"}
    # A time window selects records by their timestamp.
    far = datetime.now(UTC) + timedelta(days=1)
    assert read_lifecycle(store, cluster="default", namespace=NS, since=far) == []


async def test_api_fallback_streams_complete_when_files_are_unreadable(
    tmp_path: Path, make_settings: Callable[..., Settings],
    kubeconfig_env: Callable[[FakeKube], None],
) -> None:
    """No readable log tree: logs come through pods/log (follow, previous after a restart),
    into the same streams; every instance is complete, as kubelet renders it."""
    sim = KubeletSim(tmp_path / "node-only")  # the files exist, but not where the agent looks

    def source(ns: str, pod: str, uid: str, container: str, restart: int) -> bytes | None:
        try:
            return sim.record(StreamId(ns, pod, uid, container, restart))
        except KeyError:
            return None

    settings = make_settings(kubernetes="on", log_root=str(tmp_path / "not-mounted"))
    with FakeKube(node="node-1", log_source=source) as fake:
        kubeconfig_env(fake)
        node = Node(sim, fake)
        node.add_pod("pay-1", ("app", "sidecar"))
        node.add_pod("pay-2")
        node.add_pod("job-1")  # ran to completion before the agent started
        for i in range(10):
            sim.write(NS, "job-1", "app", f"job-1 step {i}")
        fake.terminate_container(NS, "job-1", "app", reason="Completed", exit_code=0)
        async with kube_agent(settings) as agent:
            await wait_until(lambda: agent.status.kube_mode == "api-logs", within=5,
                             what="API fallback mode")
            detail = agent.readiness()["kubernetes"]["detail"]
            assert "weaker" in detail and "not-mounted" in detail
            for i in range(30):
                sim.write(NS, "pay-1", "app", f"pay-1 app {i}")
                sim.write(NS, "pay-1", "sidecar", f"pay-1 sidecar {i}")
                sim.write(NS, "pay-2", "app", f"pay-2 app {i}")
            # The follows are open and have brought every line so far: pay-1's restart ends
            # its follow (no previous=true needed for it).
            await wait_until(lambda: all(following(agent, sim, sid) for sid in sim.streams()
                                         if sid.pod != "job-1"),
                             within=10, what="the follows of pay-1 and pay-2 caught up")
            node.restart("pay-1", "app")  # the follow ends at the exit: instance 0 complete
            sim.write(NS, "pay-1", "app", "pay-1 app instance 1")
            await wait_until(lambda: outcomes(agent, "complete") >= 1, within=10,
                             what="pay-1's previous log, from its follow")
            # pay-2: the log stream is cut and the log endpoint fails while it restarts, so
            # instance 0's end can only come from previous=true, deduplicated.
            fake.inject("503", on="log", times=None)
            fake.cut("log")
            for i in range(20):
                sim.write(NS, "pay-2", "app", f"pay-2 app late {i}")
            node.restart("pay-2", "app", reason="OOMKilled", exit_code=137)
            sim.write(NS, "pay-2", "app", "pay-2 app instance 1")
            # The endpoint stays down until the agent has seen the restart and has asked it
            # (and been refused) since.
            await wait_until(lambda: sample(agent, "evidence_keeper_container_restarts_total")
                             >= 2, within=10, what="pay-2's restart seen")
            refused = fake.stats.requests.get("log", 0)
            await wait_until(lambda: fake.stats.requests.get("log", 0) > refused, within=10,
                             what="a log request refused after the restart")
            fake.clear_faults()
            await wait_until(lambda: outcomes(agent, "complete") >= 2, within=15,
                             what="both previous logs complete")
            previous = [q for q in fake.stats.log_requests if q.get("previous") == "true"]
            assert previous and {q["pod"] for q in previous} == {"pay-2"}
            # The cut follows are back: lines written now reach the store.
            for c in ("app", "sidecar"):
                sim.write(NS, "pay-1", c, f"pay-1 {c} after the log endpoint recovered")
            live = {sid: render_kubelet_log(sim.record(sid), timestamps=True)
                    for sid in (sim.stream_of(NS, "pay-1", "app"),
                                sim.stream_of(NS, "pay-1", "sidecar"))}
            await wait_all_stored(FileStore(tmp_path / "store"), live, within=10)
            fake.terminate_container(NS, "pay-1", "app")
            fake.terminate_container(NS, "pay-1", "sidecar")
            fake.delete_pod(NS, "pay-1")
            store = FileStore(tmp_path / "store")
            expected = {sid: render_kubelet_log(sim.record(sid), timestamps=True)
                        for sid in sim.streams()}
            await wait_all_stored(store, expected, within=15)
            assert outcomes(agent, "partial") == outcomes(agent, "missing") == 0
            assert loss_gaps(agent.ledger) == []
    assert len(expected) == 6


async def test_agent_restart_keeps_lifecycle_and_sees_restarts_it_missed(
    tmp_path: Path, make_settings: Callable[..., Settings], fake: FakeKube
) -> None:
    """Lifecycle history survives the agent; restarts and deletions that happened while it was
    down are recognised from that history when it lists pods again, and counted once."""
    settings = make_settings(kubernetes="on")
    node = Node(KubeletSim(tmp_path / "pods"), fake)
    uid = node.add_pod("db-1")
    gone_uid = node.add_pod("db-2")
    async with kube_agent(settings) as agent:
        node.sim.write(NS, "db-1", "app", "instance 0")
        sid0 = node.sim.stream_of(NS, "db-1", "app")
        await wait_until(lambda: sid0 in agent.spool.streams
                         and agent.spool.streams[sid0].next_offset == len(node.sim.record(sid0)),
                         within=10, what="instance 0 read")
        node.restart("db-1", "app")
        await wait_until(lambda: outcomes(agent, "complete") >= 1, within=10, what="restart 1")
    # Agent down: another restart, and db-2 is deleted for good.
    node.sim.write(NS, "db-1", "app", "instance 1")
    node.restart("db-1", "app", exit_code=3)
    node.sim.write(NS, "db-1", "app", "instance 2")
    fake.delete_pod(NS, "db-2")
    node.sim.delete_pod(NS, "db-2")
    async with kube_agent(settings) as agent:
        await wait_until(lambda: outcomes(agent, "complete") >= 1, within=10,
                         what="the restart that happened while the agent was down")
        assert sample(agent, "evidence_keeper_container_restarts_total") == 1
        store = FileStore(tmp_path / "store")
        await wait_all_stored(store, {sid: node.sim.record(sid) for sid in node.sim.streams()
                                      if sid.pod == "db-1"}, within=10)
        await wait_until(lambda: not agent.kube or not agent.kube.lifecycle.dirty()[1],
                         within=5, what="lifecycle uploaded")
    recs = lifecycle_of(store, uid, "db-1")
    assert len({r["id"] for r in recs}) == len(recs)
    assert [(r["restart"], r["outcome"]) for r in recs if r["event"] == "previous_logs"] == [
        (0, "complete"), (1, "complete")]
    assert [r["restart"] for r in recs if r["event"] == "restarted"] == [1, 2]
    gone = lifecycle_of(store, gone_uid, "db-2")
    assert gone[-1]["event"] == "deleted" and "not watched" in gone[-1]["detail"]


# ------------------------------------------------------------------------------ units
def _pod(restart: int, *, state: dict[str, Any], last: dict[str, Any] | None = None,
         cid: str = "containerd://b") -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": NS, "uid": "u1", "resourceVersion": "5",
                     "creationTimestamp": "2025-11-10T12:00:00Z", "labels": {"a": "b"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "p-rs",
                                          "controller": True}]},
        "spec": {"nodeName": "node-1", "serviceAccountName": "sa",
                 "containers": [{"name": "app", "image": "img:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "app", "restartCount": restart, "containerID": cid, "image": "img:1",
            "imageID": "img@sha256:abc", "state": state,
            "lastState": {"terminated": last} if last else {}}]},
    }


def test_observe_crashloop_then_restart() -> None:
    running = parse_pod(_pod(0, state={"running": {"startedAt": "2025-11-10T12:00:01Z"}},
                             cid="containerd://a"))
    term = {"exitCode": 137, "reason": "OOMKilled", "containerID": "containerd://a",
            "startedAt": "2025-11-10T12:00:01Z", "finishedAt": "2025-11-10T12:05:00Z"}
    crashed = parse_pod(_pod(0, state={"waiting": {"reason": "CrashLoopBackOff"}}, last=term,
                             cid="containerd://a"))
    t = observe(running, crashed)
    assert t.restarts == [] and t.ended == [("app", 0)]  # instance 0 exited, not restarted yet
    assert {r["id"] for r in t.records} >= {"terminated:app:0", "oom_killed:app:0"}
    restarted = parse_pod(_pod(1, state={"running": {"startedAt": "2025-11-10T12:05:10Z"}},
                               last=term, cid="containerd://b"))
    t = observe(crashed, restarted)
    assert t.restarts == [("app", 0, 1)] and t.ended == []
    rec = next(r for r in t.records if r["event"] == "restarted")
    assert rec["last_state"]["reason"] == "OOMKilled" and rec["ts"].startswith(
        "2025-11-10T12:05:00")
    assert rec["owner"] == {"kind": "ReplicaSet", "name": "p-rs"}
    first_sight = observe(None, restarted)
    assert first_sight.restarts == []  # history, not a restart this agent saw
    assert observe(None, restarted, known_restarts={"app": 0}).restarts == [("app", 0, 1)]


def test_api_stream_resumes_by_timestamp() -> None:
    sid = StreamId(NS, "p", "u", "app", 0)
    lines = [f"2025-11-10T12:27:00.{i:03d}Z line {i}\n".encode() for i in range(1, 6)]
    st = ApiStream(sid)
    st.begin()
    got = st.take(b"".join(lines[:2]) + lines[2][:7])
    assert got == b"".join(lines[:2])
    st.appended(got)
    assert st.last_ts == parse_ts_ns(lines[1])
    st.begin()  # reconnect: the response starts over
    assert st.take(b"".join(lines)) == b"".join(lines[2:])
    assert parse_ts_ns(b"2025-11-10T12:27:00Z x") == parse_ts_ns(b"2025-11-10T12:27:00.000Z y")
    assert parse_ts_ns(b"garbage") is None


def test_lifecycle_merges_store_history_when_local_copy_is_lost(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    base = {"namespace": NS, "pod": "p", "pod_uid": "u1", "ts": "2025-11-10T12:00:00.000000Z",
            "observed_at": "2025-11-10T12:00:00.000000Z"}
    first = LifecycleLedger(tmp_path / "a", store=store, cluster="default", node="n")
    first.load()
    first.add([dict(base, id="created", event="created"),
               dict(base, id="started:app:0", event="started")])
    first.flush()
    assert first.upload()
    # The spool is lost: a new ledger knows nothing, sees the pod again and a restart.
    second = LifecycleLedger(tmp_path / "b", store=store, cluster="default", node="n")
    second.load()
    second.add([dict(base, id="created", event="created"),
                dict(base, id="restarted:app:1", event="restarted")])
    second.flush()
    assert second.upload()
    recs = parse_lines(store.get(lifecycle_key("default", NS, "p", "u1")))
    assert [r["id"] for r in recs] == ["created", "started:app:0", "restarted:app:1"]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    third = LifecycleLedger(tmp_path / "b", store=store, cluster="default", node="n")
    third.load()
    assert [r["id"] for r in third.records("u1")] == [r["id"] for r in recs]
    assert json.loads((tmp_path / "store" / (lifecycle_key("default", NS, "p", "u1")
                                             + ".meta.json")).read_text())["ek-records"] == "3"
