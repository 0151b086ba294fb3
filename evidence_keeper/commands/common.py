"""What several commands share: configuration, the store, time flags, output format, progress.

Blocking on purpose: commands are short-lived processes; the agent's event loop is not here.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from evidence_keeper.agents import (
    AGENT_NAMESPACE,
    AGENT_SELECTOR,
    agent_pod_docs,
    agent_pods,
    kube_client,
)
from evidence_keeper.api.client import default_url
from evidence_keeper.archive.cluster import AgentPod, ClusterError
from evidence_keeper.archive.manifest import Scope, ScopeError, check_glob, check_namespace
from evidence_keeper.commands.base import CliError, NoEvidence
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.store import FileStore, Store, StoreError, open_store
from evidence_keeper.timefmt import TimeError, parse_time

FORMATS: Final = ("text", "json")


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="YAML configuration file (or $EK_CONFIG)")


def add_output(p: argparse.ArgumentParser, *, json_help: str = "JSON") -> None:
    """``-o text|json`` (kubectl's flag) with ``--json`` kept as its alias."""
    p.add_argument("-o", "--output", choices=FORMATS, default="text", dest="output",
                   help=f"output format: text (default) or json ({json_help})")
    p.add_argument("--json", action="store_const", const="json", dest="output",
                   help="alias of -o json")


def add_namespace(p: argparse.ArgumentParser, *, required: bool = False,
                  help: str | None = None) -> None:
    p.add_argument("-n", "--namespace", required=required, help=help)


def settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(getattr(args, "config", None), overrides=overrides)


def when(value: str | None, name: str, *, now: datetime | None = None) -> datetime | None:
    """A ``--since``/``--until`` value, or a one-line :class:`CliError`."""
    if value is None:
        return None
    try:
        return parse_time(value, name, now or datetime.now(UTC))
    except TimeError as exc:
        raise CliError(str(exc)) from exc


def flag_scope(args: argparse.Namespace, *, what: str = "namespace",
               all_namespaces: bool = False) -> Scope:
    """The scope of the ``-n``, ``--pod``, ``--container``, ``--since`` and ``--until`` flags,
    checked (``what`` names the namespace in its error; with ``all_namespaces`` no ``-n`` is
    every namespace, ``""``); a bad flag is a one-line :class:`CliError`."""
    try:
        return Scope(
            namespace=("" if all_namespaces and not args.namespace
                       else check_namespace(args.namespace, what)),
            pod=args.pod and check_glob(args.pod, "--pod", subdomain=True),
            container=args.container and check_glob(args.container, "--container",
                                                    subdomain=False),
            since=when(args.since, "--since"), until=when(args.until, "--until"))
    except ScopeError as exc:
        raise CliError(str(exc)) from exc


def read_store(cfg: Settings, *, scope: bool = True) -> Store:
    """The configured store, opened to read. For a read of a scope (``search``, ``export``
    of a pod) a ``file://`` store that does not exist is :class:`NoEvidence` (an empty
    listing would pass for "no match"); a missing bucket says so on the first listing. A
    read by archive id (``verify``, ``export --archive``) reports the missing manifest."""
    try:
        store = open_store(cfg.store_url, endpoint_url=cfg.s3_endpoint_url)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    if scope and isinstance(store, FileStore) and not store.root.is_dir():
        raise NoEvidence(f"the store {store.describe()} does not exist (check store_url)")
    return store


def store_failure(exc: StoreError) -> Exception:
    """A store error as the CLI reports it: a bucket that does not exist is "no evidence"
    (exit 1), anything else an error (exit 2)."""
    if "does not exist" in str(exc):
        return NoEvidence(str(exc))
    return CliError(str(exc))


def token(args: argparse.Namespace, cfg: Settings) -> str:
    path = args.token_file or cfg.archive_token_file
    if path is None:
        raise CliError("no archive token: pass --token-file or set archive_token_file")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the archive token from {path}: {exc}") from exc
    if not text:
        raise CliError(f"the archive token file {path} is empty")
    return text


def agent_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    return default_url(settings(args).listen)


# ------------------------------------------------------------------ agents, through the API
def add_agents(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, kubeconfig_help: str,
               port_help: str = "default: the port of the listen setting") -> None:
    """How to find the agents through the API server (``archive``/``gaps``/``preflight
    --all-nodes`` and every ``kubectl evidence`` command)."""
    p.add_argument("--kubeconfig", metavar="PATH", help=kubeconfig_help)
    p.add_argument("--agent-namespace", default=AGENT_NAMESPACE,
                   help=f"namespace of the agents' DaemonSet (default {AGENT_NAMESPACE})")
    p.add_argument("--agent-selector", default=AGENT_SELECTOR,
                   help="label selector of the agent pods")
    p.add_argument("--agent-port", type=int, help=port_help)


def kube_api(kubeconfig: str | None, *, context: str | None = None,
             in_cluster: bool = True) -> Any:
    """:func:`~evidence_keeper.agents.kube_client`, failing as a one-line :class:`CliError`."""
    try:
        return kube_client(kubeconfig, context=context, in_cluster=in_cluster)
    except ClusterError as exc:
        raise CliError(str(exc)) from None


def agent_docs(api: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The agent pods of ``--agent-namespace``/``--agent-selector`` as the API server's JSON;
    at least one."""
    try:
        docs = agent_pod_docs(api, namespace=args.agent_namespace, selector=args.agent_selector)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    if not docs:
        raise CliError(f"no agent pods {args.agent_selector!r} in namespace"
                       f" {args.agent_namespace} (see --agent-namespace, --agent-selector)")
    return docs


def find_agents(api: Any, args: argparse.Namespace) -> list[AgentPod]:
    """The agent pods (at least one), by node."""
    return agent_pods(agent_docs(api, args))


class Progress:
    """Progress on stderr for long operations: after 2 s, then every 0.5 s (TTY) or 10 s.

    ``force`` shows it even when stderr is not a terminal (``--progress``); ``enabled=False``
    never shows it (commands whose progress is for terminals only)."""

    def __init__(self, verb: str, *, unit: str, enabled: bool = True,
                 force: bool = False) -> None:
        self.verb, self.unit = verb, unit
        self.started = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.enabled = enabled or force
        self.force = force
        self.delay = 0.0 if force else 2.0
        self.shown = False

    def update(self, done: int, total: int | None, extra: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or now - self.started < self.delay:
            return
        if (self.shown or not self.force) and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last, self.shown = now, True
        of = f"/{total}" if total is not None else ""
        text = f"{self.verb} {done}{of} {self.unit}" + (f", {extra}" if extra else "")
        print(("\r" + text + " " * 8) if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> bool:
        """End the progress line; whether any progress was shown since the last close."""
        shown, self.shown = self.shown, False
        if shown and self.tty:
            print(file=sys.stderr)
        return shown
