"""A fake kube-apiserver for pods, speaking the real wire protocol to the real client.

It serves just what evidence-keeper uses, the way the API server and kubelet do:

* ``GET /api/v1/pods`` and ``/api/v1/namespaces/{ns}/pods``: a ``PodList`` carrying
  ``metadata.resourceVersion``; ``fieldSelector`` (``spec.nodeName=…``, ``metadata.name=…``,
  ``metadata.namespace=…``) is honoured.
* The same paths with ``?watch=true``: a chunked stream of JSON lines ``{"type": "ADDED|MODIFIED|
  DELETED|ERROR|BOOKMARK", "object": …}`` starting after ``resourceVersion`` (synthetic ``ADDED``
  events for every pod when it is empty or ``"0"``), ending after ``timeoutSeconds``. A
  ``resourceVersion`` older than the last :meth:`FakeKube.compact` gets what a real server sends:
  HTTP 200 and one ``ERROR`` event holding a ``Status`` with ``code: 410`` (reason ``Expired``),
  or, with ``expired_as_http=True``, an HTTP 410 ``Status`` response.
* ``GET /api/v1/namespaces/{ns}/pods/{name}/log`` with ``container``, ``previous``, ``follow`` and
  ``timestamps``: the log as kubelet renders it (the message of each CRI / json-file record,
  with the record's timestamp in front when ``timestamps=true``), from a ``log_source`` callable
  (tests pass the :class:`~evidence_keeper.sim.KubeletSim` record). ``follow`` streams new records
  until the container instance has terminated, like kubelet.
* Nodes and the pod proxy (a fleet of agents, see the section "nodes and the pod proxy"):
  ``labelSelector`` on pod lists, and the routes of the simulated API server's front
  (:class:`evidence_keeper.sim.apiserver.ApiFront`) over this server's nodes and pods:
  ``GET /api/v1/nodes`` (``labelSelector``) and ``/api/v1/nodes/{name}``, and
  ``/api/v1/namespaces/{ns}/pods/{name}[:port]/proxy/{path}``, which forwards to the agent
  registered for that pod (:meth:`FakeKube.add_agent`) on loopback the way kube-apiserver
  does: without the caller's ``Authorization``, with a 503 ``Status`` when the pod cannot be
  reached. An authenticated front with secrets is that front served on its own
  (:class:`~evidence_keeper.sim.apiserver.SimApiServer` over a FakeKube, with a token).
* Faults: :meth:`inject` makes the next requests of a kind fail with a 503 ``Status``, hang, drop
  the connection (mid-stream for watches and logs), or answer 410; :meth:`down` / :meth:`up` take
  the whole server off the network (the listener closes, live connections are cut).

The server runs in its own thread and event loop on 127.0.0.1; every public method is
thread-safe and may be called from the test's loop. :meth:`write_kubeconfig` writes a kubeconfig
the official client loads as it is.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from evidence_keeper.sim.apiserver import ApiFront, labels_match, status_doc, write_kubeconfig

LogSource = Callable[[str, str, str, str, int], bytes | None]
"""``(namespace, pod, pod_uid, container, restart) -> raw log file bytes`` (None: unknown)."""

Pod = dict[str, Any]


def k8s_time(ts: datetime | None = None) -> str:
    """The API's timestamp format (``metav1.Time``): RFC3339, seconds, UTC ``Z``."""
    return (ts or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_rfc3339nano(ts: str) -> str:
    """Re-format an RFC3339 timestamp as Go's ``time.RFC3339Nano`` (fraction trimmed)."""
    if "." not in ts:
        return ts
    head, _, rest = ts.partition(".")
    digits = "".join(ch for ch in rest if ch.isdigit())
    zone = rest[len(digits):]
    digits = digits[:9].rstrip("0")
    return f"{head}.{digits}{zone}" if digits else f"{head}{zone}"


def render_kubelet_log(raw: bytes, *, timestamps: bool) -> bytes:
    """What ``pods/log`` returns for a log file's complete records (kubelet's ``ReadLogs``).

    CRI records ``<ts> <stream> <P|F> <msg>`` become ``msg`` (plus ``\\n`` for ``F``); Docker
    json-file records become their ``log`` field. With ``timestamps`` every record is prefixed
    with its timestamp in RFC3339Nano and a space, partial records included, as kubelet does.
    Bytes after the last newline (a record still being written) are not rendered.
    """
    out = bytearray()
    end = raw.rfind(b"\n") + 1
    for line in raw[:end].split(b"\n")[:-1]:
        if line.startswith(b"{"):
            rec = json.loads(line)
            msg = rec["log"].encode("utf-8", "surrogateescape")
            ts = go_rfc3339nano(rec["time"]).encode()
        else:
            ts, _stream, tag, msg = (line.split(b" ", 3) + [b""] * 4)[:4]
            if tag == b"F":
                msg += b"\n"
        if timestamps:
            out += ts + b" "
        out += msg
    return bytes(out)


@dataclass
class _Watcher:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, str, Pod]]
    namespace: str | None
    selector: dict[str, str]


@dataclass
class Fault:
    kind: str  # "503" | "hang" | "drop" | "410"
    on: str  # "watch" | "list" | "log" | "any"
    times: int | None  # None: until cleared


@dataclass
class Stats:
    lists: int = 0
    watches: int = 0
    logs: int = 0
    expired: int = 0
    watch_rvs: list[str] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # by kind, faults included
    log_requests: list[dict[str, str]] = field(default_factory=list)


def _parse_selector(raw: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (raw or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.replace("==", "=").partition("=")
        out[key.strip()] = value.strip()
    return out


def _matches(pod: Pod, namespace: str | None, selector: dict[str, str]) -> bool:
    meta = pod["metadata"]
    if namespace is not None and meta["namespace"] != namespace:
        return False
    for key, value in selector.items():
        have = {
            "spec.nodeName": pod["spec"].get("nodeName", ""),
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
        }.get(key)
        if have is None or have != value:
            return False
    return True


class FakeKube:
    """A pods-only kube-apiserver (and kubelet log endpoint) on 127.0.0.1, in its own thread."""

    def __init__(self, *, node: str = "node-1", log_source: LogSource | None = None,
                 expired_as_http: bool = False, log_poll_s: float = 0.05) -> None:
        self.node = node
        self.log_source = log_source
        self.expired_as_http = expired_as_http
        self.log_poll_s = log_poll_s
        self.stats = Stats()
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], Pod] = {}
        self._rv = 1000
        self._history: list[tuple[int, str, Pod]] = []
        self._compacted = 0
        self._watchers: list[_Watcher] = []
        self._faults: list[Fault] = []
        self._down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._handlers: dict[asyncio.Task[Any], tuple[str, web.Request]] = {}
        self.port = 0
        self._init_fleet()

    # ------------------------------------------------------------------ server lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeKube:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="fakekube", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake kube-apiserver did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(15)
        self._loop = None

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._startup())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/api/v1/pods", self._pods_handler)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods_handler)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._log_handler)
        self._add_fleet_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None
        sockets: list[Any] = list(getattr(server, "sockets", None) or [])  # asyncio.Server's
        self.port = int(sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        for t in list(self._handlers):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def down(self) -> None:
        """The API server is gone: its port refuses connections, live connections are cut."""
        self._call(self._go_down())

    def up(self) -> None:
        self._call(self._go_up())

    async def _go_down(self) -> None:
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        await self._cut("any")

    async def _go_up(self) -> None:
        assert self._runner is not None
        self._down = False
        if self._site is None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()

    def cut(self, kind: str = "any") -> int:
        """Drop the live connections of ``kind`` (``watch``, ``log``, ``list``): a network cut."""
        return int(self._call(self._cut(kind)))

    async def _cut(self, kind: str) -> int:
        n = 0
        for task, (k, request) in list(self._handlers.items()):
            if kind in ("any", k):
                _abort(request)
                task.cancel()
                n += 1
        return n

    def write_kubeconfig(self, path: Path, *, token: str = "fake-token") -> Path:
        return write_kubeconfig(path, server=self.url, token=token, name="fake")

    # ------------------------------------------------------------------ faults
    def inject(self, kind: str, *, on: str = "any", times: int | None = 1) -> None:
        """The next ``times`` requests of kind ``on`` fail with ``kind`` (None: until cleared)."""
        if kind not in ("503", "hang", "drop", "410"):
            raise ValueError(kind)
        with self._lock:
            self._faults.append(Fault(kind, on, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, request_kind: str) -> str | None:
        with self._lock:
            for f in self._faults:
                if f.on in ("any", request_kind):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
                    return f.kind
        return None

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        kind = ("proxy" if "/proxy" in request.path else
                "log" if request.path.endswith("/log") else
                "watch" if request.query.get("watch") in ("true", "1") else "list")
        self._handlers[task] = (kind, request)
        with self._lock:
            self.stats.requests[kind] = self.stats.requests.get(kind, 0) + 1
        try:
            if self._down:
                _abort(request)
                return web.Response(status=503)
            fault = self._take_fault(kind)
            if fault == "503":
                return web.json_response(status_doc(503, "ServiceUnavailable", "injected fault"),
                                         status=503)
            if fault == "410":
                return web.json_response(status_doc(410, "Expired", "injected: too old"),
                                         status=410)
            if fault == "hang":
                await asyncio.sleep(3600)
            if fault == "drop":
                if kind in ("watch", "log"):
                    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                    await resp.prepare(request)
                    await resp.write(b'{"type":"MODIF')
                _abort(request)
                return web.Response(status=503)
            result: web.StreamResponse = await handler(request)
            return result
        finally:
            self._handlers.pop(task, None)

    # ------------------------------------------------------------------ pods: state
    def add_pod(self, namespace: str, name: str, *, uid: str, containers: Sequence[str] = ("app",),
                labels: dict[str, str] | None = None, owner: tuple[str, str] | None = None,
                service_account: str = "default", node: str | None = None,
                image: str = "registry.example/app:1.0") -> Pod:
        now = k8s_time()
        owner_kind, owner_name = owner or ("ReplicaSet", f"{name.rsplit('-', 1)[0]}-rs")
        pod: Pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace, "uid": uid, "resourceVersion": "",
                "creationTimestamp": now, "labels": dict(labels or {"app": name}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind,
                                     "name": owner_name, "uid": f"owner-{uid}",
                                     "controller": True}],
            },
            "spec": {
                "nodeName": node or self.node, "serviceAccountName": service_account,
                "restartPolicy": "Always",
                "containers": [{"name": c, "image": image} for c in containers],
            },
            "status": {
                "phase": "Running", "startTime": now,
                "containerStatuses": [self._runningstatus_doc(c, image, 0) for c in containers],
            },
        }
        with self._lock:
            self._pods[(namespace, name)] = pod
            self._emit("ADDED", pod)
        return copy.deepcopy(pod)

    @staticmethod
    def _runningstatus_doc(container: str, image: str, restart: int) -> dict[str, Any]:
        digest = secrets.token_hex(32)
        return {
            "name": container, "image": image,
            "imageID": f"{image.split(':', maxsplit=1)[0]}@sha256:{digest}",
            "containerID": f"containerd://{secrets.token_hex(32)}",
            "ready": True, "started": True, "restartCount": restart,
            "state": {"running": {"startedAt": k8s_time()}}, "lastState": {},
        }

    def pod(self, namespace: str, name: str) -> Pod:
        with self._lock:
            return copy.deepcopy(self._pods[(namespace, name)])

    def update(self, namespace: str, name: str, mutate: Callable[[Pod], None]) -> Pod:
        """Apply ``mutate`` to the pod and send the MODIFIED event."""
        with self._lock:
            pod = self._pods[(namespace, name)]
            mutate(pod)
            self._emit("MODIFIED", pod)
            return copy.deepcopy(pod)

    def touch(self, namespace: str, name: str) -> None:
        """A change the agent does not care about (an annotation): still a MODIFIED event."""
        def bump(pod: Pod) -> None:
            ann = pod["metadata"].setdefault("annotations", {})
            ann["touched"] = str(int(ann.get("touched", "0")) + 1)
        self.update(namespace, name, bump)

    def _status_of(self, pod: Pod, container: str) -> dict[str, Any]:
        for cs in pod["status"]["containerStatuses"]:
            if cs["name"] == container:
                return dict(cs)
        raise KeyError(container)

    def restart_container(self, namespace: str, name: str, container: str, *,
                          reason: str = "Error", exit_code: int = 1,
                          finished: datetime | None = None) -> int:
        """The container exited and kubelet started the next instance (restartCount + 1)."""
        new = 0

        def mutate(pod: Pod) -> None:
            nonlocal new
            for cs in pod["status"]["containerStatuses"]:
                if cs["name"] != container:
                    continue
                old_state = cs["state"].get("running") or cs["state"].get("terminated") or {}
                term = cs["state"].get("terminated") or {
                    "exitCode": exit_code, "reason": reason,
                    "startedAt": old_state.get("startedAt", k8s_time()),
                    "finishedAt": k8s_time(finished), "containerID": cs["containerID"],
                }
                new = cs["restartCount"] + 1
                fresh = self._runningstatus_doc(container, cs["image"], new)
                fresh["imageID"] = cs["imageID"]
                fresh["lastState"] = {"terminated": term}
                cs.clear()
                cs.update(fresh)
        self.update(namespace, name, mutate)
        return new

    def crash_container(self, namespace: str, name: str, container: str, *,
                        reason: str = "Error", exit_code: int = 1) -> None:
        """The container exited and waits in CrashLoopBackOff (restartCount unchanged)."""
        def mutate(pod: Pod) -> None:
            for cs in pod["status"]["containerStatuses"]:
                if cs["name"] == container:
                    cs["lastState"] = {"terminated": _exit(cs, reason, exit_code)}
                    cs["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
                    cs["ready"] = cs["started"] = False
        self.update(namespace, name, mutate)

    def terminate_container(self, namespace: str, name: str, container: str, *,
                            reason: str = "Completed", exit_code: int = 0) -> None:
        """The container exited for good (``state.terminated``), e.g. during pod deletion."""
        def mutate(pod: Pod) -> None:
            for cs in pod["status"]["containerStatuses"]:
                if cs["name"] == container:
                    cs["state"] = {"terminated": _exit(cs, reason, exit_code)}
                    cs["ready"] = cs["started"] = False
        self.update(namespace, name, mutate)

    def mark_deleting(self, namespace: str, name: str, *, grace_s: int = 30) -> None:
        def mutate(pod: Pod) -> None:
            pod["metadata"]["deletionTimestamp"] = k8s_time(
                datetime.now(UTC) + timedelta(seconds=grace_s))
            pod["metadata"]["deletionGracePeriodSeconds"] = grace_s
        self.update(namespace, name, mutate)

    def delete_pod(self, namespace: str, name: str) -> None:
        """The pod object is removed (DELETED event with its last state)."""
        with self._lock:
            pod = self._pods.pop((namespace, name))
            self._emit("DELETED", pod)

    def compact(self) -> int:
        """Forget the event history: a watch from an older resourceVersion gets 410 Expired."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            return self._rv

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def _emit(self, etype: str, pod: Pod) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        snap = copy.deepcopy(pod)
        self._history.append((self._rv, etype, snap))
        for w in self._watchers:
            w.loop.call_soon_threadsafe(w.queue.put_nowait, (self._rv, etype, snap))

    # ------------------------------------------------------------------ pods: HTTP
    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info.get("ns")
        selector = _parse_selector(request.query.get("fieldSelector"))
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, ns, selector)
        with self._lock:
            self.stats.lists += 1
            items = [copy.deepcopy(p) for p in self._pods.values() if _matches(p, ns, selector)
                     and labels_match(p["metadata"].get("labels") or {},
                                    request.query.get("labelSelector"))]
            rv = self._rv
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def _watch(self, request: web.Request, ns: str | None,
                     selector: dict[str, str]) -> web.StreamResponse:
        rv_param = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str, Pod]] = asyncio.Queue()
        watcher = _Watcher(loop, queue, ns, selector)
        expired = False
        with self._lock:
            self.stats.watches += 1
            self.stats.watch_rvs.append(rv_param)
            if rv_param in ("", "0"):
                initial = [(self._rv, "ADDED", copy.deepcopy(p)) for p in self._pods.values()]
            elif int(rv_param) < self._compacted:
                expired = True
                self.stats.expired += 1
                initial = []
            else:
                initial = [e for e in self._history if e[0] > int(rv_param)]
            if not expired:
                self._watchers.append(watcher)
        if expired and self.expired_as_http:
            return web.json_response(status_doc(
                410, "Expired", f"too old resource version: {rv_param} ({self._compacted})"),
                status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if expired:
            await resp.write(json.dumps({"type": "ERROR", "object": status_doc(
                410, "Expired",
                f"too old resource version: {rv_param} ({self._compacted})")}).encode() + b"\n")
            return resp
        try:
            for _rv, etype, pod in initial:
                if _matches(pod, ns, selector):
                    await resp.write(_event(etype, pod))
            deadline = loop.time() + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    _rv, etype, pod = await asyncio.wait_for(queue.get(), timeout=left)
                except TimeoutError:
                    break
                if _matches(pod, ns, selector):
                    await resp.write(_event(etype, pod))
        finally:
            with self._lock:
                self._watchers.remove(watcher)
        return resp

    # ------------------------------------------------------------------ logs
    def _instance(self, ns: str, name: str, container: str,
                  previous: bool) -> tuple[str, int] | web.Response:
        with self._lock:
            pod = self._pods.get((ns, name))
            if pod is None:
                return web.json_response(status_doc(404, "NotFound", f'pods "{name}" not found'),
                                         status=404)
            try:
                cs = self._status_of(pod, container)
            except KeyError:
                return web.json_response(status_doc(
                    400, "BadRequest", f"container {container} is not valid for pod {name}"),
                    status=400)
            uid = pod["metadata"]["uid"]
            restart = int(cs["restartCount"])
        if previous:
            if restart == 0:
                return web.json_response(status_doc(
                    400, "BadRequest",
                    f'previous terminated container "{container}" in pod "{name}" not found'),
                    status=400)
            return uid, restart - 1
        return uid, restart

    def _terminated(self, ns: str, name: str, uid: str, container: str, restart: int) -> bool:
        with self._lock:
            pod = self._pods.get((ns, name))
            if pod is None or pod["metadata"]["uid"] != uid:
                return True
            cs = self._status_of(pod, container)
            return int(cs["restartCount"]) > restart or "terminated" in cs["state"]

    async def _log_handler(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        q = request.query
        container = q.get("container", "")
        previous = q.get("previous") in ("true", "1")
        follow = q.get("follow") in ("true", "1")
        timestamps = q.get("timestamps") in ("true", "1")
        with self._lock:
            self.stats.logs += 1
            self.stats.log_requests.append(dict(q, pod=name))
        inst = self._instance(ns, name, container, previous)
        if isinstance(inst, web.Response):
            return inst
        uid, restart = inst
        assert self.log_source is not None, "FakeKube(log_source=...) is needed for logs"
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        last_round = not follow or previous
        while True:
            done = follow and self._terminated(ns, name, uid, container, restart)
            raw = self.log_source(ns, name, uid, container, restart) or b""
            complete = raw[: raw.rfind(b"\n") + 1]
            if len(complete) > sent:
                await resp.write(render_kubelet_log(complete[sent:], timestamps=timestamps))
                sent = len(complete)
            if last_round or done:
                break
            await asyncio.sleep(self.log_poll_s)
        return resp

    # ------------------------------------------------------------------ nodes and the pod proxy
    # Kept apart from the pod machinery above: the fleet commands (gaps/preflight --all-nodes,
    # archive --all-nodes, a kubectl plugin) need nodes, label selectors and the proxy only,
    # served by the simulated API server's front (evidence_keeper.sim.apiserver) over this
    # server's nodes and pods.
    def _init_fleet(self) -> None:
        self._nodes: dict[str, dict[str, Any]] = {}
        self.front = ApiFront(self)  # targets: (namespace, pod) -> http://host:port

    def _add_fleet_routes(self, app: web.Application) -> None:
        self.front.add_routes(app, pods=False)  # pod lists and watches are served above

    @property
    def proxied(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """``(method, pod, path?query, headers)`` of every request the pod proxy forwarded."""
        return self.front.proxied

    def node_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(n) for n in self._nodes.values()]

    def pod_list(self, namespace: str) -> list[Pod]:
        with self._lock:
            return [copy.deepcopy(p) for (ns, _name), p in self._pods.items() if ns == namespace]

    def add_node(self, name: str, *, labels: dict[str, str] | None = None,
                 unschedulable: bool = False, ready: bool = True) -> dict[str, Any]:
        node: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"node-uid-{name}", "resourceVersion": "1",
                         "creationTimestamp": k8s_time(),
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"unschedulable": True} if unschedulable else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "reason": "KubeletReady" if ready else "KubeletNotReady"}],
                       "addresses": [{"type": "Hostname", "address": name}]},
        }
        with self._lock:
            self._rv += 1
            node["metadata"]["resourceVersion"] = str(self._rv)
            self._nodes[name] = node
        return copy.deepcopy(node)

    def remove_node(self, name: str) -> None:
        with self._lock:
            self._nodes.pop(name, None)

    def add_agent(self, node: str, url: str | None, *, namespace: str = "evidence-keeper",
                  name: str | None = None, ready: bool = True,
                  labels: dict[str, str] | None = None) -> str:
        """An agent pod of the DaemonSet on ``node`` (the chart's labels), proxied to ``url``
        (None: the pod exists but nothing answers, like a pod that crash-loops)."""
        name = name or f"evidence-keeper-{secrets.token_hex(3)}"
        self.add_pod(namespace, name, uid=f"uid-{name}", containers=("agent",), node=node,
                     labels=labels or {"app.kubernetes.io/name": "evidence-keeper",
                                       "app.kubernetes.io/instance": "evidence-keeper"},
                     owner=("DaemonSet", "evidence-keeper"))
        if not ready:
            def not_ready(pod: Pod) -> None:
                for cs in pod["status"]["containerStatuses"]:
                    cs["ready"] = False
            self.update(namespace, name, not_ready)
        self.route_agent(namespace, name, url)
        return name

    def route_agent(self, namespace: str, name: str, url: str | None) -> None:
        """Where the pod proxy sends requests for pod ``name`` (None: unreachable)."""
        with self._lock:
            if url is None:
                self.front.targets.pop((namespace, name), None)
            else:
                self.front.targets[(namespace, name)] = url.rstrip("/")


def _exit(cs: dict[str, Any], reason: str, exit_code: int) -> dict[str, Any]:
    """``terminated`` of the running instance of container status ``cs``, ending now."""
    started = (cs["state"].get("running") or {}).get("startedAt", k8s_time())
    return {"exitCode": exit_code, "reason": reason, "startedAt": started,
            "finishedAt": k8s_time(), "containerID": cs["containerID"]}


def _event(etype: str, pod: Pod) -> bytes:
    return json.dumps({"type": etype, "object": pod}, separators=(",", ":")).encode() + b"\n"


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
