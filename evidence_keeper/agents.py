"""Talking to the agents of a cluster from outside: find their pods through the API server and
reach each one through the API server's pod proxy (``--all-nodes``) or at its pod IP.

The one survey of the agents, used by ``archive --all-nodes``, ``gaps``/``preflight
--all-nodes`` (:mod:`evidence_keeper.fleet`) and the ``kubectl evidence`` plugin: the agent
pods are found by the chart's labels (:data:`AGENT_SELECTOR` in :data:`AGENT_NAMESPACE`), each
is reached through a transport (:class:`PodProxy` or :class:`PodIP`, :func:`transport`) whose
answer is always ``(status, JSON object)`` — status 0 and ``{"error": ...}`` when nothing
answered, and the API server's own ``Status`` (the pod was not reached) turned into an error —
and :func:`fan_out` asks them a few at a time. The Kubernetes client is imported where it is
used: only these commands need it, and it is the slowest import of the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from evidence_keeper.api.client import ApiError, call
from evidence_keeper.api.contract import TOKEN_HEADER
from evidence_keeper.archive.cluster import AgentPod, AgentTransport, ClusterError

AGENT_NAMESPACE: Final = "evidence-keeper"
AGENT_SELECTOR: Final = "app.kubernetes.io/name=evidence-keeper"  # the chart's labels

T = TypeVar("T")
R = TypeVar("R")


def kube_client(kubeconfig: str | None = None, *, context: str | None = None,
                in_cluster: bool = True) -> Any:
    """An API client from the pod's service account (``in_cluster`` and no ``kubeconfig``),
    else the kubeconfig (``$KUBECONFIG``) and its ``context`` (None: the current one)."""

    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config
    cfg = client.Configuration()
    try:
        if in_cluster and kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=cfg)
    except Exception as exc:
        raise ClusterError(f"cannot load Kubernetes credentials: {exc}") from None
    return client.ApiClient(cfg)


def read_list(api: Any, what: str, fetch: Callable[[Any], Any]) -> list[dict[str, Any]]:
    """The ``items`` of one list call, ``fetch(CoreV1Api)`` (not preloaded), as plain JSON;
    ``ClusterError("cannot list <what>: ...")`` when the API server does not give them."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        doc = json.loads(fetch(client.CoreV1Api(api)).read())
    except ApiException as exc:
        raise ClusterError(f"cannot list {what}: HTTP {exc.status} {exc.reason}") from None
    except Exception as exc:
        raise ClusterError(f"cannot list {what}: {exc}") from None
    return list(doc.get("items") or [])


def agent_pod_docs(api: Any, *, namespace: str, selector: str) -> list[dict[str, Any]]:
    """The agent DaemonSet's pods (by label), as the API server's JSON."""
    return read_list(api, f"pods {selector!r} in {namespace}", lambda core: (
        core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False,
                                 _request_timeout=30)))


def agent_pod(item: Mapping[str, Any]) -> AgentPod:
    """One pod of the API server's JSON as an agent to reach (ready: running, all ready)."""
    meta, spec, status = item.get("metadata", {}), item.get("spec", {}), item.get("status", {})
    ready = status.get("phase") == "Running" and all(
        cs.get("ready", False) for cs in status.get("containerStatuses") or [{}])
    return AgentPod(name=str(meta.get("name", "")), node=str(spec.get("nodeName", "")),
                    ip=str(status.get("podIP") or ""), ready=ready)


def agent_pods(items: Sequence[Mapping[str, Any]]) -> list[AgentPod]:
    """Agent pods from the API server's JSON, by node."""
    return sorted((agent_pod(item) for item in items), key=lambda p: p.node)


def list_agent_pods(api: Any, *, namespace: str, selector: str) -> list[AgentPod]:
    """The agent DaemonSet's pods (by label), by node."""
    return agent_pods(agent_pod_docs(api, namespace=namespace, selector=selector))


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
                params: Mapping[str, str] | None = None, body: dict[str, Any] | None = None,
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
            req = self.api.param_serialize(
                method=method, resource_path=resource, query_params=list((params or {}).items()),
                header_params=headers, body=body, auth_settings=["BearerToken"])
            resp = self.api.call_api(*req, _request_timeout=self.timeout_s)
            status, data = int(resp.status), resp.read()
        except ApiException as exc:
            status, data = int(exc.status or 0), (exc.body or b"")
        except Exception as exc:
            return 0, {"error": f"cannot reach {pod.name} through the API server: {exc}"}
        return status, _json_doc(data, status)


class PodIP:
    """Reach an agent directly at ``http://<pod IP>:<port>`` (from inside the cluster)."""

    def __init__(self, *, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s

    def request(self, pod: AgentPod, method: str, path: str, *,
                params: Mapping[str, str] | None = None, body: dict[str, Any] | None = None,
                token: str | None = None) -> tuple[int, dict[str, Any]]:
        if not pod.ip:
            return 0, {"error": f"pod {pod.name} has no IP"}
        try:
            status, doc = call(f"http://{pod.ip}:{self.port}", path, method=method,
                               params=dict(params) if params else None, body=body, token=token,
                               timeout=self.timeout_s,
                               accept_status=(400, 401, 403, 404, 409, 413, 500, 502, 503))
        except ApiError as exc:
            return 0, {"error": str(exc)}
        return status, doc if isinstance(doc, dict) else {"error": "not a JSON object"}


def transport(api: Any, *, namespace: str, port: int, via: str = "proxy",
              timeout_s: float = 30.0) -> AgentTransport:
    """The pod proxy (``via="proxy"``) or the pod IPs (``"pod-ip"``)."""
    if via == "proxy":
        return PodProxy(api, namespace=namespace, port=port, timeout_s=timeout_s)
    return PodIP(port=port, timeout_s=timeout_s)


def fan_out(ask: Callable[[T], R], items: Sequence[T], *, workers: int, name: str,
            progress: Callable[[int, int], None] | None = None) -> list[R]:
    """``ask`` for every item, ``workers`` at a time in threads named ``name``; the answers in
    the items' order, ``progress(done, total)`` after each (in that order)."""
    if not items:
        return []
    out: list[R] = []
    with ThreadPoolExecutor(max_workers=min(workers, len(items)),
                            thread_name_prefix=name) as pool:
        futures = [pool.submit(ask, item) for item in items]
        for done, fut in enumerate(futures, start=1):
            out.append(fut.result())
            if progress is not None:
                progress(done, len(futures))
    return out


def _json_doc(data: bytes | str, status: int) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return {"error": text.strip()[:200] or f"empty answer (HTTP {status})"}
    if not isinstance(doc, dict):
        return {"error": "not a JSON object"}
    if doc.get("kind") == "Status":  # the API server's own answer: the pod was not reached
        return {"error": str(doc.get("message") or doc.get("reason") or "API server error")}
    return doc
