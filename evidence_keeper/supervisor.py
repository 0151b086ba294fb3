"""The supervisor: builds the pipeline, runs it as named tasks, shuts it down in order.

Task tree (one root ``asyncio.TaskGroup``)::

    agent
    ├── discover   scan the log tree, hand new files and finality to the tailer
    ├── tail       read every stream's files into the spool
    ├── commit     seal by age, fsync, checkpoint, evict (every commit_interval_s < 1 s)
    ├── monitor    backlog gap, spool gauges, heartbeat, ledger retention (every second)
    ├── sinks      probe the log sinks and the store, sink_outage gaps with coverage
    └── ship       sealed segments → store, backoff and circuit breaker
    (+ the HTTP API, started first and stopped last so /metrics answers during the drain)

Each loop is *guarded*: an exception is logged with its task name and the loop restarts after
a back-off (1 s doubling to 30 s), so one bad file or a full disk never stops capture. Loops
stop at their next iteration once ``intake_closed`` is set (blocking work runs in threads,
and a cancelled ``to_thread`` would leave its thread running against the state).

Shutdown (SIGTERM), bounded by ``shutdown_timeout_s``:

1. stop intake: discover and tail finish their current pass and return;
2. seal every open segment, fsync and checkpoint (nothing captured is at risk from here on);
3. drain the shipper until everything committed is stored or the deadline passes;
4. a last checkpoint records the acknowledgements; what did not ship stays in the spool and
   ships on the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from evidence_keeper.archive.service import install as install_archive
from evidence_keeper.discover.changes import ChangeWatcher
from evidence_keeper.discover.kube import KubeWatcher, kube_enabled
from evidence_keeper.discover.logtree import LogTree, Scan
from evidence_keeper.fsio import FileSystem
from evidence_keeper.health.ledger import Ledger, rfc3339
from evidence_keeper.health.probes import Prober, Resolver, ResolverPool
from evidence_keeper.health.sinks import SinkMonitor
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss
from evidence_keeper.settings import Settings
from evidence_keeper.ship.shipper import ShipConfig, Shipper
from evidence_keeper.ship.store import Store, StoreError, open_store
from evidence_keeper.spool.spool import Spool
from evidence_keeper.tail.budget import FdBudget, raise_nofile_limit
from evidence_keeper.tail.tailer import Tailer

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
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(spool_dir / "ledger.sqlite")
        self.spool = Spool(
            spool_dir,
            segment_max_bytes=settings.segment_max_bytes,
            flush_interval_s=settings.flush_interval_s,
            max_bytes=settings.spool_max_bytes,
            record_loss=self._record_loss,
            metrics=self.metrics,
            fs=self.fs,
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
                settings=settings, spool=self.spool, tailer=self.tailer, ledger=self.ledger,
                store=self.store, metrics=self.metrics, status=self.status,
                stop=self.intake_closed, fs=self.fs)
        self.api_extensions: list[Callable[[web.Application], None]] = []
        self.api_address: tuple[str, int] | None = None
        self._backlog_gap: int | None = None
        install_archive(self)

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
    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` until intake closes; restart it with back-off if it raises."""
        delay = 1.0
        while not self.intake_closed.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task failed; restarting", task=name, retry_in_s=delay)
                try:
                    await asyncio.wait_for(self.intake_closed.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    async def _sleep_or_close(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.intake_closed.wait(), timeout=seconds)
        except TimeoutError:
            pass

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
            await self._wait_change(self.watcher.scan_wake, self.settings.discover_interval_s)

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

    def _heartbeat(self) -> None:
        self.ledger.set_meta("heartbeat", rfc3339(datetime.now(UTC)))

    def _record_downtime(self) -> None:
        """An ``agent_down`` gap from the last heartbeat of the previous run to now."""
        last = self.ledger.get_meta("heartbeat")
        if last is None:
            return
        stopped = self.ledger.get_meta("stopped_at")
        start = datetime.fromisoformat(last.replace("Z", "+00:00"))
        clean = stopped is not None and stopped >= last
        if clean and stopped is not None:
            start = datetime.fromisoformat(stopped.replace("Z", "+00:00"))
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
        next_probe = 0.0
        while not self.intake_closed.is_set():
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + self.settings.probe_interval_s
                await self.sinks.probe_round()
            await asyncio.to_thread(self.sinks.account)
            await self._sleep_or_close(min(1.0, max(0.05, next_probe - time.monotonic())))

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
        return {
            "ready": ready,
            "node": self.settings.node_name,
            "spool": {"recovered": st.recovered, "unshipped_bytes": self.spool.total_bytes(),
                      "budget_bytes": self.spool.max_bytes,
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
        try:
            await asyncio.to_thread(self.store.check)
            self.metrics.sink_up.labels(sink="store", check=self.store.check_name).set(1)
        except StoreError as exc:
            if not exc.retryable:
                raise StartupError(str(exc)) from exc
            self.metrics.sink_up.labels(sink="store", check=self.store.check_name).set(0)
            log.error("store unreachable at start-up; capturing to the spool meanwhile",
                      error=str(exc))
        await asyncio.to_thread(self._record_downtime)
        await asyncio.to_thread(self._heartbeat)
        await asyncio.to_thread(self.sinks.restore)
        self.status.recovered = True
        log.info("agent started", node=self.settings.node_name, log_root=str(
            self.settings.log_root), store=self.store.describe(),
            streams=len(self.spool.streams))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        await self.start()
        from evidence_keeper.api.app import serve

        try:
            runner = await serve(self, self.settings.listen_host, self.settings.listen_port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {self.settings.listen}: {exc}") from exc
        ship_stop = asyncio.Event()
        self.watcher.attach(asyncio.get_running_loop())
        self.metrics.watch_mode.set(1 if self.watcher.active else 0)
        try:
            async with asyncio.TaskGroup() as tg:
                intake = [
                    tg.create_task(self._guard("discover", self._discover_loop),
                                   name="discover"),
                    tg.create_task(self._guard("tail", self._tail_loop), name="tail"),
                    tg.create_task(self._guard("pace", self._pace_loop), name="pace"),
                    tg.create_task(self._guard("commit", self._commit_loop), name="commit"),
                    tg.create_task(self._guard("monitor", self._monitor_loop), name="monitor"),
                    tg.create_task(self._guard("sinks", self._sinks_loop), name="sinks"),
                ]
                if self.kube is not None:
                    intake.append(tg.create_task(self._guard("kube", self.kube.run), name="kube"))
                ship = tg.create_task(self.shipper.run(stop=ship_stop), name="ship")
                await stop.wait()
                await self.shutdown(intake, ship, ship_stop)
        finally:
            self.watcher.close()
            await runner.cleanup()

    async def shutdown(self, intake: list[asyncio.Task[None]], ship: asyncio.Task[None],
                       ship_stop: asyncio.Event) -> None:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        log.info("shutting down: closing intake")
        self.intake_closed.set()
        _, pending = await asyncio.wait(intake, timeout=max(0.1, deadline - time.monotonic()))
        for t in pending:
            log.error("task did not stop in time; cancelling", task=t.get_name())
            t.cancel()
        await asyncio.to_thread(self.spool.seal_all)
        await asyncio.to_thread(self.spool.commit)
        self.shipper.wakeup.set()
        drained = await self.shipper.drain(deadline)
        ship_stop.set()
        self.shipper.wakeup.set()
        try:
            left_s = max(0.1, deadline - time.monotonic())
            await asyncio.wait_for(asyncio.shield(ship), timeout=left_s)
        except TimeoutError:
            log.error("uploads still running at the deadline; cancelling", task="ship")
            ship.cancel()
        await asyncio.to_thread(self.spool.commit)
        await asyncio.to_thread(self.sinks.flush_coverage)
        await asyncio.to_thread(self.ledger.set_meta, "stopped_at", rfc3339(datetime.now(UTC)))
        left = self.spool.total_bytes()
        log.info("shutdown complete", drained=drained, unshipped_bytes=left)

    def close(self) -> None:
        self.watcher.close()
        self.shipper.close()
        self.sinks.close()
        self.resolvers.close()
        self.tailer.close()
        self.spool.close()
        self.ledger.close()
