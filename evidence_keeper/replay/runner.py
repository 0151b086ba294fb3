"""The replay: stored evidence → lines → batches → a sink, once per line.

Per stream, work is a pipeline of two steps that overlap: a worker thread reads the next
segments, parses and encodes lines until a batch is full (CPU and blocking store reads never
run on the event loop, so the agent keeps capturing while it backfills), while the loop sends
the previous batch. Batches of one stream go out one at a time, in order, and after each
acknowledgement the stream's checkpoint is replaced atomically; streams run concurrently, at
most ``concurrency`` at once, all requests sharing one rate limit.

A line is sent when its timestamp is in ``[since, until]`` and its range is not in the
checkpoint. Datadog lines older than the intake's window (``max_age_s`` minus a safety margin
for the time in flight) go to the archive path when ``archive_url`` is set; without it they
are counted as ``too_old``, not sent and not checkpointed, and the replay says so.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aiohttp

from evidence_keeper.discover.lifecycle import read_lifecycle
from evidence_keeper.logs import get_logger
from evidence_keeper.model import StreamId
from evidence_keeper.replay.checkpoint import Checkpoints, ReplayCheckpoint
from evidence_keeper.replay.delivery import (
    ArchiveSink,
    HttpSink,
    RateLimit,
    Refused,
    RetryLater,
    TooLarge,
    backoff_s,
    read_credentials,
)
from evidence_keeper.replay.encoding import (
    Batch,
    DatadogEncoder,
    Encoder,
    LokiEncoder,
    OtlpEncoder,
    StreamContext,
    split_datadog,
)
from evidence_keeper.replay.parsing import Line, LineParser, to_ns
from evidence_keeper.replay.source import (
    Run,
    SourceError,
    StreamPlan,
    observed_ns,
    plan,
    read_segment,
)
from evidence_keeper.settings import ReplayTarget
from evidence_keeper.store import Store, StoreError

IN_FLIGHT_MARGIN_S: Final = 600.0  # a line this close to Datadog's 18 h limit takes the archive

log = get_logger("evidence_keeper.replay")


@dataclass
class ReplayRequest:
    namespace: str | None = None
    namespaces: tuple[str, ...] | None = None  # without namespace: these (default: all)
    pod: str | None = None
    container: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    node: str | None = None  # only segments this node wrote (the backfill)
    streams: set[str] | None = None  # only these stream keys
    dry_run: bool = False
    resend: bool = False  # ignore the checkpoints (send again what was acknowledged)
    gap_id: int | None = None


@dataclass
class StreamResult:
    stream: StreamId
    lines: int = 0
    bytes: int = 0
    skipped: int = 0  # already acknowledged by an earlier replay
    too_old: int = 0
    paths: Counter[str] = field(default_factory=Counter)
    invalid_utf8: int = 0
    partials_joined: int = 0
    unparsed: int = 0
    clamped_ts: int = 0
    split_entries: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.stream
        return {"namespace": s.namespace, "pod": s.pod, "pod_uid": s.pod_uid,
                "container": s.container, "restart": s.restart, "lines": self.lines,
                "bytes": self.bytes, "already_replayed": self.skipped,
                "too_old": self.too_old, "paths": dict(self.paths),
                "invalid_utf8": self.invalid_utf8, "partials_joined": self.partials_joined,
                "unparsed": self.unparsed, "clamped_timestamps": self.clamped_ts,
                "split_entries": self.split_entries, "error": self.error}


@dataclass
class ReplaySummary:
    target: str
    kind: str
    dry_run: bool
    streams: list[StreamResult] = field(default_factory=list)
    archive_objects: list[str] = field(default_factory=list)
    retries: int = 0
    requests: int = 0
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    error: str | None = None

    @property
    def lines(self) -> int:
        return sum(r.lines for r in self.streams)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.streams)

    @property
    def status(self) -> str:
        if self.error is not None or any(r.error for r in self.streams):
            return "failed"
        if any(r.too_old for r in self.streams):
            return "partial"
        return "complete"

    def paths(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.streams:
            total.update(r.paths)
        return total

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "dry_run": self.dry_run,
                "status": self.status, "error": self.error, "lines": self.lines,
                "bytes": self.bytes, "paths": dict(self.paths()),
                "already_replayed": sum(r.skipped for r in self.streams),
                "too_old": sum(r.too_old for r in self.streams),
                "invalid_utf8": sum(r.invalid_utf8 for r in self.streams),
                "requests": self.requests, "retries": self.retries,
                "archive_objects": self.archive_objects,
                "elapsed_s": round(self.elapsed_s, 3),
                "streams": [r.to_json() for r in self.streams]}


@dataclass
class Progress:
    streams_total: int = 0
    streams_done: int = 0
    lines: int = 0
    bytes: int = 0
    bytes_total: int = 0
    retries: int = 0


class Replayer:
    """Replays a scope of the store to one target (see the module docstring)."""

    def __init__(self, *, store: Store, cluster: str, target: ReplayTarget,
                 checkpoints: Checkpoints, node_name: str = "",
                 clock: Callable[[], datetime], concurrency: int = 4,
                 rate_lines_per_s: float | None = None,
                 progress: Callable[[Progress], None] | None = None,
                 s3_options: dict[str, Any] | None = None,
                 on_lines: Callable[[int], None] | None = None,
                 version: str = "") -> None:
        self.store = store
        self.cluster = cluster
        self.target = target
        self.checkpoints = checkpoints
        self.node_name = node_name
        self.clock = clock
        self.concurrency = max(1, concurrency)
        self.limit = RateLimit(rate_lines_per_s)
        self.progress_cb = progress
        self.s3_options = s3_options
        self.on_lines = on_lines
        self.version = version
        self.progress = Progress()
        self._labels: dict[tuple[str, str, str], dict[str, str]] = {}

    # ------------------------------------------------------------------ entry point
    async def run(self, req: ReplayRequest) -> ReplaySummary:
        summary = ReplaySummary(self.target.name, self.target.kind, req.dry_run)
        try:
            plans = await asyncio.to_thread(
                plan, self.store, cluster=self.cluster, namespace=req.namespace,
                namespaces=req.namespaces, pod=req.pod,
                container=req.container, since=req.since, until=req.until, node=req.node,
                streams=req.streams)
        except StoreError as exc:
            summary.error = f"cannot list the store: {exc}"
            return summary
        self.progress.streams_total = len(plans)
        self.progress.bytes_total = sum(p.stored_bytes for p in plans)
        summary.streams = [StreamResult(p.stream) for p in plans]
        sink: HttpSink | None = None
        archive: ArchiveSink | None = None
        session: aiohttp.ClientSession | None = None
        try:
            if not req.dry_run:
                secret = await asyncio.to_thread(read_credentials, self.target)
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self.concurrency))
                sink = HttpSink(self.target, session=session, secret=secret)
                if self.target.kind == "datadog" and self.target.archive_url:
                    archive = ArchiveSink(self.target.archive_url, s3_options=self.s3_options)
            slots = asyncio.Semaphore(self.concurrency)
            now_ns = to_ns(self.clock())
            async with asyncio.TaskGroup() as tg:
                for name, group in self._groups(plans, summary.streams).items():
                    tg.create_task(self._in_order(slots, group, req, sink, archive, summary,
                                                  now_ns), name=f"replay:{name}")
        except Refused as exc:
            summary.error = str(exc)
        finally:
            if session is not None:
                await session.close()
            summary.elapsed_s = time.monotonic() - summary.started
        return summary

    def _groups(self, plans: list[StreamPlan], results: list[StreamResult]
                ) -> dict[str, list[tuple[StreamPlan, StreamResult]]]:
        """Streams that must go one after the other. Loki has no restart label: the restarts
        of a container are one Loki stream, sent in restart order so it stays in time order."""
        groups: dict[str, list[tuple[StreamPlan, StreamResult]]] = {}
        for p, res in zip(plans, results, strict=True):
            s = p.stream
            name = (f"{s.namespace}/{s.pod}_{s.pod_uid}/{s.container}"
                    if self.target.kind == "loki" else s.key)
            groups.setdefault(name, []).append((p, res))
        for group in groups.values():
            group.sort(key=lambda pr: pr[0].stream.restart)
        return groups

    async def _in_order(self, slots: asyncio.Semaphore,
                        group: list[tuple[StreamPlan, StreamResult]], req: ReplayRequest,
                        sink: HttpSink | None, archive: ArchiveSink | None,
                        summary: ReplaySummary, now_ns: int) -> None:
        async with slots:
            for sp, res in group:
                await self._guarded(sp, res, req, sink, archive, summary, now_ns)

    async def _guarded(self, sp: StreamPlan, res: StreamResult,
                       req: ReplayRequest, sink: HttpSink | None, archive: ArchiveSink | None,
                       summary: ReplaySummary, now_ns: int) -> None:
        try:
            await self._stream(sp, res, req, sink, archive, summary, now_ns)
        except (SourceError, StoreError, ValueError) as exc:
            res.error = str(exc)
        except Refused as exc:
            res.error = str(exc)
            summary.error = summary.error or str(exc)
        self.progress.streams_done += 1
        self._report()

    # ------------------------------------------------------------------ one stream
    async def _stream(self, sp: StreamPlan, res: StreamResult, req: ReplayRequest,
                      sink: HttpSink | None, archive: ArchiveSink | None,
                      summary: ReplaySummary, now_ns: int) -> None:
        ckpt = (ReplayCheckpoint(None) if req.resend or req.dry_run
                else await asyncio.to_thread(self.checkpoints.load, self.target.name, sp.stream))
        labels = await asyncio.to_thread(self._labels_of, sp.stream)
        ctx = StreamContext(sp.stream, node=sp.node or self.node_name, labels=labels,
                            extra_tags=self.target.tags)
        cutoff = now_ns - int((self.target.max_age_s - IN_FLIGHT_MARGIN_S) * 1e9)
        encoder = self._encoder(ctx, cutoff, req.dry_run)
        # The worker thread reads a frozen copy: what was acknowledged before this replay.
        prior = ReplayCheckpoint(None, [list(r) for r in ckpt.ranges])
        gen = self._produce(sp, ctx, encoder, prior, req, res, cutoff)
        name = f"replay-read:{sp.stream.key}"
        nxt = asyncio.create_task(asyncio.to_thread(next, gen, None), name=name)
        try:
            while (batch := await nxt) is not None:
                nxt = asyncio.create_task(asyncio.to_thread(next, gen, None), name=name)
                if sink is None:
                    continue
                await self._deliver(batch, sink, archive, summary)
                ckpt.add(batch.ranges, batch.lines)
                await asyncio.to_thread(ckpt.save)
                res.paths[batch.kind] += batch.lines
                self.progress.lines += batch.lines
                self.progress.bytes += batch.raw_bytes
                if self.on_lines is not None:
                    self.on_lines(batch.lines)
                self._report()
        finally:
            if not nxt.done():
                await asyncio.wait([nxt])
            gen.close()
        c = encoder.counters
        res.invalid_utf8, res.clamped_ts, res.split_entries = (
            c.invalid_utf8, c.clamped_ts, c.split_entries)

    def _encoder(self, ctx: StreamContext, cutoff: int, dry_run: bool) -> Encoder:
        kind = self.target.kind
        if kind == "datadog":
            return DatadogEncoder(ctx, cutoff_ns=cutoff,
                                  archive=bool(self.target.archive_url) or dry_run)
        if kind == "loki":
            return LokiEncoder(ctx)
        return OtlpEncoder(ctx, version=self.version)

    def _produce(self, sp: StreamPlan, ctx: StreamContext, encoder: Encoder,
                 ckpt: ReplayCheckpoint, req: ReplayRequest, res: StreamResult,
                 cutoff: int) -> Generator[Batch, None, None]:
        """Runs in a worker thread: the stream's batches, in order (dry run: none)."""
        since = to_ns(req.since) if req.since is not None else None
        until = to_ns(req.until) if req.until is not None else None
        old_needs_archive = self.target.kind == "datadog" and not self.target.archive_url
        for run in sp.runs:
            parser = self._run_parser(run)
            start = run.segments[0].offset
            joined, unparsed = parser.partials_joined, parser.unparsed
            for entry in run.segments:
                ctx.observed_ns = observed_ns(entry)
                offset = entry.offset
                for chunk in read_segment(self.store, entry):
                    lines = parser.feed(chunk, offset)
                    offset += len(chunk)
                    if run.context is not None:  # a line begun in the context is not ours
                        lines = [line for line in lines if line[0] >= start]
                    yield from self._take(lines, encoder, ckpt, res, since, until, cutoff,
                                          req.dry_run, old_needs_archive)
            lines = [line for line in parser.finish() if line[0] >= start]
            yield from self._take(lines, encoder, ckpt, res, since, until, cutoff,
                                  req.dry_run, old_needs_archive)
            res.partials_joined += parser.partials_joined - joined
            res.unparsed += parser.unparsed - unparsed
        if not req.dry_run:
            yield from encoder.flush()

    def _run_parser(self, run: Run) -> LineParser:
        """A parser positioned at the run's start: fed the skipped segment before the run (its
        lines are dropped), so a run starting on a line boundary keeps its first line and one
        starting mid-line does not. If that segment cannot be read, the first line is dropped
        as possibly partial: a line whose start cannot be read is not evidence to replay."""
        if run.context is None:
            return LineParser()
        parser = LineParser()
        offset = run.context.offset
        try:
            for chunk in read_segment(self.store, run.context):
                parser.feed(chunk, offset)
                offset += len(chunk)
        except (SourceError, StoreError) as exc:
            log.warning("replay: segment before a run unreadable; its first line is skipped",
                        key=run.context.key, error=str(exc))
            return LineParser(skip_first_line=True)
        return parser

    def _take(self, lines: list[Line], encoder: Encoder, ckpt: ReplayCheckpoint,
              res: StreamResult, since: int | None, until: int | None, cutoff: int,
              dry_run: bool, old_needs_archive: bool) -> Iterator[Batch]:
        datadog = self.target.kind == "datadog"
        if (since is None and until is None and not ckpt and not dry_run
                and not (datadog and old_needs_archive)):
            # Everything is taken (a whole-store replay, the first run): no per-line checks.
            res.lines += len(lines)
            res.bytes += sum(line[1] - line[0] for line in lines)
            if lines:
                yield from encoder.add_lines(lines)
            return
        selected: list[Line] = []
        for line in lines:
            ts = line[2]
            if (since is not None and ts < since) or (until is not None and ts > until):
                continue
            if ckpt and ckpt.covers(line[0], line[1]):
                res.skipped += 1
                continue
            if datadog and ts < cutoff and old_needs_archive and not dry_run:
                res.too_old += 1
                continue
            res.lines += 1
            res.bytes += line[1] - line[0]
            if dry_run:
                old = datadog and ts < cutoff
                res.paths[("too_old" if old_needs_archive else "archive") if old
                          else "intake"] += 1
                continue
            selected.append(line)
        if selected:
            yield from encoder.add_lines(selected)

    # ------------------------------------------------------------------ delivery
    async def _deliver(self, batch: Batch, sink: HttpSink, archive: ArchiveSink | None,
                       summary: ReplaySummary) -> None:
        attempt = 0
        while True:
            if summary.error is not None:  # another stream met a refusal: stop them all
                raise Refused(summary.error)
            await self.limit.take(batch.lines)
            try:
                summary.requests += 1
                if batch.kind == "archive":
                    assert archive is not None
                    await asyncio.to_thread(archive.write, batch.key, batch.body)
                    summary.archive_objects.append(batch.key)
                else:
                    await sink.post(batch)
                return
            except TooLarge:
                halves = split_datadog(batch) if self.target.kind == "datadog" else [batch]
                if len(halves) == 1:
                    raise Refused(f"target {self.target.name}: a single entry is too large"
                                  " for the sink (HTTP 413)") from None
                for half in halves:
                    await self._deliver(half, sink, archive, summary)
                return
            except RetryLater as exc:
                summary.retries += 1
                self.progress.retries += 1
                delay = exc.retry_after if exc.retry_after is not None else backoff_s(attempt)
                attempt += 1
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ helpers
    def _labels_of(self, sid: StreamId) -> dict[str, str]:
        """The pod's labels from its newest lifecycle record (empty when the store has none)."""
        key = (sid.namespace, sid.pod, sid.pod_uid)
        if key not in self._labels:
            labels: dict[str, str] = {}
            try:
                records = read_lifecycle(self.store, cluster=self.cluster,
                                         namespace=sid.namespace, pod=sid.pod,
                                         pod_uid=sid.pod_uid)
            except (StoreError, ValueError):
                records = []
            for r in records:
                if isinstance(r.get("labels"), dict):
                    labels = {str(k): str(v) for k, v in r["labels"].items()}
            self._labels[key] = labels
        return self._labels[key]

    def _report(self) -> None:
        if self.progress_cb is not None:
            self.progress_cb(self.progress)
