"""Automatic backfill: when a sink's outage closes, replay what it missed into it.

Opt-in per target (``replay_on_recovery: [datadog]``; the sink probe and the replay target
share the name). The sink monitor calls :meth:`Backfill.outage_closed` when a ``sink_outage``
gap of such a sink closes; the backfill then

1. records ``backfill: {status: pending, ...}`` on the gap (the ledger row's ``extra``, so it
   shows in ``/gaps`` and survives a restart: pending or running backfills resume at start-up);
2. waits until the contract's capture bound (one second) has passed since the gap's end, so
   every line written inside the window is captured (a line written just before the close may
   still be unread when the probe sees the sink again), then seals every open spool segment
   and waits until the store holds everything captured up to then (the outage window's lines
   are in the store, not only in the spool);
3. replays this node's streams (``ek-node``; narrowed to the streams and namespaces the
   outage's coverage saw traffic in, and those the spool holds at the close) for the window
   ``[gap.start, gap.end]`` to the target, with the same checkpoints as ``evidence-keeper
   replay`` (under ``spool_dir``), so a manual replay and the backfill never send a line
   twice, and a restart resumes;
4. records ``backfill: {status, lines, bytes, paths, already_replayed, error}`` on the gap
   (``lines``/``bytes``: sent by the last run; ``already_replayed``: lines of the window the
   sink had acknowledged before it, e.g. before a restart) and counts every acknowledged line
   in ``evidence_keeper_replayed_lines_total{target}``. A failed backfill is not retried on its
   own: ``evidence-keeper replay --to <target> --gap <id>`` finishes it, once per line.

Times: the gap is dated by the agent's clock, the lines by their own timestamps; on a real
node both are the node's clock. ``timeline`` is the seam for a node whose lines carry another
clock (the demo replays Nov 10 on today's agent): it maps the agent's instants to log time and
says what "now" is for Datadog's 18 h rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from evidence_keeper.health.ledger import GapRow, Ledger
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import CAPTURE_BOUND_S, StreamId
from evidence_keeper.replay.checkpoint import Checkpoints
from evidence_keeper.replay.runner import Replayer, ReplayRequest
from evidence_keeper.settings import ReplayTarget, Settings
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import Store
from evidence_keeper.timefmt import parse_rfc3339

log = get_logger("evidence_keeper.replay")
SHIP_TIMEOUT_S: Final = 300.0


class Timeline(Protocol):
    def now(self) -> datetime: ...

    def log_time(self, at: datetime) -> datetime: ...


class NodeClock:
    """The real node: log lines and the agent share one clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def log_time(self, at: datetime) -> datetime:
        return at


@dataclass
class BackfillState:
    status: str = "pending"  # pending | running | complete | partial | failed
    target: str = ""
    lines: int = 0
    bytes: int = 0
    paths: Mapping[str, int] | None = None
    error: str | None = None
    already_replayed: int = 0  # lines of the window acknowledged before this run (a resume)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "target": self.target, "lines": self.lines,
                "bytes": self.bytes, "paths": dict(self.paths or {}),
                "already_replayed": self.already_replayed, "error": self.error}


class Backfill:
    def __init__(self, *, settings: Settings, store: Store, ledger: Ledger, spool: Spool,
                 metrics: Metrics, wake_shipper: Callable[[], None],
                 timeline: Timeline | None = None, ship_timeout_s: float = SHIP_TIMEOUT_S,
                 poll_s: float = 0.2, capture_bound_s: float = CAPTURE_BOUND_S) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.spool = spool
        self.metrics = metrics
        self.wake_shipper = wake_shipper
        self.timeline: Timeline = timeline or NodeClock()
        self.ship_timeout_s = ship_timeout_s
        self.poll_s = poll_s
        self.capture_bound_s = capture_bound_s
        self.targets: dict[str, ReplayTarget] = {
            t.name: t for t in settings.replay_targets if t.name in settings.replay_on_recovery}
        self.checkpoints = Checkpoints(Path(settings.spool_dir))
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._group: asyncio.TaskGroup | None = None  # while run() owns the backfills

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Own the backfills until ``stop`` (a root task of the agent): resume the ones a
        previous run left unfinished, run each new one as a task of this group, and cancel
        them at stop. A backfill cut short stays "running" in the ledger and resumes on the
        next start."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            self._loop = asyncio.get_running_loop()
            try:
                if self.targets:
                    rows = await asyncio.to_thread(self.ledger.gaps, kind="sink_outage",
                                                   open_=False)
                    for row in rows:
                        state = _state_of(row)
                        if state is not None and state.status in ("pending", "running"):
                            log.warning("resuming a backfill interrupted by a restart",
                                        gap_id=row.id, target=state.target)
                            self._start(row.id, state.target)
                await stop.wait()
            finally:
                self._group = None
                self._loop = None
                for t in list(self.tasks.values()):
                    t.cancel()

    # ------------------------------------------------------------------ the hook
    def outage_closed(self, sink: str, gap_id: int) -> None:
        """Called by the sink monitor (from a worker thread) when an outage of ``sink`` closed."""
        if sink not in self.targets:
            return
        self._record(gap_id, BackfillState("pending", sink))
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                loop.call_soon_threadsafe(self._start, gap_id, sink)

    def _start(self, gap_id: int, target: str) -> None:
        running = self.tasks.get(gap_id)
        if running is not None and not running.done():
            return
        if self._group is None:
            return  # stopping: the state stays "pending" and the next start resumes it
        task = self._group.create_task(self._run(gap_id, target), name=f"backfill:{gap_id}")
        self.tasks[gap_id] = task
        task.add_done_callback(lambda t: self.tasks.pop(gap_id, None) if self.tasks.get(
            gap_id) is t else None)

    # ------------------------------------------------------------------ the job
    async def _run(self, gap_id: int, name: str) -> None:
        target = self.targets.get(name)
        state = BackfillState("running", name)
        try:
            row = await asyncio.to_thread(self._gap, gap_id)
            if row is None or row.end is None or target is None:
                raise BackfillError(f"gap {gap_id} is not a closed outage of {name}")
            await asyncio.to_thread(self._record, gap_id, state)
            req = self._request(row)
            await self._wait_captured(row.end)
            live = await self._wait_shipped()
            if req.streams is not None:
                # Traffic of the last instant before the close may not be in the coverage yet:
                # the streams the spool holds now are replayed too (their window lines only).
                req.streams |= {sid.key for sid in live}
                req.namespaces = tuple(sorted({*(req.namespaces or ()),
                                               *(sid.namespace for sid in live)}))
            counter = self.metrics.replayed_lines.labels(target=name)
            replayer = Replayer(store=self.store, cluster=self.settings.cluster, target=target,
                                checkpoints=self.checkpoints, node_name=self.settings.node_name,
                                clock=self.timeline.now, concurrency=2,
                                on_lines=counter.inc,
                                s3_options={"endpoint_url": self.settings.s3_endpoint_url})
            summary = await replayer.run(req)
            state = BackfillState(summary.status, name, summary.lines, summary.bytes,
                                  dict(summary.paths()),
                                  summary.error or next((r.error for r in summary.streams
                                                         if r.error), None),
                                  sum(r.skipped for r in summary.streams))
            log.info("backfill finished", gap_id=gap_id, target=name, status=state.status,
                     lines=state.lines, bytes=state.bytes, paths=state.paths, error=state.error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # recorded on the gap: a backfill never takes the agent down
            state = BackfillState("failed", name, state.lines, state.bytes, None, str(exc))
            log.exception("backfill failed", gap_id=gap_id, target=name)
        await asyncio.to_thread(self._record, gap_id, state)

    def _request(self, row: GapRow) -> ReplayRequest:
        start = datetime.fromisoformat(row.start.replace("Z", "+00:00"))
        assert row.end is not None
        end = datetime.fromisoformat(row.end.replace("Z", "+00:00"))
        extra = json.loads(row.fields.get("extra") or "{}")
        keys = extra.get("stream_keys")  # streams with traffic during the outage (coverage)
        namespaces = (extra.get("coverage") or {}).get("namespaces")
        return ReplayRequest(since=self.timeline.log_time(start),
                             until=self.timeline.log_time(end), node=self.settings.node_name,
                             streams=set(keys) if isinstance(keys, list) else None,
                             namespaces=tuple(namespaces) if namespaces else None,
                             gap_id=row.id)

    async def _wait_captured(self, end: str) -> None:
        """Wait until what was written up to the window's ``end`` is captured (the contract's
        capture bound): sealing at once would leave the window's last lines out of the store
        the replay reads, and the backfill would call itself complete without them."""
        closed = parse_rfc3339(end)
        if closed is None:
            return  # an open gap has no end: nothing to wait for
        # At most the bound itself: a wall clock stepped back must not stretch the wait.
        wait = min(self.capture_bound_s,
                   self.capture_bound_s - (datetime.now(UTC) - closed).total_seconds())
        if wait > 0:
            await asyncio.sleep(wait)

    async def _wait_shipped(self) -> dict[StreamId, int]:
        """Seal what is open and wait until the store holds everything captured so far."""
        targets = await asyncio.to_thread(self._seal)
        deadline = time.monotonic() + self.ship_timeout_s
        while await asyncio.to_thread(self._pending, targets):
            if time.monotonic() > deadline:
                raise BackfillError(f"the store did not take the outage window's data within"
                                    f" {self.ship_timeout_s:g}s")
            self.wake_shipper()
            await asyncio.sleep(self.poll_s)
        return targets

    def _seal(self) -> dict[StreamId, int]:
        with self.spool.lock:
            sids = list(self.spool.streams)
            self.spool.seal_all(sids)
            return {sid: self.spool.streams[sid].next_offset for sid in sids}

    def _pending(self, targets: Mapping[StreamId, int]) -> bool:
        with self.spool.lock:
            for sid, target in targets.items():
                s = self.spool.streams.get(sid)
                if s is None:
                    continue
                if any(not seg.shipped and seg.start < target for seg in s.sealed):
                    return True
                if s.open is not None and s.open.start < target:
                    return True
        return False

    # ------------------------------------------------------------------ ledger
    def _gap(self, gap_id: int) -> GapRow | None:
        return next((g for g in self.ledger.gaps(kind="sink_outage") if g.id == gap_id), None)

    def _record(self, gap_id: int, state: BackfillState) -> None:
        """Merge ``backfill`` into the gap's ``extra`` (kept next to its coverage)."""
        row = self._gap(gap_id)
        if row is None:
            return
        extra = json.loads(row.fields.get("extra") or "{}")
        extra["backfill"] = state.to_json()
        self.ledger.update_gap(gap_id, extra=json.dumps(extra))


class BackfillError(Exception):
    pass


def _state_of(row: GapRow) -> BackfillState | None:
    try:
        doc = json.loads(row.fields.get("extra") or "{}").get("backfill")
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return BackfillState(str(doc.get("status")), str(doc.get("target")))
