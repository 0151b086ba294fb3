"""Keeping the HTTP API from endangering capture: a connection cap, timeouts, quiet errors.

On a real node the agent may have 1024 descriptors, and the tailer and the spool need almost
all of them. aiohttp alone keeps an idle connection for an hour and accepts as many as
arrive, so 1000 idle TCP connections once took every descriptor and stopped capture. Here:

* **A cap** (``http_max_connections``, default 64). A new connection beyond it first makes
  room by closing the connection that has been idle longest (no request in a handler: an
  idle keep-alive, a client that connected and said nothing, a slowloris); only when every
  connection is busy in a handler is the new one closed at once. So a flood of idle
  connections can neither hold descriptors nor lock out ``/healthz`` and ``/metrics``: a
  probe that sends its request evicts the flood, the flood cannot evict it. The listen
  backlog is the cap too, so the API never holds more than twice the cap in descriptors
  (the open connections plus one accept burst being closed).
* **Timeouts.** A connection with no request in progress is closed after
  ``http_idle_timeout_s`` (before its first request and between keep-alive requests); once
  the first byte of a request arrived, its headers must be complete within
  ``http_header_timeout_s`` (slowloris). A handler stuck writing to a client that does not
  read is cut off after :data:`REQUEST_TIMEOUT_S`. The sweep runs several times per second
  as the task ``http-guard``.
* **Quiet errors.** Closures are counted in ``evidence_keeper_http_connections_closed_total
  {reason}`` (``evidence_keeper_http_connections_rejected_total`` for the cap) and logged at
  most once per :data:`LOG_EVERY_S` per reason with a count; ``accept()`` failures for want
  of descriptors (asyncio retries them every second) go to
  ``evidence_keeper_http_accept_errors_total{errno}`` and the same rate-limited log, never
  one traceback per attempt.

The guard sits between the listening socket and aiohttp: :class:`GuardedSite` is an aiohttp
site whose protocol factory wraps aiohttp's, and :meth:`ConnectionGuard.middleware` marks
requests in progress. Only public protocol methods of aiohttp's handler are called.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from evidence_keeper.logs import get_logger
from evidence_keeper.metrics import Metrics

log = get_logger("evidence_keeper.api")
REQUEST_TIMEOUT_S: Final = 60.0
LOG_EVERY_S: Final = 10.0
_ACCEPT_MESSAGE: Final = "socket.accept() out of system resource"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Conn:
    transport: asyncio.BaseTransport
    since: float  # when it last had no request (accepted, or the end of a request)
    first_byte: float | None = None  # first byte of a request whose headers are incomplete
    busy: int = 0  # requests in a handler
    busy_since: float = 0.0


class _Tally:
    """Counts events by reason and logs them at most once per ``every`` seconds."""

    def __init__(self, event: str, *, every: float, clock: Callable[[], float]) -> None:
        self.event = event
        self.every = every
        self.clock = clock
        self.counts: dict[str, int] = {}
        self.last = -every

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.flush()

    def flush(self) -> None:
        now = self.clock()
        if self.counts and now - self.last >= self.every:
            log.warning(self.event, **self.counts, per_s=round(self.every))
            self.counts, self.last = {}, now


class ConnectionGuard:
    def __init__(self, *, max_connections: int, idle_timeout_s: float,
                 header_timeout_s: float, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.metrics = metrics
        self.clock = clock
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}
        self.closed = _Tally("http connections closed", every=LOG_EVERY_S, clock=clock)
        self.accept_errors = _Tally("http accept failed (out of descriptors?)",
                                    every=LOG_EVERY_S, clock=clock)
        self._task: asyncio.Task[None] | None = None
        self._previous_handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ connections
    def protocol_factory(self, make: Callable[[], asyncio.Protocol]
                         ) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, make)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Room for a new connection (evicting the longest-idle one if needed)?"""
        if len(self.conns) >= self.max_connections:
            idle = [c for c in self.conns.values() if not c.busy]
            if not idle:
                self.metrics.http_connections_rejected.inc()
                self.closed.add("limit")
                return False
            victim = min(idle, key=lambda c: c.since)
            self._close(victim, "evicted")
        self.conns[transport] = _Conn(transport, since=self.clock())
        self.metrics.http_connections.set(len(self.conns))
        return True

    def forget(self, transport: asyncio.BaseTransport) -> None:
        if self.conns.pop(transport, None) is not None:
            self.metrics.http_connections.set(len(self.conns))

    def saw_data(self, transport: asyncio.BaseTransport) -> None:
        c = self.conns.get(transport)
        if c is not None and not c.busy and c.first_byte is None:
            c.first_byte = self.clock()

    def _close(self, c: _Conn, reason: str) -> None:
        self.forget(c.transport)
        self.metrics.http_connections_closed.labels(reason=reason).inc()
        self.closed.add(reason)
        # abort: release the descriptor now; nothing is owed to an idle or stuck client.
        c.transport.abort()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ requests
    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def in_progress(request: web.Request, handler: Handler) -> web.StreamResponse:
            c = self.conns.get(request.transport) if request.transport is not None else None
            if c is not None:
                c.busy += 1
                c.busy_since = self.clock()
                c.first_byte = None
            try:
                return await handler(request)
            finally:
                if c is not None:
                    c.busy -= 1
                    c.since = self.clock()

        return in_progress

    # ------------------------------------------------------------------ the sweep
    def sweep(self) -> None:
        now = self.clock()
        for c in list(self.conns.values()):
            if c.busy:
                if now - c.busy_since > REQUEST_TIMEOUT_S:
                    self._close(c, "request_timeout")
            elif c.first_byte is not None:
                if now - c.first_byte > self.header_timeout_s:
                    self._close(c, "header_timeout")
            elif now - c.since > self.idle_timeout_s:
                self._close(c, "idle_timeout")
        self.closed.flush()
        self.accept_errors.flush()

    async def _sweep_forever(self) -> None:
        period = min(1.0, max(0.05, min(self.idle_timeout_s, self.header_timeout_s) / 4))
        while True:
            await asyncio.sleep(period)
            self.sweep()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._task = loop.create_task(self._sweep_forever(), name="http-guard")
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self.handle_loop_exception)

    async def stop(self, _app: web.Application | None = None) -> None:
        if self._loop is not None and self._loop.get_exception_handler() == (
                self.handle_loop_exception):
            self._loop.set_exception_handler(self._previous_handler)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == _ACCEPT_MESSAGE and isinstance(exc, OSError):
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.metrics.http_accept_errors.labels(errno=name).inc()
            self.accept_errors.add(name)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol behind the guard: created only for admitted connections."""

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._transport = transport
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None and self._transport is not None:
            self._guard.saw_data(self._transport)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.forget(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass the guard first (aiohttp's TCPSite otherwise)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 guard: ConnectionGuard) -> None:
        super().__init__(runner, backlog=guard.max_connections)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server), self._host, self._port,
            backlog=self._backlog, reuse_address=True)
