"""``POST /archive``: seal, ship and record the evidence of a scope; and the cluster-wide trigger.

Agent side (:class:`ArchiveService`, installed by :func:`install`):

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

CLI side (:func:`cluster_archive`): find the DaemonSet's pods through the API server, trigger
each agent with the same label (through the API server's pod proxy, or pod IPs), wait for the
node manifests, and write a cluster manifest listing them with their digests, plus any
segments of the scope that no reachable agent covered (nodes that are gone).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

from evidence_keeper.api.client import ApiError, call
from evidence_keeper.api.contract import (
    MAX_BODY,
    BadRequest,
    conform_gap,
    parse_json_body,
    parse_time,
)
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
    load_manifest,
    manifest_full_key,
    manifest_key,
    manifest_meta,
    seal,
    select_segments,
)
from evidence_keeper.logs import get_logger
from evidence_keeper.model import StreamId
from evidence_keeper.ship.store import Store, StoreError
from evidence_keeper.timefmt import parse_rfc3339
from evidence_keeper.timefmt import rfc3339_or_none as rfc3339

if TYPE_CHECKING:
    from evidence_keeper.supervisor import Agent

log = get_logger("evidence_keeper.archive")

FIELDS: Final = ("namespace", "pod", "container", "since", "until", "reason", "label",
                 "requester")
LABEL: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKEN_HEADER: Final = "X-Evidence-Keeper-Token"
_CREDENTIAL_PARAMS: Final = re.compile(r"token|auth|bearer|secret|passw|key|credential", re.I)
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Free text never becomes a path, but nothing in a request may even look like one.
_PATHLIKE: Final = re.compile(r"(^|[/\\])\.\.([/\\]|$)|%2e|%2f|%5c|^[/\\]", re.I)
CAPTURE_BOUND_S: Final = 1.0  # contract: captured within one second of being written
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
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise BadRequest(f"unknown field(s) {shown} (allowed: {', '.join(FIELDS)})")
    for key, value in doc.items():
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key}: must be a string")
    req = {k: v for k, v in doc.items() if v is not None}
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadRequest(f"field {k[:40]!r} given twice")
        out[k] = v
    return out


class ArchiveService:
    """The archive jobs of one agent: HTTP handlers, durable job state, the job runner."""

    def __init__(self, agent: Agent, *, ship_timeout_s: float = SHIP_TIMEOUT_S,
                 capture_bound_s: float = CAPTURE_BOUND_S, poll_s: float = 0.1,
                 max_running: int = 2, jobs_keep_days: float = JOBS_KEEP_DAYS,
                 jobs_max: int = JOBS_MAX) -> None:
        self.agent = agent
        self.ship_timeout_s = ship_timeout_s
        self.capture_bound_s = capture_bound_s
        self.poll_s = poll_s
        self.jobs_keep_days = jobs_keep_days
        self.jobs_max = jobs_max
        self.dir = Path(agent.settings.spool_dir) / "archives"
        self.jobs: dict[str, ArchiveJob] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_running)

    # ------------------------------------------------------------------ wiring
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/archive", self.post_archive)
        app.router.add_get("/archives/{id}", self.get_archive)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, _app: web.Application) -> None:
        jobs = await asyncio.to_thread(self._load_jobs)
        for job in jobs:
            self.jobs[job.id] = job
        await self._prune()
        for job in list(self.jobs.values()):
            if job.status in ("pending", "running"):
                log.warning("resuming archive interrupted by a restart", archive_id=job.id,
                            status=job.status)
                job.status, job.stage = "pending", "resumed after an agent restart"
                self._start(job)

    async def _on_cleanup(self, _app: web.Application) -> None:
        # A job cut short keeps its durable "running" state and resumes on the next start.
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        fs = self.agent.fs

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
        fs = self.agent.fs

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
        path = self.agent.settings.archive_token_file
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
        timeout = self.agent.settings.http_header_timeout_s
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
        settings = self.agent.settings
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
        task = asyncio.create_task(self._run(job), name=f"archive:{job.id}")
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
                targets = await asyncio.to_thread(self._seal, scope)
                await self._wait_shipped(job, targets)
                await self._stage(job, "writing the manifest")
                # The gap records of the window go to the store first: the manifest lists them.
                await self.agent.ledger_shipper.drain(time.monotonic() + 30)
                gaps = await self._gaps(scope)
                doc = await asyncio.to_thread(self._write_manifest, job, scope, gaps,
                                              len(targets))
            job.manifest_key = manifest_full_key(self.agent.store, self.agent.settings.cluster,
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

    def _seal(self, scope: Scope) -> dict[StreamId, int]:
        """Seal the scope's open segments; returns each stream's offset the archive waits for."""
        spool = self.agent.spool
        with spool.lock:
            sids = [sid for sid in spool.streams if scope.matches(sid)]
            spool.seal_all(sids)
            return {sid: spool.streams[sid].next_offset for sid in sids}

    def _pending(self, targets: Mapping[StreamId, int]) -> tuple[int, int]:
        """Segments and bytes below the targets that are not in the store yet."""
        spool = self.agent.spool
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

    async def _wait_shipped(self, job: ArchiveJob, targets: Mapping[StreamId, int]) -> None:
        deadline = time.monotonic() + self.ship_timeout_s
        shown = None
        while True:
            segments, nbytes = await asyncio.to_thread(self._pending, targets)
            if segments == 0:
                return
            if time.monotonic() > deadline:
                err = self.agent.shipper.last_error
                raise ArchiveError(
                    f"{segments} segments ({nbytes} bytes) of the scope were not stored within"
                    f" {self.ship_timeout_s:g}s" + (f"; last store error: {err}" if err else ""))
            stage = f"shipping: {segments} segments ({nbytes} bytes) to go"
            if stage != shown:
                shown = stage
                await self._stage(job, stage)
            self.agent.shipper.wakeup.set()
            await asyncio.sleep(self.poll_s)

    async def _gaps(self, scope: Scope) -> list[dict[str, Any]]:
        rows = await self.agent.gap_rows(since=scope.since, until=scope.until)
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
        settings = self.agent.settings
        store = self.agent.store
        key = manifest_key(settings.cluster, job.id)
        # Records the lifecycle watcher has not uploaded yet come from its local ledger.
        local = getattr(getattr(self.agent, "kube", None), "lifecycle", None)
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


def lifecycle_records(store: Store, cluster: str, scope: Scope, *, nodes: Collection[str] | None,
                      exclude: Collection[str] = (), local: object = None,
                      ) -> list[dict[str, Any]]:
    """Lifecycle records of the scope's pods in the window, on ``nodes`` (None: any node)."""
    from evidence_keeper.discover.lifecycle import LifecycleLedger, read_lifecycle

    glob = scope.pod is not None and any(c in scope.pod for c in "*?[")
    records = read_lifecycle(
        store, cluster=cluster, namespace=scope.namespace,
        pod=None if glob or scope.pod is None else scope.pod, since=scope.since,
        until=scope.until, local=local if isinstance(local, LifecycleLedger) else None)
    return [r for r in records if scope.matches_pod(str(r.get("pod", "")))
            and (nodes is None or r.get("node") in nodes) and r.get("node") not in exclude]


def install(agent: Agent) -> ArchiveService:
    """Serve ``POST /archive`` and ``GET /archives/<id>`` on the agent's API."""
    service = ArchiveService(agent)
    agent.api_extensions.append(service.add_routes)
    return service


# ---------------------------------------------------------------------------- cluster scope
@dataclass(frozen=True, slots=True)
class AgentPod:
    name: str
    node: str
    ip: str
    ready: bool


class AgentTransport(Protocol):
    def request(self, pod: AgentPod, method: str, path: str, *,
                body: dict[str, Any] | None = None,
                token: str | None = None) -> tuple[int, dict[str, Any]]: ...


class ClusterError(Exception):
    pass


def kube_client(kubeconfig: str | None = None) -> Any:
    """An API client from the pod's service account, else the kubeconfig (``$KUBECONFIG``)."""
    import os

    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config
    cfg = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except Exception as exc:
        raise ClusterError(f"cannot load Kubernetes credentials: {exc}") from None
    return client.ApiClient(cfg)


def list_agent_pods(api: Any, *, namespace: str, selector: str) -> list[AgentPod]:
    """The agent DaemonSet's pods (by label), read as plain JSON."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        core: Any = client.CoreV1Api(api)
        resp = core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False, _request_timeout=30)
        doc = json.loads(resp.read())
    except ApiException as exc:
        raise ClusterError(f"cannot list pods {selector!r} in {namespace}: HTTP {exc.status}"
                           f" {exc.reason}") from None
    except Exception as exc:
        raise ClusterError(f"cannot list pods {selector!r} in {namespace}: {exc}") from None
    pods = []
    for item in doc.get("items") or []:
        meta, spec, status = item.get("metadata", {}), item.get("spec", {}), item.get(
            "status", {})
        ready = status.get("phase") == "Running" and all(
            cs.get("ready", False) for cs in status.get("containerStatuses") or [{}])
        pods.append(AgentPod(name=str(meta.get("name", "")), node=str(spec.get("nodeName", "")),
                             ip=str(status.get("podIP") or ""), ready=ready))
    return sorted(pods, key=lambda p: p.node)


class PodProxy:
    """Reach an agent through ``/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>``.

    The API server authenticates the caller and strips ``Authorization`` before proxying, so
    the agent's token travels in ``X-Evidence-Keeper-Token``.
    """

    def __init__(self, api: Any, *, namespace: str, port: int, timeout_s: float = 30.0) -> None:
        self.api = api
        self.namespace = namespace
        self.port = port
        self.timeout_s = timeout_s

    def request(self, pod: AgentPod, method: str, path: str, *,
                body: dict[str, Any] | None = None,
                token: str | None = None) -> tuple[int, dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json", "User-Agent": "evidence-keeper"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if token:
            headers[TOKEN_HEADER] = token
        resource = (f"/api/v1/namespaces/{self.namespace}/pods/{pod.name}:{self.port}/proxy"
                    f"{path}")
        try:
            params = self.api.param_serialize(
                method=method, resource_path=resource, header_params=headers, body=body,
                auth_settings=["BearerToken"])
            resp = self.api.call_api(*params, _request_timeout=self.timeout_s)
            status, data = int(resp.status), resp.read()
        except ApiException as exc:
            status, data = int(exc.status or 0), (exc.body or b"")
        except Exception as exc:
            return 0, {"error": f"cannot reach {pod.name} through the API server: {exc}"}
        return status, _json_doc(data)


class PodIP:
    """Reach an agent directly at ``http://<pod IP>:<port>`` (from inside the cluster)."""

    def __init__(self, *, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s

    def request(self, pod: AgentPod, method: str, path: str, *,
                body: dict[str, Any] | None = None,
                token: str | None = None) -> tuple[int, dict[str, Any]]:
        if not pod.ip:
            return 0, {"error": f"pod {pod.name} has no IP"}
        try:
            status, doc = call(f"http://{pod.ip}:{self.port}", path, method=method, body=body,
                               token=token, timeout=self.timeout_s,
                               accept_status=(400, 401, 403, 404, 409, 413, 500, 503))
        except ApiError as exc:
            return 0, {"error": str(exc)}
        return status, doc if isinstance(doc, dict) else {"error": "not a JSON object"}


def _json_doc(data: bytes | str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return {"error": text.strip()[:200] or "empty answer"}
    return doc if isinstance(doc, dict) else {"error": "not a JSON object"}


@dataclass
class NodeArchive:
    node: str
    agent_pod: str
    archive_id: str | None = None
    status: str = "pending"
    manifest_key: str | None = None
    manifest_digest: str | None = None
    error: str | None = None
    stage: str = ""


@dataclass
class ClusterResult:
    id: str
    manifest_key: str
    nodes: list[NodeArchive] = field(default_factory=list)
    segments: int = 0  # in node manifests and uncovered

    @property
    def complete(self) -> bool:
        return all(n.status == "complete" for n in self.nodes)


def cluster_archive(store: Store, *, cluster: str, pods: Sequence[AgentPod],
                    transport: AgentTransport, body: dict[str, Any], token: str,
                    scope: Scope, timeout_s: float = 600.0, poll_s: float = 0.5,
                    object_lock_days: int = 0,
                    progress: Callable[[list[NodeArchive]], None] | None = None,
                    ) -> ClusterResult:
    """Archive ``scope`` on every agent and write the cluster manifest (blocking)."""
    label = body.get("label") or f"cluster-{secrets.token_hex(8)}"
    body = {**body, "label": label}
    cid = archive_id("cluster", cluster, label)
    result = ClusterResult(cid, manifest_full_key(store, cluster, cid))
    for pod in pods:
        entry = NodeArchive(node=pod.node, agent_pod=pod.name)
        result.nodes.append(entry)
        status, doc = transport.request(pod, "POST", "/archive", body=body, token=token)
        if status == 202 and isinstance(doc.get("id"), str):
            entry.archive_id, entry.status = doc["id"], str(doc.get("status", "pending"))
            entry.manifest_key, entry.error = doc.get("manifest_key"), doc.get("error")
        else:
            entry.status = "failed"
            entry.error = f"HTTP {status}: {doc.get('error', 'no answer')}" if status else str(
                doc.get("error"))
    deadline = time.monotonic() + timeout_s
    by_name = {p.name: p for p in pods}
    while True:
        waiting = [n for n in result.nodes if n.status in ("pending", "running")]
        if progress is not None:
            progress(result.nodes)
        if not waiting:
            break
        if time.monotonic() > deadline:
            for n in waiting:
                n.status, n.error = "failed", f"not complete after {timeout_s:g}s ({n.stage})"
            break
        time.sleep(poll_s)
        for n in waiting:
            status, doc = transport.request(by_name[n.agent_pod], "GET",
                                            f"/archives/{n.archive_id}", token=token)
            if status != 200:
                n.stage = f"HTTP {status}: {doc.get('error')}"
                continue  # a transient proxy error; the deadline decides
            n.status = str(doc.get("status"))
            n.stage = str(doc.get("stage") or "")
            n.error = doc.get("error")
            n.manifest_key = doc.get("manifest_key")
    covered: set[str] = set()
    for n in result.nodes:
        if n.status == "complete" and n.archive_id is not None:
            try:
                node_doc, _ = load_manifest(store, cluster, n.archive_id)
            except Exception as exc:
                n.status, n.error = "failed", f"node manifest unreadable: {exc}"
                continue
            n.manifest_digest = str(node_doc.get("digest"))
            result.segments += len(node_doc.get("segments") or [])
            covered.add(n.node)
    uncovered = select_segments(store, cluster=cluster, scope=scope, exclude_nodes=covered)
    result.segments += len(uncovered.segments)
    doc = seal({
        "version": MANIFEST_VERSION, "kind": "cluster", "id": cid, "created_at": _now(),
        "node": None, "cluster": cluster, "store": store.describe(), "request": body,
        "window": scope.window_json(), "requester": {"name": body.get("requester")},
        "nodes": [asdict(n) for n in result.nodes],
        "segments": [e.to_json() for e in uncovered.segments],
        "lifecycle": lifecycle_records(store, cluster, scope, nodes=None, exclude=covered),
        "gaps": [],
        # Nodes no node manifest speaks for (gone, or their archive failed): their ledgers.
        "ledger": window_entries(store, cluster, since=scope.since, until=scope.until,
                                 exclude=covered),
    })
    retain = None
    if object_lock_days > 0:
        retain = datetime.now(UTC) + timedelta(days=object_lock_days)
    store.put(manifest_key(cluster, cid), encode(doc), manifest_meta(doc), retain_until=retain)
    return result
