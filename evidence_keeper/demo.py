"""``evidence-keeper demo``: the Nov 10 incident, replayed on a simulated node.

The demo builds a kubelet log tree with :class:`~evidence_keeper.sim.KubeletSim`, starts the
real agent on it (the same :class:`~evidence_keeper.supervisor.Agent` as ``run``), plays the
sock-shop incident in real time (orders failing with ``PAYMENT_FAILED``, a rotation that
splits a line, a deleted pod, the restarts that wiped the evidence on Nov 11), shuts the agent
down in order and then proves, from the store alone, that the evidence was kept: every
stream exported from the store is compared byte for byte with what the simulated containers
wrote, and the ``PAYMENT_FAILED`` lines are printed from the export.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.formats import line_message
from evidence_keeper.logs import configure_logging
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.ship.store import Store
from evidence_keeper.sim import KubeletSim, nov10_incident, play
from evidence_keeper.sim.scenario import NAMESPACE, PAYMENT_FAILED_MARKER, ScenarioStep
from evidence_keeper.supervisor import Agent

_TTY = sys.stdout.isatty()
BOLD, DIM, RED, GREEN, RESET = (
    ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[0m") if _TTY else ("",) * 5)


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
    }
    base.update(overrides)
    return load_settings(None, environ={}, overrides=base)


async def _run_agent_during(agent: Agent, sim: KubeletSim, steps: list[ScenarioStep],
                            speed: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    started = time.monotonic()

    def on_step(step: ScenarioStep) -> None:
        print(f"  {DIM}t+{time.monotonic() - started:4.1f}s{RESET}  {step.description}",
              flush=True)

    try:
        await asyncio.to_thread(play, sim, steps, speed=speed, on_step=on_step)
        # Let the last lines be captured and the flush timer seal them.
        await asyncio.sleep(agent.settings.flush_interval_s + 1.5)
    finally:
        stop.set()
        await task


def _report(settings: Settings, agent: Agent, sim: KubeletSim, store: Store,
            unseen: set[StreamId]) -> int:
    _h("Gaps recorded by the agent")
    gaps = agent.ledger.gaps()
    if not gaps:
        print("  none: every byte written on the node was captured")
    for g in gaps:
        j = g.to_json()
        print(f"  {j['kind']:<12} {j.get('reason', ''):<14} {j.get('pod', '')}"
              f" offset={j.get('offset')} bytes={j.get('bytes')}  {j.get('detail', '')}")

    _h(f"Evidence in the store ({store.describe()})")
    exact = True
    failed_lines: list[bytes] = []
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
            failed_lines += [ln for ln in buf.getvalue().splitlines()
                             if PAYMENT_FAILED_MARKER in ln]

    _h("Did PAYMENT_FAILED happen on Nov 10? (read back from the store)")
    for ln in failed_lines:
        ts = ln.split(b" ", 1)[0].decode()
        msg = line_message(ln).decode("utf-8", "replace")
        print(f"  {ts}  ...{msg[-76:]}")
    print(f"\n  {len(failed_lines)} PAYMENT_FAILED lines preserved;"
          f" every stream byte-exact: {'yes' if exact else 'NO'}")
    print(f"\n  Try: evidence-keeper export --config {settings.spool_dir}/demo.yaml"
          " --namespace sock-shop --pod <pod> --container <container>")
    return 0 if exact and failed_lines else 1


def run_demo(*, workdir: str | None = None, speed: float = 1.0) -> int:
    configure_logging("warning")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ek-demo-"))
    if workdir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(work)
    cfg = Path(settings.spool_dir) / "demo.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        f"cluster: {settings.cluster}\nstore_url: {settings.store_url}\n"
        f"spool_dir: {settings.spool_dir}\nlog_root: {settings.log_root}\nkubernetes: 'off'\n")

    _h("evidence-keeper demo: the Nov 10 sock-shop incident on a simulated node")
    print(f"  node log tree  {settings.log_root}\n  spool          {settings.spool_dir}\n"
          f"  store          {settings.store_url}")
    sim = KubeletSim(Path(settings.log_root), max_files=3)
    steps = nov10_incident(sim)
    unseen = {sid for sid in sim.streams() if not sim.files_of(sid)}
    agent = Agent(settings)
    _h("Replaying the incident (agent running)")
    try:
        asyncio.run(_run_agent_during(agent, sim, steps, speed))
        return _report(settings, agent, sim, agent.store, unseen)
    finally:
        agent.close()
