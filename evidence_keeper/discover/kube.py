"""The Kubernetes watcher: pod lifecycle from the API, an accelerator of capture, never a
dependency of it.

Capture works from kubelet's files alone (discover → tail → spool → ship). The API adds what the
files cannot say, and says it sooner:

* **Restarts.** When a container's ``restartCount`` rises from ``old`` to ``new``, instances
  ``old … new-1`` have exited. Their streams (kubelet names the file after the instance's
  restart count, so instance ``r`` is stream restart ``r``) are marked *priority* (sealed at the
  next commit and shipped before everything else) and *ended* in the tailer (its files are final
  once read to EOF, even before a scan shows the next instance). A job per instance then waits
  for the outcome and counts it in ``evidence_keeper_previous_logs_total{outcome}``:
  ``complete`` once the stream is finished and every byte of it is in the store; ``partial``
  when the gap ledger holds a ``loss`` for it (that gap says why); ``missing`` when the agent
  never had a stream or file for it (a ``loss`` gap of unknown length is recorded, saying why).
  ``evidence_keeper_container_restarts_total`` counts restarts seen.
* **Termination and deletion.** A container reported terminated (``state.terminated``, or
  waiting in CrashLoopBackOff with ``lastState`` being its newest instance) has its stream
  ended the same way. A pod with a ``deletionTimestamp`` (or ``DELETED``) has all its streams
  marked priority, so what its containers write during the grace period ships first and the
  rest drains before kubelet removes the directory; open descriptors survive the removal.
  Streams are *not* ended on ``deletionTimestamp`` alone: containers are still running then,
  and their last words are the evidence.
* **Lifecycle evidence** (see :mod:`evidence_keeper.discover.lifecycle`).

Watching follows client-go's reflector: list pods with ``fieldSelector=spec.nodeName=<node>``,
then watch from the list's ``resourceVersion`` with ``timeoutSeconds`` and resume from the last
event's version. 410 Gone is for the resource version too old error: the watch cannot resume, so
the agent lists again and compares every pod with what it knew, so no restart or deletion is
missed across an outage (pods missing from the new list were deleted meanwhile). An unreachable
API server costs jittered, exponential back-off (0.5 s doubling to 30 s); tailing goes on.

The official client's asyncio API (``kubernetes.aio``) provides configuration (in-cluster
service account when ``KUBERNETES_SERVICE_HOST`` is set, else ``$KUBECONFIG`` or
``~/.kube/config``), authentication and transport; events are read as raw JSON lines and not
turned into model objects, which is what keeps event handling cheap.

If the node's ``log_root`` is missing or unreadable when the watcher starts, it switches to the
weaker API fallback (:mod:`evidence_keeper.discover.apilogs`) and says so in ``status`` (for
``/readyz``) and in its log.

RBAC: ``get``, ``list``, ``watch`` on ``pods`` and ``get`` on ``pods/log``; nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp

from evidence_keeper.discover.apilogs import WEAKER_DETAIL, ApiError, ApiLogs, Backoff
from evidence_keeper.discover.lifecycle import LifecycleLedger, PodView, observe, parse_pod
from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger, stream_fields
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.store import Store
from evidence_keeper.timefmt import rfc3339

log = get_logger("evidence_keeper.kube")

SERVICE_HOST_ENV: Final = "KUBERNETES_SERVICE_HOST"
ENDING_TTL_S: Final = 60.0  # keep asking the tailer to end a stream it has not seen yet
PRIORITY_TTL_S: Final = 600.0  # a deleted pod's streams stay priority at most this long

MODE_OFF: Final = "off"
MODE_WATCH: Final = "watch"
MODE_API_LOGS: Final = "api-logs"


def kube_enabled(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """``kubernetes: on|off|auto``; auto is on inside a cluster (``KUBERNETES_SERVICE_HOST``)."""
    env = os.environ if environ is None else environ
    if settings.kubernetes == "auto":
        return bool(env.get(SERVICE_HOST_ENV))
    return settings.kubernetes == "on"


class KubeConfigError(Exception):
    """No usable in-cluster configuration or kubeconfig."""


class Expired(Exception):
    """410 Gone: the watch's resourceVersion is too old; list again."""


class StatusLike(Protocol):
    kube_mode: str
    kube_detail: str | None


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """What capture knows of one stream (see :class:`StreamControl`)."""

    size: int | None  # bytes read so far (None: files found, nothing in the spool yet)
    finished: bool  # read to its end, sealed and every segment stored


class StreamControl(Protocol):
    """What the watcher may ask of, and tell, the capture pipeline; nothing else.

    The supervisor builds it over the tailer, the spool, the gap ledger and the store, so the
    watcher depends on none of them: it *emits* decisions (end these streams, ship these first)
    and *asks* narrow questions (how far is this stream, is it in the store, what was lost).
    Every method blocks (locks, SQLite, the store) and is called from a worker thread.
    """

    def end_streams(self, streams: list[StreamId]) -> set[StreamId]:
        """The instances exited: read their files to EOF, then finish them. Returns those
        the tailer knew."""
        ...

    def prioritise(self, *, pods: set[str], streams: set[StreamId]) -> set[str]:
        """Ship what is left of these pods' and streams' data first. Returns the pods that
        still have data in the spool."""
        ...

    def progress(self, sid: StreamId) -> StreamProgress | None:
        """None when capture has no stream (and no file) for ``sid``."""
        ...

    def in_store(self, sid: StreamId) -> bool: ...

    def loss_gap_ids(self, sid: StreamId) -> list[int]: ...

    def record_loss(self, loss: Loss) -> bool:
        """Record a ``loss`` gap; False when this exact hole was recorded before."""
        ...


class FallbackFactory(Protocol):
    """Builds the ``pods/log`` fallback (it writes to the spool, which the watcher never sees)."""

    def __call__(self, *, core: Callable[[], Awaitable[Any]], stop: asyncio.Event,
                 tuning: KubeTuning) -> ApiLogs: ...


@dataclass(frozen=True, slots=True)
class KubeTuning:
    """Timing of the watcher (not user settings: tests and benchmarks shorten them)."""

    watch_timeout_s: int = 290  # server-side timeoutSeconds of one watch request
    request_timeout_s: float = 15.0  # connect + response headers (a hung server)
    list_timeout_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    poll_s: float = 0.1  # restart / drain jobs
    missing_after_s: float = 3.0  # no stream for a previous instance by then: missing
    lifecycle_flush_s: float = 0.25  # local fsync of lifecycle records (< 1 s, like bytes)
    lifecycle_upload_s: float = 1.0
    release_after_s: float = 60.0  # forget a deleted pod's local lifecycle file after this
    fallback_probe_s: float = 2.0  # log_root unreadable this long at start: API fallback
    follow_timeout_s: float = 600.0  # API fallback: re-open follows at least this often
    eof_settle_s: float = 2.0


async def new_api_client(environ: Mapping[str, str] | None = None) -> Any:
    """A ``kubernetes.aio`` ApiClient: in-cluster config when in a pod, else the kubeconfig."""
    from kubernetes.aio import client
    from kubernetes.aio import config as kube_config

    config: Any = kube_config  # untyped loaders
    env = os.environ if environ is None else environ
    cfg = client.Configuration()
    try:
        if env.get(SERVICE_HOST_ENV):
            config.load_incluster_config(client_configuration=cfg)
        else:
            home = env.get("HOME") or "~"
            path = (env.get("KUBECONFIG") or "").split(os.pathsep)[0] or f"{home}/.kube/config"
            await config.load_kube_config(config_file=path, client_configuration=cfg,
                                          persist_config=False)
    except Exception as exc:  # the loaders raise ConfigException, OSError, YAML errors...
        raise KubeConfigError(f"no usable Kubernetes configuration: {exc}") from exc
    # One connection per followed log in the API fallback, plus the watch: no pool limit.
    cfg.connection_pool_maxsize = 0
    return client.ApiClient(configuration=cfg)


@dataclass(slots=True)
class PreviousLogJob:
    """Wait for the outcome of one previous instance's capture after a restart."""

    stream: StreamId
    created: float  # monotonic
    seen: bool = False  # the agent had a stream for it at some point
    size: int | None = None


@dataclass(slots=True)
class Outcome:
    job: PreviousLogJob
    outcome: str  # complete | partial | missing
    gaps: list[int] = field(default_factory=list)


class KubeWatcher:
    """Pods of this node from the API: restarts, deletions, lifecycle records, API fallback."""

    def __init__(
        self,
        *,
        settings: Settings,
        control: StreamControl,
        fallback: FallbackFactory,
        store: Store,
        metrics: Metrics,
        status: StatusLike,
        stop: asyncio.Event,
        fs: FileSystem | None = None,
        tuning: KubeTuning | None = None,
        api_factory: Callable[[], Awaitable[Any]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.node = settings.node_name
        self.cluster = settings.cluster
        self.control = control
        self.fallback = fallback
        self.store = store  # lifecycle records only
        self.metrics = metrics
        self.status = status
        self.stop = stop
        self.fs = fs or FileSystem()
        self.tuning = tuning or KubeTuning()
        self._environ = os.environ if environ is None else environ
        self._api_factory = api_factory or (lambda: new_api_client(self._environ))
        self.lifecycle = LifecycleLedger(
            Path(settings.spool_dir) / "lifecycle", store=store, cluster=settings.cluster,
            node=settings.node_name, object_lock_days=settings.object_lock_days)
        self.selector = f"spec.nodeName={self.node}"
        self.pods: dict[str, PodView] = {}  # by uid
        self.jobs: dict[StreamId, PreviousLogJob] = {}
        self._ending: dict[StreamId, float] = {}  # stream -> give up (monotonic)
        self._priority: dict[str, float] = {}  # pod uid -> give up (monotonic)
        self._kick = asyncio.Event()
        self._eval_lock = threading.Lock()
        self._core_lock = asyncio.Lock()
        self._api: Any = None
        self._v1: Any = None
        self._loaded = False
        self._mode_decided = False
        self._root_problem = "log_root unreadable"
        self.apilogs: ApiLogs | None = None
        self.resource_version: str | None = None
        self.connected = False
        self.synced = False  # a list has been applied
        self.down_since: float | None = None  # wall time of the first failure of an outage
        self.last_error: str | None = None
        self.events = 0
        self.relists = 0
        self.expired = 0
        self.outcomes: list[tuple[StreamId, str]] = []
        status.kube_mode = MODE_WATCH
        status.kube_detail = "connecting to the Kubernetes API"

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Watch until ``stop`` is set (the supervisor's intake_closed)."""
        if not self._loaded:
            await asyncio.to_thread(self.lifecycle.load)
            now = time.monotonic()
            for sid in self.lifecycle.unresolved_restarts():
                self.jobs.setdefault(sid, PreviousLogJob(sid, now))
            self._loaded = True
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._jobs_loop(), name="kube:jobs")
                tg.create_task(self._lifecycle_loop(), name="kube:lifecycle")
                watch = tg.create_task(self._watch_forever(), name="kube:watch")
                mode = tg.create_task(self._decide_mode(tg), name="kube:mode")
                await self.stop.wait()
                watch.cancel()
                mode.cancel()
        finally:
            api, self._api, self._v1 = self._api, None, None
            if api is not None:
                await api.close()

    async def _core(self) -> Any:
        """The CoreV1 API on one shared client, created on first use (the watch and the API
        fallback's feeds may ask at once: one client, one connection pool)."""
        async with self._core_lock:
            if self._v1 is None:
                from kubernetes.aio import client

                try:
                    self._api = await self._api_factory()
                except KubeConfigError:
                    raise
                except Exception as exc:
                    raise KubeConfigError(str(exc)) from exc
                self._v1 = client.CoreV1Api(self._api)
            return self._v1

    async def _sleep(self, seconds: float, *also: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self.stop, *also)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # ------------------------------------------------------------------ mode
    async def _decide_mode(self, tg: asyncio.TaskGroup) -> None:
        if not self._mode_decided:
            deadline = time.monotonic() + self.tuning.fallback_probe_s
            while True:
                error = await asyncio.to_thread(self._root_error)
                if error is None:
                    self._mode_decided = True
                    self._set_detail()
                    return
                if time.monotonic() >= deadline:
                    break
                await self._sleep(0.25)
            self._mode_decided = True
            self.status.kube_mode = MODE_API_LOGS
            self._root_problem = error
            log.warning("log_root is not readable: falling back to the Kubernetes API (weaker)",
                        log_root=str(self.settings.log_root), error=error, detail=WEAKER_DETAIL)
            self.apilogs = self.fallback(core=self._core, stop=self.stop, tuning=self.tuning)
            for view in self.pods.values():
                self.apilogs.pod_changed(view)
            if self.synced:
                self.apilogs.sync_done(set(self.pods))
            self._set_detail()
        if self.apilogs is not None:
            tg.create_task(self.apilogs.run(), name="kube:apilogs")

    def _root_error(self) -> str | None:
        root = str(self.settings.log_root)
        try:
            self.fs.listdir(root)
        except OSError as exc:
            return f"log_root {root} is missing or unreadable: {exc.strerror or exc}"
        return None

    def _set_detail(self) -> None:
        if self.status.kube_mode == MODE_API_LOGS:
            base = f"{self._root_problem}; {WEAKER_DETAIL}"
        else:
            base = f"watching pods of node {self.node}; capture reads the log tree"
        if self.connected:
            self.status.kube_detail = base
        elif self.down_since is not None:
            since = datetime.fromtimestamp(self.down_since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.status.kube_detail = (f"{base}; Kubernetes API unreachable since {since}:"
                                       f" {self.last_error}")
        else:
            self.status.kube_detail = f"{base}; connecting to the Kubernetes API"

    # ------------------------------------------------------------------ list + watch
    async def _watch_forever(self) -> None:
        backoff = Backoff(self.tuning.backoff_initial_s, self.tuning.backoff_max_s)
        rv: str | None = None
        expired_in_a_row = 0
        while True:
            try:
                v1 = await self._core()
                if rv is None:
                    rv = await self._relist(v1)
                rv = await self._watch_once(v1, rv)
                backoff.reset()
                expired_in_a_row = 0
            except Expired as exc:
                self.expired += 1
                expired_in_a_row += 1
                log.info("watch resourceVersion expired (410 Gone); listing pods again",
                         resource_version=rv, detail=str(exc))
                rv = None
                if expired_in_a_row > 1:
                    await asyncio.sleep(backoff.next())
            except (ApiError, KubeConfigError, aiohttp.ClientError, OSError, TimeoutError,
                    ValueError) as exc:
                self._went_down(exc)
                await asyncio.sleep(backoff.next())

    def _went_up(self) -> None:
        if not self.connected:
            if self.down_since is not None:
                log.info("Kubernetes API reachable again",
                         outage_s=round(time.time() - self.down_since, 1))
            self.connected = True
            self.down_since = None
            self.last_error = None
            self._set_detail()

    def _went_down(self, exc: BaseException) -> None:
        error = str(exc) or type(exc).__name__
        if self.connected or self.down_since is None:
            log.warning("Kubernetes API unreachable; retrying (capture continues from files)",
                        error=error, node=self.node)
            self.down_since = time.time()
        self.connected = False
        self.last_error = error
        self._set_detail()

    async def _relist(self, v1: Any) -> str:
        resp = await asyncio.wait_for(v1.list_pod_for_all_namespaces_without_preload_content(
            field_selector=self.selector, _request_timeout=self.tuning.list_timeout_s,
        ), timeout=self.tuning.request_timeout_s)
        try:
            if resp.status != 200:
                raise ApiError(resp.status, (await resp.content.read(4096)).decode(
                    "utf-8", "replace"))
            body = await resp.read()
        finally:
            resp.release()
        doc = json.loads(body)
        present: set[str] = set()
        for obj in doc.get("items") or ():
            view = parse_pod(obj)
            if view.uid:
                present.add(view.uid)
                self._apply(view, deleted=False)
        gone = "the pod was gone when pods were listed again (its deletion was not watched)"
        for uid, view in list(self.pods.items()):
            if uid not in present:
                self._apply(view, deleted=True, detail=gone)
        for rec in self._lifecycle_live_pods(exclude=present):
            # Known from the durable ledger, gone after an agent restart.
            self.lifecycle.add([dict(rec, id="deleted", event="deleted",
                                     ts=rec["observed_at"], detail=gone)],
                               now_mono=time.monotonic())
        if self.apilogs is not None:
            self.apilogs.sync_done(present)
        self.relists += 1
        self.synced = True
        self._went_up()
        rv = str((doc.get("metadata") or {}).get("resourceVersion") or "")
        self.resource_version = rv
        return rv

    def _lifecycle_live_pods(self, *, exclude: set[str]) -> list[dict[str, Any]]:
        out = []
        for uid in list(self.lifecycle.pods):
            if uid in exclude or uid in self.pods or self.lifecycle.deleted(uid):
                continue
            records = self.lifecycle.records(uid)
            if records:
                last = records[-1]
                out.append({k: last.get(k) for k in (
                    "namespace", "pod", "pod_uid", "node", "owner", "service_account",
                    "labels")} | {"observed_at": rfc3339(datetime.now(UTC))})
        return out

    async def _watch_once(self, v1: Any, rv: str) -> str:
        timeout = self.tuning.watch_timeout_s
        resp = await asyncio.wait_for(v1.list_pod_for_all_namespaces_without_preload_content(
            field_selector=self.selector, watch=True, resource_version=rv,
            timeout_seconds=timeout, allow_watch_bookmarks=True,
            _request_timeout=float(timeout + 30),
        ), timeout=self.tuning.request_timeout_s)
        try:
            if resp.status == 410:
                raise Expired((await resp.content.read(4096)).decode("utf-8", "replace"))
            if resp.status != 200:
                raise ApiError(resp.status, (await resp.content.read(4096)).decode(
                    "utf-8", "replace"))
            self._went_up()
            while True:
                line = await resp.content.readline()
                if not line:
                    return rv  # timeoutSeconds reached: watch again from here
                new_rv = self.handle_line(line)
                if new_rv:
                    rv = new_rv
                    self.resource_version = rv
        finally:
            resp.release()

    def handle_line(self, line: bytes) -> str | None:
        """One watch event (a JSON line); returns its resourceVersion. Raises Expired on 410."""
        if not line.strip():
            return None
        ev = json.loads(line)
        etype = ev.get("type")
        obj = ev.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            message = f"{obj.get('reason')}: {obj.get('message')}"
            if code == 410:
                raise Expired(message)
            raise ApiError(int(code or 500), message)
        self.events += 1
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.handle_event(etype, obj)
        return str(rv) if rv else None

    # ------------------------------------------------------------------ pod changes
    def handle_event(self, etype: str, obj: Mapping[str, Any]) -> None:
        view = parse_pod(obj)
        if not view.uid:
            return
        self._apply(view, deleted=etype == "DELETED")

    def _apply(self, view: PodView, *, deleted: bool, detail: str | None = None) -> None:
        prev = self.pods.get(view.uid)
        known = self.lifecycle.known_restarts(view.uid) if prev is None else None
        mono = time.monotonic()
        t = observe(prev, view, deleted=deleted, known_restarts=known, detail=detail)
        for rec in self.lifecycle.add(t.records, now_mono=mono):
            if rec["event"] in ("restarted", "oom_killed", "deletion_requested", "deleted"):
                last = rec.get("last_state") or {}
                extra = {"container": rec.get("container"), "restart": rec.get("restart"),
                         "reason": last.get("reason") or rec.get("reason"),
                         "exit_code": last.get("exit_code", rec.get("exit_code")),
                         "detail": rec.get("detail")}
                log.info(f"pod {rec['event'].replace('_', ' ')}", namespace=view.namespace,
                         pod=view.name, pod_uid=view.uid,
                         **{k: v for k, v in extra.items() if v is not None})
        kick = False
        for name, old, new in t.restarts:
            self.metrics.container_restarts.inc(new - old)
            for r in range(old, new):
                sid = view.stream(name, r)
                if sid not in self.jobs and not self.lifecycle.has(
                    view.uid, f"previous_logs:{name}:{r}"
                ):
                    self.jobs[sid] = PreviousLogJob(sid, mono)
                self._ending[sid] = mono + ENDING_TTL_S
            kick = True
        for name, r in t.ended:
            sid = view.stream(name, r)
            if sid not in self._ending:
                self._ending[sid] = mono + ENDING_TTL_S
                kick = True
        if deleted or view.deletion is not None:
            if view.uid not in self._priority:
                kick = True
            self._priority[view.uid] = mono + PRIORITY_TTL_S
        if deleted:
            self.pods.pop(view.uid, None)
        else:
            self.pods[view.uid] = view
        if self.apilogs is not None:
            self.apilogs.pod_changed(view, deleted=deleted)
        if kick:
            self._kick.set()

    # ------------------------------------------------------------------ jobs
    async def _jobs_loop(self) -> None:
        failures = 0
        while not self.stop.is_set():
            self._kick.clear()
            now = time.monotonic()
            for sid in [s for s, until in self._ending.items() if until < now]:
                del self._ending[sid]
            for uid in [u for u, until in self._priority.items() if until < now]:
                del self._priority[uid]
            if self.apilogs is not None:
                self._ending.clear()  # no tailer streams to end: the API feeds own them
            if self.jobs or self._ending or self._priority:
                try:
                    done, ended, seen_pods = await asyncio.to_thread(
                        self._evaluate, list(self.jobs.values()), list(self._ending),
                        set(self._priority), now)
                except Exception:
                    failures += 1
                    if failures in (1, 10, 100):
                        log.exception("evaluating restart and deletion jobs failed; retrying")
                else:
                    for o in done:
                        self.jobs.pop(o.job.stream, None)
                    for sid in ended:
                        self._ending.pop(sid, None)
                    for uid in list(self._priority):
                        if uid not in self.pods and uid not in seen_pods:
                            del self._priority[uid]  # deleted, and nothing of it left to ship
            await self._sleep(self.tuning.poll_s, self._kick)

    def _evaluate(self, jobs: list[PreviousLogJob], ending: list[StreamId],
                  priority_pods: set[str], now: float
                  ) -> tuple[list[Outcome], set[StreamId], set[str]]:
        """Blocking: end streams in the tailer, mark priority, judge previous-log jobs."""
        with self._eval_lock:
            ended = self.control.end_streams(ending) if ending else set()
            seen_pods = self.control.prioritise(pods=priority_pods,
                                                streams={j.stream for j in jobs})
            done = []
            for job in jobs:
                outcome = self._judge(job, now)
                if outcome is not None:
                    self._resolve(outcome)
                    done.append(outcome)
            return done, ended, seen_pods

    def _judge(self, job: PreviousLogJob, now: float) -> Outcome | None:
        sid = job.stream
        progress = self.control.progress(sid)
        if progress is not None:
            if progress.size is not None:
                job.size = progress.size
            job.seen = True
            if not progress.finished:
                return None
        elif not job.seen:
            api_state = self.apilogs.state(sid) if self.apilogs is not None else None
            if api_state == "pending":
                return None
            if api_state is None and now - job.created < self.tuning.missing_after_s:
                return None
            if not self.control.in_store(sid):
                return Outcome(job, "missing")
            job.seen = True
        gaps = self.control.loss_gap_ids(sid)
        return Outcome(job, "partial" if gaps else "complete", gaps)

    def _resolve(self, o: Outcome) -> None:
        sid = o.job.stream
        detail = None
        if o.outcome == "missing":
            if self.apilogs is not None:
                reason = "unreadable"
                detail = (f"previous instance (restart {sid.restart}) of container"
                          f" {sid.container}: log_root is unreadable and the API did not serve"
                          " its log; its length is unknown")
            else:
                reason = "deleted"
                detail = (f"previous instance (restart {sid.restart}) of container"
                          f" {sid.container}: its log files were removed before the agent could"
                          " open them (an instance shorter than the discovery interval, or one"
                          " that ended while the agent was not running); its length is unknown")
            loss = Loss(stream=sid, offset=0, bytes=None, reason=reason, detail=detail)
            if self.control.record_loss(loss):
                self.metrics.loss_events.labels(reason=reason).inc()
            o.gaps = self.control.loss_gap_ids(sid)
        self.metrics.previous_logs.labels(outcome=o.outcome).inc()
        self.outcomes.append((sid, o.outcome))
        latency = round(time.monotonic() - o.job.created, 3)
        fields = stream_fields(sid)
        if o.outcome == "complete":
            log.info("previous log captured", outcome=o.outcome, bytes=o.job.size,
                     seconds=latency, **fields)
        else:
            log.warning("previous log not fully captured", outcome=o.outcome,
                        bytes=o.job.size, gap_ids=o.gaps, detail=detail, **fields)
        last = self.lifecycle.records(sid.pod_uid)
        base = last[-1] if last else {}
        self.lifecycle.add([{
            "id": f"previous_logs:{sid.container}:{sid.restart}", "event": "previous_logs",
            "ts": rfc3339(datetime.now(UTC)),
            "observed_at": rfc3339(datetime.now(UTC)),
            "namespace": sid.namespace, "pod": sid.pod, "pod_uid": sid.pod_uid,
            "node": base.get("node", self.node), "owner": base.get("owner"),
            "service_account": base.get("service_account"), "labels": base.get("labels", {}),
            "container": sid.container, "restart": sid.restart, "outcome": o.outcome,
            "bytes": o.job.size, "loss_gap_ids": o.gaps or None,
        }])

    # ------------------------------------------------------------------ lifecycle records
    async def _lifecycle_loop(self) -> None:
        last_upload = 0.0
        upload_ok = True
        failures = 0
        while True:
            stopping = self.stop.is_set()
            try:
                unflushed, unuploaded = self.lifecycle.dirty()
                if unflushed:
                    await asyncio.to_thread(self.lifecycle.flush)
                now = time.monotonic()
                # At shutdown, one last upload only if the store answered the previous one:
                # the records are durable locally and go up at the next start otherwise.
                due = (upload_ok if stopping
                       else now - last_upload >= self.tuning.lifecycle_upload_s)
                if unuploaded and due:
                    last_upload = now
                    upload_ok = await asyncio.to_thread(self.lifecycle.upload)
                busy = {j.stream.pod_uid for j in self.jobs.values()}
                for uid, at in self.lifecycle.deleted_pods():
                    if uid not in busy and (at == 0.0 or now - at >= self.tuning.release_after_s):
                        await asyncio.to_thread(self.lifecycle.release, uid)
                failures = 0
            except OSError as exc:
                failures += 1
                self.metrics.spool_errors.labels(op="lifecycle").inc()
                if failures in (1, 10, 100):
                    log.error("writing lifecycle records failed; will retry", error=str(exc))
            if stopping:
                return
            await self._sleep(self.tuning.lifecycle_flush_s)
