"""Pod lifecycle evidence: what happened to each pod on this node, kept next to its logs.

Three parts, all free of Kubernetes client types (pods arrive as the API's JSON):

* :func:`parse_pod` reduces a pod object to a :class:`PodView`: identity, owner, service
  account, labels and, per container (init, regular and ephemeral), its restart count, state,
  last termination, image and image digest.
* :func:`observe` compares two views of one pod (the previous one may be unknown) and returns a
  :class:`Transition`: lifecycle *records* (``created``, ``started``, ``terminated``,
  ``oom_killed``, ``restarted``, ``deletion_requested``, ``deleted``), the restarts seen
  (``restartCount`` rises) and the container instances now known to have exited. It is pure, so
  the watcher, a relist and a restart of the agent all derive the same records.
* :class:`LifecycleLedger` keeps the records durably. Each record has a deterministic ``id``
  (``restarted:app:3``), so seeing the same state twice (a relist after ``410 Expired``, an
  agent restart) adds nothing: the ledger is idempotent. Records are appended in the order they
  were observed (``seq``) to a local JSON-lines file per pod under ``<spool_dir>/lifecycle/``
  (append + fsync within ``flush``, the same one-second durability as log bytes), and the whole
  file is written to the store as ``<cluster>/<namespace>/<pod>_<uid>/lifecycle.jsonl``, beside
  the pod's streams, whenever it grew. The store object is rewritten, never appended to: each
  version is the complete, ordered history, so a crash between two uploads loses nothing. When
  the agent has no local history of a pod (its spool was lost), the store's object is merged in
  before the first upload, so history is never overwritten by a shorter one.

Labels, owner and service account live in the records (and from there in archive manifests),
never in metric labels or store keys: they are unbounded and change over a pod's life.

:func:`read_lifecycle` is the archive's query: the records of a namespace (optionally one pod)
in a time window, read back from the store; :meth:`LifecycleLedger.query` answers the same
question from the agent's local copy, which also holds records not yet uploaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from evidence_keeper.logs import get_logger
from evidence_keeper.model import StreamId
from evidence_keeper.store import ObjectMissing, Store, StoreError
from evidence_keeper.timefmt import parse_rfc3339, rfc3339

log = get_logger("evidence_keeper.lifecycle")

LIFECYCLE_OBJECT: Final = "lifecycle.jsonl"
EVENTS: Final = (
    "created", "started", "terminated", "oom_killed", "restarted", "deletion_requested",
    "deleted", "previous_logs",
)
MESSAGE_MAX: Final = 4096  # termination messages are capped by kubelet at 4 KiB too

Record = dict[str, Any]


def lifecycle_key(cluster: str, namespace: str, pod: str, pod_uid: str) -> str:
    """Store key of a pod's lifecycle records, next to its streams (no prefix)."""
    return f"{cluster}/{namespace}/{pod}_{pod_uid}/{LIFECYCLE_OBJECT}"


def normalize_time(value: object) -> str | None:
    """An API timestamp (``2025-11-10T12:27:00Z``) in the ledger's sortable format."""
    ts = parse_rfc3339(value)
    return None if ts is None else rfc3339(ts)


# --------------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True, slots=True)
class ContainerView:
    name: str
    kind: str  # "container" | "init" | "ephemeral"
    restart_count: int
    state: str  # "running" | "waiting" | "terminated" | "unknown"
    state_detail: Mapping[str, Any]
    last_terminated: Mapping[str, Any] | None
    container_id: str
    image: str
    image_id: str

    @property
    def current_terminated(self) -> Mapping[str, Any] | None:
        """How instance ``restart_count`` ended, once it has.

        ``state.terminated``, or, while kubelet waits to restart it (CrashLoopBackOff), a
        ``lastState.terminated`` whose container ID is the newest container's: restartCount only
        rises when kubelet creates the next instance.
        """
        if self.state == "terminated":
            return self.state_detail
        lt = self.last_terminated
        if lt is not None and self.container_id and lt.get("containerID") == self.container_id:
            return lt
        return None

    @property
    def has_run(self) -> bool:
        """Instance ``restart_count`` was started (so it has a log, possibly empty)."""
        return self.state in ("running", "terminated") or self.current_terminated is not None


@dataclass(frozen=True, slots=True)
class PodView:
    namespace: str
    name: str
    uid: str
    node: str
    phase: str
    resource_version: str
    created: str | None
    deletion: str | None  # deletionTimestamp (normalized) once deletion was requested
    grace_s: int | None
    labels: Mapping[str, str]
    owner: Mapping[str, str] | None
    service_account: str
    containers: Mapping[str, ContainerView]
    spec_images: Mapping[str, str] = field(default_factory=dict)

    def stream(self, container: str, restart: int) -> StreamId:
        return StreamId(self.namespace, self.name, self.uid, container, restart)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _container_view(cs: Mapping[str, Any], kind: str, spec_image: str) -> ContainerView:
    state = _mapping(cs.get("state"))
    name, detail = "unknown", {}
    for key in ("running", "terminated", "waiting"):
        if key in state:
            name, detail = key, dict(_mapping(state[key]))
            break
    last = _mapping(cs.get("lastState")).get("terminated")
    return ContainerView(
        name=str(cs.get("name", "")), kind=kind,
        restart_count=_int(cs.get("restartCount")),
        state=name, state_detail=detail,
        last_terminated=dict(last) if isinstance(last, Mapping) else None,
        container_id=str(cs.get("containerID") or ""),
        image=str(cs.get("image") or spec_image),
        image_id=str(cs.get("imageID") or ""),
    )


def parse_pod(obj: Mapping[str, Any]) -> PodView:
    """The parts of a pod object the agent uses; tolerant of missing fields."""
    meta = _mapping(obj.get("metadata"))
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    spec_images: dict[str, str] = {}
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or ():
            if isinstance(c, Mapping) and c.get("name"):
                spec_images[str(c["name"])] = str(c.get("image") or "")
    containers: dict[str, ContainerView] = {}
    for key, kind in (("initContainerStatuses", "init"), ("containerStatuses", "container"),
                      ("ephemeralContainerStatuses", "ephemeral")):
        for cs in status.get(key) or ():
            if isinstance(cs, Mapping) and cs.get("name"):
                cv = _container_view(cs, kind, spec_images.get(str(cs["name"]), ""))
                containers[cv.name] = cv
    owner = None
    for ref in meta.get("ownerReferences") or ():
        if isinstance(ref, Mapping) and (ref.get("controller") or owner is None):
            owner = {"kind": str(ref.get("kind", "")), "name": str(ref.get("name", ""))}
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels")).items()}
    grace = meta.get("deletionGracePeriodSeconds")
    return PodView(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), node=str(spec.get("nodeName") or ""),
        phase=str(status.get("phase") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        created=normalize_time(meta.get("creationTimestamp")),
        deletion=normalize_time(meta.get("deletionTimestamp")),
        grace_s=grace if isinstance(grace, int) else None,
        labels=labels, owner=owner,
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or ""),
        containers=containers, spec_images=spec_images,
    )


# --------------------------------------------------------------------------------------------
# Transitions


@dataclass(slots=True)
class Transition:
    records: list[Record] = field(default_factory=list)
    restarts: list[tuple[str, int, int]] = field(default_factory=list)  # container, old, new
    ended: list[tuple[str, int]] = field(default_factory=list)  # instances known to have exited


def _termination(term: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "reason": term.get("reason"),
        "exit_code": term.get("exitCode"),
        "signal": term.get("signal"),
        "started_at": normalize_time(term.get("startedAt")),
        "finished_at": normalize_time(term.get("finishedAt")),
    }
    msg = term.get("message")
    if isinstance(msg, str) and msg:
        out["message"] = msg[:MESSAGE_MAX]
    return {k: v for k, v in out.items() if v is not None}


def observe(prev: PodView | None, cur: PodView, *, deleted: bool = False,
            known_restarts: Mapping[str, int] | None = None,
            now: datetime | None = None, detail: str | None = None) -> Transition:
    """Records and facts implied by ``cur`` given what was known before.

    ``prev`` is the last view of this pod; when it is None, ``known_restarts`` (restart counts
    from the durable ledger, after an agent restart) stands in for it. Without either, the pod is
    seen for the first time: its restart count is history, not a restart seen by this agent.
    """
    now = now or datetime.now(UTC)
    observed = rfc3339(now)
    t = Transition()

    def rec(rid: str, event: str, ts: str | None, **fields: Any) -> None:
        r: Record = {
            "id": rid, "event": event, "ts": ts or observed, "observed_at": observed,
            "namespace": cur.namespace, "pod": cur.name, "pod_uid": cur.uid, "node": cur.node,
            "owner": dict(cur.owner) if cur.owner else None,
            "service_account": cur.service_account, "labels": dict(cur.labels),
        }
        r.update({k: v for k, v in fields.items() if v is not None})
        t.records.append(r)

    rec("created", "created", cur.created, phase=cur.phase)
    before: Mapping[str, int] = (
        {name: c.restart_count for name, c in prev.containers.items()} if prev is not None
        else known_restarts or {}
    )
    for name, c in cur.containers.items():
        image = {"image": c.image or None, "image_id": c.image_id or None}
        old = before.get(name)
        if old is not None and c.restart_count > old:
            t.restarts.append((name, old, c.restart_count))
            for r in range(old + 1, c.restart_count + 1):
                fields: dict[str, Any] = {"container": name, "container_kind": c.kind,
                                          "restart": r, "previous_restart": r - 1, **image}
                if r == c.restart_count and c.last_terminated is not None:
                    fields["last_state"] = _termination(c.last_terminated)
                    ts = normalize_time(c.last_terminated.get("finishedAt"))
                else:
                    fields["detail"] = ("restart seen only as a restartCount change (the API was"
                                        " not watched then); its last state is unknown")
                    ts = None
                rec(f"restarted:{name}:{r}", "restarted", ts, **fields)
        # The previous instance's end, as reported in lastState.
        lt = c.last_terminated
        if lt is not None and c.restart_count > 0 and c.current_terminated is not lt:
            _ended_records(rec, name, c, c.restart_count - 1, lt, image)
        if c.state == "running" or c.current_terminated is not None:
            started = normalize_time(
                c.state_detail.get("startedAt") if c.state == "running"
                else (c.current_terminated or {}).get("startedAt"))
            rec(f"started:{name}:{c.restart_count}", "started", started, container=name,
                container_kind=c.kind, restart=c.restart_count,
                container_id=c.container_id or None, **image)
        term = c.current_terminated
        if term is not None:
            _ended_records(rec, name, c, c.restart_count, term, image)
            t.ended.append((name, c.restart_count))
        elif cur.phase in ("Succeeded", "Failed"):
            t.ended.append((name, c.restart_count))
    if cur.deletion is not None:
        rec("deletion_requested", "deletion_requested", cur.deletion, grace_s=cur.grace_s)
    if deleted:
        rec("deleted", "deleted", None, phase=cur.phase, detail=detail)
    return t


def _ended_records(rec: Any, name: str, c: ContainerView, restart: int,
                   term: Mapping[str, Any], image: Mapping[str, Any]) -> None:
    info = _termination(term)
    ts = info.get("finished_at")
    rec(f"terminated:{name}:{restart}", "terminated", ts, container=name, container_kind=c.kind,
        restart=restart, **info, **image)
    if info.get("reason") == "OOMKilled":
        rec(f"oom_killed:{name}:{restart}", "oom_killed", ts, container=name,
            container_kind=c.kind, restart=restart, **info, **image)


# --------------------------------------------------------------------------------------------
# The durable ledger


def _line(r: Record) -> bytes:
    return json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parse_lines(body: bytes) -> list[Record]:
    """Records of a JSON-lines body; a torn last line (crash mid-append) is ignored."""
    out = []
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("id"), str):
            out.append(r)
    return out


@dataclass(slots=True)
class PodLog:
    namespace: str
    pod: str
    uid: str
    records: list[Record] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    unflushed: list[Record] = field(default_factory=list)
    uploaded: int = 0  # len(records) at the last confirmed upload
    local: bool = False  # a local file holds (part of) the history
    merge_store: bool = False  # no local history: merge the store's object before uploading
    deleted_at: float | None = None  # monotonic, once a "deleted" record was added

    @property
    def file_name(self) -> str:
        return f"{self.namespace}_{self.pod}_{self.uid}.jsonl"


class LifecycleLedger:
    """Durable, idempotent, ordered lifecycle records per pod (see the module docstring)."""

    def __init__(self, directory: Path, *, store: Store, cluster: str, node: str,
                 object_lock_days: int = 0) -> None:
        self.directory = directory
        self.store = store
        self.cluster = cluster
        self.node = node
        self.object_lock_days = object_lock_days
        self._lock = threading.Lock()  # the in-memory state
        self._flush_lock = threading.Lock()  # local files
        self._upload_lock = threading.Lock()
        self.pods: dict[str, PodLog] = {}
        self.store_errors = 0

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Read the local history (blocking)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.listdir(self.directory)):
            path = self.directory / entry
            if entry.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            if not entry.endswith(".jsonl"):
                continue
            records = [r for r in parse_lines(path.read_bytes())
                       if all(isinstance(r.get(k), str) for k in ("namespace", "pod", "pod_uid"))]
            if not records:
                log.warning("ignoring a lifecycle file without records", path=str(path))
                continue
            first = records[0]
            p = PodLog(str(first["namespace"]), str(first["pod"]), str(first["pod_uid"]),
                       local=True)
            for r in records:
                if r["id"] not in p.ids:
                    p.ids.add(r["id"])
                    p.records.append(r)
                    if r.get("event") == "deleted":
                        p.deleted_at = 0.0
            with self._lock:
                self.pods[p.uid] = p
            # Whether the store has the latest version is unknown: upload once more.

    # ------------------------------------------------------------------ adding (any thread)
    def add(self, records: Iterable[Record], *, now_mono: float = 0.0) -> list[Record]:
        """Append records not seen before (by ``id``); returns those added, with their ``seq``."""
        added = []
        with self._lock:
            for new in records:
                uid = str(new["pod_uid"])
                p = self.pods.get(uid)
                if p is None:
                    p = PodLog(str(new["namespace"]), str(new["pod"]), uid, merge_store=True)
                    self.pods[uid] = p
                if new["id"] in p.ids:
                    continue
                r = dict(new, seq=(p.records[-1]["seq"] + 1) if p.records else 1)
                p.ids.add(r["id"])
                p.records.append(r)
                p.unflushed.append(r)
                if r["event"] == "deleted":
                    p.deleted_at = now_mono
                added.append(r)
        return added

    def has(self, uid: str, rid: str) -> bool:
        with self._lock:
            p = self.pods.get(uid)
            return p is not None and rid in p.ids

    def known_restarts(self, uid: str) -> dict[str, int] | None:
        """Highest container instance each container is known to have reached, from history."""
        with self._lock:
            p = self.pods.get(uid)
            if p is None:
                return None
            out: dict[str, int] = {}
            for r in p.records:
                c, n = r.get("container"), r.get("restart")
                if isinstance(c, str) and isinstance(n, int) and r["event"] in (
                    "started", "restarted", "terminated"
                ):
                    out[c] = max(out.get(c, 0), n)
            return out

    def unresolved_restarts(self) -> list[StreamId]:
        """Previous instances whose capture outcome was never recorded (agent restarted)."""
        out = []
        with self._lock:
            for p in self.pods.values():
                for r in p.records:
                    if r["event"] != "restarted":
                        continue
                    prev = int(r["previous_restart"])
                    if f"previous_logs:{r['container']}:{prev}" not in p.ids:
                        out.append(StreamId(p.namespace, p.pod, p.uid, str(r["container"]), prev))
        return out

    def deleted(self, uid: str) -> bool:
        with self._lock:
            p = self.pods.get(uid)
            return p is not None and p.deleted_at is not None

    # ------------------------------------------------------------------ persistence (threads)
    def dirty(self) -> tuple[bool, bool]:
        """(records not yet on local disk, records not yet in the store)."""
        with self._lock:
            unflushed = any(p.unflushed for p in self.pods.values())
            unuploaded = any(p.uploaded < len(p.records) for p in self.pods.values())
        return unflushed, unuploaded

    def flush(self) -> int:
        """Append new records to the local files and fsync them. Raises OSError (kept queued)."""
        with self._flush_lock:
            with self._lock:
                work = [(p, p.unflushed) for p in self.pods.values() if p.unflushed]
                for p, _ in work:
                    p.unflushed = []
            n = 0
            try:
                while work:
                    p, recs = work[0]
                    self._append_local(p, recs)
                    n += len(recs)
                    work.pop(0)
            finally:
                if work:  # put back what did not reach the disk, in order
                    with self._lock:
                        for p, recs in work:
                            p.unflushed = recs + p.unflushed
            return n

    def _append_local(self, p: PodLog, recs: list[Record]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / p.file_name
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, b"".join(_line(r) for r in recs))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.directory)
        p.local = True

    def upload(self) -> bool:
        """Write every grown history to the store; returns False if some upload failed."""
        ok = True
        with self._upload_lock:
            with self._lock:
                todo = [p for p in self.pods.values() if p.uploaded < len(p.records)]
            for p in todo:
                key = lifecycle_key(self.cluster, p.namespace, p.pod, p.uid)
                try:
                    if p.merge_store:
                        self._merge_from_store(p, key)
                    with self._lock:
                        records = list(p.records)
                    body = b"".join(_line(r) for r in records)
                    retain = None
                    if self.object_lock_days > 0:
                        retain = datetime.now(UTC) + timedelta(days=self.object_lock_days)
                    self.store.put(key, body, {
                        "ek-node": self.node, "ek-namespace": p.namespace, "ek-pod": p.pod,
                        "ek-pod-uid": p.uid, "ek-kind": "lifecycle",
                        "ek-records": str(len(records)),
                        "ek-sha256": hashlib.sha256(body).hexdigest(),
                    }, retain_until=retain)
                except (StoreError, OSError) as exc:
                    ok = False
                    self.store_errors += 1
                    if self.store_errors in (1, 10, 100) or self.store_errors % 1000 == 0:
                        log.warning("lifecycle upload failed; will retry", key=key,
                                    error=str(exc), failures=self.store_errors)
                    continue
                with self._lock:
                    p.uploaded = max(p.uploaded, len(records))
        return ok

    def _merge_from_store(self, p: PodLog, key: str) -> None:
        """The agent had no local history of this pod: keep what the store already has."""
        try:
            older = parse_lines(self.store.get(key))
        except ObjectMissing:
            older = []
        with self._flush_lock, self._lock:
            if older:
                mine = [r for r in p.records if r["id"] not in {o["id"] for o in older}]
                top = max(int(o.get("seq", 0)) for o in older)
                merged = list(older)
                for i, r in enumerate(mine, start=1):
                    merged.append(dict(r, seq=top + i))
                p.records = merged
                p.ids = {r["id"] for r in merged}
                p.unflushed = []
                _write_atomic(self.directory / p.file_name, b"".join(_line(r) for r in merged))
                p.local = True
            p.merge_store = False

    def release(self, uid: str) -> bool:
        """Forget a deleted pod whose full history is in the store (drops the local file)."""
        with self._flush_lock, self._lock:
            p = self.pods.get(uid)
            if p is None or p.unflushed or p.uploaded < len(p.records):
                return False
            del self.pods[uid]
        try:
            (self.directory / p.file_name).unlink(missing_ok=True)
        except OSError:
            pass
        return True

    def deleted_pods(self) -> list[tuple[str, float]]:
        with self._lock:
            return [(u, p.deleted_at) for u, p in self.pods.items() if p.deleted_at is not None]

    # ------------------------------------------------------------------ queries
    def query(self, *, namespace: str, pod: str | None = None, pod_uid: str | None = None,
              since: datetime | None = None, until: datetime | None = None) -> list[Record]:
        """Local records of a namespace (or one pod) whose ``ts`` is in ``[since, until]``."""
        with self._lock:
            pods = [p for p in self.pods.values() if p.namespace == namespace
                    and (pod is None or p.pod == pod) and (pod_uid is None or p.uid == pod_uid)]
            records = [r for p in pods for r in p.records]
        return _window(records, since, until)

    def records(self, uid: str) -> list[Record]:
        with self._lock:
            p = self.pods.get(uid)
            return list(p.records) if p is not None else []


def _window(records: Iterable[Record], since: datetime | None,
            until: datetime | None) -> list[Record]:
    lo = rfc3339(since) if since is not None else ""
    hi = rfc3339(until) if until is not None else "~"
    out = [r for r in records if lo <= str(r.get("ts", "")) <= hi]
    out.sort(key=lambda r: (str(r.get("ts", "")), str(r["pod_uid"]), int(r.get("seq", 0))))
    return out


def lifecycle_keys(store: Store, *, cluster: str, namespace: str,
                   pod: str | None = None) -> Iterator[tuple[str, str, str]]:
    """``(key, pod, pod_uid)`` of every lifecycle object of a namespace (or one pod)."""
    prefix = f"{cluster}/{namespace}/" + (f"{pod}_" if pod else "")
    for key in store.list(prefix):
        parts = key.split("/")
        if len(parts) != 4 or parts[3] != LIFECYCLE_OBJECT or parts[:2] != [cluster, namespace]:
            continue
        name, sep, uid = parts[2].rpartition("_")
        if not sep or (pod is not None and name != pod):
            continue
        yield key, name, uid


def read_lifecycle(store: Store, *, cluster: str, namespace: str, pod: str | None = None,
                   pod_uid: str | None = None, since: datetime | None = None,
                   until: datetime | None = None,
                   local: LifecycleLedger | None = None) -> list[Record]:
    """Lifecycle records of a namespace (or one pod) with ``ts`` in ``[since, until]``.

    This is what an archive manifest's ``lifecycle`` holds: read from the store (blocking), and
    merged with ``local`` records not uploaded yet when the agent's ledger is given. Sorted by
    time, then pod, then observation order; every record appears once.
    """
    found: dict[tuple[str, str], Record] = {}
    for key, _name, uid in lifecycle_keys(store, cluster=cluster, namespace=namespace, pod=pod):
        if pod_uid is not None and uid != pod_uid:
            continue
        try:
            body = store.get(key)
        except ObjectMissing:
            continue
        for r in parse_lines(body):
            found[(uid, r["id"])] = r
    if local is not None:
        for r in local.query(namespace=namespace, pod=pod, pod_uid=pod_uid):
            found.setdefault((str(r["pod_uid"]), r["id"]), r)
    return _window(found.values(), since, until)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
