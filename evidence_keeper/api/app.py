"""The HTTP API (aiohttp, one port): health, readiness, metrics and the gap ledger.

Every response is JSON (``/metrics`` excepted); every error is ``{"error": "..."}`` with the
right status and never a traceback: a middleware turns unexpected exceptions into a 500 with a
generic message and logs the details instead. Query parameters are validated strictly: an
unknown or repeated parameter is a 400 naming it, so a typo never silently widens a query.

The server runs as one more task of the supervisor (``AppRunner`` with ``handle_signals=False``
and a :class:`~evidence_keeper.api.guarding.GuardedSite`), and stops last so ``/metrics`` and
``/gaps`` answer during the drain. The guard caps concurrent connections and closes idle and
slow ones within seconds, so no client can take the descriptors capture needs
(CONTRACT.md section 6, v2; :mod:`evidence_keeper.api.guarding`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from evidence_keeper import timefmt
from evidence_keeper.api.contract import MAX_BODY, BadRequest, conform_gap, parse_time
from evidence_keeper.api.guarding import ConnectionGuard, GuardedSite
from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import GAP_KINDS

__all__ = ["MAX_BODY", "BadRequest", "build_app", "parse_time", "serve"]

log = get_logger("evidence_keeper.api")


class AgentView(Protocol):
    """What the HTTP API reads of the agent, and nothing else (the supervisor builds it)."""

    @property
    def node(self) -> str: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    def readiness(self) -> dict[str, Any]:
        """The ``/readyz`` document (blocking: it reads shared state under locks)."""
        ...

    async def gap_rows(self, *, since: datetime | None, until: datetime | None,
                       kind: str | None, namespace: str | None,
                       open_: bool | None) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The API guard's limits (settings ``http_*``)."""

    max_connections: int
    idle_timeout_s: float
    header_timeout_s: float


AGENT: Final = web.AppKey("agent", AgentView)
DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_error(exc.status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {404: "not found", 405: "method not allowed",
                  413: f"request body over {MAX_BODY} bytes"}.get(exc.status, exc.reason)
        return json_error(exc.status, reason)
    except Exception:
        log.exception("request failed", path=request.path, method=request.method)
        return json_error(500, "internal error (see the agent's log)")


def _single(request: web.Request, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in request.query:
        if key not in allowed:
            raise BadRequest(f"unknown parameter {key!r} (allowed: {', '.join(sorted(allowed))})")
        values = request.query.getall(key)
        if len(values) != 1:
            raise BadRequest(f"parameter {key!r} given {len(values)} times")
        out[key] = values[0]
    return out


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    detail = await asyncio.to_thread(agent.readiness)  # takes the spool lock
    return web.json_response(detail, status=200 if detail["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = generate_latest(agent.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def gaps(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    q = _single(request, {"since", "until", "kind", "namespace", "open"})
    now = datetime.now(UTC)
    since = parse_time(q["since"], "since", now) if "since" in q else None
    until = parse_time(q["until"], "until", now) if "until" in q else None
    if since and until and since > until:
        raise BadRequest("since is after until")
    kind = q.get("kind")
    if kind is not None and kind not in GAP_KINDS:
        raise BadRequest(f"kind: {kind!r} is not one of {', '.join(GAP_KINDS)}")
    namespace = q.get("namespace")
    if namespace is not None and not DNS_LABEL.match(namespace):
        raise BadRequest(f"namespace: {namespace!r} is not a Kubernetes namespace name")
    open_: bool | None = None
    if "open" in q:
        if q["open"] not in ("true", "false"):
            raise BadRequest("open: must be true or false")
        open_ = q["open"] == "true"
    rows = await agent.gap_rows(since=since, until=until, kind=kind, namespace=namespace,
                                open_=open_)
    return web.json_response({
        "node": agent.node,
        "generated_at": timefmt.rfc3339(now),
        "gaps": [conform_gap(r) for r in rows],
    })


def build_app(agent: AgentView, *, extensions: Sequence[Callable[[web.Application], None]] = (),
              guard: ConnectionGuard | None = None) -> web.Application:
    middlewares: list[Any] = [errors] if guard is None else [guard.middleware(), errors]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[AGENT] = agent
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/gaps", gaps)
    for extend in extensions:
        extend(app)
    return app


async def serve(agent: AgentView, *, host: str, port: int, limits: HttpLimits,
                metrics: Metrics, extensions: Sequence[Callable[[web.Application], None]] = (),
                ) -> tuple[web.AppRunner, tuple[str, int]]:
    """Start the server; returns the runner (``await runner.cleanup()`` stops it) and the
    address it listens on."""
    guard = ConnectionGuard(max_connections=limits.max_connections,
                            idle_timeout_s=limits.idle_timeout_s,
                            header_timeout_s=limits.header_timeout_s,
                            metrics=metrics)
    app = build_app(agent, extensions=extensions, guard=guard)
    app.on_cleanup.append(guard.stop)
    # aiohttp's own keep-alive timer (its default is an hour) backs the guard up; a little
    # later, so the guard decides and counts.
    backup = max(limits.idle_timeout_s, limits.header_timeout_s) + 2.0
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=backup)
    await runner.setup()
    guard.start()
    site = GuardedSite(runner, host, port, guard=guard)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addrs: list[Any] = list(runner.addresses)
    address: tuple[str, int] = addrs[0][:2] if addrs else (host, port)
    log.info("http api listening", address=f"{address[0]}:{address[1]}")
    return runner, address
