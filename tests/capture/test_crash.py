"""kill -9: the agent runs as a real process and is killed at random moments while a simulated
node keeps writing, rotating (with lines split across the rename), compressing and
restarting containers. After a last clean stop every stream in the store must equal the
simulator's record byte for byte, as one unbroken hash chain of segments tiling ``[0, end)``,
with no ``loss`` in the ledger: a crash may delay shipping, never lose or duplicate a byte
(CONTRACT.md section 3: "A byte is captured when it is fsynced in the spool; the read
checkpoint never runs ahead of captured data").
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from evidence_keeper.sim import KubeletSim, churn
from evidence_keeper.store import FileStore
from tests.conftest import stored_segments
from tests.support.exact import assert_streams_exact, spool_segment_files, wait_all_stored
from tests.support.node import node_settings
from tests.support.paths import REPO

SEED = int(os.environ.get("CRASH_TEST_SEED", "20251110"))  # vary to explore
NS = "crash"


def write_config(tmp_path: Path, name: str = "agent.yaml", **overrides: object) -> Path:
    cfg = node_settings(tmp_path, segment_max_bytes="64KiB", log_level="info", **overrides)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


class AgentProcess:
    """``evidence-keeper run`` as a child process; its log lines go to a file per run."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def start(self) -> None:
        assert self.proc is None
        self.runs += 1
        self.log_path = self.logs / f"run-{self.runs:02d}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EK_")}
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                env=env,
            )

    def started(self) -> bool:
        assert self.log_path is not None
        return b'"agent started"' in self.log_path.read_bytes()

    def wait_started(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.started():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not start within {timeout}s: {self.tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode in (-signal.SIGKILL, 0), self.tail()
        self.proc = None

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return code

    def tail(self, n: int = 8) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def agent_process(config: Path, logs: Path) -> Iterator[AgentProcess]:
    logs.mkdir(exist_ok=True)
    agent = AgentProcess(config, logs)
    try:
        yield agent
    finally:
        agent.close()


class Writer(threading.Thread):
    """The node: writes, rotations with split lines, compression, one restart per container.

    ``max_files`` is large enough that kubelet deletes nothing, and no container restarts twice
    (the second restart would delete the first instance's files), so every byte stays
    available to the agent however long it is down: any byte missing from the store is the
    agent's fault.
    """

    def __init__(self, sim: KubeletSim, rng: random.Random, *, pods: int) -> None:
        super().__init__(name="sim-writer", daemon=True)
        self.sim = sim
        self.rng = rng
        self.pods = pods
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.restarted: set[tuple[str, str]] = set()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                churn(self.sim, self.rng, pods=self.pods, steps=6, namespace=NS,
                      rotate_p=0.04, split_p=0.6, restart_p=0.0, docker_p=0.3)
                if self.rng.random() < 0.01:
                    ns, pod = self.rng.choice(self.sim.pods())
                    container = self.rng.choice(self.sim.containers(ns, pod))
                    if (pod, container) not in self.restarted:
                        self.restarted.add((pod, container))
                        self.sim.restart(ns, pod, container)
                self.stop.wait(0.02)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    (tmp_path / "pods").mkdir()
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods", max_files=50)
    writer = Writer(sim, random.Random(SEED + 1), pods=5)
    churn(sim, writer.rng, pods=5, steps=50, namespace=NS, restart_p=0.0)
    kills = 0
    with agent_process(write_config(tmp_path), tmp_path / "logs") as agent:
        agent.start()
        writer.start()
        try:
            for _ in range(12):
                if rng.random() < 0.7:
                    agent.wait_started()  # most kills hit a running pipeline ...
                time.sleep(rng.uniform(0.05, 0.8))  # ... the others also recovery and start-up
                agent.kill()
                kills += 1
                agent.start()
        finally:
            writer.stop.set()
            writer.join(timeout=10)
        assert writer.error is None, writer.error
        for sid in sim.streams():  # the node kept every byte: all of it is the agent's to take
            assert sim.disk_bytes(sid) == sim.record(sid), sid.key
        agent.wait_started()
        # The store catches up while the agent runs, not only in the drain after SIGTERM.
        wait_all_stored(store, sim, timeout=25)
        code = agent.terminate()
        assert code == 0, agent.tail()
    assert kills >= 10
    assert sum(1 for sid in sim.streams() if sim.record_len(sid)) >= 5
    assert sum(len(stored_segments(store, sid)) for sid in sim.streams()) > 50
    assert_streams_exact(store, sim, tmp_path / "spool")


def checkpointed(spool_dir: Path) -> int:
    """Bytes of all streams the spool's checkpoint counts as captured (0 before the first)."""
    try:
        doc = json.loads((spool_dir / "checkpoint.json").read_bytes())
    except FileNotFoundError:
        return 0
    return sum(int(s["next_offset"]) for s in doc["streams"])


@pytest.mark.slow
def test_no_orphan_spool_segments_after_kill_9_and_a_clean_run(tmp_path: Path) -> None:
    (tmp_path / "pods").mkdir()
    spool_dir = tmp_path / "spool"
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods", max_files=50)
    writer = Writer(sim, random.Random(SEED + 2), pods=3)
    churn(sim, writer.rng, pods=3, steps=20, namespace=NS, restart_p=0.0)
    # A long flush interval keeps segments in the spool (sealed by size, not shipped by age)
    # when the agent is killed in the middle of a stream of writes.
    slow = write_config(tmp_path, "slow.yaml", flush_interval_s=60)
    with agent_process(slow, tmp_path / "logs") as agent:
        agent.start()
        agent.wait_started()
        before = sum(sim.record_len(sid) for sid in sim.streams())
        writer.start()
        try:
            # Killed mid-writes once it has captured some of them (flush is 60 s: what the
            # spool holds stays there until the next run ships it).
            deadline = time.monotonic() + 30
            while checkpointed(spool_dir) <= before or len(spool_segment_files(spool_dir)) < 2:
                assert time.monotonic() < deadline, "the writes were not captured"
                time.sleep(0.05)
            agent.kill()
        finally:
            writer.stop.set()
            writer.join(timeout=10)
        assert writer.error is None, writer.error
    left = spool_segment_files(spool_dir)
    assert len(left) >= 2, "the killed agent must leave spool segments behind"

    with agent_process(write_config(tmp_path), tmp_path / "logs2") as agent:
        agent.start()
        agent.wait_started()
        wait_all_stored(store, sim, timeout=30)
        assert agent.terminate() == 0, agent.tail()
    assert spool_segment_files(spool_dir) == []
    assert list(spool_dir.rglob("*.tmp")) == []
    checkpoint = json.loads((spool_dir / "checkpoint.json").read_bytes())
    for s in checkpoint["streams"]:
        assert s["open"] is None and s["sealed"] == [], s["id"]
    assert_streams_exact(store, sim, spool_dir)
