"""Command line: argument parsing only. Each subcommand hands validated settings to the code
that does the work, prints one clear line on error and exits non-zero (no tracebacks)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from evidence_keeper.api.client import ApiError, call, default_url
from evidence_keeper.logs import configure_logging
from evidence_keeper.settings import ConfigError, Settings, load_settings


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(args.config, overrides=overrides)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="YAML configuration file (or $EK_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evidence-keeper",
        description="Log-evidence preservation agent for Kubernetes nodes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the agent on this node")
    _add_config(p)

    p = sub.add_parser("export", help="write a stream's exact bytes (or a pod or an archive"
                                      " as a tar) from the store")
    _add_config(p)
    p.add_argument("--namespace")
    p.add_argument("--pod")
    p.add_argument("--container", help="one container's stream (without it: the pod as a tar)")
    p.add_argument("--restart", type=int, help="container instance (default: all, in order)")
    p.add_argument("--pod-uid", help="pick one pod when a name was reused")
    p.add_argument("--archive", metavar="ID",
                   help="a whole archive as a tar: its manifest and the bytes it lists")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    p = sub.add_parser("gaps", help="list gaps from a running agent's ledger")
    _add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("--kind", choices=["sink_outage", "loss", "backlog", "agent_down"])
    p.add_argument("--namespace")
    p.add_argument("--open", action="store_true", help="only gaps still open")
    p.add_argument("--json", action="store_true", help="the API's JSON document")

    p = sub.add_parser("preflight",
                       help="exit 0 only if sinks are up and shipping is current (chaos gate)")
    _add_config(p)
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--since", default="1h",
                   help="fail on loss gaps newer than this (RFC3339 or duration; default 1h)")
    p.add_argument("--max-backlog-s", type=float,
                   help="largest acceptable oldest-unshipped age (default: backlog_threshold_s)")

    p = sub.add_parser("archive", help="seal and archive the evidence of a scope (POST /archive)")
    _add_config(p)
    p.add_argument("--namespace", required=True)
    p.add_argument("--pod", help="pod name or glob (* ? [...])")
    p.add_argument("--container", help="container name or glob")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m (default: all)")
    p.add_argument("--until", help="RFC3339 or a duration back from now (default: now)")
    p.add_argument("--reason", required=True, help="why the evidence is kept (in the manifest)")
    p.add_argument("--label", help="idempotency key: the same label gives the same archive")
    p.add_argument("--wait", action="store_true", help="wait for the manifest, with progress")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    p.add_argument("--url", help="agent API (default: from the configured listen address)")
    p.add_argument("--token-file", metavar="PATH", help="default: archive_token_file")
    p.add_argument("--all-nodes", action="store_true",
                   help="every agent of the DaemonSet, then a cluster manifest (implies --wait)")
    p.add_argument("--kubeconfig", metavar="PATH", help="default: in-cluster, else $KUBECONFIG")
    p.add_argument("--agent-namespace", default="evidence-keeper")
    p.add_argument("--agent-selector", default="app.kubernetes.io/name=evidence-keeper")
    p.add_argument("--agent-port", type=int, help="default: the port of the listen setting")
    p.add_argument("--via", choices=["proxy", "pod-ip"], default="proxy",
                   help="reach agents through the API server's pod proxy or at their pod IPs")

    p = sub.add_parser("verify", help="check an archive: segments, hashes, chains, digest")
    _add_config(p)
    p.add_argument("archive_id", metavar="ARCHIVE_ID")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = sub.add_parser("search", help="search the store for lines matching a pattern")
    _add_config(p)
    p.add_argument("pattern", metavar="PATTERN", help="a regular expression (or -F: a string)")
    p.add_argument("--namespace", required=True)
    p.add_argument("--pod", help="pod name or glob (* ? [...])")
    p.add_argument("--container", help="container name or glob")
    p.add_argument("--since", help="RFC3339 or a duration back from now, e.g. 30m")
    p.add_argument("--until", help="RFC3339 or a duration back from now")
    p.add_argument("-F", "--fixed-strings", action="store_true", help="PATTERN is a string")
    p.add_argument("-i", "--ignore-case", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per matching line")

    p = sub.add_parser("demo", help="replay the Nov 10 incident on a simulated node")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo files here")
    p.add_argument("--speed", type=float, default=1.0, help="scenario speed factor")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "gaps":
            return cmd_gaps(args)
        if args.command == "preflight":
            return cmd_preflight(args)
        if args.command == "archive":
            return cmd_archive(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "search":
            return cmd_search(args)
        if args.command == "demo":
            from evidence_keeper.demo import run_demo

            return run_demo(workdir=args.workdir, speed=args.speed)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (CliError, ApiError) as exc:
        print(f"evidence-keeper: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def cmd_run(args: argparse.Namespace) -> int:
    from evidence_keeper.supervisor import Agent, StartupError

    settings = _settings(args)
    configure_logging(settings.log_level)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            agent = Agent(settings)
        except StartupError as exc:
            raise CliError(str(exc)) from exc
        try:
            await agent.run(stop)
        except StartupError as exc:
            raise CliError(str(exc)) from exc
        finally:
            agent.close()
        return 0

    return asyncio.run(_main())


def cmd_export(args: argparse.Namespace) -> int:
    from evidence_keeper.archive.export import ExportError, export_stream, find_streams
    from evidence_keeper.ship.store import StoreError, open_store

    if args.archive is not None:
        if any(getattr(args, k) is not None for k in ("namespace", "pod", "container", "restart",
                                                       "pod_uid")):
            raise CliError("--archive exports a whole archive: drop --namespace/--pod/...")
        return cmd_export_tar(args)
    if args.namespace is None or args.pod is None:
        raise CliError("export needs --namespace and --pod (and --container for one stream),"
                       " or --archive ID")
    if args.container is None:
        return cmd_export_tar(args)
    settings = _settings(args)
    try:
        store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        streams = find_streams(
            store, cluster=settings.cluster, namespace=args.namespace, pod=args.pod,
            container=args.container, restart=args.restart, pod_uid=args.pod_uid,
        )
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    if not streams:
        raise CliError(
            f"no segments in {store.describe()} for {args.namespace}/{args.pod}/{args.container}"
            + (f" restart {args.restart}" if args.restart is not None else ""))
    uids = {ss.stream.pod_uid for ss in streams}
    if len(uids) > 1:
        raise CliError(f"pod name {args.pod!r} matches several pods; pick one with --pod-uid:"
                       f" {', '.join(sorted(uids))}")
    out: BinaryIO
    out = Path(args.output).open("wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    try:
        for ss in streams:
            report = export_stream(store, ss, out)
            note = (f"restart {ss.stream.restart}: {report.bytes} bytes"
                    f" in {report.segments} segments")
            for a, b in report.holes:
                note += f"; hole [{a}, {b}) not in the store (see /gaps)"
            print(note, file=sys.stderr)
    except (ExportError, StoreError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    return 0


def cmd_export_tar(args: argparse.Namespace) -> int:
    """A pod (every container and restart) or a whole archive as a tar."""
    from evidence_keeper.archive.export import find_streams
    from evidence_keeper.archive.manifest import (
        BundleError,
        ManifestError,
        write_archive_tar,
        write_streams_tar,
    )
    from evidence_keeper.ship.store import ObjectMissing, StoreError, open_store

    settings = _settings(args)
    if not args.output and sys.stdout.isatty():
        raise CliError("refusing to write a tar to a terminal: use -o FILE or redirect stdout")
    store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    out: BinaryIO
    out = Path(args.output).open("wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    ok = False
    try:
        if args.archive is not None:
            n = write_archive_tar(store, settings.cluster, args.archive, out)
            what = f"archive {args.archive}"
        else:
            streams = find_streams(store, cluster=settings.cluster, namespace=args.namespace,
                                   pod=args.pod, restart=args.restart, pod_uid=args.pod_uid)
            if not streams:
                raise CliError(f"no segments in {store.describe()} for"
                               f" {args.namespace}/{args.pod}")
            uids = {ss.stream.pod_uid for ss in streams}
            if len(uids) > 1:
                raise CliError(f"pod name {args.pod!r} matches several pods; pick one with"
                               f" --pod-uid: {', '.join(sorted(uids))}")
            n = write_streams_tar(store, {ss.stream: ss.keys for ss in streams}, out)
            what = f"pod {args.namespace}/{args.pod}: {len(streams)} streams"
        ok = True
    except ObjectMissing as exc:
        raise CliError(f"not in {store.describe()}: {exc.key}") from exc
    except (BundleError, ManifestError, StoreError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if args.output:
            out.close()
            if not ok:
                Path(args.output).unlink(missing_ok=True)
        else:
            out.flush()
    print(f"{what}: {n} segments written as a tar", file=sys.stderr)
    return 0


def _read_store(settings: Settings) -> Any:
    from evidence_keeper.ship.store import StoreError, open_store

    try:
        return open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    except StoreError as exc:
        raise CliError(str(exc)) from exc


def _when(value: str | None, name: str) -> Any:
    from datetime import UTC, datetime

    from evidence_keeper.api.app import BadRequest, parse_time

    if value is None:
        return None
    try:
        return parse_time(value, name, datetime.now(UTC))
    except BadRequest as exc:
        raise CliError(str(exc)) from exc


def _token(args: argparse.Namespace, settings: Settings) -> str:
    path = args.token_file or settings.archive_token_file
    if path is None:
        raise CliError("no archive token: pass --token-file or set archive_token_file")
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the archive token from {path}: {exc}") from exc
    if not token:
        raise CliError(f"the archive token file {path} is empty")
    return token


def cmd_archive(args: argparse.Namespace) -> int:
    import getpass
    import socket
    import time

    from evidence_keeper.archive.manifest import Scope, ScopeError, check_glob, check_namespace

    settings = _settings(args)
    token = _token(args, settings)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    body: dict[str, Any] = {"namespace": args.namespace, "reason": args.reason,
                            "requester": f"{user}@{socket.gethostname()}"[:256]}
    for key in ("pod", "container", "since", "until", "label"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.all_nodes:
        try:
            scope = Scope(namespace=check_namespace(args.namespace),
                          pod=args.pod and check_glob(args.pod, "--pod", subdomain=True),
                          container=args.container and check_glob(args.container, "--container",
                                                                  subdomain=False),
                          since=_when(args.since, "--since"), until=_when(args.until, "--until"))
        except ScopeError as exc:
            raise CliError(str(exc)) from exc
        return _archive_all_nodes(args, settings, body, token, scope)
    url = _url(args)
    _, doc = call(url, "/archive", method="POST", body=body, token=token)
    print(f"archive {doc['id']} accepted by {url}: {doc['status']}", file=sys.stderr)
    if not (args.wait or doc["status"] in ("complete", "failed")):
        print(doc["id"])
        return 0
    deadline = time.monotonic() + args.timeout
    started, shown = time.monotonic(), ""
    while doc["status"] in ("pending", "running"):
        if time.monotonic() > deadline:
            raise CliError(f"archive {doc['id']} not complete after {args.timeout:g}s"
                           f" ({doc.get('stage')})")
        time.sleep(0.3)
        _, doc = call(url, f"/archives/{doc['id']}")
        line = f"{doc['status']}: {doc.get('stage') or ''}"
        if line != shown:
            shown = line
            print(f"  {time.monotonic() - started:6.1f}s  {line}", file=sys.stderr)
    if doc["status"] == "failed":
        print(f"archive {doc['id']} failed: {doc.get('error')}", file=sys.stderr)
        return 1
    print(f"archive {doc['id']} complete: {doc['manifest_key']}", file=sys.stderr)
    print(doc["id"])
    return 0


def _archive_all_nodes(args: argparse.Namespace, settings: Settings, body: dict[str, Any],
                       token: str, scope: Any) -> int:
    import time

    from evidence_keeper.archive.service import (
        AgentTransport,
        ClusterError,
        NodeArchive,
        PodIP,
        PodProxy,
        cluster_archive,
        kube_client,
        list_agent_pods,
    )
    from evidence_keeper.ship.store import StoreError

    store = _read_store(settings)
    port = args.agent_port or settings.listen_port
    try:
        api = kube_client(args.kubeconfig)
        pods = list_agent_pods(api, namespace=args.agent_namespace, selector=args.agent_selector)
    except ClusterError as exc:
        raise CliError(str(exc)) from exc
    if not pods:
        raise CliError(f"no agent pods {args.agent_selector!r} in namespace"
                       f" {args.agent_namespace}")
    print(f"triggering {len(pods)} agents: {', '.join(p.node or p.name for p in pods)}",
          file=sys.stderr)
    transport: AgentTransport = (PodProxy(api, namespace=args.agent_namespace, port=port)
                                 if args.via == "proxy" else PodIP(port=port))
    started = time.monotonic()
    shown: dict[str, str] = {}

    def progress(nodes: list[NodeArchive]) -> None:
        for n in nodes:
            line = f"{n.status}: {n.error or n.stage}".rstrip(": ")
            if shown.get(n.agent_pod) != line:
                shown[n.agent_pod] = line
                print(f"  {time.monotonic() - started:6.1f}s  {n.node or n.agent_pod}: {line}",
                      file=sys.stderr)

    try:
        result = cluster_archive(store, cluster=settings.cluster, pods=pods,
                                 transport=transport, body=body, token=token, scope=scope,
                                 timeout_s=args.timeout, progress=progress,
                                 object_lock_days=settings.object_lock_days)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    done = sum(n.status == "complete" for n in result.nodes)
    print(f"cluster archive {result.id}: {done}/{len(result.nodes)} nodes complete,"
          f" {result.segments} segments; manifest {result.manifest_key}", file=sys.stderr)
    print(result.id)
    return 0 if result.complete else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from evidence_keeper.archive.manifest import ManifestError
    from evidence_keeper.archive.verify import format_report, verify_archive
    from evidence_keeper.ship.store import StoreError

    settings = _settings(args)
    store = _read_store(settings)
    progress = _Progress("verified", unit="segments")
    try:
        report = verify_archive(store, cluster=settings.cluster, archive_id=args.archive_id,
                                progress=progress.update)
    except (ManifestError, StoreError) as exc:
        raise CliError(str(exc)) from exc
    progress.close()
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


def cmd_search(args: argparse.Namespace) -> int:
    from evidence_keeper.archive.manifest import Scope, ScopeError, check_glob, check_namespace
    from evidence_keeper.archive.search import (
        Hit,
        Matcher,
        PatternError,
        SearchStats,
        format_json,
        format_text,
        search,
    )
    from evidence_keeper.ship.store import StoreError

    settings = _settings(args)
    try:
        scope = Scope(namespace=check_namespace(args.namespace, "--namespace"),
                      pod=args.pod and check_glob(args.pod, "--pod", subdomain=True),
                      container=args.container and check_glob(args.container, "--container",
                                                              subdomain=False),
                      since=_when(args.since, "--since"), until=_when(args.until, "--until"))
        matcher = Matcher(args.pattern, fixed=args.fixed_strings, ignore_case=args.ignore_case)
    except (ScopeError, PatternError) as exc:
        raise CliError(str(exc)) from exc
    store = _read_store(settings)
    out = sys.stdout.buffer
    fmt = format_json if args.json else format_text
    progress = _Progress("searched", unit="MiB")

    def emit(hit: Hit) -> None:
        out.write(fmt(hit))

    def report(st: SearchStats) -> None:
        progress.update(st.bytes >> 20, st.bytes_total >> 20,
                        f"{st.segments}/{st.segments_total - st.skipped} segments,"
                        f" {st.matches} matches")

    try:
        stats = search(store, matcher, cluster=settings.cluster, scope=scope, emit=emit,
                       progress=report)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    except BrokenPipeError:
        return 0  # `| head`: the reader has seen enough
    out.flush()
    if progress.close():
        print(f"{stats.matches} matches in {stats.bytes / 2**20:.1f} MiB of {stats.streams}"
              f" streams ({stats.segments} segments read, {stats.skipped} skipped by time)"
              f" in {stats.elapsed:.1f}s", file=sys.stderr)
    return 0 if stats.matches else 1


class _Progress:
    """Progress on stderr for long operations: after 2 s, then every 0.5 s (TTY) or 10 s."""

    def __init__(self, verb: str, *, unit: str) -> None:
        import time

        self.verb, self.unit = verb, unit
        self.started = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, done: int, total: int, extra: str = "") -> None:
        import time

        now = time.monotonic()
        if now - self.started < 2.0 or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last, self.shown = now, True
        text = f"{self.verb} {done}/{total} {self.unit}" + (f", {extra}" if extra else "")
        print(("\r" + text + " " * 8) if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> bool:
        if self.shown and self.tty:
            print(file=sys.stderr)
        return self.shown


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    return default_url(_settings(args).listen)


def format_gaps(doc: dict[str, Any]) -> str:
    rows = [("ID", "KIND", "START", "END", "WHAT", "DETAIL")]
    for g in doc["gaps"]:
        if g["kind"] == "loss":
            what = (f"{g.get('namespace')}/{g.get('pod')}/{g.get('container')}#{g.get('restart')}"
                    f" @{g.get('offset')} +{g.get('bytes') if g.get('bytes') is not None else '?'}"
                    f" {g.get('reason', '')}")
        else:
            what = " ".join(str(x) for x in (g.get("sink"), g.get("check"), g.get("reason"))
                            if x)
        detail = g.get("detail") or ""
        cov = g.get("coverage")
        if cov:
            detail = (f"coverage: {cov['streams']} streams, {cov['captured_bytes']} B captured,"
                      f" {cov['shipped_bytes']} B shipped; {detail}")
        rows.append((str(g["id"]), g["kind"], g["start"][:19], (g["end"] or "open")[:19],
                     what, detail[:90]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
             for r in rows]
    lines.append(f"{len(doc['gaps'])} gaps on node {doc['node']} (generated {doc['generated_at']})")
    return "\n".join(lines)


def cmd_gaps(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in ("since", "until", "kind", "namespace")
              if getattr(args, k)}
    if args.open:
        params["open"] = "true"
    _, doc = call(_url(args), "/gaps", params=params)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_gaps(doc))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """The gate a chaos test runs first: every sink up, store current, no recent loss."""
    url = _url(args)
    max_backlog = args.max_backlog_s
    if max_backlog is None:
        max_backlog = _settings(args).backlog_threshold_s if not args.url else 60.0
    _, ready = call(url, "/readyz", accept_status=(503,))
    _, loss = call(url, "/gaps", params={"kind": "loss", "since": args.since})
    problems: list[str] = []
    checks: list[tuple[bool, str]] = []
    checks.append((bool(ready.get("ready")), "agent ready (spool recovered, log root tailed)"))
    for s in ready.get("sinks", []):
        ok = s.get("up") is True
        why = "" if ok else f": {s.get('failed_check') or 'not probed yet'} {s.get('error') or ''}"
        checks.append((ok, f"sink {s['sink']} ({s['target']}) up{why}".rstrip()))
    age = float(ready.get("spool", {}).get("oldest_unshipped_age_s", 0))
    checks.append((age <= max_backlog,
                   f"shipping current (oldest unshipped {age:.1f}s <= {max_backlog:g}s)"))
    n_loss = len(loss.get("gaps", []))
    checks.append((n_loss == 0, f"no loss gaps since {args.since} ({n_loss} found)"))
    for ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {text}")
        if not ok:
            problems.append(text)
    if problems:
        print(f"preflight failed: {len(problems)} problem(s); evidence would be at risk",
              file=sys.stderr)
        return 1
    print("preflight passed: sinks up, shipping current, no recent loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
