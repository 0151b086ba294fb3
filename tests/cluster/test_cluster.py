"""The whole cluster at once: real agents as nodes behind the fake API server, the store's ledger.

Agents run as real ``evidence-keeper run`` processes (one per node, on loopback ports), so one
can be killed with SIGKILL and lose its spool; the CLI reaches them through the fake API
server's pod proxy with the official ``kubernetes`` client; every node's ledger is read back
from a shared ``file://`` store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from evidence_keeper.api.client import ApiError, call
from evidence_keeper.cli import main as cli_main
from evidence_keeper.sim import KubeletSim
from tests.fakekube import FakeKube
from tests.netproxy import Proxy
from tests.support.node import node_settings

NS = "sock-shop"
AGENT_NS = "evidence-keeper"


class SinkServer:
    """A TCP log sink on loopback that accepts and closes connections (a tcp probe passes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="sink")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


class AgentProcess:
    """``evidence-keeper run`` for one node in a child process, on a loopback port."""

    def __init__(self, root: Path, node: str, *, store_url: str, sink_port: int,
                 **settings: Any) -> None:
        self.root, self.node = root / node, node
        self.log_root = self.root / "pods"
        self.spool = self.root / "spool"
        self.log_root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "agent.yaml"
        conf = node_settings(self.root, **{
            "node_name": node, "store_url": store_url, "log_level": "info",
            "shutdown_timeout_s": 10, "sink_probes": f"loki=127.0.0.1:{sink_port}",
            "probe_interval_s": 0.3, "probe_timeout_s": 3, "backlog_threshold_s": 30,
            **settings})
        self.config.write_text(yaml.safe_dump(conf))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.sim = KubeletSim(self.log_root)

    def start(self) -> AgentProcess:
        return self.spawn().wait_ready()

    def spawn(self) -> AgentProcess:
        """Start the process without waiting (agents start side by side: see start_all)."""
        self.stderr = self.root / f"agent-{time.monotonic_ns()}.log"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evidence_keeper.cli", "run", "--config",
                 str(self.config)], stdout=subprocess.DEVNULL, stderr=err)
        return self

    def wait_ready(self) -> AgentProcess:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while not self.url:
            assert self.proc.poll() is None, self.stderr.read_text()[-2000:]
            assert time.monotonic() < deadline, "the agent did not start listening"
            for line in self.stderr.read_text(errors="replace").splitlines():
                if '"http api listening"' in line:
                    self.url = "http://" + json.loads(line)["address"]
            time.sleep(0.05)
        wait_for(lambda: self.ready().get("ready") is True, within=60,
                 what=f"{self.node} ready")
        return self

    def ready(self) -> dict[str, Any]:
        try:
            return dict(call(self.url, "/readyz", accept_status=(503,))[1])
        except ApiError:
            return {}

    def sink_up(self, up: bool) -> bool:
        sinks = {s["sink"]: s for s in self.ready().get("sinks", [])}
        return "loki" in sinks and sinks["loki"]["up"] is up and sinks["store"]["up"] is True

    def gaps(self) -> list[dict[str, Any]]:
        return list(call(self.url, "/gaps")[1]["gaps"])

    def ledger_shipped(self) -> bool:
        return bool(self.ready().get("ledger", {}).get("unshipped_records") == 0)

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.url = ""

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop`` waits: agents stop side by side)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.url = ""


def start_all(agents: list[AgentProcess]) -> None:
    """Start the agents side by side (each takes a second or two to import and recover)."""
    for a in agents:
        a.spawn()
    for a in agents:
        a.wait_ready()


def wait_for(cond: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    server = SinkServer()
    yield server
    server.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.terminate()
    for a in started:
        a.stop()


def cli_config(tmp_path: Path, store_url: str) -> str:
    path = tmp_path / "cli.yaml"
    path.write_text(f"store_url: {store_url}\nspool_dir: {tmp_path / 'cli-spool'}\n"
                    "listen: 127.0.0.1:9095\n")
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------ all nodes
def test_preflight_all_nodes_names_a_node_without_agent_and_a_sink_outage_on_its_row(
        tmp_path: Path, sink: SinkServer, agents: list[AgentProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    # node-2 reaches the sink through a link that the test can cut: an outage on that node only.
    link = Proxy(("127.0.0.1", sink.port))
    try:
        for node, port in (("node-1", sink.port), ("node-2", link.port), ("node-3", sink.port)):
            agents.append(AgentProcess(tmp_path, node, store_url=store_url, sink_port=port))
        start_all(agents)
        with FakeKube() as kube:
            for n in ("node-1", "node-2", "node-3", "node-4"):
                kube.add_node(n, labels={"pool": "chaos"} if n != "node-4" else {})
            for a in agents:
                kube.add_agent(a.node, a.url)
            kube.add_pod(NS, "orders-1", uid="uid-orders", node="node-4")  # not an agent
            kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
            config = cli_config(tmp_path, store_url)
            base = ["--config", config, "--all-nodes", "--kubeconfig", kubeconfig,
                    "--agent-port", "9095"]
            for a in agents:
                wait_for(functools.partial(a.sink_up, True), within=30,
                         what=f"{a.node} sinks up")

            # node-4 has no agent: a named failure, the other rows pass.
            rc, out, err = run_cli(capsys, "preflight", *base, "-o", "json")
            assert rc == 1, err
            doc = json.loads(out)
            assert doc["ok"] is False
            assert doc["failures"] == ["node node-4: no evidence-keeper agent — logs on this"
                                       " node are not preserved"]
            rows = {r["node"]: r for r in doc["nodes"]}
            assert sorted(rows) == ["node-1", "node-2", "node-3", "node-4"]
            assert rows["node-4"]["agent"] == "none" and rows["node-4"]["ok"] is False
            for n in ("node-1", "node-2", "node-3"):
                assert rows[n]["agent"] == "ready" and rows[n]["ok"] is True, rows[n]
                assert rows[n]["shipping_current"] is True and rows[n]["loss_gaps"] == 0
                assert {s["sink"]: s["checks"] for s in rows[n]["sinks"]} == {
                    "loki": {"dns": True, "tcp": True}, "store": {"file": True}}
            # The table says the same; the API server saw no caller credentials pass through.
            rc, out, err = run_cli(capsys, "preflight", *base)
            assert rc == 1
            row4 = next(line for line in out.splitlines() if line.startswith("node-4"))
            assert "NONE" in row4 and row4.rstrip().endswith("FAIL")
            assert "node node-4: no evidence-keeper agent" in out
            assert "cluster preflight FAILED: 1 of 4 nodes (node-4)" in out
            assert kube.proxied and all("Authorization" not in h for *_x, h in kube.proxied)

            # Excluded, or outside the node selector: the cluster passes.
            rc, out, err = run_cli(capsys, "preflight", *base, "--exclude-node", "node-4")
            assert rc == 0, out + err
            assert "cluster preflight passed: 3 nodes" in out and "excluded: node-4" in out
            rc, out, _ = run_cli(capsys, "preflight", *base, "--node-selector", "pool=chaos")
            assert rc == 0 and "node-4" not in out
            rc, _, err = run_cli(capsys, "preflight", *base, "--exclude-node", "node-9")
            assert rc == 2 and "no node named node-9" in err

            # A sink outage on node-2: its row only.
            link.down()
            wait_for(lambda: agents[1].sink_up(False), within=30, what="node-2 loki down")
            rc, out, _ = run_cli(capsys, "preflight", *base, "--exclude-node", "node-4",
                                 "-o", "json")
            assert rc == 1
            doc = json.loads(out)
            rows = {r["node"]: r for r in doc["nodes"]}
            assert [r["node"] for r in doc["nodes"] if not r["ok"]] == ["node-2"]
            loki = {r: next(s for s in rows[r]["sinks"] if s["sink"] == "loki")["checks"]
                    for r in rows}
            assert loki == {"node-1": {"dns": True, "tcp": True},
                            "node-2": {"dns": True, "tcp": False},
                            "node-3": {"dns": True, "tcp": True}}
            assert len(doc["failures"]) == 1 and doc["failures"][0].startswith(
                "node node-2: sink loki")
            rc, out, _ = run_cli(capsys, "preflight", *base, "--exclude-node", "node-4")
            lines = {line.split()[0]: line for line in out.splitlines()
                     if line.startswith("node-")}
            assert "loki DOWN(dns:ok,tcp:FAIL)" in lines["node-2"]
            assert lines["node-2"].rstrip().endswith("FAIL")
            for n in ("node-1", "node-3"):
                assert "loki up" in lines[n] and lines[n].rstrip().endswith("ok")

            # gaps --all-nodes: every agent's gaps in one table, each with its node.
            rc, out, _ = run_cli(capsys, "gaps", *base, "-o", "json")
            assert rc == 1  # node-4 cannot report: the answer is incomplete, and says so
            doc = json.loads(out)
            assert doc["complete"] is False
            outages = [g for g in doc["gaps"] if g["kind"] == "sink_outage"]
            assert [(g["node"], g["sink"], g["check"]) for g in outages] == [
                ("node-2", "loki", "tcp")]
            rc, out, err = run_cli(capsys, "gaps", *base, "--exclude-node", "node-4")
            assert rc == 0, err
            assert "sink_outage" in out and "loki tcp" in out
            # Only open gaps: nothing can be said of loss (loss gaps are never open).
            rc, out, _ = run_cli(capsys, "gaps", *base, "--exclude-node", "node-4", "--open",
                                 "-o", "json")
            doc = json.loads(out)
            assert rc == 0 and {r["loss_gaps"] for r in doc["nodes"]} == {None}
            assert [g["node"] for g in doc["gaps"]] == ["node-2"]

            # node-4 gets an agent: the whole cluster is covered.
            link.up()
            wait_for(lambda: agents[1].sink_up(True), within=30, what="node-2 loki up again")
            fourth = AgentProcess(tmp_path, "node-4", store_url=store_url, sink_port=sink.port)
            agents.append(fourth.start())
            kube.add_agent("node-4", fourth.url)
            wait_for(lambda: fourth.sink_up(True), within=30, what="node-4 sinks up")
            rc, out, err = run_cli(capsys, "preflight", *base, "--since", "1s")
            assert rc == 0, out + err
            assert "cluster preflight passed: 4 nodes" in out
    finally:
        link.close()


def test_preflight_all_nodes_agent_not_answering_and_a_cordoned_node(
        tmp_path: Path, sink: SinkServer, agents: list[AgentProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A crash-looping agent pod (no answer through the proxy) fails its node, by name; a
    cordoned node is not schedulable and needs no agent."""
    store_url = f"file://{tmp_path / 'store'}"
    a = AgentProcess(tmp_path, "node-1", store_url=store_url, sink_port=sink.port)
    agents.append(a.start())
    with FakeKube() as kube:
        kube.add_node("node-1")
        kube.add_node("node-2")
        kube.add_agent("node-1", a.url)
        kube.add_agent("node-2", None, name="evidence-keeper-crashing", ready=False)
        kube.add_node("node-3", unschedulable=True)  # cordoned, no agent: not required
        kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        rc, out, _ = run_cli(capsys, "preflight", "--config", cli_config(tmp_path, store_url),
                             "--all-nodes", "--kubeconfig", kubeconfig, "-o", "json")
    assert rc == 1
    doc = json.loads(out)
    rows = {r["node"]: r for r in doc["nodes"]}
    assert rows["node-1"]["ok"] is True
    assert rows["node-2"]["agent"] == "unreachable"
    assert len(doc["failures"]) == 1 and doc["failures"][0].startswith(
        "node node-2: agent evidence-keeper-crashing does not answer (error trying to reach")
    assert rows["node-3"]["ok"] is True and rows["node-3"]["cordoned"] is True
    assert rows["node-3"]["notes"] == ["node node-3: cordoned, no agent (not required)"]


# ------------------------------------------------------------------------------ from the store
def _comparable(gap: dict[str, Any]) -> dict[str, Any]:
    # An open outage's coverage grows in memory between its flushes to the ledger (10 s).
    return {k: v for k, v in gap.items() if not (k == "coverage" and gap["end"] is None)}


def test_gaps_from_store_survive_sigkill_and_a_lost_spool(
        tmp_path: Path, sink: SinkServer, agents: list[AgentProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store_dir = tmp_path / "store"
    link = Proxy(("127.0.0.1", sink.port))
    try:
        doomed = AgentProcess(tmp_path, "node-a", store_url=store_url, sink_port=link.port)
        other = AgentProcess(tmp_path, "node-b", store_url=store_url, sink_port=sink.port)
        agents.extend([doomed, other])
        start_all(agents)
        # node-a: a closed outage with coverage, a truncation (loss), an outage still open.
        sim = doomed.sim
        sim.add_pod(NS, "orders-1", containers=("orders",))
        link.down()
        wait_for(lambda: doomed.sink_up(False), within=30, what="loki down on node-a")
        for i in range(20):
            sim.write(NS, "orders-1", "orders", f"order {i} PAYMENT_FAILED")
        sid = sim.stream_of(NS, "orders-1", "orders")
        wait_for(lambda: doomed.ready().get("spool", {}).get("streams", 0) >= 1,
                 within=30, what="node-a captured the stream")
        link.up()
        wait_for(lambda: doomed.sink_up(True), within=30, what="loki up on node-a")
        sim.truncate(NS, "orders-1", "orders")
        sim.write(NS, "orders-1", "orders", "after the truncation")
        wait_for(lambda: any(g["kind"] == "loss" for g in doomed.gaps()), within=30,
                 what="the truncation recorded")
        link.down()
        wait_for(lambda: doomed.sink_up(False), within=30, what="loki down again")
        before = doomed.gaps()  # then wait: everything in it is in the store before the kill
        wait_for(doomed.ledger_shipped, within=30, what="node-a's ledger shipped")
        kinds = [g["kind"] for g in before]
        assert kinds.count("sink_outage") == 2 and "loss" in kinds, before
        assert any(g["kind"] == "sink_outage" and g["end"] is None for g in before)
        assert sid.namespace == NS

        doomed.kill()
        shutil.rmtree(doomed.spool)

        config = cli_config(tmp_path, store_url)
        with FakeKube() as kube:  # node-a's pod is still there, crash-looping
            kube.add_node("node-a")
            kube.add_node("node-b")
            kube.add_agent("node-a", None, ready=False)
            kube.add_agent("node-b", other.url)
            kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
            rc, out, err = run_cli(capsys, "gaps", "--config", config, "--all-nodes",
                                   "--kubeconfig", kubeconfig, "-o", "json")
        assert rc == 1 and json.loads(out)["complete"] is False
        via_store = [g for g in json.loads(out)["gaps"] if g["node"] == "node-a"]
        assert sorted(g["id"] for g in via_store) == sorted(g["id"] for g in before)
        assert {g["source"] for g in via_store} == {"store"}

        rc, out, err = run_cli(capsys, "gaps", "--config", config, "--from-store",
                               "--node", "node-a", "-o", "json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["nodes"] == ["node-a"] and doc["damaged_objects"] == []
        stored = {g["id"]: g for g in doc["gaps"]}
        assert {g["node"] for g in stored.values()} == {"node-a"}
        assert len({g["ledger_id"] for g in stored.values()}) == 1
        for g in before:
            mine = {k: v for k, v in stored[g["id"]].items()
                    if k not in ("node", "ledger_id", "recorded_at")}
            assert _comparable(mine) == _comparable(g), (mine, g)
        assert len(stored) == len(before)
        # Filters as /gaps has them; the table has a NODE column; other nodes are read too.
        rc, out, _ = run_cli(capsys, "gaps", "--config", config, "--from-store", "--kind",
                             "loss", "--since", "1h", "-o", "json")
        losses = json.loads(out)["gaps"]
        assert [(g["node"], g["reason"]) for g in losses] == [("node-a", "truncated")]
        rc, out, _ = run_cli(capsys, "gaps", "--config", config, "--from-store")
        assert rc == 0 and "node-a" in out and "truncated" in out
        rc, _, err = run_cli(capsys, "gaps", "--config", config, "--from-store", "--since",
                             "yesterday")
        assert rc == 2 and "--since" in err

        # The node comes back with an empty spool: its ledger continues the same chain.
        doomed.spool.mkdir()
        doomed.start()
        wait_for(lambda: doomed.sink_up(False), within=30, what="the new node-a sees loki down")
        link.up()
        wait_for(lambda: doomed.sink_up(True), within=30, what="loki up on the new node-a")
        wait_for(doomed.ledger_shipped, within=30, what="the new ledger shipped")
        doomed.stop()
        rc, out, err = run_cli(capsys, "verify", "--config", config, "--ledger", "--json")
        assert rc == 0, out + err
        report = json.loads(out)
        assert report["nodes"] == 1 and report["objects"] >= 2 and report["problems"] == []
        rc, out, _ = run_cli(capsys, "gaps", "--config", config, "--from-store", "--node",
                             "node-a", "-o", "json")
        assert len({g["ledger_id"] for g in json.loads(out)["gaps"]}) == 2

        # One flipped byte in a ledger object: verify names it.
        objects = sorted((store_dir / "default" / "_ledger" / "node-a").glob("*.jsonl.zst"))
        assert len(objects) >= 2
        victim = objects[0]
        body = bytearray(victim.read_bytes())
        body[len(body) // 2] ^= 0x01
        victim.write_bytes(bytes(body))
        key = str(victim.relative_to(store_dir))
        rc, out, _ = run_cli(capsys, "verify", "--config", config, "--ledger")
        assert rc == 1
        assert f"FAIL  {key}:" in out and "VERIFICATION FAILED" in out
        rc, out, err = run_cli(capsys, "verify", "--config", config, "--ledger", "--node",
                             "node-b")
        assert rc == 0 and "no ledger objects found for node node-b" in err, out
        rc, out, err = run_cli(capsys, "gaps", "--config", config, "--from-store", "-o", "json")
        assert key in json.loads(out)["damaged_objects"] and key in err
    finally:
        link.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["preflight", "--all-nodes", "--url", "http://127.0.0.1:9"], "exclude each other"),
    (["gaps", "--from-store", "--all-nodes"], "exclude each other"),
    (["preflight", "--exclude-node", "node-1"], "need --all-nodes"),
    (["gaps", "--node", "node-1"], "add --from-store"),
    (["preflight", "--all-nodes", "--kubeconfig", "/nonexistent/kubeconfig"],
     "cannot load Kubernetes credentials"),
    (["gaps", "--from-store", "--since", "2025-11-10T12:00:00"], "needs a time zone"),
    (["gaps", "--from-store", "--since", "1h", "--until", "2h"], "--since is after --until"),
    (["verify"], "verify needs an ARCHIVE_ID, or --ledger"),
    (["verify", "--ledger", "0" * 24], "takes no ARCHIVE_ID"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               argv: list[str], message: str) -> None:
    config = cli_config(tmp_path, f"file://{tmp_path / 'store'}")
    rc, out, err = run_cli(capsys, *argv, "--config", config)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_the_api_server_down_is_one_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKube() as kube:
        kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        kube.down()
        rc, _, err = run_cli(capsys, "preflight", "--all-nodes", "--kubeconfig", kubeconfig,
                             "--config", cli_config(tmp_path, f"file://{tmp_path}/store"))
        kube.up()
    assert rc == 2 and err.startswith("evidence-keeper: cannot list nodes:"), err
    assert len(err.strip().splitlines()) == 1
