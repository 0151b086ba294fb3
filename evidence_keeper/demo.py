"""``evidence-keeper demo``: the Nov 10 incident, replayed on a simulated node.

The demo starts a real S3 endpoint on loopback (moto's server, when installed: ``make demo``
installs it) with an Object Lock bucket, and a sink probe for the Datadog log intake whose DNS
is broken, as it was on Nov 10. It builds a kubelet log tree with the simulator, starts the
real agent on it (the same ``Agent`` as ``run``), runs ``preflight --all-nodes`` through a
simulated API server (which fails, as it should have on Nov 10: the sink's DNS is broken and a
second node has no agent at all), plays the sock-shop incident in real time (orders failing with
``PAYMENT_FAILED``, a rotation that splits a line, a deleted pod, the restarts that wiped the
evidence on Nov 11, the DNS fix), shows ``/gaps`` before and after the fix, shuts the agent
down in order and proves, from the store alone, that the evidence was kept: every stream
exported from the store is compared byte for byte with what the simulated containers wrote,
and the ``PAYMENT_FAILED`` lines are printed from the export. The gap ledger is read back
from the store with no agent running (``gaps --from-store``) and its chain verified.

The ending (issue 15): the Datadog sink is also a replay target with ``replay_on_recovery``,
pointing at a local Datadog-compatible intake (the strict one the tests use). When the DNS
fix closes the outage, the agent backfills the outage window into it, and the demo shows the
Nov 10 ``PAYMENT_FAILED`` lines arriving in "Datadog" — late, but there. The lines carry the
incident's timestamps while the agent runs today, so the demo gives the backfill (and the
intake) the incident's clock (:class:`IncidentTimeline`): at the DNS fix it is Nov 11 05:30
UTC, and Nov 10's lines are about 17 hours old, inside Datadog's 18 hour window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from evidence_keeper.api.client import call
from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.commands import archive, export, gaps, preflight, search, verify
from evidence_keeper.commands.base import build_parser, dispatch, subcommand
from evidence_keeper.commands.render import format_gaps
from evidence_keeper.logs import configure_logging
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.sim import KubeletSim, nov10_incident, play
from evidence_keeper.sim.apiserver import SimAgent, SimApiServer, SimCluster
from evidence_keeper.sim.intakes import DatadogIntake
from evidence_keeper.sim.scenario import NAMESPACE, PAYMENT_FAILED_MARKER, ScenarioStep
from evidence_keeper.store import FileStore, Store
from evidence_keeper.supervisor import Agent

_TTY = sys.stdout.isatty()
BOLD, DIM, RED, GREEN, RESET = (
    ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[0m") if _TTY else ("",) * 5)


def cli_main(argv: list[str]) -> int:
    """The commands the demo shows, run exactly as ``evidence-keeper`` runs them."""
    parser = build_parser(prog="evidence-keeper", description="the demo's commands",
                          commands=(preflight, gaps, archive, verify, search, export))
    return dispatch(parser, argv)


def keep_copy(store: Store, dest: Path) -> FileStore:
    """A ``file://`` copy of every object in ``store`` (keys and metadata as they are), so the
    evidence outlives the demo's S3 endpoint and the closing ``Try:`` hint works."""
    copy = FileStore(dest)
    for key in store.list(""):
        copy.put(key, store.get(key), store.head(key) or {})
    return copy


def _h(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def demo_settings(work: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "node_name": "ip-10-0-1-23.ec2.internal",
        "cluster": "sock-shop-staging",
        "log_root": str(work / "node/var/log/pods"),
        "spool_dir": str(work / "node/var/lib/evidence-keeper"),
        "store_url": f"file://{work / 'store'}",
        "kubernetes": "off",
        "flush_interval_s": 2,
        "segment_max_bytes": "64KiB",
        "discover_interval_s": 0.25,
        "tail_interval_s": 0.1,
        "log_level": "warning",
        "listen": "127.0.0.1:0",
        "probe_interval_s": 0.5,
    }
    base.update(overrides)
    return load_settings(None, environ={}, overrides=base)


DD_INTAKE_HOST = "agent-http-intake.logs.datadoghq.com"


class Nov10DNS:
    """The pod resolver of Nov 10: the Datadog intake does not resolve until it is fixed."""

    def __init__(self) -> None:
        self.broken = True

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if self.broken and host == DD_INTAKE_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == DD_INTAKE_HOST:  # the demo has no network: the fixed name is loopback
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return socket.getaddrinfo(host, port, *args, **kwargs)


class IncidentTimeline:
    """The incident's clock for the backfill: agent instants → the simulated time of the lines.

    Simulated time only moves when a scenario step jumps it, so an agent instant maps to the
    simulated time read at the latest mark before it (a mark is taken when the agent starts and
    after every step).
    """

    def __init__(self, sim: KubeletSim) -> None:
        self.sim = sim
        self.marks: list[tuple[datetime, datetime]] = []
        self.lock = threading.Lock()

    def mark(self) -> None:
        with self.lock:
            self.marks.append((datetime.now(UTC), self.sim.now()))

    def log_time(self, at: datetime) -> datetime:
        with self.lock:
            before = [sim_t for wall, sim_t in self.marks if wall <= at]
            return before[-1] if before else self.marks[0][1]

    def now(self) -> datetime:
        return self.log_time(datetime.now(UTC))


class LocalDatadog:
    """A Datadog-compatible log intake on loopback, served from a thread of its own."""

    API_KEY = "demo-datadog-api-key"

    def __init__(self, now: Callable[[], float]) -> None:
        self.intake = DatadogIntake(api_key=self.API_KEY, now=now)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ek-demo-datadog",
                                       daemon=True)
        self.thread.start()
        base = asyncio.run_coroutine_threadsafe(self.intake.start(), self.loop).result(10)
        self.url = base + DatadogIntake.path

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.intake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _show_gaps(url: str, title: str) -> None:
    _h(f"{title}: GET {url}/gaps  (evidence-keeper gaps --url {url})")
    _, doc = call(url, "/gaps")
    print("  " + format_gaps(doc).replace("\n", "\n  "))


class LocalS3:
    """moto's S3 server on 127.0.0.1 with an Object Lock bucket (None without moto)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        for k, v in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        import boto3

        boto3.client("s3", endpoint_url=self.url).create_bucket(
            Bucket="evidence", ObjectLockEnabledForBucket=True)

    def stop(self) -> None:
        self.server.stop()


async def _run_agent_during(agent: Agent, sim: KubeletSim, steps: list[ScenarioStep],
                            speed: float, dns: Nov10DNS, archive_ids: list[str],
                            timeline: IncidentTimeline, datadog: LocalDatadog) -> None:
    stop = asyncio.Event()
    timeline.mark()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        while agent.api_address is None or agent.sinks.rounds < 2:
            if task.done():
                task.result()
            await asyncio.sleep(0.1)
        url = f"http://{agent.api_address[0]}:{agent.api_address[1]}"
        await asyncio.to_thread(_cluster_preflight, agent, url)
        print(f"  {DIM}(on Nov 10 the test went ahead anyway; so does this replay){RESET}")
        _h("Replaying the incident (agent running)")
        started = time.monotonic()

        def on_step(step: ScenarioStep) -> None:
            timeline.mark()
            if "DNS fixed" in step.description:
                _show_gaps(url, "Before the DNS fix, mid-incident")
                dns.broken = False
            print(f"  {DIM}t+{time.monotonic() - started:4.1f}s{RESET}  {step.description}",
                  flush=True)

        await asyncio.to_thread(play, sim, steps, speed=speed, on_step=on_step)
        # The DNS recovery is probed (the outage closes) before the gaps are shown again; the
        # archive below seals and ships what is still open itself.
        await _sink_up(agent, task, "datadog", within=10 * agent.settings.probe_interval_s)
        await asyncio.to_thread(_show_gaps, url, "After the DNS fix")
        await _show_backfill(agent, datadog)
        assert agent.settings.archive_token_file is not None
        args = ["archive", "--url", url, "--token-file", str(agent.settings.archive_token_file),
                "--namespace", NAMESPACE, "--since", "2025-11-10T12:00:00Z",
                "--reason", "Nov 10 chaos test: orders failing with PAYMENT_FAILED",
                "--label", "nov10-chaos", "--wait"]
        _h("Right after the test: evidence-keeper archive --namespace sock-shop --wait ...")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = await asyncio.to_thread(cli_main, args)
        archive_ids.append(out.getvalue().strip())
        print(f"  archive id: {archive_ids[-1]} (exit {rc})")
    finally:
        stop.set()
        await task


async def _sink_up(agent: Agent, task: asyncio.Task[None], sink: str, *, within: float) -> None:
    """Until the agent's probes see ``sink`` up (at most ``within`` seconds: the story then
    goes on and its report says what did not happen)."""
    deadline = time.monotonic() + within
    while agent.sinks.states[sink].up is not True and time.monotonic() < deadline:
        if task.done():
            task.result()
        await asyncio.sleep(0.1)


UNCOVERED_NODE = "ip-10-0-1-57.ec2.internal"


def _cluster_preflight(agent: Agent, url: str) -> None:
    """``preflight --all-nodes`` through a simulated API server: this node, and one more node
    where the DaemonSet has no pod (a taint it does not tolerate), as nobody noticed on Nov 10."""
    _h("evidence-keeper preflight --all-nodes, before the chaos test (the gate the runbook"
       " lacked)")
    node = agent.settings.node_name
    nodes = sorted([node, UNCOVERED_NODE])
    cluster = SimCluster(nodes=nodes, agents=[SimAgent("evidence-keeper-x7k2p", node, url)])
    with SimApiServer(cluster, targets=cluster.targets) as api:
        kubeconfig = api.write_kubeconfig(Path(agent.settings.spool_dir).parent / "kubeconfig")
        print(f"  {DIM}(the API server knows {len(nodes)} nodes; the DaemonSet has a pod on one:"
              f" {UNCOVERED_NODE} has a taint it does not tolerate){RESET}", flush=True)
        sys.stdout.flush()
        cli_main(["preflight", "--all-nodes", "--kubeconfig", str(kubeconfig), "--since", "1h",
                  "--agent-port", str(agent.settings.listen_port or 9095)])
        sys.stdout.flush()


def _ledger_from_store(cfg: Path) -> int:
    _h("The gap ledger from the store alone (no agent running): evidence-keeper gaps"
       " --from-store")
    sys.stdout.flush()
    cli_main(["gaps", "--from-store", "--config", str(cfg)])
    sys.stdout.flush()
    _h("evidence-keeper verify --ledger  (every node's ledger chain: bodies, hashes, links)")
    sys.stdout.flush()
    rc = cli_main(["verify", "--ledger", "--config", str(cfg)])
    sys.stdout.flush()
    return rc


async def _show_backfill(agent: Agent, datadog: LocalDatadog) -> None:
    """Wait for the automatic backfill of the Datadog outage and show what Datadog received."""
    _h("After the DNS fix: the agent backfills the outage window into Datadog"
       " (replay_on_recovery: [datadog])")
    deadline = time.monotonic() + 120
    backfill: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(agent.ledger.gaps, kind="sink_outage")
        backfill = rows[-1].to_json().get("backfill", {}) if rows else {}
        if backfill.get("status") in ("complete", "partial", "failed"):
            break
        await asyncio.sleep(0.2)
    print(f"  backfill {backfill.get('status', 'not started')}: {backfill.get('lines', 0)}"
          f" lines ({backfill.get('bytes', 0)} bytes) of the outage window replayed to"
          f" {datadog.url} via {', '.join(backfill.get('paths') or {}) or '-'}"
          + (f"; error: {backfill['error']}" if backfill.get("error") else ""))
    failed = [e for e in datadog.intake.entries if "PAYMENT_FAILED" in str(e.get("message"))]
    for e in failed:
        print(f"  {GREEN}datadog{RESET} {e['evidence_keeper']['time'][:23]}Z"
              f" service:{e['service']} host:{e['hostname']} │ {e['message']}")
    print(f"  PAYMENT_FAILED lines in Datadog after the DNS fix: {len(failed)}"
          f" (late, but there: dashboards and saved searches now show Nov 10)")


def _report(settings: Settings, agent: Agent, sim: KubeletSim, store: Store,
            unseen: set[StreamId], archive_ids: list[str], cfg: Path, keep: Path,
            datadog: LocalDatadog) -> int:
    _h("Gaps in the ledger after shutdown")
    gaps = agent.ledger.gaps()
    losses = [g for g in gaps if g.kind == "loss"]
    for g in gaps:
        j = g.to_json()
        if g.kind == "sink_outage":
            cov = j.get("coverage", {})
            print(f"  sink_outage  {j['sink']} ({j['check']}) since {j['start'][:19]}Z"
                  f" {'still open' if g.open else 'until ' + str(j['end'])[:19]}:"
                  f" {j.get('detail')}\n    coverage: the agent captured"
                  f" {cov.get('captured_bytes')} bytes from {cov.get('streams')} streams in"
                  f" {', '.join(cov.get('namespaces', []))} and shipped"
                  f" {cov.get('shipped_bytes')} to the store meanwhile")
        elif g.kind == "loss":
            print(f"  loss         {j.get('pod')}/{j.get('container')}#{j.get('restart')}"
                  f" offset={j.get('offset')} bytes={j.get('bytes')}: {j.get('detail')}")
        else:
            print(f"  {g.kind:<12} {j['start'][:19]}Z - {str(j['end'])[:19]}"
                  f" {j.get('detail', '')}")
    if not losses:
        print(f"  {GREEN}no loss: every byte written on the node was captured{RESET}")

    _h(f"Evidence in the store ({store.describe()})")
    exact = True
    failed_lines: list[bytes] = []
    witness: StreamId | None = None
    for sid in sorted(sim.streams()):
        found = find_streams(store, cluster=settings.cluster, namespace=sid.namespace,
                             pod=sid.pod, container=sid.container, restart=sid.restart,
                             pod_uid=sid.pod_uid)
        buf = io.BytesIO()
        segments = 0
        if found:
            segments = export_stream(store, found[0], buf).segments
        if sid in unseen:
            print(f"  {sid.namespace}/{sid.pod}/{sid.container} #{sid.restart}:"
                  f" {DIM}deleted by kubelet before the agent started: nothing to see{RESET}")
            continue
        ok = buf.getvalue() == sim.record(sid)
        exact &= ok
        on_disk = "deleted by kubelet" if not sim.files_of(sid) else "still on node"
        mark = f"{GREEN}byte-exact{RESET}" if ok else f"{RED}DIFFERS{RESET}"
        print(f"  {sid.namespace}/{sid.pod}/{sid.container} #{sid.restart}:"
              f" {len(buf.getvalue()):>7} bytes, {segments:>2} segments, {mark}"
              f"  {DIM}({on_disk}){RESET}")
        if sid.namespace == NAMESPACE:
            found_here = [ln for ln in buf.getvalue().splitlines()
                          if PAYMENT_FAILED_MARKER in ln]
            witness = witness or (sid if found_here else None)
            failed_lines += found_here

    ledger_ok = _ledger_from_store(cfg) == 0
    verified = 1
    if archive_ids and archive_ids[0]:
        _h(f"evidence-keeper verify {archive_ids[0]}  (hashes, chain, presence, digest)")
        verified = cli_main(["verify", archive_ids[0], "--config", str(cfg)])
    _h("Did PAYMENT_FAILED happen on Nov 10?  evidence-keeper search PAYMENT_FAILED"
       " --namespace sock-shop -F")
    sys.stdout.flush()
    searched = cli_main(["search", "PAYMENT_FAILED", "--namespace", NAMESPACE, "-F",
                      "--config", str(cfg)])
    sys.stdout.flush()
    print(f"\n  {len(failed_lines)} PAYMENT_FAILED lines preserved, the lines Datadog never"
          f" received; every stream byte-exact: {'yes' if exact else 'NO'};"
          f" archive verified: {'yes' if verified == 0 else 'NO'}")
    _hint(settings, store, keep, witness)
    in_datadog = sum(1 for e in datadog.intake.entries
                     if PAYMENT_FAILED_MARKER.decode() in str(e.get("message")))
    print(f"  PAYMENT_FAILED lines backfilled into Datadog: {in_datadog} of"
          f" {len(failed_lines)}; intake violations: {len(datadog.intake.violations)}")
    ok = (exact and bool(failed_lines) and verified == 0 and searched == 0 and ledger_ok
          and in_datadog == len(failed_lines) and not datadog.intake.violations)
    return 0 if ok else 1


def _hint(settings: Settings, store: Store, keep: Path, witness: StreamId | None) -> None:
    """Leave the evidence where the closing hint can reach it once the demo's S3 is gone."""
    if isinstance(store, FileStore):
        copy = store
    else:
        if keep.exists():
            shutil.rmtree(keep)
        copy = keep_copy(store, keep)
    cfg = keep.parent / "evidence.yaml"
    cfg.write_text(f"cluster: {settings.cluster}\nstore_url: {copy.describe()}\n"
                   "kubernetes: 'off'\n")
    print(f"\n  The evidence stays in {copy.describe()} ({cfg} points at it).")
    ns, pod, container = ((witness.namespace, witness.pod, witness.container) if witness
                          else (NAMESPACE, "<pod>", "<container>"))
    print(f"  Try: evidence-keeper export --config {cfg} --namespace {ns}"
          f" --pod {pod} --container {container}")


def run_demo(*, workdir: str | None = None, speed: float = 1.0) -> int:
    configure_logging("critical")  # the demo prints its own story; the agent's log is JSON
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ek-demo-"))
    if workdir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    s3: LocalS3 | None = None
    overrides: dict[str, Any] = {"sink_probes": f"datadog=dns:{DD_INTAKE_HOST}",
                                 "replay_on_recovery": ["datadog"]}
    try:
        s3 = LocalS3()
        overrides.update(store_url="s3://evidence/nov10", s3_endpoint_url=s3.url,
                         object_lock_days=30)
    except ImportError:
        print("(moto is not installed: using a file:// store; `make demo` installs it)")
    try:
        token = work / "archive-token"
        token.write_text(secrets.token_hex(16))
        token.chmod(0o600)
        overrides["archive_token_file"] = str(token)
        key = work / "datadog-api-key"
        key.write_text(LocalDatadog.API_KEY)
        key.chmod(0o600)
        clock: list[IncidentTimeline] = []
        datadog = LocalDatadog(now=lambda: clock[0].now().timestamp() if clock else time.time())
        try:
            overrides["replay_targets"] = {"datadog": {
                "kind": "datadog", "url": datadog.url, "credentials_file": str(key)}}
            return _demo(work, demo_settings(work, **overrides), speed, s3, datadog, clock)
        finally:
            datadog.stop()
    finally:
        if s3 is not None:
            s3.stop()


def _demo(work: Path, settings: Settings, speed: float, s3: LocalS3 | None,
          datadog: LocalDatadog, clock: list[IncidentTimeline]) -> int:
    cfg = Path(settings.spool_dir) / "demo.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        f"cluster: {settings.cluster}\nstore_url: {settings.store_url}\n"
        f"spool_dir: {settings.spool_dir}\nlog_root: {settings.log_root}\nkubernetes: 'off'\n"
        + (f"s3_endpoint_url: {settings.s3_endpoint_url}\n" if settings.s3_endpoint_url else ""))

    _h("evidence-keeper demo: the Nov 10 sock-shop incident on a simulated node")
    print(f"  node log tree  {settings.log_root}\n  spool          {settings.spool_dir}\n"
          f"  store          {settings.store_url}"
          + (f"  (S3 on {s3.url}, Object Lock COMPLIANCE {settings.object_lock_days} days)"
             if s3 else "")
          + f"\n  sink probe     datadog=dns:{DD_INTAKE_HOST} (DNS broken, as on Nov 10)"
          f"\n  replay target  datadog -> {datadog.url} (a local Datadog-compatible intake),"
          " backfilled when the outage closes")
    print("  The agent starts on a node whose sink DNS is already broken, like Nov 10.")
    sim = KubeletSim(Path(settings.log_root), max_files=3)
    steps = nov10_incident(sim)
    unseen = {sid for sid in sim.streams() if not sim.files_of(sid)}
    dns = Nov10DNS()
    agent = Agent(settings, resolver=dns)
    timeline = IncidentTimeline(sim)
    clock.append(timeline)
    agent.backfill.timeline = timeline  # the lines carry Nov 10's clock, not today's
    archive_ids: list[str] = []
    try:
        asyncio.run(_run_agent_during(agent, sim, steps, speed, dns, archive_ids, timeline,
                                      datadog))
        return _report(settings, agent, sim, agent.store, unseen, archive_ids, cfg,
                       work / "evidence", datadog)
    finally:
        agent.close()


# -------------------------------------------------------------------------------------------
# ``evidence-keeper demo``: this module is its own command (it drives the other commands, so
# it sits above them; a command module importing it would be a cycle).

NAME: Final = "demo"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="replay the Nov 10 incident on a simulated node",
                   exit_codes="exit codes:\n  0  every stream byte-exact, the archive verified,"
                              " the evidence found\n  1  the story did not hold")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo files here")
    p.add_argument("--speed", type=float, default=1.0, help="scenario speed factor")
    return p


def run(args: argparse.Namespace) -> int:
    return run_demo(workdir=args.workdir, speed=args.speed)
