"""What the plugin's commands share: the API server connection, the agent pods, a fan-out of
one request to every agent through the pod proxy, and the store settings the agents use.

Store settings. Without ``--config`` (or ``$EK_CONFIG``), the plugin reads the agents' own
settings from their pod spec: the literal ``EK_*`` values of the agent container (those the
chart and kustomize set; ``valueFrom`` references are not followed). The caller's ``EK_*``
environment still wins over them, so ``EK_S3_ENDPOINT_URL`` can point at a port-forward.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from evidence_keeper.agents import PodProxy, fan_out
from evidence_keeper.archive.cluster import AgentPod
from evidence_keeper.commands.base import CliError
from evidence_keeper.commands.common import add_agents, add_config, agent_docs, kube_api
from evidence_keeper.settings import CONFIG_ENV, ENV_PREFIX, Settings, load_settings

DEFAULT_CONTAINER_ANNOTATION: Final = "kubectl.kubernetes.io/default-container"
FANOUT: Final = 8  # agents asked at once through the API server
# Agent settings that matter to a reader of the store or a caller of the agents' API.
SHARED_KEYS: Final = ("cluster", "store_url", "s3_endpoint_url", "object_lock_days", "listen",
                      "sse", "sse_kms_key_id")


def add_kube(p: argparse.ArgumentParser) -> None:
    """How to reach the agents (every plugin command has these)."""
    add_config(p)
    add_agents(p, kubeconfig_help="default: $KUBECONFIG, ~/.kube/config",
               port_help="the agents' API port (default: from their listen setting)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def connect(args: argparse.Namespace) -> Any:
    """An API client from the kubeconfig (``--kubeconfig``/``$KUBECONFIG``, ``--context``),
    as kubectl's: never the pod's service account."""
    return kube_api(args.kubeconfig, context=args.context, in_cluster=False)


def on_node(pods: Sequence[AgentPod], node: str | None) -> list[AgentPod]:
    """``--node``: the agent of one node (all without it)."""
    chosen = [p for p in pods if node in (None, p.node)]
    if not chosen:
        raise CliError(f"no agent on node {node} (agents on: {', '.join(p.node for p in pods)})")
    return chosen


def agent_env(api: Any, args: argparse.Namespace) -> dict[str, str]:
    """The literal ``EK_*`` values of the agent container in the first agent pod's spec."""
    return container_env(agent_pod_doc(api, args))


def agent_pod_doc(api: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The first agent pod, as the API server's JSON."""
    return agent_docs(api, args)[0]


def agent_container(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's container: kubectl's default-container annotation, else the first."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    want = ((pod.get("metadata") or {}).get("annotations") or {}).get(
        DEFAULT_CONTAINER_ANNOTATION)
    chosen: dict[str, Any] = next((c for c in containers if c.get("name") == want),
                                  containers[0])
    return chosen


def container_env(pod: Mapping[str, Any]) -> dict[str, str]:
    return {str(e["name"]): str(e["value"]) for e in agent_container(pod).get("env") or []
            if isinstance(e, dict) and "name" in e and isinstance(e.get("value"), str)}


def token_secret(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """The Secret (name, key) mounted where the agent reads its archive token, if any."""
    path = container_env(pod).get(f"{ENV_PREFIX}ARCHIVE_TOKEN_FILE")
    if not path:
        return None
    for mount in agent_container(pod).get("volumeMounts") or []:
        root = str(mount.get("mountPath", "")).rstrip("/")
        if mount.get("subPath") and path == root:
            key = str(mount["subPath"])
        elif path.startswith(root + "/"):
            key = path[len(root) + 1:]
        else:
            continue
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            secret = volume.get("secret") if volume.get("name") == mount.get("name") else None
            if secret and secret.get("secretName"):
                items = {str(i.get("path")): str(i.get("key"))
                         for i in secret.get("items") or []}
                return str(secret["secretName"]), items.get(key, key)
    return None


def archive_token(api: Any, args: argparse.Namespace) -> str:
    """The agents' archive token, from the Secret their pod mounts (needs ``get secrets``)."""
    found = token_secret(agent_pod_doc(api, args))
    if found is None:
        raise CliError("the agents have no archive token Secret (archive is disabled);"
                       " pass --token-file if they read it elsewhere")
    name, key = found
    core: Any = client.CoreV1Api(api)
    where = f"secret {name} in {args.agent_namespace}"
    try:
        resp = core.read_namespaced_secret(name, args.agent_namespace, _preload_content=False,
                                           _request_timeout=30)
        data = json.loads(resp.read()).get("data") or {}
    except ApiException as exc:
        raise CliError(f"cannot read the archive token from {where}: HTTP {exc.status}"
                       f" {exc.reason} (or pass --token-file)") from None
    except Exception as exc:
        raise CliError(f"cannot read the archive token from {where}: {exc}") from None
    try:
        token = base64.b64decode(data[key], validate=True).decode("utf-8").strip()
    except (KeyError, ValueError, UnicodeDecodeError):
        raise CliError(f"{where} has no usable key {key!r}") from None
    if not token:
        raise CliError(f"the archive token in {where} is empty")
    return token


def cluster_settings(api: Any, args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for the caller: ``--config``/``$EK_CONFIG`` if given, else the agents'."""
    env = dict(os.environ if environ is None else environ)
    if args.config or env.get(CONFIG_ENV, "").strip():
        return load_settings(args.config, environ=env)
    theirs = agent_env(api, args)
    shared = {f"{ENV_PREFIX}{k.upper()}" for k in SHARED_KEYS}
    merged = {k: v for k, v in theirs.items() if k in shared and v.strip()}
    merged.update({k: v for k, v in env.items() if v.strip() or not k.startswith(ENV_PREFIX)})
    return load_settings(None, environ=merged)


def readable_store(cfg: Settings) -> Settings:
    """The agents' store must be one the caller can read (not a directory on each node)."""
    if cfg.store_url.startswith("file://") and not os.path.isdir(cfg.store_url[7:]):
        raise CliError(f"the agents store on their nodes ({cfg.store_url}): the plugin reads"
                       " a shared store (s3://...); pass --config for another store")
    return cfg


@dataclass(frozen=True, slots=True)
class Answer:
    pod: AgentPod
    status: int
    doc: dict[str, Any]

    @property
    def node(self) -> str:
        return self.pod.node or self.pod.name

    @property
    def error(self) -> str | None:
        if self.status == 200:
            return None
        what = f"HTTP {self.status}: " if self.status else ""
        return f"{what}{self.doc.get('error') or 'no answer'}"


def ask_all(api: Any, args: argparse.Namespace, pods: Sequence[AgentPod], path: str, *,
            params: Mapping[str, str] | None = None, port: int,
            accept: tuple[int, ...] = ()) -> list[Answer]:
    """``GET path`` on every agent through the API server's pod proxy, a few at a time."""
    proxy = PodProxy(api, namespace=args.agent_namespace, port=port)

    def one(pod: AgentPod) -> Answer:
        status, doc = proxy.request(pod, "GET", path, params=params)
        if status in accept:
            status = 200
        return Answer(pod, status, doc)

    return fan_out(one, pods, workers=FANOUT, name="ek-kubectl")


def agent_port(args: argparse.Namespace, api: Any) -> int:
    """``--agent-port``, else the port of the agents' ``listen`` setting."""
    if args.agent_port:
        return int(args.agent_port)
    return cluster_settings(api, args).listen_port


def warn(answers: Sequence[Answer]) -> int:
    """One stderr line per agent that did not answer; how many."""
    failed = [a for a in answers if a.error is not None]
    for a in failed:
        print(f"kubectl-evidence: {a.node} ({a.pod.name}): {a.error}", file=sys.stderr)
    return len(failed)
