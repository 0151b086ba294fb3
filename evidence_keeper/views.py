"""Narrow views of the pipeline, built by the supervisor for the components that need them.

A component never receives the supervisor (or the tailer, the spool and the ledger together)
to reach into: it declares the few operations it needs as a ``Protocol`` next to its own code,
and this module implements each over the real parts: the watcher's ``StreamControl``, the
HTTP API's ``AgentView`` and the archive service's ``ArchiveCapture``. Keeping these adapters
here (just below the supervisor) is what lets ``api/`` never import the supervisor and
``discover/`` never import the tailer or the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from evidence_keeper.archive.manifest import Scope
from evidence_keeper.discover.apilogs import ApiLogs
from evidence_keeper.discover.kube import KubeTuning, KubeWatcher, StreamProgress
from evidence_keeper.discover.lifecycle import LifecycleLedger
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.health.ledgership import LedgerShipper
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.ship.shipper import Shipper
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import Store
from evidence_keeper.tail.tailer import Tailer


class PipelineControl:
    """:class:`evidence_keeper.discover.kube.StreamControl` over the tailer, spool, ledger and
    store (blocking: called from the watcher's worker thread)."""

    def __init__(self, *, tailer: Tailer, spool: Spool, ledger: Ledger, store: Store,
                 cluster: str, rescan: Callable[[], None] = lambda: None) -> None:
        self._rescan = rescan
        self._tailer = tailer
        self._spool = spool
        self._ledger = ledger
        self._store = store
        self._cluster = cluster

    def end_streams(self, streams: list[StreamId]) -> set[StreamId]:
        ended = self._tailer.end_streams(streams)
        if ended:
            self._rescan()  # listings after the exit confirm it: take them now
        return ended

    def prioritise(self, *, pods: set[str], streams: set[StreamId]) -> set[str]:
        seen: set[str] = set()
        with self._spool.lock:
            for sid, s in self._spool.streams.items():
                if sid.pod_uid in pods:
                    seen.add(sid.pod_uid)
                elif sid not in streams:
                    continue
                if not s.priority and (s.open is not None or s.sealed or not s.finished):
                    s.priority = True
                    self._spool.dirty = True
        return seen

    def progress(self, sid: StreamId) -> StreamProgress | None:
        with self._spool.lock:
            s = self._spool.streams.get(sid)
            if s is None:
                return StreamProgress(None, False) if sid in self._tailer.tails else None
            # Finished, sealed, and every sealed segment shipped (and so dropped).
            return StreamProgress(s.next_offset,
                                  s.finished and s.open is None and not s.sealed)

    def in_store(self, sid: StreamId) -> bool:
        try:
            prefix = f"{sid.store_dir(self._cluster)}/"
            return next(iter(self._store.list(prefix)), None) is not None
        except Exception:
            return False  # unknown counts as absent: the outcome says "missing", not more

    def loss_gap_ids(self, sid: StreamId) -> list[int]:
        return [g.id for g in self._ledger.gaps(kind="loss", namespace=sid.namespace)
                if (g.fields.get("pod_uid"), g.fields.get("container"),
                    g.fields.get("restart")) == (sid.pod_uid, sid.container, sid.restart)]

    def record_loss(self, loss: Loss) -> bool:
        return self._ledger.record_loss(loss, at=datetime.now(UTC))


def api_fallback(spool: Spool) -> Callable[..., ApiLogs]:
    """The watcher's :class:`~evidence_keeper.discover.kube.FallbackFactory` over ``spool``."""

    def build(*, core: Callable[[], Awaitable[Any]], stop: asyncio.Event,
              tuning: KubeTuning) -> ApiLogs:
        return ApiLogs(spool=spool, core=core, stop=stop,
                       request_timeout_s=tuning.request_timeout_s,
                       follow_timeout_s=tuning.follow_timeout_s,
                       eof_settle_s=tuning.eof_settle_s,
                       backoff_initial_s=tuning.backoff_initial_s,
                       backoff_max_s=tuning.backoff_max_s)

    return build


@dataclass(frozen=True, slots=True)
class ApiView:
    """:class:`evidence_keeper.api.app.AgentView`: the node's name, its metrics registry, and the
    two documents the API serves (built over the supervisor's readiness and gap rows)."""

    node: str
    registry: CollectorRegistry
    readiness_doc: Callable[[], dict[str, Any]]
    rows: Callable[..., Awaitable[list[dict[str, Any]]]]

    def readiness(self) -> dict[str, Any]:
        return self.readiness_doc()

    async def gap_rows(self, *, since: datetime | None, until: datetime | None,
                       kind: str | None = None, namespace: str | None = None,
                       open_: bool | None = None) -> list[dict[str, Any]]:
        return await self.rows(since=since, until=until, kind=kind, namespace=namespace,
                               open_=open_)


class ArchiveCaptureView:
    """:class:`evidence_keeper.api.archiving.ArchiveCapture` over the spool, the shipper, the
    gap ledger's shipper and the watcher's local lifecycle records."""

    def __init__(self, *, spool: Spool, shipper: Shipper, ledger_shipper: LedgerShipper,
                 rows: Callable[..., Awaitable[list[dict[str, Any]]]],
                 kube: KubeWatcher | None) -> None:
        self._spool = spool
        self._shipper = shipper
        self._ledger_shipper = ledger_shipper
        self._rows = rows
        self._kube = kube

    def seal_scope(self, scope: Scope) -> dict[StreamId, int]:
        spool = self._spool
        with spool.lock:
            sids = [sid for sid in spool.streams if scope.matches(sid)]
            spool.seal_all(sids)
            return {sid: spool.streams[sid].next_offset for sid in sids}

    def pending(self, targets: Mapping[StreamId, int]) -> tuple[int, int]:
        spool = self._spool
        segments = nbytes = 0
        with spool.lock:
            for sid, target in targets.items():
                s = spool.streams.get(sid)
                if s is None:
                    continue
                for seg in s.sealed:
                    if not seg.shipped and seg.start < target:
                        segments += 1
                        nbytes += seg.length
                if s.open is not None and s.open.start < target:
                    segments += 1
                    nbytes += min(s.open.size, target - s.open.start)
        return segments, nbytes

    def kick_shipping(self) -> None:
        self._shipper.wakeup.set()

    def last_store_error(self) -> str | None:
        return self._shipper.last_error

    async def drain_ledger(self, deadline: float) -> bool:
        return await self._ledger_shipper.drain(deadline)

    async def gap_rows(self, *, since: datetime | None,
                       until: datetime | None) -> list[dict[str, Any]]:
        return await self._rows(since=since, until=until)

    def lifecycle_local(self) -> LifecycleLedger | None:
        return self._kube.lifecycle if self._kube is not None else None
