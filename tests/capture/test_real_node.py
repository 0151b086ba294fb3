"""Real nodes (issue 10): thousands of files under a descriptor limit of 1024, an agent paused
across rotations, cri-dockerd symlinks with Docker's own rotation, a log root that vanishes
and comes back, and a rotation every 0.1 s. Each reproduces a way the agent lost or
duplicated evidence silently before; here every byte that could be read is in the store,
byte-exact, as one hash chain, and every hole is a ``loss`` gap that says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evidence_keeper.health.ledger import Ledger
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from tests.conftest import (
    check_segments,
    export_bytes,
    loss_gaps,
    running_agent,
    settle,
    stored_segments,
    wait_exported,
    wait_until,
)
from tests.support.node import node_settings, terminate
from tests.support.paths import REPO
from tests.support.stream import assert_stored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limit_descriptors() -> None:
    # What containerd 2 gives a container, with the hard limit at the same value so the
    # agent's start-up raise cannot help: only the descriptor budget can.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


class ChildAgent:
    """``evidence-keeper run`` in a child process, optionally with a ``preexec_fn``."""

    def __init__(self, tmp: Path, *, preexec: Callable[[], None] | None = None,
                 **overrides: object) -> None:
        self.port = _free_port()
        cfg = node_settings(tmp, **{"listen": f"127.0.0.1:{self.port}",
                                    "shutdown_timeout_s": 30, "log_level": "info", **overrides})
        self.config = tmp / "agent.json"
        self.config.write_text(json.dumps(cfg))
        self.log = tmp / "agent.log"
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildAgent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EK_")}
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evidence_keeper.cli", "run", "--config",
                 str(self.config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                # setrlimit only: safe between fork and exec even with threads running.
                env=env, preexec_fn=self.preexec)  # noqa: PLW1509
        self.wait(lambda: self.metrics() is not None, within=30, what="the agent's /metrics")
        return self

    def metrics(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        m = self.metrics()
        assert m is not None, f"/metrics does not answer: {self.tail()}"
        return m.get(name, 0.0)

    def wait(self, cond: Callable[[], bool], *, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not cond():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {what}:"
                                     f" {self.tail()}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped agent cannot handle SIGTERM
        code, self.proc = terminate(self.proc, timeout=90), None
        assert code == 0, f"agent exited with {code}: {self.tail()}"

    def tail(self, n: int = 6) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[..., ChildAgent]]:
    made: list[ChildAgent] = []

    def make(**kwargs: object) -> ChildAgent:
        agent = ChildAgent(tmp_path, **kwargs)  # type: ignore[arg-type]
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.proc is not None:
            agent.proc.kill()
            agent.proc.wait()


def _shipped(agent: ChildAgent) -> float:
    return agent.metric("evidence_keeper_shipped_bytes_total")


def _ledger_losses(tmp: Path, sid: StreamId | None = None) -> list[dict[str, object]]:
    ledger = Ledger(tmp / "spool" / "ledger.sqlite")
    try:
        return [dict(g.fields) for g in loss_gaps(ledger, sid)]
    finally:
        ledger.close()


# -------------------------------------------------------------------------------------------
# 1. Thousands of files under a soft (and hard) limit of 1024 descriptors


@pytest.mark.timeout(600)
def test_3000_files_under_1024_descriptors(tmp_path: Path,
                                           child: Callable[..., ChildAgent]) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=5)
    pods = 1000
    for i in range(pods):
        sim.add_pod("fds", f"p{i}")
        sim.write("fds", f"p{i}", "app", f"first file of pod {i} " + "a" * 60)
        sim.rotate("fds", f"p{i}", "app")
        sim.write("fds", f"p{i}", "app", f"second file of pod {i} " + "b" * 60)
        sim.rotate("fds", f"p{i}", "app")  # the first rotated file is compressed now
        sim.write("fds", f"p{i}", "app", f"live file of pod {i} " + "c" * 60)
    files = sum(len(sim.files_of(sid)) for sid in sim.streams())
    assert files == 3 * pods
    agent = child(preexec=_limit_descriptors, segment_max_bytes="64KiB").start()
    total = sum(sim.record_len(sid) for sid in sim.streams())

    def shipped_all() -> bool:
        m = agent.metrics()
        assert m is not None, "/metrics stopped answering"
        assert m.get("evidence_keeper_open_files", 0) <= 1024
        return m.get("evidence_keeper_shipped_bytes_total", 0) >= total

    agent.wait(shipped_all, within=400, what=f"{total} bytes of {files} files shipped")
    m = agent.metrics()
    assert m is not None
    assert m["evidence_keeper_open_files_limit"] == 1024
    assert m["evidence_keeper_open_files_budget"] < 1024
    # Still capturing: new lines and rotations after the first catch-up.
    for i in range(0, pods, 50):
        sim.write("fds", f"p{i}", "app", f"later line of pod {i}")
        sim.rotate("fds", f"p{i}", "app")
        sim.write("fds", f"p{i}", "app", f"after the rotation of pod {i}")
    total = sum(sim.record_len(sid) for sid in sim.streams())
    agent.wait(shipped_all, within=200, what="the later lines shipped")
    agent.stop()
    assert "Too many open files" not in agent.log.read_text(errors="replace")
    store = FileStore(tmp_path / "store")
    for sid in sim.streams()[::7]:
        assert_stored(store, sid, sim.record(sid))
    assert _ledger_losses(tmp_path) == []


# -------------------------------------------------------------------------------------------
# 2. The agent paused (SIGSTOP) across 6 rotations with max_files 3


@pytest.mark.timeout(300)
def test_paused_agent_records_the_rotations_it_could_not_see(
        tmp_path: Path, child: Callable[..., ChildAgent]) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    sim.add_pod("shop", "orders-1")
    sid = sim.stream_of("shop", "orders-1", "app")
    for i in range(40):
        sim.write("shop", "orders-1", "app", f"before the pause {i} " + "x" * 80)
    agent = child().start()
    agent.wait(lambda: _shipped(agent) >= sim.record_len(sid), within=60,
               what="the first lines shipped")
    agent.signal(signal.SIGSTOP)
    try:
        for i in range(40):
            sim.write("shop", "orders-1", "app", f"while paused, first file {i} " + "y" * 80)
        held = sim.record_len(sid)  # the file the agent holds open ends here
        for r in range(6):
            sim.rotate("shop", "orders-1", "app")
            for i in range(40):
                sim.write("shop", "orders-1", "app", f"rotation {r} line {i} " + "z" * 80)
            # Deliberate: 6 x 0.7 s of pause, longer than the tailer's STALL_S (3 s), so the
            # agent can tell on SIGCONT that it did not run.
            time.sleep(0.7)
        on_disk = sim.disk_bytes(sid)
        resumed_at = sim.record_len(sid)
    finally:
        agent.signal(signal.SIGCONT)
    for i in range(20):
        sim.write("shop", "orders-1", "app", f"after the pause {i}")
    expected = sim.record(sid)[:held] + on_disk + sim.record(sid)[resumed_at:]
    assert len(expected) < sim.record_len(sid)  # files were really rotated away unseen
    agent.wait(lambda: _shipped(agent) >= len(expected), within=60, what="the rest shipped")
    agent.stop()
    store = FileStore(tmp_path / "store")
    assert_stored(store, sid, expected)
    check_segments(stored_segments(store, sid))
    losses = _ledger_losses(tmp_path, sid)
    assert [(g["offset"], g["bytes"], g["reason"]) for g in losses] == [
        (held, None, "rotated_away")], losses
    assert "did not run" in str(losses[0]["detail"]), losses[0]["detail"]


# -------------------------------------------------------------------------------------------
# 3. cri-dockerd: symlinked log files into /var/lib/docker/containers, Docker's rotation


async def test_cri_dockerd_symlinks_and_docker_rotation(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    docker = tmp_path / "docker" / "containers"
    sim = KubeletSim(tmp_path / "pods", docker_root=docker, docker_max_files=3)
    sim.add_pod("dock", "web-1", fmt="docker")
    sim.add_pod("dock", "api-1", fmt="docker", containers=("app", "sidecar"))
    secret = b"SECRET-OUTSIDE-THE-LOG-ROOTS"
    outside = tmp_path / "outside"
    (outside / "dock_evil-1_uid-1" / "app").mkdir(parents=True)
    (outside / "dock_evil-1_uid-1" / "app" / "0.log").write_bytes(secret + b" pod dir\n")
    (outside / "ctr").mkdir()
    (outside / "ctr" / "0.log").write_bytes(secret + b" container dir\n")
    (outside / "secret.log").write_bytes(secret + b" file\n")
    pods = tmp_path / "pods"
    (pods / "dock_evil-1_uid-1").symlink_to(outside / "dock_evil-1_uid-1")
    (pods / "dock_evil-2_uid-2").mkdir()
    (pods / "dock_evil-2_uid-2" / "app").symlink_to(outside / "ctr")
    (pods / "dock_evil-3_uid-3" / "app").mkdir(parents=True)
    (pods / "dock_evil-3_uid-3" / "app" / "0.log").symlink_to(outside / "secret.log")
    settings = make_settings(log_symlink_roots=str(docker))
    async with running_agent(settings) as agent:
        def captured(sid: StreamId) -> Callable[[], bool]:
            return lambda: (sid in agent.spool.streams
                            and agent.spool.streams[sid].next_offset >= sim.record_len(sid))

        for round_ in range(5):
            for pod, container in (("web-1", "app"), ("api-1", "app"), ("api-1", "sidecar")):
                for i in range(30):
                    sim.write("dock", pod, container, f"{pod}/{container} {round_}.{i} " + "d" * 50)
                sid = sim.stream_of("dock", pod, container)
                await wait_until(captured(sid), within=30, what=f"{sid.key} captured")
                if round_ == 3 and pod == "web-1":
                    sim.restart("dock", pod, container)
                else:
                    sim.rotate("dock", pod, container)  # Docker's .1, .2 (max-file 3)
                await asyncio.sleep(0.02)  # Docker's rotated files are ordered by mtime
        assert len(list(docker.glob("*/*-json.log.2"))) >= 2  # Docker really rotated
        for sid in sim.streams():
            await wait_exported(agent.store, sid, sim.record(sid), within=30)
        skipped = {reason: agent.metrics.registry.get_sample_value(
            "evidence_keeper_skipped_files_total", {"reason": reason})
            for reason in ("symlinked_dir", "symlink_outside_roots")}
        assert skipped == {"symlinked_dir": 2.0, "symlink_outside_roots": 1.0}
        assert loss_gaps(agent.ledger) == []
    store = FileStore(tmp_path / "store")
    for key in store.list(""):
        raw = (tmp_path / "store" / key).read_bytes()
        assert b"evil" not in key.encode() and secret not in raw, key
    for sid in sim.streams():
        check_segments(stored_segments(store, sid))
        data, _ = export_bytes(store, sid)
        assert b"SECRET" not in data


# -------------------------------------------------------------------------------------------
# 4. The log root emptied (a remount) and restored, with and without a restart


def _move_all(src: Path, dst: Path) -> None:
    dst.mkdir(exist_ok=True)
    for d in list(src.iterdir()):
        d.rename(dst / d.name)  # same file system: inodes are kept, as on a remount


def _write_round(sim: KubeletSim, tag: str) -> None:
    for ns, pod in sim.pods():
        for i in range(20):
            sim.write(ns, pod, "app", f"{pod} {tag} {i} " + "r" * 40)


async def _all_exported(agent_store: object, sim: KubeletSim) -> None:
    for sid in sim.streams():
        await wait_exported(agent_store, sid, sim.record(sid), within=30)  # type: ignore[arg-type]


async def test_log_root_emptied_and_restored_while_running(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    sim = KubeletSim(tmp_path / "pods")
    for i in range(3):
        sim.add_pod("shop", f"orders-{i}")
    _write_round(sim, "before")
    sim.rotate("shop", "orders-0", "app")
    _write_round(sim, "rotated")
    async with running_agent(make_settings(rescan_interval_s=0.5)) as agent:
        await _all_exported(agent.store, sim)
        _move_all(tmp_path / "pods", tmp_path / "away")
        await settle(agent, passes=5)  # five full scans of the empty root
        assert loss_gaps(agent.ledger) == []
        assert set(agent.tailer.tails) == set(sim.streams())  # nothing ended or forgotten
        assert not any(t.gone for t in agent.tailer.tails.values())
        assert agent.readiness()["tail"]["log_root_state"] == "empty"
        assert agent.metrics.registry.get_sample_value("evidence_keeper_log_root_up") == 0
        _move_all(tmp_path / "away", tmp_path / "pods")
        _write_round(sim, "after")
        await _all_exported(agent.store, sim)
        assert agent.status.log_root_state == "ok"
        assert loss_gaps(agent.ledger) == []
    store = FileStore(tmp_path / "store")
    for sid in sim.streams():
        check_segments(stored_segments(store, sid))


async def test_log_root_empty_at_restart_then_restored(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    sim = KubeletSim(tmp_path / "pods")
    for i in range(3):
        sim.add_pod("shop", f"orders-{i}")
    _write_round(sim, "before")
    settings = make_settings(rescan_interval_s=0.5)
    async with running_agent(settings) as agent:
        await _all_exported(agent.store, sim)
    _move_all(tmp_path / "pods", tmp_path / "away")
    async with running_agent(settings) as agent:
        await settle(agent, passes=5)  # five full scans of the empty root
        assert loss_gaps(agent.ledger) == []
        assert agent.readiness()["tail"]["log_root_state"] == "empty"
        _move_all(tmp_path / "away", tmp_path / "pods")
        _write_round(sim, "after")
        await _all_exported(agent.store, sim)
        assert loss_gaps(agent.ledger) == []
    store = FileStore(tmp_path / "store")
    for sid in sim.streams():
        check_segments(stored_segments(store, sid))


# -------------------------------------------------------------------------------------------
# 5. A rotation every 0.1 s for 15 s on a healthy agent: no gap


@pytest.mark.timeout(300)
def test_rotation_every_100ms_for_15s_has_no_gap(
        tmp_path: Path, child: Callable[..., ChildAgent]) -> None:
    # Each rotated name lives about 0.2 s here: less than the agent's default scan period.
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    sim.add_pod("busy", "api-0")
    sid = sim.stream_of("busy", "api-0", "app")
    agent = child(discover_interval_s=0.5, tail_interval_s=0.2).start()
    stop = time.monotonic() + 15
    rotations = 0

    def writer() -> None:
        nonlocal rotations
        n = 0
        while time.monotonic() < stop:
            for _ in range(5):
                n += 1
                sim.write("busy", "api-0", "app", f"request {n} " + "q" * 60)
            sim.rotate("busy", "api-0", "app")
            rotations += 1
            time.sleep(0.1)  # the pace is the point: a rotation every 0.1 s (issue 10)

    thread = threading.Thread(target=writer, name="kubelet")
    thread.start()
    thread.join()
    assert rotations >= 100
    agent.wait(lambda: _shipped(agent) >= sim.record_len(sid), within=60,
               what="everything shipped")
    agent.stop()
    assert _ledger_losses(tmp_path) == []
    store = FileStore(tmp_path / "store")
    assert_stored(store, sid, sim.record(sid))
    check_segments(stored_segments(store, sid))
