"""Sink probes: DNS first (that is what broke on Nov 10), then TCP, TLS and HTTP.

Each probe is a chain of checks and reports the first one that failed, so an operator reads
``check="dns"`` and knows where to look. Every probe is bounded by ``timeout``, including the
resolver: ``getaddrinfo`` is a blocking C call that socket timeouts do not bound (a broken
``/etc/resolv.conf`` can hang it for 30 s or more), so it runs in a small dedicated thread
pool under an asyncio deadline. A hung resolver thread stays hung, but the probe answers on
time, and once every resolver thread is stuck further probes fail at once with "resolver
hung" instead of queueing.

The resolver goes through the pod's own configuration (``socket.getaddrinfo``), exactly the
path the log sink's client would take. Tests and the demo inject failures by passing their
own ``resolver`` callable. A probe's latency is measured on the ``clock`` it is given
(keyword-only, ``time.monotonic`` by default; tests pass a fake one); its deadline is the
event loop's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Resolver = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    checks: tuple[str, ...]  # the checks this probe runs, in order
    failed: str | None  # the first check that failed
    error: str | None
    latency_s: float


class ResolverPool:
    """getaddrinfo in threads, with a deadline and a bound on hung threads."""

    def __init__(self, resolver: Resolver | None = None, max_threads: int = 4) -> None:
        self.resolver: Resolver = resolver or socket.getaddrinfo
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="ek-dns")
        self._busy = 0
        self._max = max_threads
        self._lock = threading.Lock()

    def _call(self, host: str, port: int | None) -> list[tuple[Any, ...]]:
        try:
            return self.resolver(host, port, type=socket.SOCK_STREAM)
        finally:
            with self._lock:
                self._busy -= 1

    async def resolve(self, host: str, port: int | None, deadline_s: float) -> list[str]:
        with self._lock:
            if self._busy >= self._max:
                raise TimeoutError("resolver hung: every resolver thread is still blocked")
            self._busy += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._call, host, port)
        try:
            infos = await asyncio.wait_for(asyncio.shield(fut), timeout=deadline_s)
        except TimeoutError:
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            raise TimeoutError(f"resolving {host} took longer than {deadline_s:g}s") from None
        addrs = [str(i[4][0]) for i in infos]
        if not addrs:
            raise OSError(f"{host} resolved to no address")
        return addrs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _tcp(addr: str, port: int, deadline_s: float, *, tls_host: str | None = None,
               ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.create_default_context() if tls_host else None
    return await asyncio.wait_for(
        asyncio.open_connection(addr, port, ssl=ctx, server_hostname=tls_host), deadline_s)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, TimeoutError, ssl.SSLError):
        pass


class Prober:
    def __init__(self, resolvers: ResolverPool, timeout: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolvers = resolvers
        self.timeout = timeout
        self.clock = clock

    async def dns(self, host: str) -> ProbeResult:
        return await self._run(("dns",), self._dns_steps(host))

    async def tcp(self, host: str, port: int) -> ProbeResult:
        return await self._run(("dns", "tcp"), self._tcp_steps(host, port))

    async def http(self, url: str) -> ProbeResult:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        checks = ("dns", "tcp", "tls", "http") if tls else ("dns", "tcp", "http")
        return await self._run(checks, self._http_steps(url))

    async def _run(self, checks: tuple[str, ...], steps: Any) -> ProbeResult:
        start = self.clock()
        current = checks[0]
        try:
            async with asyncio.timeout(self.timeout):
                async for check in steps:  # each step yields the check it is about to run
                    current = check
        except TimeoutError as exc:
            msg = str(exc) or f"{current} check timed out after {self.timeout:g}s"
            return ProbeResult(False, checks, current, msg, self.clock() - start)
        except (OSError, ssl.SSLError, ValueError) as exc:
            return ProbeResult(False, checks, current, f"{type(exc).__name__}: {exc}",
                               self.clock() - start)
        return ProbeResult(True, checks, None, None, self.clock() - start)

    async def _dns_steps(self, host: str) -> Any:
        yield "dns"
        await self.resolvers.resolve(host, None, self.timeout)

    async def _tcp_steps(self, host: str, port: int) -> Any:
        yield "dns"
        addrs = await self.resolvers.resolve(host, port, self.timeout)
        yield "tcp"
        _, w = await _tcp(addrs[0], port, self.timeout)
        await _close(w)

    async def _http_steps(self, url: str) -> Any:
        parts = urlsplit(url)
        host = parts.hostname or ""
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        yield "dns"
        addrs = await self.resolvers.resolve(host, port, self.timeout)
        yield "tcp"
        _, w = await _tcp(addrs[0], port, self.timeout)
        await _close(w)
        if tls:
            yield "tls"
            r, w = await _tcp(addrs[0], port, self.timeout, tls_host=host)
        else:
            r, w = await _tcp(addrs[0], port, self.timeout)
        try:
            yield "http"
            path = parts.path or "/"
            if parts.query:
                path += f"?{parts.query}"
            w.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: "
                    "evidence-keeper-probe\r\nConnection: close\r\n\r\n".encode())
            await w.drain()
            status_line = await r.readline()
            fields = status_line.split()
            if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(fields[1])
            if status >= 500:
                raise ValueError(f"HTTP {status}")
        finally:
            await _close(w)
