"""``kubectl evidence``: the real ``kubectl`` finds the ``kubectl-evidence`` entry point on PATH
and runs it against a fake API server whose pod proxy reaches two real agents.

Real parts: /usr/bin/kubectl (plugin discovery and exec), the installed ``kubectl-evidence``
script, the official Kubernetes client inside it, two agents in threads shipping to one
``file://`` store, and the API server's pod list, pod proxy and secrets (the simulated API
server, :class:`evidence_keeper.sim.apiserver.SimApiServer`, with a bearer token, in front of
tests/fakekube.py's :class:`FakeKube`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from evidence_keeper.cli import main as cli_main
from evidence_keeper.commands.kubectl.cluster import container_env, token_secret
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.sim.apiserver import SimApiServer
from evidence_keeper.store import FileStore
from evidence_keeper.version import build_info
from tests.conftest import AgentThread, export_bytes
from tests.fakekube import FakeKube, Pod

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
PLUGIN = Path(sys.executable).parent / "kubectl-evidence"
COMPLETER = Path(sys.executable).parent / "kubectl_complete-evidence"
NS = "sock-shop"
TOKEN = "ek-plugin-token-0123456789abcdef"
KUBE_TOKEN = "kube-admin-token"
LABELS = {"app.kubernetes.io/name": "evidence-keeper"}

T = TypeVar("T")
R = TypeVar("R")

pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(),
                                reason="kubectl is not installed (make kubectl)")


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]
    front: SimApiServer
    store: FileStore
    sims: dict[str, KubeletSim]
    token_file: Path
    agents: tuple[AgentThread, ...]

    def kubectl(self, *args: str, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KUBECTL, *args], env=env or self.env, capture_output=True,
                              text=True, timeout=120, check=False)


def side_by_side(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` over independent kubectl invocations at once, results in order: each spends
    most of its second starting the plugin's interpreter."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.fixture
def plugin_bin(tmp_path: Path) -> Path:
    """A PATH entry holding only the installed entry points (``make venv`` installs them)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for script in (PLUGIN, COMPLETER):
        assert script.exists(), f"{script} missing: reinstall the package (make venv)"
        (bindir / script.name).symlink_to(script)
    return bindir


@pytest.fixture
def cluster(tmp_path: Path, plugin_bin: Path,
            make_settings: Callable[..., Settings]) -> Iterator[Cluster]:
    token_file = tmp_path / "archive-token"
    token_file.write_text(TOKEN + "\n")
    store_url = f"file://{tmp_path / 'store'}"
    sims: dict[str, KubeletSim] = {}
    settings: dict[str, Settings] = {}
    for node in ("node-a", "node-b"):
        root = tmp_path / node / "pods"
        root.mkdir(parents=True)
        settings[node] = make_settings(node_name=node, log_root=str(root),
                                       spool_dir=str(tmp_path / node / "spool"),
                                       store_url=store_url, flush_interval_s=0.3,
                                       archive_token_file=str(token_file))
        sims[node] = KubeletSim(root)
    sims["node-a"].add_pod(NS, "orders-1", containers=("orders",))
    sims["node-b"].add_pod(NS, "payment-1", containers=("payment",), fmt="docker")
    for i in range(30):
        sims["node-a"].write(NS, "orders-1", "orders", f"Order {i} updated to PAYMENT_FAILED")
        sims["node-b"].write(NS, "payment-1", "payment", f"charge {i}: connection refused")
    agent_env = [{"name": "EK_STORE_URL", "value": store_url},
                 {"name": "EK_CLUSTER", "value": "default"},
                 {"name": "EK_LISTEN", "value": "0.0.0.0:9095"},
                 {"name": "EK_S3_ENDPOINT_URL", "value": ""},
                 {"name": "EK_ARCHIVE_TOKEN_FILE",
                  "value": "/etc/evidence-keeper/archive-token/token"},
                 {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]

    def with_env(pod: Pod) -> None:
        """The agent container as deploy/daemonset.yaml has it: env and the token Secret."""
        pod["spec"]["containers"][0]["env"] = agent_env
        pod["spec"]["containers"][0]["volumeMounts"] = [
            {"name": "archive-token", "mountPath": "/etc/evidence-keeper/archive-token",
             "readOnly": True}]
        pod["spec"]["volumes"] = [{"name": "archive-token", "secret": {
            "secretName": "evidence-keeper-archive-token", "optional": True}}]

    with AgentThread(settings["node-a"]) as a, AgentThread(settings["node-b"]) as b, \
            FakeKube() as kube:
        targets: dict[tuple[str, str], str] = {}
        for node, agent in (("node-a", a), ("node-b", b)):
            name = f"evidence-keeper-{node[-1] * 5}"
            kube.add_pod("evidence-keeper", name, uid=f"uid-{node}", labels=LABELS, node=node,
                         containers=("agent",))
            kube.update("evidence-keeper", name, with_env)
            targets[("evidence-keeper", name)] = agent.url
        kube.add_pod("evidence-keeper", "unrelated", uid="uid-x", node="node-a")
        with SimApiServer(kube, targets=targets, token=KUBE_TOKEN) as front:
            front.secrets[("evidence-keeper", "evidence-keeper-archive-token")] = {
                "token": TOKEN}
            kubeconfig = front.write_kubeconfig(tmp_path / "kubeconfig")
            env = {"PATH": f"{plugin_bin}:{Path(KUBECTL).parent}:/usr/bin:/bin",
                   "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig)}
            store = FileStore(tmp_path / "store")
            deadline = time.monotonic() + 30
            for sim in sims.values():
                for sid in sim.streams():
                    while export_bytes(store, sid)[0] != sim.record(sid):
                        assert time.monotonic() < deadline, f"{sid} not shipped"
                        time.sleep(0.1)
            # Each agent's first store probe has answered: its preflight has a verdict.
            while not (a.agent.sinks.all_up() and b.agent.sinks.all_up()):
                assert time.monotonic() < deadline, "the agents' store probes never passed"
                time.sleep(0.05)
            yield Cluster(tmp_path, env, front, store, sims, token_file, (a, b))


def test_kubectl_discovers_the_plugin(plugin_bin: Path, tmp_path: Path) -> None:
    env = {"PATH": f"{plugin_bin}:/usr/bin:/bin", "HOME": str(tmp_path)}
    listed = subprocess.run([KUBECTL, "plugin", "list"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert str(plugin_bin / "kubectl-evidence") in listed.stdout, listed.stdout + listed.stderr
    version = subprocess.run([KUBECTL, "evidence", "--version"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
    info = build_info()
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"kubectl-evidence {info.version} (revision {info.revision})"
    helped = subprocess.run([KUBECTL, "evidence", "--help"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    for word in ("gaps", "preflight", "archive", "search", "export", "exit codes:"):
        assert word in helped.stdout


def test_kubectl_completes_the_plugin(plugin_bin: Path, tmp_path: Path) -> None:
    """kubectl's own ``__complete`` asks ``kubectl_complete-evidence`` (cobra's format)."""
    env = {"PATH": f"{plugin_bin}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def complete(*words: str) -> list[str]:
        done = subprocess.run([KUBECTL, "__complete", "evidence", *words], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    first, commands, output, kind, path = side_by_side(lambda words: complete(*words), [
        ("se",), ("",), ("gaps", "-o", ""), ("gaps", "--ki"), ("search", "--kubeconfig", "")])
    assert first[0].startswith("search\t") and first[-1] == ":4"
    assert [ln.split("\t")[0] for ln in commands[:-1]] == [
        "gaps", "preflight", "archive", "search", "export", "completion"]
    assert output == ["text", "json", ":4"]
    assert kind == ["--kind", ":4"]
    assert path == [":0"]  # a path: the shell's files


def test_gaps_and_preflight_of_every_agent_through_the_pod_proxy(cluster: Cluster) -> None:
    done, text, gate = side_by_side(lambda args: cluster.kubectl(*args), [
        ("evidence", "gaps", "-o", "json"), ("evidence", "gaps", "-n", NS),
        ("evidence", "preflight", "-o", "json")])
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["nodes"] == 2 and doc["errors"] == []
    assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("NODE")
    assert "gaps on 2 nodes" in text.stdout
    # Every request went through the proxy to an agent pod, as the API server forwards it.
    paths = {(name, path.split("?")[0]) for _m, name, path, _h in cluster.front.proxied}
    assert paths == {("evidence-keeper-aaaaa", "/gaps"), ("evidence-keeper-bbbbb", "/gaps"),
                     ("evidence-keeper-aaaaa", "/readyz"), ("evidence-keeper-bbbbb", "/readyz")}
    assert any("namespace=sock-shop" in p for _m, _n, p, _h in cluster.front.proxied)

    assert gate.returncode == 0, gate.stdout + gate.stderr
    report = json.loads(gate.stdout)
    assert report["ok"] is True
    assert {c["node"] for c in report["checks"]} == {"node-a", "node-b"}
    # An agent that does not answer fails the gate (exit 1), named in its check.
    del cluster.front.targets[("evidence-keeper", "evidence-keeper-bbbbb")]
    gate, partial = side_by_side(lambda args: cluster.kubectl(*args), [
        ("evidence", "preflight"), ("evidence", "gaps")])
    assert gate.returncode == 1
    assert "FAIL  node-b: agent evidence-keeper-bbbbb answers: HTTP 503" in gate.stdout
    assert "preflight failed" in gate.stderr
    assert partial.returncode == 2 and "node-b (evidence-keeper-bbbbb): HTTP 503" in partial.stderr


def test_archive_search_and_export(cluster: Cluster,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    done = cluster.kubectl("evidence", "archive", "-n", NS, "--reason", "INC-7",
                           "--label", "inc-7", "--token-file", str(cluster.token_file),
                           "-o", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "complete" and len(doc["nodes"]) == 2
    assert "2/2 nodes complete" in done.stderr
    # The agent token travelled in its own header; the API server's credential never did.
    posts = [h for m, _n, _p, h in cluster.front.proxied if m == "POST"]
    assert len(posts) == 2
    assert all("Authorization" not in h and h["X-Evidence-Keeper-Token"] == TOKEN
               for h in posts)
    # Without --token-file the token comes from the Secret the agents mount.
    again = cluster.kubectl("evidence", "archive", "-n", NS, "--reason", "INC-7",
                            "--label", "inc-7", "-o", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["id"] == doc["id"]  # the same label, the same archive
    del cluster.front.secrets[("evidence-keeper", "evidence-keeper-archive-token")]
    missing = cluster.kubectl("evidence", "archive", "-n", NS, "--reason", "INC-7")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "cannot read the archive token from secret evidence-keeper-archive-token" in (
        missing.stderr) and "HTTP 404" in missing.stderr
    # The archive the plugin made verifies (in this process: the CLI's own tests run it).
    config = cluster.tmp / "verify.yaml"
    config.write_text(f"store_url: file://{cluster.store.root}\nspool_dir: {cluster.tmp / 'cli'}\n")
    capsys.readouterr()
    assert cli_main(["verify", doc["id"], "--config", str(config), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    # search and export read the store the agents' pod spec names (no --config).
    out = cluster.tmp / "payment.log"
    found, every, empty, exported = side_by_side(lambda args: cluster.kubectl(*args), [
        ("evidence", "search", "-F", "PAYMENT_FAILED", "-n", NS, "--timestamps"),
        ("evidence", "search", "connection refused", "-A"),
        ("evidence", "search", "x", "-n", "payments"),
        ("evidence", "export", "-n", NS, "--pod", "payment-1", "--container", "payment",
         "-o", str(out))])
    assert found.returncode == 0, found.stderr
    assert len(found.stdout.splitlines()) == 30
    assert all(" orders-1 orders │ Order " in ln for ln in found.stdout.splitlines())
    assert every.returncode == 0 and every.stdout.startswith(f"{NS} payment-1 payment │")
    assert empty.returncode == 1 and "no evidence for namespace payments" in empty.stderr
    assert exported.returncode == 0, exported.stderr
    sim = cluster.sims["node-b"]
    assert out.read_bytes() == sim.record(sim.stream_of(NS, "payment-1", "payment"))


def test_plugin_errors_are_one_line(cluster: Cluster) -> None:
    bad = cluster.front.write_kubeconfig(cluster.tmp / "bad-kubeconfig", token="wrong")
    calls: list[tuple[tuple[str, ...], dict[str, str] | None]] = [
        (("evidence", "gaps"), {**cluster.env, "KUBECONFIG": str(bad)}),
        (("evidence", "preflight", "--agent-namespace", "elsewhere"), None),
        (("evidence", "gaps", "--node", "node-z"), None),
        (("evidence", "gaps", "--node", "node-a", "-o", "json"), None),
        (("evidence", "search", "x"), None)]
    done, none, nowhere, one, usage = side_by_side(
        lambda call: cluster.kubectl(*call[0], env=call[1]), calls)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "HTTP 401" in done.stderr, done.stderr
    assert none.returncode == 2 and "no agent pods" in none.stderr
    assert nowhere.returncode == 2 and "no agent on node node-z" in nowhere.stderr
    assert one.returncode == 0 and json.loads(one.stdout)["nodes"] == 1
    assert usage.returncode == 2 and "exactly one of -n NAMESPACE and -A" in usage.stderr


def test_plugin_store_settings_come_from_the_agents(cluster: Cluster) -> None:
    """Without --config the agents' EK_* values are used; the caller's EK_* still win."""
    elsewhere = cluster.tmp / "elsewhere"
    elsewhere.mkdir()
    done = cluster.kubectl("evidence", "search", "x", "-n", NS,
                           env={**cluster.env, "EK_STORE_URL": f"file://{elsewhere}"})
    assert done.returncode == 1 and f"file://{elsewhere}" in done.stderr
    assert os.listdir(elsewhere) == []


def test_token_secret_follows_mounts_items_and_subpaths() -> None:
    def pod(mount: dict[str, object], secret: dict[str, object], path: str) -> Pod:
        return {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "agent"}},
                "spec": {"containers": [
                    {"name": "sidecar", "env": [{"name": "EK_ARCHIVE_TOKEN_FILE",
                                                 "value": "/elsewhere"}]},
                    {"name": "agent", "volumeMounts": [{"name": "t", **mount}],
                     "env": [{"name": "EK_ARCHIVE_TOKEN_FILE", "value": path},
                             {"name": "NODE_NAME", "valueFrom": {"fieldRef": {}}}]}],
                    "volumes": [{"name": "other", "emptyDir": {}},
                                {"name": "t", "secret": secret}]}}

    plain = pod({"mountPath": "/etc/t"}, {"secretName": "s"}, "/etc/t/token")
    assert token_secret(plain) == ("s", "token")
    assert container_env(plain) == {"EK_ARCHIVE_TOKEN_FILE": "/etc/t/token"}
    mapped = pod({"mountPath": "/etc/t/"}, {"secretName": "s", "items": [
        {"key": "archive", "path": "token"}]}, "/etc/t/token")
    assert token_secret(mapped) == ("s", "archive")
    sub = pod({"mountPath": "/etc/token", "subPath": "tok"}, {"secretName": "s"}, "/etc/token")
    assert token_secret(sub) == ("s", "tok")
    assert token_secret(pod({"mountPath": "/etc/t"}, {"secretName": "s"}, "/run/x")) is None
    assert token_secret(pod({"mountPath": "/etc/t"}, {}, "/etc/t/token")) is None
