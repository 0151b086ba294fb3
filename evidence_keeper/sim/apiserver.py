"""A simulated kube-apiserver front: nodes, pods, the pod proxy and secrets, on the real wire.

The one stand-in for the API server's view of a fleet, for the demo and the test suite alike:
the demo's cluster (:class:`SimCluster` behind a :class:`SimApiServer`), the kubectl plugin's
and ``archive --all-nodes``' tests (a :class:`SimApiServer` with a bearer token in front of
``tests/fakekube.py``'s pods), and ``tests/fakekube.py`` itself, which mounts an
:class:`ApiFront`'s routes on its own server. It serves what ``preflight``/``gaps``/``archive
--all-nodes`` and ``kubectl evidence`` read, speaking the real wire protocol to the official
client, the way kube-apiserver does:

* ``GET /api/v1/nodes`` and ``/api/v1/nodes/{name}`` — a ``NodeList`` (``labelSelector``
  honoured) and one ``Node``;
* ``GET /api/v1/namespaces/{ns}/pods`` — a ``PodList`` (``labelSelector`` honoured; a server
  with its own pod lists and watches leaves this route out);
* ``/api/v1/namespaces/{ns}/pods/{name}[:port]/proxy/{path}`` — a 404 ``Status`` for a pod
  that does not exist; else forwarded (method, query, body, headers) to the URL registered for
  the pod in :attr:`ApiFront.targets` *without* the caller's ``Authorization`` (kube-apiserver
  authenticates the caller and does not pass its credentials on), or a 503 ``Status`` when
  nothing answers for the pod. Every proxied request is recorded in :attr:`ApiFront.proxied`;
* ``GET /api/v1/namespaces/{ns}/secrets/{name}`` — from :attr:`ApiFront.secrets`, base64 on
  the wire (404 ``Status`` when absent);
* with a ``token``, every request must carry ``Authorization: Bearer <token>`` (401 ``Status``).

The objects come from a :class:`ClusterObjects` (plain API JSON). A :class:`SimApiServer` runs
on 127.0.0.1 (port from the OS) in a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientError, ClientSession, ClientTimeout, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# kube-apiserver's own hop-by-hop handling: the caller's credentials never reach the pod.
_NOT_FORWARDED = ("authorization", "host", "content-length")


def status_doc(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``Status`` object, as the API server answers a failure."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_doc(code, reason, message), status=code)


def labels_match(labels: Mapping[str, str], selector: str | None) -> bool:
    """Equality-based label selectors (``a=b,c!=d``, ``key``, ``!key``), as the API applies."""
    for part in (selector or "").split(","):
        term = part.strip()
        if not term:
            continue
        if "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def write_kubeconfig(path: Path, *, server: str, token: str, name: str = "sim") -> Path:
    """A kubeconfig the official client (and kubectl) loads as it is: one cluster, a token."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: {name}\n  cluster:\n    server: {server}\n"
        f"users:\n- name: {name}\n  user:\n    token: {token}\n"
        f"contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
        f"current-context: {name}\n")
    return path


class ClusterObjects(Protocol):
    """The objects a front serves, as plain API JSON (the front does not change them)."""

    def node_list(self) -> list[dict[str, Any]]: ...

    def pod_list(self, namespace: str) -> list[dict[str, Any]]: ...


def _named(items: Iterable[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((i for i in items if i.get("metadata", {}).get("name") == name), None)


def _selected(items: Iterable[dict[str, Any]], selector: str | None) -> list[dict[str, Any]]:
    return [i for i in items if labels_match(i.get("metadata", {}).get("labels") or {},
                                             selector)]


class ApiFront:
    """The API server's routes for the fleet commands over a :class:`ClusterObjects`.

    ``targets`` maps ``(namespace, pod)`` to where the pod proxy sends requests
    (``http://host:port``); a pod with no entry is one nothing answers for. ``proxied`` holds
    ``(method, pod, path?query, headers)`` of every forwarded request, ``secrets``
    ``{(namespace, name): {key: text}}``. Both dicts may be changed while the front serves.
    """

    def __init__(self, objects: ClusterObjects, *,
                 targets: dict[tuple[str, str], str] | None = None, token: str | None = None,
                 timeout_s: float = 30.0) -> None:
        self.objects = objects
        self.targets: dict[tuple[str, str], str] = {} if targets is None else targets
        self.token = token
        self.timeout_s = timeout_s
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.proxied: list[tuple[str, str, str, dict[str, str]]] = []

    def add_routes(self, app: web.Application, *, pods: bool = True) -> None:
        """Mount the front on ``app`` (``pods=False``: ``app`` lists pods itself)."""
        guard = self._authenticated
        app.router.add_get("/api/v1/nodes", guard(self._nodes))
        app.router.add_get("/api/v1/nodes/{name}", guard(self._node))
        if pods:
            app.router.add_get("/api/v1/namespaces/{ns}/pods", guard(self._pods))
        for route in ("/api/v1/namespaces/{ns}/pods/{name}/proxy",
                      "/api/v1/namespaces/{ns}/pods/{name}/proxy/{path:.*}"):
            app.router.add_route("*", route, guard(self._proxy))
        app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", guard(self._secret))

    def _authenticated(self, handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if self.token is not None and (
                    request.headers.get("Authorization") != f"Bearer {self.token}"):
                return status_response(401, "Unauthorized", "Unauthorized")
            return await handler(request)
        return checked

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        items = sorted(_selected(self.objects.node_list(), request.query.get("labelSelector")),
                       key=lambda n: str(n["metadata"]["name"]))
        return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "1"}, "items": items})

    async def _node(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        node = _named(self.objects.node_list(), name)
        if node is None:
            return status_response(404, "NotFound", f'nodes "{name}" not found')
        return web.json_response(node)

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        items = _selected(self.objects.pod_list(request.match_info["ns"]),
                          request.query.get("labelSelector"))
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "1"}, "items": items})

    async def _secret(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        data = self.secrets.get((ns, name))
        if data is None:
            return status_response(404, "NotFound", f'secrets "{name}" not found')
        return web.json_response({
            "kind": "Secret", "apiVersion": "v1", "type": "Opaque",
            "metadata": {"name": name, "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        name = request.match_info["name"].partition(":")[0]
        if _named(self.objects.pod_list(ns), name) is None:
            return status_response(404, "NotFound", f'pods "{name}" not found')
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _NOT_FORWARDED}
        path_qs = "/" + request.match_info.get("path", "") + (
            f"?{request.query_string}" if request.query_string else "")
        self.proxied.append((request.method, name, path_qs, headers))
        target = self.targets.get((ns, name))
        refused = (503, "ServiceUnavailable",
                   f"error trying to reach service: dial tcp {name}: connect: connection refused")
        if target is None:
            return status_response(*refused)
        try:
            async with ClientSession(timeout=ClientTimeout(total=self.timeout_s)) as http, \
                    http.request(request.method, target.rstrip("/") + path_qs,
                                 data=await request.read(), headers=headers) as resp:
                return web.Response(status=resp.status, body=await resp.read(), headers={
                    "Content-Type": resp.headers.get("Content-Type",
                                                     "application/octet-stream")})
        except (ClientError, OSError, TimeoutError):
            return status_response(*refused)


class SimApiServer(ApiFront):
    """An :class:`ApiFront` on 127.0.0.1 (port from the OS), served from a thread of its own
    with its own event loop; a context manager."""

    def __init__(self, objects: ClusterObjects, *,
                 targets: dict[tuple[str, str], str] | None = None,
                 token: str | None = None) -> None:
        super().__init__(objects, targets=targets, token=token)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="sim-apiserver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SimApiServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the simulated API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """A kubeconfig for this server with ``token`` (default: the front's own)."""
        return write_kubeconfig(path, server=self.url, token=token or self.token or "sim-token")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]


@dataclass(frozen=True, slots=True)
class SimAgent:
    pod: str
    node: str
    url: str | None  # where the agent listens (None: the pod exists, nothing answers)


class SimCluster:
    """The demo's cluster: ready nodes by name and one agent pod per :class:`SimAgent`, with
    the chart's labels; :attr:`targets` is where the pod proxy reaches the agents."""

    def __init__(self, *, nodes: list[str], agents: list[SimAgent],
                 namespace: str = "evidence-keeper",
                 labels: dict[str, str] | None = None) -> None:
        self.nodes, self.agents, self.namespace = nodes, agents, namespace
        self.labels = labels or {"app.kubernetes.io/name": "evidence-keeper"}
        self.targets = {(namespace, a.pod): a.url for a in agents if a.url is not None}

    def node_list(self) -> list[dict[str, Any]]:
        return [{"metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}},
                 "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
                for n in self.nodes]

    def pod_list(self, namespace: str) -> list[dict[str, Any]]:
        if namespace != self.namespace:
            return []
        return [{"metadata": {"name": a.pod, "namespace": self.namespace,
                              "labels": dict(self.labels)},
                 "spec": {"nodeName": a.node},
                 "status": {"phase": "Running", "podIP": "127.0.0.1",
                            "containerStatuses": [{"name": "agent",
                                                   "ready": a.url is not None}]}}
                for a in self.agents]
