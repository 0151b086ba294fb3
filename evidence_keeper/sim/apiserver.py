"""A simulated kube-apiserver for the demo's cluster view: nodes, agent pods, the pod proxy.

The demo runs one real agent on one simulated node; ``preflight --all-nodes`` and
``gaps --all-nodes`` need the API server's view of the whole cluster. This serves the three
things those commands read, speaking the real wire protocol to the official client:

* ``GET /api/v1/nodes`` — a ``NodeList``;
* ``GET /api/v1/namespaces/{ns}/pods?labelSelector=k=v`` — the agent pods (``PodList``);
* ``/api/v1/namespaces/{ns}/pods/{name}[:port]/proxy/{path}`` — forwarded to the agent on
  loopback without the caller's ``Authorization`` (as kube-apiserver does), or a 503 ``Status``
  when nothing answers for the pod.

It runs on 127.0.0.1 in a thread with its own event loop. The test suite has a fuller fake
(``tests/fakekube.py``: watches, logs, faults); this one is the demo's, and nothing more.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web


@dataclass(frozen=True, slots=True)
class SimAgent:
    pod: str
    node: str
    url: str | None  # where the agent listens (None: the pod exists, nothing answers)


class SimApiServer:
    def __init__(self, *, nodes: list[str], agents: list[SimAgent],
                 namespace: str = "evidence-keeper",
                 labels: dict[str, str] | None = None) -> None:
        self.nodes, self.agents, self.namespace = nodes, agents, namespace
        self.labels = labels or {"app.kubernetes.io/name": "evidence-keeper"}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="sim-apiserver", daemon=True)

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

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: demo\n  cluster:\n    server: http://127.0.0.1:{self.port}\n"
            "users:\n- name: demo\n  user:\n    token: demo-token\n"
            "contexts:\n- name: demo\n  context:\n    cluster: demo\n    user: demo\n"
            "current-context: demo\n")
        return path

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
        app.router.add_get("/api/v1/nodes", self._nodes)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/pods/{name}/proxy/{path:.*}",
                             self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _nodes(self, request: web.Request) -> web.Response:
        items = [{"metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}},
                  "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
                 for n in self.nodes]
        return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "1"}, "items": items})

    async def _pods(self, request: web.Request) -> web.Response:
        wanted = dict(p.split("=", 1) for p in request.query.get("labelSelector", "").split(",")
                      if "=" in p)
        match = request.match_info["ns"] == self.namespace and all(
            self.labels.get(k) == v for k, v in wanted.items())
        items = [self._pod(a) for a in self.agents] if match else []
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "1"}, "items": items})

    def _pod(self, a: SimAgent) -> dict[str, Any]:
        return {"metadata": {"name": a.pod, "namespace": self.namespace, "labels": self.labels},
                "spec": {"nodeName": a.node},
                "status": {"phase": "Running", "podIP": "127.0.0.1",
                           "containerStatuses": [{"name": "agent", "ready": a.url is not None}]}}

    async def _proxy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].partition(":")[0]
        agent = next((a for a in self.agents if a.pod == name), None)
        refused = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                   "reason": "ServiceUnavailable",
                   "message": f"error trying to reach service: dial tcp {name}: connection"
                              " refused"}
        if agent is None or agent.url is None:
            return web.json_response(refused, status=503)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length")}
        query = f"?{request.query_string}" if request.query_string else ""
        try:
            async with ClientSession(timeout=ClientTimeout(total=30)) as http, http.request(
                    request.method, f"{agent.url}/{request.match_info['path']}{query}",
                    headers=headers, data=await request.read()) as resp:
                return web.Response(status=resp.status, body=await resp.read(),
                                    content_type=resp.content_type)
        except (ClientError, OSError, TimeoutError):
            return web.json_response(refused, status=503)
