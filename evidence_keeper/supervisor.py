"""The supervisor: builds the pipeline, runs it as named tasks, shuts it down in order.

Task tree (one root ``asyncio.TaskGroup``)::

    agent
    ├── discover   scan the log tree, hand new files and finality to the tailer
    ├── tail       read every stream's files into the spool
    ├── commit     seal by age, fsync, checkpoint, evict (every commit_interval_s < 1 s)
    ├── monitor    backlog gap, spool gauges, heartbeat, ledger retention (every second)
    ├── sinks      probe the log sinks and the store, sink_outage gaps with coverage
    ├── ship       sealed segments → store, backoff and circuit breaker
    └── ledger     gap records → the store's ledger objects (health/ledgership.py)
    (+ the HTTP API, started first and stopped last so /metrics answers during the drain)

Each loop is *guarded*: an exception is logged with its task name and the loop restarts after
a back-off (1 s doubling to 30 s), so one bad file or a full disk never stops capture. Loops
stop at their next iteration once ``intake_closed`` is set (blocking work runs in threads,
and a cancelled ``to_thread`` would leave its thread running against the state).

Shutdown (SIGTERM), bounded by ``shutdown_timeout_s``:

1. stop intake: discover and tail finish their current pass and return; the gap ledger is
   shipped first (the record of loss is the smallest and most precious evidence);
2. seal every open segment, fsync and checkpoint (nothing captured is at risk from here on);
3. drain the shipper until everything committed is stored or the deadline passes;
4. a last checkpoint records the acknowledgements; what did not ship stays in the spool and
   ships on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from evidence_keeper.aiotasks import guard, sleep_until, stop_tasks
from evidence_keeper.api.app import HttpLimits, serve
from evidence_keeper.api.archiving import ArchiveService
from evidence_keeper.discover.changes import ChangeWatcher
from evidence_keeper.discover.kube import KubeWatcher, kube_enabled
from evidence_keeper.discover.logtree import LogTree, Scan
from evidence_keeper.fsio import FileSystem
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.health.ledgership import LedgerShipConfig, LedgerShipper
from evidence_keeper.health.probes import Prober, Resolver, ResolverPool
from evidence_keeper.health.sinks import SinkMonitor
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss
from evidence_keeper.replay.backfill import Backfill
from evidence_keeper.settings import Settings
from evidence_keeper.ship.shipper import ShipConfig, Shipper
from evidence_keeper.spool.lock import SpoolBusy, SpoolLock
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import CannotLock, Store, StoreError, open_store
from evidence_keeper.store.codec import extension
from evidence_keeper.tail.budget import FdBudget, raise_nofile_limit
from evidence_keeper.tail.tailer import Tailer
from evidence_keeper.timefmt import parse_rfc3339, rfc3339
from evidence_keeper.views import ApiView, ArchiveCaptureView, PipelineControl, api_fallback

log = get_logger("evidence_keeper.supervisor")
HEARTBEAT_S = 5.0


class StartupError(Exception):
    """The agent cannot start (one clear line for the operator)."""


@dataclass
class Status:
    recovered: bool = False
    tailing: bool = False
    started_at: float = field(default_factory=time.time)
    log_root_ok: bool = True
    log_root_error: str | None = None
    log_root_state: str = "ok"  # ok | missing | empty (a remount: nothing is ended meanwhile)
    unlisted_dirs: int = 0
    kube_mode: str = "off"  # off | watch | api-logs (the weaker fallback: capture via pods/log)
    kube_detail: str | None = None


class Agent:
    def __init__(self, settings: Settings, *, fs: FileSystem | None = None,
                 store: Store | None = None, metrics: Metrics | None = None,
                 resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.fs = fs or FileSystem()
        self.metrics = metrics or Metrics()
        spool_dir = Path(settings.spool_dir)
        # One agent per spool, before anything is read or written (the ledger included).
        try:
            self.spool_lock = SpoolLock.acquire(spool_dir)
        except (SpoolBusy, OSError) as exc:
            raise StartupError(str(exc)) from exc
        self.ledger = Ledger(spool_dir / "ledger.sqlite")
        self.spool = Spool(
            spool_dir,
            segment_max_bytes=settings.segment_max_bytes,
            flush_interval_s=settings.flush_interval_s,
            max_bytes=settings.spool_max_bytes,
            record_loss=self._record_loss,
            metrics=self.metrics,
            fs=self.fs,
            segment_ext=extension(settings.compression),
        )
        self.tree, self.tailer = self._build_tail()
        self.watcher = ChangeWatcher(enabled=settings.watch_mode != "poll")
        self.tailer.write_seq = self.watcher.write_seq
        self.store = store or open_store(
            settings.store_url,
            endpoint_url=settings.s3_endpoint_url,
            sse=settings.sse,
            sse_kms_key_id=settings.sse_kms_key_id,
            object_lock_days=settings.object_lock_days,
        )
        self.shipper = Shipper(
            self.spool, self.store,
            ShipConfig(
                node=settings.node_name, cluster=settings.cluster,
                compression=settings.compression, level=settings.compression_level,
                concurrency=settings.ship_concurrency,
                object_lock_days=settings.object_lock_days,
            ),
            metrics=self.metrics,
        )
        self.ledger_shipper = LedgerShipper(
            self.ledger, self.store,
            LedgerShipConfig(
                node=settings.node_name, cluster=settings.cluster,
                compression=settings.compression, level=settings.compression_level,
                object_lock_days=settings.object_lock_days,
                flush_interval_s=settings.flush_interval_s,
            ),
            metrics=self.metrics,
        )
        self.resolvers = ResolverPool(resolver)
        self.sinks = SinkMonitor(
            settings.sink_probes, store=self.store, ledger=self.ledger, spool=self.spool,
            metrics=self.metrics, prober=Prober(self.resolvers, settings.probe_timeout_s),
            interval_s=settings.probe_interval_s,
            failures_before_down=settings.probe_failures_before_down,
            successes_before_up=settings.probe_successes_before_up,
        )
        self.status = Status()
        self.intake_closed = asyncio.Event()
        self.kube: KubeWatcher | None = None
        if kube_enabled(settings):
            self.kube = KubeWatcher(
                settings=settings,
                control=PipelineControl(tailer=self.tailer, spool=self.spool,
                                        ledger=self.ledger, store=self.store,
                                        cluster=settings.cluster,
                                        rescan=self.watcher.wake_full),
                fallback=api_fallback(self.spool), store=self.store, metrics=self.metrics,
                status=self.status, stop=self.intake_closed, fs=self.fs)
        self.archive = ArchiveService(
            settings=settings, fs=self.fs, store=self.store,
            capture=ArchiveCaptureView(spool=self.spool, shipper=self.shipper,
                                       ledger_shipper=self.ledger_shipper, rows=self.gap_rows,
                                       kube=self.kube))
        # replay_on_recovery (issue 15): a closed outage of a replay target is backfilled.
        self.backfill = Backfill(settings=settings, store=self.store, ledger=self.ledger,
                                 spool=self.spool, metrics=self.metrics,
                                 wake_shipper=self.shipper.wakeup.set)
        self.sinks.on_outage_closed.append(self.backfill.outage_closed)
        self.sinks.on_outage_closed.append(self.shipper.outage_closed)  # drain at once
        self.api_extensions: list[Callable[[web.Application], None]] = [self.archive.add_routes]
        self.api_address: tuple[str, int] | None = None
        self._backlog_gap: int | None = None
        self._shutdown_deadline = 0.0

    def _build_tail(self) -> tuple[LogTree, Tailer]:
        """The log tree and the tailer, within the descriptor budget (soft limit raised to
        the hard one first, ``fd_reserve`` kept for everything but the tail path)."""
        raise_nofile_limit()
        skipped = self.metrics.skipped_files
        tree = LogTree(str(self.settings.log_root), fs=self.fs,
                       symlink_roots=tuple(str(p) for p in self.settings.log_symlink_roots),
                       on_skip=lambda reason: skipped.labels(reason=reason).inc())
        budget = FdBudget.from_process(reserve=self.settings.fd_reserve)
        tailer = Tailer(self.spool, metrics=self.metrics, fs=self.fs, budget=budget, tree=tree)
        return tree, tailer

    def _record_loss(self, loss: Loss) -> None:
        self.ledger.record_loss(loss, at=datetime.now(UTC))

    # ------------------------------------------------------------------ loops
    def _guarded(self, name: str, loop: Callable[[], Awaitable[None]], *,
                 stop: asyncio.Event | None = None) -> Coroutine[Any, Any, None]:
        """``loop`` as an eternal, guarded task body (see :mod:`evidence_keeper.aiotasks`)."""
        return guard(name, loop, stop=stop or self.intake_closed,
                     restarts=self.metrics.task_restarts)

    async def _sleep_or_close(self, seconds: float) -> None:
        await sleep_until(self.intake_closed, seconds)

    def _scan_and_watch(self, changed: set[str] | None) -> Scan:
        scan = self.tree.scan(changed)
        if scan.root_ok:
            self.watcher.watch(self.tree.dirs)
        return scan

    def _changes(self, take: Callable[[], set[str] | None], due: list[float]) -> set[str] | None:
        """What changed (inotify), or None for a full pass: polling, an overflow, or the
        periodic safety-net pass every ``rescan_interval_s``."""
        changed = take()
        now = time.monotonic()
        if now >= due[0]:
            due[0] = now + self.settings.rescan_interval_s
            return None
        return changed

    async def _wait_change(self, wake: asyncio.Event, poll_s: float) -> None:
        """Until a change (inotify) or ``poll_s``; the safety-net period while watching."""
        if not self.watcher.active:
            await self._sleep_or_close(poll_s)
            return
        del poll_s
        closed = asyncio.create_task(self.intake_closed.wait(), name="wait-intake-closed")
        changed = asyncio.create_task(wake.wait(), name="wait-change")
        try:
            await asyncio.wait({closed, changed}, timeout=self.settings.rescan_interval_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            changed.cancel()
        await asyncio.sleep(0.01)  # let a burst of events (a rotation) arrive together

    async def _pace_loop(self) -> None:
        """A heartbeat that notices the agent not running: a wake-up far later than asked
        (SIGSTOP, a frozen cgroup, CPU starvation) is a blind window the tailer names."""
        while not self.intake_closed.is_set():
            before = self.tailer.beat = time.monotonic()
            await self._sleep_or_close(0.5)
            self.tailer.note_pause(time.monotonic() - before - 0.5)

    async def _discover_loop(self) -> None:
        warned = False
        due = [0.0]
        while not self.intake_closed.is_set():
            changed = self._changes(self.watcher.take_scan, due)
            scan = await asyncio.to_thread(self._scan_and_watch, changed)
            if not scan.root_ok:
                if not warned:
                    log.error("log root unavailable; retrying", error=scan.error)
                    warned = True
                self.status.log_root_ok, self.status.log_root_error = False, scan.error
            else:
                if warned:
                    log.info("log root available again")
                    warned = False
                self.status.log_root_ok, self.status.log_root_error = True, None
                if self.status.kube_mode != "api-logs":  # else the API fallback owns streams
                    await asyncio.to_thread(self.tailer.sync, scan)
                    self.status.tailing = True
                    self.watcher.tail_wake.set()  # newly queued files are read at once
            self._note_root(scan)
            if self.tailer.awaits_listing():
                # An exit the API reported is confirmed by full listings taken after it; no
                # change event may come for it (the container wrote its last line already).
                due[0] = 0.0
                await self._sleep_or_close(self.settings.discover_interval_s)
            else:
                await self._wait_change(self.watcher.scan_wake,
                                        self.settings.discover_interval_s)

    def _note_root(self, scan: Scan) -> None:
        """Log root state for /readyz and the metric. Empty while streams are tailed is a
        remount, not a deletion: the tailer ends nothing (see Tailer.sync)."""
        state = "missing" if not scan.root_ok else (
            "empty" if scan.root_empty and self.tailer.root_gone else "ok")
        if state != self.status.log_root_state:
            log.warning("log root state changed", state=state, log_root=self.tree.root)
        self.status.log_root_state = state
        self.status.unlisted_dirs = len(scan.unlisted)
        self.metrics.log_root_up.set(1 if state == "ok" else 0)
        self.metrics.unlisted_dirs.set(len(scan.unlisted))

    async def _tail_loop(self) -> None:
        due = [0.0]
        while not self.intake_closed.is_set():
            dirs = self._changes(self.watcher.take_tail, due)
            self.tailer.watching = self.watcher.active
            more = await asyncio.to_thread(self.tailer.pump, dirs)
            if more:
                continue
            if self.tailer.pending or not self.watcher.active:
                await self._sleep_or_close(self.settings.tail_interval_s)
            else:
                await self._wait_change(self.watcher.tail_wake, self.settings.tail_interval_s)

    async def _monitor_loop(self) -> None:
        """Backlog gap, spool gauges, heartbeat and ledger retention, once a second."""
        open_ = self.ledger.gaps(kind="backlog", open_=True)
        self._backlog_gap = open_[-1].id if open_ else None
        last_beat = last_prune = 0.0
        while not self.intake_closed.is_set():
            await asyncio.to_thread(self._backlog_tick)
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                await asyncio.to_thread(self._heartbeat)
            if now - last_prune >= 3600:
                last_prune = now
                await asyncio.to_thread(
                    self.ledger.prune, older_than=timedelta(days=self.settings.gap_retention_days),
                    now=datetime.now(UTC))
            await self._sleep_or_close(1.0)

    def _backlog_tick(self) -> None:
        age = self.spool.oldest_unshipped_age()
        self.metrics.oldest_unshipped_age.set(age)
        self.metrics.unshipped_bytes.set(self.spool.total_bytes())
        threshold = self.settings.backlog_threshold_s
        now = datetime.now(UTC)
        if age > threshold and self._backlog_gap is None:
            err = self.shipper.last_error
            self._backlog_gap = self.ledger.open_gap(
                "backlog", dedup="backlog:store", at=now - timedelta(seconds=age),
                sink="store", check=self.store.check_name, reason="shipping_behind",
                detail=f"oldest unshipped byte older than {threshold:g}s"
                       + (f"; last store error: {err}" if err else ""))
            log.warning("shipping backlog", oldest_unshipped_age_s=round(age, 1),
                        unshipped_bytes=self.spool.total_bytes())
        elif age <= threshold and self._backlog_gap is not None:
            self.ledger.close_gap(self._backlog_gap, at=now)
            log.info("shipping caught up", gap_id=self._backlog_gap)
            self._backlog_gap = None
        for kind, n in self.ledger.open_counts().items():
            self.metrics.open_gaps.labels(kind=kind).set(n)
        self.metrics.ledger_unshipped_records.set(self.ledger_shipper.unshipped())

    def _heartbeat(self) -> None:
        self.ledger.set_meta("heartbeat", rfc3339(datetime.now(UTC)))

    def _record_downtime(self) -> None:
        """An ``agent_down`` gap from the last heartbeat of the previous run to now."""
        last = self.ledger.get_meta("heartbeat")
        if last is None:
            return
        stopped = self.ledger.get_meta("stopped_at")
        start = parse_rfc3339(last) or datetime.now(UTC)
        clean = stopped is not None and stopped >= last
        if clean and stopped is not None:
            start = parse_rfc3339(stopped) or start
        now = datetime.now(UTC)
        gap_id = self.ledger.open_gap(
            "agent_down", dedup=f"agent_down:{rfc3339(start)}", at=start,
            reason="stopped" if clean else "crashed",
            detail=("the agent was stopped" if clean else
                    "the agent stopped without a clean shutdown (killed, OOM or node failure);"
                    " start is its last heartbeat")
                   + f"; nothing was captured on node {self.settings.node_name} meanwhile,"
                     " files still on disk were read on restart")
        self.ledger.close_gap(gap_id, at=now)
        log.warning("agent was down", since=rfc3339(start), clean=clean)

    async def _sinks_loop(self) -> None:
        # The schedule lives with the monitor (health/sinks.py), where a fake clock tests it.
        await self.sinks.run(stop=self.intake_closed)

    # ------------------------------------------------------------------ API views
    def readiness(self) -> dict[str, Any]:
        """The /readyz document. Blocking: it reads shared state under the spool lock."""
        with self.spool.lock:
            return self._readiness()

    def _readiness(self) -> dict[str, Any]:
        st = self.status
        # The API fallback (no readable log tree) is ready but weaker, and says so in detail:
        # an agent that never turns Ready would hide the evidence it does capture.
        ready = st.recovered and ((st.tailing and st.log_root_ok) or st.kube_mode == "api-logs")
        # A commit loop that keeps failing (a full or read-only spool disk) makes nothing
        # durable any more: the agent is not doing its job, and says so.
        commit = self.spool.commit_health()
        return {
            "ready": ready and commit["ok"],
            "node": self.settings.node_name,
            "spool": {"recovered": st.recovered, "unshipped_bytes": self.spool.total_bytes(),
                      "budget_bytes": self.spool.max_bytes,
                      # At the budget: files still holding their bytes wait (back-pressure).
                      "back_pressure": self.spool.room() <= 0,
                      "commit": commit,
                      "oldest_unshipped_age_s": round(self.spool.oldest_unshipped_age(), 3),
                      "streams": len(self.spool.streams)},
            "tail": {"tailing": st.tailing, "log_root": str(self.settings.log_root),
                     "log_root_ok": st.log_root_ok, "error": st.log_root_error,
                     "log_root_state": st.log_root_state, "unlisted_dirs": st.unlisted_dirs,
                     "open_files": self.tailer.budget.in_use,
                     "open_files_budget": self.tailer.budget.tail_max,
                     "files": sum(1 for t in self.tailer.tails.values() for f in t.queue
                                  if f.is_open)},
            "store": {"url": self.store.describe(), "shipping_up": self.shipper.store_up,
                      "last_error": self.shipper.last_error,
                      "backlog_open": self._backlog_gap is not None},
            "sinks": [s.to_json() for s in self.sinks.states.values()],
            "kubernetes": {"mode": st.kube_mode, "detail": st.kube_detail},
            "ledger": {"unshipped_records": self.ledger_shipper.unshipped(),
                       "last_error": self.ledger_shipper.last_error},
        }

    async def gap_rows(self, **filters: Any) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(self.ledger.gaps, **filters)
        live = {s.gap_id: s.coverage for s in self.sinks.states.values() if s.gap_id}
        out = []
        for r in rows:
            j = r.to_json()
            if r.id in live:
                j["coverage"] = live[r.id].to_json()
            out.append(j)
        return out

    def _seal_and_commit(self) -> bool:
        self.spool.seal_due(time.monotonic())
        return self.spool.commit()

    async def commit_once(self) -> None:
        committed = await asyncio.to_thread(self._seal_and_commit)
        if committed:
            self.shipper.wakeup.set()
        elif self.spool.rewound:
            # A failed data fsync rewound streams to their checkpoint (Spool._rewind): a full
            # read pass re-reads them now; no change event will announce those bytes again.
            # Only then: a checkpoint that cannot be written (ENOSPC) rewinds nothing, and a
            # full pass every commit would starve a node of thousands of files.
            self.spool.rewound = False
            self.watcher.wake_full()

    async def _commit_loop(self) -> None:
        while not self.intake_closed.is_set():
            await self.commit_once()
            await self._sleep_or_close(self.settings.commit_interval_s)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Recover the spool and check the store; raises StartupError on a fatal problem."""
        if self.settings.watch_mode == "inotify" and not self.watcher.active:
            raise StartupError("watch_mode is inotify but inotify is not available here")
        try:
            await asyncio.to_thread(self.spool.recover)
        except (OSError, ValueError, RuntimeError) as exc:
            raise StartupError(f"cannot recover spool in {self.settings.spool_dir}: {exc}") from exc
        await self._check_store()
        await asyncio.to_thread(self._record_downtime)
        await asyncio.to_thread(self._heartbeat)
        await asyncio.to_thread(self.sinks.restore)
        self.status.recovered = True
        log.info("agent started", node=self.settings.node_name, log_root=str(
            self.settings.log_root), store=self.store.describe(),
            streams=len(self.spool.streams))

    async def _check_store(self) -> None:
        """The store at start-up: fatal only when it cannot work whatever happens next.

        A store that is down, or whose credentials are not there yet (a booting node, an
        IRSA token not yet mounted), is reported down (``sink_up`` 0, ``/readyz``, and the
        store probe's ``sink_outage``) while the agent captures to the spool; shipping starts
        as soon as it answers. A missing bucket, a refused key, or ``object_lock_days > 0`` on
        a bucket without Object Lock stop the agent with one line.
        """
        up = self.metrics.sink_up.labels(sink="store", check=self.store.check_name)
        try:
            await asyncio.to_thread(self.store.check)
            up.set(1)
        except StoreError as exc:
            if not exc.retryable:
                raise StartupError(str(exc)) from exc
            up.set(0)
            self.shipper.store_up, self.shipper.last_error = False, str(exc)
            log.error("store unreachable at start-up; capturing to the spool meanwhile",
                      error=str(exc))
            return
        if self.settings.object_lock_days > 0:
            try:
                await asyncio.to_thread(self.store.check_object_lock)
            except CannotLock as exc:
                raise StartupError(str(exc)) from exc
            except StoreError as exc:
                log.warning("cannot tell whether the bucket has Object Lock; the PUTs' own"
                            " retention settings will tell", error=str(exc))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order.

        The ordered drain runs whatever ended the wait: ``stop``, a root task that finished
        (impossible while it is guarded, logged as a bug) or the cancellation of ``run``
        itself. The HTTP server is a root task too; it is stopped last, so ``/metrics``
        answers during the drain, and its cleanup is shielded from cancellation.
        """
        await self.start()
        s = self.settings
        view = ApiView(node=s.node_name, registry=self.metrics.registry,
                       readiness_doc=self.readiness, rows=self.gap_rows)
        try:
            runner, self.api_address = await serve(
                view, host=s.listen_host, port=s.listen_port, metrics=self.metrics,
                limits=HttpLimits(s.serving.http_max_connections,
                                  s.serving.http_idle_timeout_s,
                                  s.serving.http_header_timeout_s),
                extensions=self.api_extensions)
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.listen}: {exc}") from exc
        ship_stop, ledger_stop, http_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        jobs_stop = asyncio.Event()  # archive jobs and backfills: until the drain is done
        self.watcher.attach(asyncio.get_running_loop())
        self.metrics.watch_mode.set(1 if self.watcher.active else 0)
        async with asyncio.TaskGroup() as tg:
            http = tg.create_task(self._serve_until(runner, http_stop), name="http")
            jobs = [tg.create_task(self._guarded(name, functools.partial(run, jobs_stop),
                                                 stop=jobs_stop), name=name)
                    for name, run in (("archive", self.archive.run),
                                      ("backfill", self.backfill.run))]
            try:
                intake = [tg.create_task(self._guarded(name, loop), name=name)
                          for name, loop in self._intake_loops()]
                ship = tg.create_task(
                    self._guarded("ship", lambda: self.shipper.run(stop=ship_stop),
                                  stop=ship_stop), name="ship")
                ledger = tg.create_task(
                    self._guarded("ledger", lambda: self.ledger_shipper.run(stop=ledger_stop),
                                  stop=ledger_stop), name="ledger")
                await self._wait_stop(stop, [*intake, ship, ledger])
                await self.shutdown(intake, ship, ship_stop)
                await self._drain_ledger(ledger, ledger_stop)
            finally:
                jobs_stop.set()
                await stop_tasks(jobs, within=5.0, cancel=False)
                self.watcher.close()
                http_stop.set()
                await asyncio.shield(http)

    def _intake_loops(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("discover", self._discover_loop), ("tail", self._tail_loop),
            ("pace", self._pace_loop), ("commit", self._commit_loop),
            ("monitor", self._monitor_loop),
            ("sinks", self._sinks_loop),
        ]
        if self.kube is not None:
            loops.append(("kube", self.kube.run))
        return loops

    @staticmethod
    async def _wait_stop(stop: asyncio.Event, roots: list[asyncio.Task[None]]) -> None:
        """Until ``stop`` is set or a root task ends (a bug: guarded tasks end only on stop)."""
        stopper = asyncio.create_task(stop.wait(), name="stop-signal")
        try:
            done, _ = await asyncio.wait([stopper, *roots], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        for t in done:
            if t is not stopper:
                log.error("root task ended before shutdown; draining", task=t.get_name())

    @staticmethod
    async def _serve_until(runner: web.AppRunner, http_stop: asyncio.Event) -> None:
        try:
            await http_stop.wait()
        finally:
            await asyncio.shield(runner.cleanup())

    async def shutdown(self, intake: list[asyncio.Task[None]], ship: asyncio.Task[None],
                       ship_stop: asyncio.Event) -> None:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        log.info("shutting down: closing intake")
        self.intake_closed.set()
        # Intake loops finish their current pass (a cancelled to_thread would leave its thread
        # running against the state): they are cancelled only past the deadline.
        await stop_tasks(intake, within=max(0.1, deadline - time.monotonic()), cancel=False)
        # The ledger first: a few records, and the only account of what was lost.
        ledger_deadline = time.monotonic() + max(0.1, (deadline - time.monotonic()) / 3)
        if not await self.ledger_shipper.drain(ledger_deadline):
            log.error("gap ledger not fully shipped at shutdown; it ships on the next start",
                      unshipped_records=self.ledger_shipper.unshipped(),
                      error=self.ledger_shipper.last_error)
        self._shutdown_deadline = deadline
        await asyncio.to_thread(self.spool.seal_all)
        await asyncio.to_thread(self.spool.commit)
        self.shipper.wakeup.set()
        drained = await self.shipper.drain(deadline)
        ship_stop.set()
        self.shipper.wakeup.set()
        await stop_tasks([ship], within=max(0.1, deadline - time.monotonic()), cancel=False)
        await asyncio.to_thread(self.spool.commit)
        await asyncio.to_thread(self.sinks.flush_coverage)
        await asyncio.to_thread(self.ledger.set_meta, "stopped_at", rfc3339(datetime.now(UTC)))
        left = self.spool.total_bytes()
        log.info("shutdown complete", drained=drained, unshipped_bytes=left)

    async def _drain_ledger(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """After the segments: ship the records the drain itself made (coverage, backlog)."""
        stop.set()
        deadline = max(self._shutdown_deadline, time.monotonic() + 0.5)
        _, pending = await asyncio.wait({task}, timeout=max(0.1, deadline - time.monotonic()))
        for t in pending:  # its tick waits for a store call that hangs
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.ledger_shipper.drain(deadline)
        await self.ledger_shipper.abandon()

    def close(self) -> None:
        self.watcher.close()
        self.shipper.close()
        self.ledger_shipper.close()
        self.sinks.close()
        self.resolvers.close()
        self.tailer.close()
        self.spool.close()
        self.ledger.close()
        self.spool_lock.release()
