"""Talking to the agents of a cluster from outside: find their pods through the API server and
reach each one through the API server's pod proxy (``--all-nodes``) or at its pod IP.

Used by ``archive --all-nodes``, ``gaps``/``preflight --all-nodes`` (:mod:`evidence_keeper.
fleet`) and the ``kubectl evidence`` plugin. The Kubernetes client is imported where it is
used: only these commands need it, and it is the slowest import of the package.
"""

from __future__ import annotations

import json
import os
from typing import Any

from evidence_keeper.api.client import ApiError, call
from evidence_keeper.api.contract import TOKEN_HEADER
from evidence_keeper.archive.cluster import AgentPod, ClusterError


def kube_client(kubeconfig: str | None = None) -> Any:
    """An API client from the pod's service account, else the kubeconfig (``$KUBECONFIG``)."""

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
