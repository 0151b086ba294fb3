"""``POST /archive``: seal, ship and record the evidence of a scope; and the cluster-wide trigger.

The agent side of archiving (:class:`ArchiveService`; the cluster-wide trigger is
:mod:`evidence_keeper.archive.cluster`). The service sees the pipeline only through
:class:`ArchiveCapture`, which the supervisor builds (seal a scope, what is still unshipped,
the gap rows, the ledger drain); its jobs run as tasks of its own task group
(:meth:`ArchiveService.run`, a root task of the agent), never in the HTTP server's lifecycle.

1. The request is authenticated before anything else is looked at: a bearer token compared in
   constant time with the contents of ``archive_token_file`` (read per request, so a rotated
   secret applies at once). Credentials in the query string are refused (they end up in access
   logs and shell history). ``X-Evidence-Keeper-Token`` is accepted as well, because the API
   server's pod proxy (``--all-nodes``) consumes and strips ``Authorization``.
2. The body (at most 64 KiB read within ``http_header_timeout_s``, JSON nested at most 16
   deep, an object without unknown or duplicate fields) is validated: Kubernetes name rules,
   bounded globs, no control characters, nothing that spells a path.
3. The job is persisted under ``<spool_dir>/archives/<id>.json`` before the 202 answer, so an
   agent restart resumes it; a client ``label`` makes the id deterministic (same label, same
   archive), and a different request under a used label is a 409. ``GET /archives/<id>`` needs
   the token too (a label is guessable). Finished jobs are pruned by age
   (:data:`JOBS_KEEP_DAYS`) and count (:data:`JOBS_MAX`), at start-up and after each job;
   the manifests in the store are never touched.
4. The job waits out the capture bound (every byte is in the spool within one second of being
   written, CONTRACT.md section 1), seals the scope's open segments and waits until everything
   up to the seal is stored; the commit task commits the seals within ``commit_interval_s``
   and the shipper ships them. The wait is bounded; a store that does not take the data fails
   the archive with the store's error instead of writing a manifest with missing evidence.
5. It then lists the scope in the store, keeps this node's segments in the window, adds pod
   lifecycle records and the ledger's gaps, seals the manifest with its digest and writes it to
   ``<cluster>/_archives/<id>/manifest.json`` (COMPLIANCE-locked with ``object_lock_days``);
   the manifest and the job's ``manifest_key`` name objects by their full keys.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from aiohttp import web

from evidence_keeper.api.contract import (
    MAX_BODY,
    TOKEN_HEADER,
    BadRequest,
    conform_gap,
    parse_json_body,
    parse_time,
)
from evidence_keeper.archive.cluster import lifecycle_records
from evidence_keeper.archive.ledger import window_entries
from evidence_keeper.archive.manifest import (
    ARCHIVE_ID,
    MANIFEST_VERSION,
    Scope,
    ScopeError,
    archive_id,
    check_glob,
    check_namespace,
    encode,
    manifest_full_key,
    manifest_key,
    manifest_meta,
    seal,
    select_segments,
)
from evidence_keeper.discover.lifecycle import LifecycleLedger
from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger
from evidence_keeper.model import CAPTURE_BOUND_S, StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.store import Store, StoreError
from evidence_keeper.timefmt import parse_rfc3339
from evidence_keeper.timefmt import rfc3339_or_none as rfc3339

log = get_logger("evidence_keeper.archive")

FIELDS: Final = ("namespace", "pod", "container", "since", "until", "reason", "label",
                 "requester")
LABEL: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CREDENTIAL_PARAMS: Final = re.compile(r"token|auth|bearer|secret|passw|key|credential", re.I)
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Free text never becomes a path, but nothing in a request may even look like one.
_PATHLIKE: Final = re.compile(r"(^|[/\\])\.\.([/\\]|$)|%2e|%2f|%5c|^[/\\]", re.I)
SHIP_TIMEOUT_S: Final = 300.0
STATUSES: Final = ("pending", "running", "complete", "failed")
JOBS_KEEP_DAYS: Final = 30  # finished jobs' state files older than this are pruned
JOBS_MAX: Final = 1000  # ... and beyond this many, the oldest


# ---------------------------------------------------------------------------- jobs
@dataclass
class ArchiveJob:
    id: str
    request: dict[str, Any]  # the validated body, as posted
    since: str | None  # the window, resolved when the request was accepted
    until: str
    requester: dict[str, Any]
    accepted_at: str
    status: str = "pending"
    stage: str = "queued"
    manifest_key: str | None = None
    error: str | None = None
    updated_at: str = ""

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "manifest_key": self.manifest_key,
                "error": self.error, "stage": self.stage, "label": self.request.get("label"),
                "accepted_at": self.accepted_at, "updated_at": self.updated_at}

    @classmethod
    def from_state(cls, doc: Mapping[str, Any]) -> ArchiveJob:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in names})

    def scope(self) -> Scope:
        r = self.request
        return Scope(namespace=r["namespace"], pod=r.get("pod"), container=r.get("container"),
                     since=parse_rfc3339(self.since), until=parse_rfc3339(self.until))


def _now() -> str:
    return rfc3339(datetime.now(UTC)) or ""


def validate_request(doc: object, *, now: datetime) -> tuple[dict[str, Any], Scope]:
    """The body of ``POST /archive`` checked field by field; raises BadRequest (400)."""
    req = _fields(doc)
    _check_scope(req)
    _check_texts(req)
    if "label" in req and not LABEL.match(req["label"]):
        raise BadRequest("label: 1 to 128 characters of A-Z a-z 0-9 . _ -, starting with a"
                         " letter or digit")
    since = parse_time(req["since"], "since", now) if "since" in req else None
    until = parse_time(req["until"], "until", now) if "until" in req else now
    if since is not None and since > until:
        raise BadRequest("since is after until")
    if since is not None and since > now:
        raise BadRequest("since is in the future")
    scope = Scope(namespace=req["namespace"], pod=req.get("pod"),
                  container=req.get("container"), since=since, until=until)
    return req, scope


def _fields(doc: object) -> dict[str, str]:
    """A JSON object of known, string (or null) fields; the nulls dropped."""
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise BadRequest(f"unknown field(s) {shown} (allowed: {', '.join(FIELDS)})")
    for key, value in doc.items():
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key}: must be a string")
    return {k: v for k, v in doc.items() if v is not None}


def _check_scope(req: Mapping[str, str]) -> None:
    try:
        if "namespace" not in req:
            raise ScopeError("namespace: required")
        check_namespace(req["namespace"])
        if "pod" in req:
            check_glob(req["pod"], "pod", subdomain=True)
        if "container" in req:
            check_glob(req["container"], "container", subdomain=False)
    except ScopeError as exc:
        raise BadRequest(str(exc)) from None


def _check_texts(req: Mapping[str, str]) -> None:
    """``reason`` (required) and ``requester``: bounded, no control or path-like text."""
    for key, limit in (("reason", 1024), ("requester", 256)):
        value = req.get(key)
        if value is None:
            if key == "reason":
                raise BadRequest("reason: required (why the evidence is kept)")
            continue
        if not value.strip() or len(value) > limit:
            raise BadRequest(f"{key}: must be 1 to {limit} characters")
        if _CONTROL.search(value) or _PATHLIKE.search(value):
            raise BadRequest(f"{key}: control characters and path-like text are not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadRequest(f"field {k[:40]!r} given twice")
        out[k] = v
    return out


class ArchiveCapture(Protocol):
    """What an archive job needs of the capture pipeline; the supervisor builds it."""

    def seal_scope(self, scope: Scope) -> dict[StreamId, int]:
        """Seal the scope's open segments; each stream's offset the archive waits for
        (blocking)."""
        ...

    def pending(self, targets: Mapping[StreamId, int]) -> tuple[int, int]:
        """Segments and bytes below the targets not in the store yet (blocking)."""
        ...

    def kick_shipping(self) -> None: ...

    def last_store_error(self) -> str | None: ...

    async def drain_ledger(self, deadline: float) -> bool: ...

    async def gap_rows(self, *, since: datetime | None,
                       until: datetime | None) -> list[dict[str, Any]]: ...

    def lifecycle_local(self) -> LifecycleLedger | None:
        """Lifecycle records the watcher has not uploaded yet (None without a watcher)."""
        ...


class ArchiveService:
    """The archive jobs of one agent: HTTP handlers, durable job state, the job runner."""

    def __init__(self, *, settings: Settings, fs: FileSystem, store: Store,
                 capture: ArchiveCapture, ship_timeout_s: float = SHIP_TIMEOUT_S,
                 capture_bound_s: float = CAPTURE_BOUND_S, poll_s: float = 0.1,
                 max_running: int = 2, jobs_keep_days: float = JOBS_KEEP_DAYS,
                 jobs_max: int = JOBS_MAX) -> None:
        self.settings = settings
        self.fs = fs
        self.store = store
        self.capture = capture
        self.ship_timeout_s = ship_timeout_s
        self.capture_bound_s = capture_bound_s
        self.poll_s = poll_s
        self.jobs_keep_days = jobs_keep_days
        self.jobs_max = jobs_max
        self.dir = Path(settings.spool_dir) / "archives"
        self.jobs: dict[str, ArchiveJob] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._group: asyncio.TaskGroup | None = None  # while run() owns the jobs
        self._queued: list[ArchiveJob] = []  # accepted before run() started

    # ------------------------------------------------------------------ wiring
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/archive", self.post_archive)
        app.router.add_get("/archives/{id}", self.get_archive)

    async def run(self, stop: asyncio.Event) -> None:
        """Own the archive jobs until ``stop``: resume the ones a previous run left
        unfinished, run new ones as tasks of this service's own task group, and cancel them
        at stop. A job cut short keeps its durable "running" state and resumes next start."""
        jobs = await asyncio.to_thread(self._load_jobs)
        for job in jobs:
            self.jobs.setdefault(job.id, job)
        await self._prune()
        for job in list(self.jobs.values()):
            if job.status in ("pending", "running") and job not in self._queued:
                log.warning("resuming archive interrupted by a restart", archive_id=job.id,
                            status=job.status)
                job.status, job.stage = "pending", "resumed after an agent restart"
                self._queued.append(job)
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            try:
                for job in self._queued:
                    self._start(job)
                self._queued.clear()
                await stop.wait()
            finally:
                self._group = None
                for t in list(self.tasks.values()):
                    t.cancel()

    def _load_jobs(self) -> list[ArchiveJob]:
        if not self.dir.is_dir():
            return []
        jobs = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                jobs.append(ArchiveJob.from_state(json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("unreadable archive job state; ignored", path=str(path), error=str(exc))
        return jobs

    def prunable(self, now: datetime) -> list[str]:
        """Finished jobs older than the retention, and the oldest beyond the count limit."""
        finished = sorted(
            (j for j in self.jobs.values() if j.status in ("complete", "failed")),
            key=lambda j: parse_rfc3339(j.updated_at or j.accepted_at) or now)
        cutoff = now - timedelta(days=self.jobs_keep_days)
        excess = len(finished) - self.jobs_max
        return [j.id for i, j in enumerate(finished)
                if i < excess or (parse_rfc3339(j.updated_at or j.accepted_at) or now) < cutoff]

    async def _prune(self) -> None:
        ids = self.prunable(datetime.now(UTC))
        if not ids:
            return
        for job_id in ids:
            del self.jobs[job_id]
        fs = self.fs

        def unlink() -> None:
            for job_id in ids:
                try:
                    fs.unlink(str(self.dir / f"{job_id}.json"))
                except FileNotFoundError:
                    pass

        try:
            await asyncio.to_thread(unlink)
        except OSError as exc:  # the next prune tries again
            log.error("cannot prune archive jobs", error=str(exc))
            return
        log.info("archive jobs pruned", count=len(ids))

    async def _persist(self, job: ArchiveJob) -> None:
        job.updated_at = _now()
        data = json.dumps(asdict(job), sort_keys=True).encode()
        path = str(self.dir / f"{job.id}.json")
        fs = self.fs

        def write() -> None:
            fs.makedirs(str(self.dir))
            fs.write_atomic(path, data)

        await asyncio.to_thread(write)

    # ------------------------------------------------------------------ HTTP
    async def _authenticate(self, request: web.Request) -> str:
        """The request's token if it is the configured one; raises BadRequest otherwise."""
        # CONTRACT §6: a missing or malformed token is a 401, checked before anything else;
        # a well-formed token is then refused with 403 while the endpoint is disabled.
        refused = BadRequest("credentials in the query string are refused (they end up in"
                             " logs); send Authorization: Bearer <token>", 401)
        if any(_CREDENTIAL_PARAMS.search(key) for key in request.query):
            raise refused
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            given = request.headers.get(TOKEN_HEADER, "")
            if not given:
                raise BadRequest("missing bearer token (Authorization: Bearer <token>)", 401)
        elif scheme.lower() != "bearer" or not given.strip():
            raise BadRequest("the Authorization header must be 'Bearer <token>'", 401)
        expected = await self._expected_token()
        if any(hmac.compare_digest(v.encode(), expected.encode()) for v in request.query.values()):
            raise refused
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise BadRequest("invalid bearer token", 401)
        return expected

    async def _expected_token(self) -> str:
        path = self.settings.archive_token_file
        if path is None:
            raise BadRequest("the archive endpoint is disabled (archive_token_file is not set)",
                             403)
        try:
            token = (await asyncio.to_thread(Path(path).read_text, encoding="utf-8")).strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read archive_token_file; archive endpoint unavailable",
                      path=str(path), error=str(exc))
            raise BadRequest("the archive endpoint is disabled (its token file cannot be"
                             " read; see the agent's log)", 403) from None
        if not token or not token.isascii():
            log.error("archive_token_file is empty or not ASCII; archive endpoint unavailable",
                      path=str(path))
            raise BadRequest("the archive endpoint is disabled (its token file is empty)", 403)
        return token

    async def post_archive(self, request: web.Request) -> web.Response:
        await self._authenticate(request)
        if request.query:
            raise BadRequest(f"unknown parameter {next(iter(request.query))[:40]!r}"
                             " (the request goes in the JSON body)")
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
        timeout = self.settings.http_header_timeout_s
        try:
            async with asyncio.timeout(timeout):  # a body trickled in holds a connection
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"request body over {MAX_BODY} bytes", 413) from None
        except TimeoutError:
            raise BadRequest(f"request body not received within {timeout:g}s", 408) from None
        doc = parse_json_body(raw, object_pairs_hook=_no_duplicates)
        now = datetime.now(UTC)
        req, scope = validate_request(doc, now=now)
        settings = self.settings
        label = req.get("label")
        job_id = (archive_id("node", settings.cluster, settings.node_name, label) if label
                  else secrets.token_hex(12))
        existing = self.jobs.get(job_id)
        if existing is not None:
            if existing.request != req:
                raise BadRequest(f"label {label!r} was used for a different request"
                                 f" (archive {job_id})", 409)
            if existing.status == "failed":
                existing.status, existing.error, existing.stage = "pending", None, "retrying"
                await self._persist(existing)
                self._start(existing)
            return web.json_response(existing.public(), status=202)
        job = ArchiveJob(
            id=job_id, request=req, since=rfc3339(scope.since), until=rfc3339(scope.until) or "",
            requester={
                "name": req.get("requester"), "address": request.remote,
                "user_agent": request.headers.get("User-Agent", "")[:200],
                "forwarded_for": request.headers.get("X-Forwarded-For", "")[:200] or None,
            },
            accepted_at=rfc3339(now) or "")
        self.jobs[job_id] = job
        try:
            await self._persist(job)
        except OSError as exc:
            del self.jobs[job_id]
            log.error("cannot record an archive job", archive_id=job_id, error=str(exc))
            raise BadRequest(f"cannot record the archive job in the spool: {exc.strerror}",
                             503) from None
        log.info("archive accepted", archive_id=job_id, namespace=scope.namespace,
                 pod=scope.pod, container=scope.container, since=job.since, until=job.until,
                 label=label, requester=job.requester["name"], address=request.remote)
        self._start(job)
        return web.json_response(job.public(), status=202)

    async def get_archive(self, request: web.Request) -> web.Response:
        # v2: the token is required here too (an id can be derived from a guessed label).
        await self._authenticate(request)
        for key in request.query:
            raise BadRequest(f"unknown parameter {key[:40]!r}")
        job_id = request.match_info["id"]
        if not ARCHIVE_ID.match(job_id):
            raise BadRequest("invalid archive id (24 hex digits)")
        job = self.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no archive {job_id} on this agent", 404)
        return web.json_response(job.public())

    # ------------------------------------------------------------------ the job
    def _start(self, job: ArchiveJob) -> None:
        running = self.tasks.get(job.id)
        if running is not None and not running.done():
            return
        if self._group is None:  # accepted before the service started: it starts it
            if job not in self._queued:
                self._queued.append(job)
            return
        task = self._group.create_task(self._run(job), name=f"archive:{job.id}")
        self.tasks[job.id] = task
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        job_id = task.get_name().removeprefix("archive:")
        if self.tasks.get(job_id) is task:
            del self.tasks[job_id]

    async def _stage(self, job: ArchiveJob, stage: str, status: str = "running") -> None:
        job.stage, job.status = stage, status
        await self._persist(job)

    async def _run(self, job: ArchiveJob) -> None:
        started = time.monotonic()
        try:
            async with self._slots:
                await self._stage(job, "capturing what was written before the request")
                accepted = parse_rfc3339(job.accepted_at) or datetime.now(UTC)
                wait = self.capture_bound_s - (datetime.now(UTC) - accepted).total_seconds()
                if wait > 0:
                    await asyncio.sleep(wait)
                scope = job.scope()
                await self._stage(job, "sealing")
                targets = await asyncio.to_thread(self.capture.seal_scope, scope)
                await self._wait_shipped(job, targets)
                await self._stage(job, "writing the manifest")
                # The gap records of the window go to the store first: the manifest lists them.
                await self.capture.drain_ledger(time.monotonic() + 30)
                gaps = await self._gaps(scope)
                doc = await asyncio.to_thread(self._write_manifest, job, scope, gaps,
                                              len(targets))
            job.manifest_key = manifest_full_key(self.store, self.settings.cluster,
                                                 job.id)
            job.error = None
            await self._stage(job, f"{len(doc['segments'])} segments", "complete")
            log.info("archive complete", archive_id=job.id, manifest_key=job.manifest_key,
                     segments=len(doc["segments"]), seconds=round(time.monotonic() - started, 2))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.error = str(exc) if isinstance(exc, (ArchiveError, StoreError)) else (
                f"internal error ({type(exc).__name__}); see the agent's log")
            if not isinstance(exc, (ArchiveError, StoreError)):
                log.exception("archive failed", archive_id=job.id)
            else:
                log.error("archive failed", archive_id=job.id, error=job.error)
            try:
                await self._stage(job, job.stage, "failed")
            except OSError as exc:  # the state stays "running": the next start retries it
                log.error("cannot record the archive's failure", archive_id=job.id,
                          error=str(exc))
        await self._prune()

    async def _wait_shipped(self, job: ArchiveJob, targets: Mapping[StreamId, int]) -> None:
        deadline = time.monotonic() + self.ship_timeout_s
        shown = None
        while True:
            segments, nbytes = await asyncio.to_thread(self.capture.pending, targets)
            if segments == 0:
                return
            if time.monotonic() > deadline:
                err = self.capture.last_store_error()
                raise ArchiveError(
                    f"{segments} segments ({nbytes} bytes) of the scope were not stored within"
                    f" {self.ship_timeout_s:g}s" + (f"; last store error: {err}" if err else ""))
            stage = f"shipping: {segments} segments ({nbytes} bytes) to go"
            if stage != shown:
                shown = stage
                await self._stage(job, stage)
            self.capture.kick_shipping()
            await asyncio.sleep(self.poll_s)

    async def _gaps(self, scope: Scope) -> list[dict[str, Any]]:
        rows = await self.capture.gap_rows(since=scope.since, until=scope.until)
        out = []
        for g in rows:
            if g.get("namespace") is not None and g["namespace"] != scope.namespace:
                continue
            if g.get("pod") is not None and not scope.matches_pod(str(g["pod"])):
                continue
            if g.get("container") is not None and not scope.matches_container(
                    str(g["container"])):
                continue
            out.append(conform_gap(g))
        return out

    def _write_manifest(self, job: ArchiveJob, scope: Scope, gaps: list[dict[str, Any]],
                        sealed_streams: int) -> dict[str, Any]:
        settings = self.settings
        store = self.store
        key = manifest_key(settings.cluster, job.id)
        # Records the lifecycle watcher has not uploaded yet come from its local ledger.
        local = self.capture.lifecycle_local()
        selection = select_segments(store, cluster=settings.cluster, scope=scope,
                                    node=settings.node_name)
        doc = seal({
            "version": MANIFEST_VERSION, "kind": "node", "id": job.id, "created_at": _now(),
            "node": settings.node_name, "cluster": settings.cluster, "store": store.describe(),
            "request": job.request, "window": scope.window_json(), "requester": job.requester,
            "accepted_at": job.accepted_at,
            "sealed": {"streams": sealed_streams, "segments_listed": selection.headed},
            "segments": [e.to_json() for e in selection.segments],
            "lifecycle": lifecycle_records(store, settings.cluster, scope,
                                           nodes={settings.node_name}, local=local),
            "gaps": gaps,
            "ledger": window_entries(store, settings.cluster, since=scope.since,
                                     until=scope.until, nodes=[settings.node_name]),
        })
        retain = None
        if settings.object_lock_days > 0:
            retain = datetime.now(UTC) + timedelta(days=settings.object_lock_days)
        store.put(key, encode(doc), manifest_meta(doc), retain_until=retain)
        return doc


class ArchiveError(Exception):
    """An archive that cannot complete (the message is the job's ``error``)."""
