"""A resolver for tests: chosen hosts fail or hang, the rest resolve to loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

SINK_HOST = "agent-http-intake.logs.datadoghq.test"


class FlakyDNS:
    """Fails (NXDOMAIN-like) or hangs for chosen hosts; resolves the rest to loopback."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.hang: set[str] = set()
        self.release = threading.Event()
        self.calls = 0
        # Per-call outcomes for chosen hosts (True = fail), consumed in order, then repeated.
        self.pattern: dict[str, list[bool]] = {}
        self.pattern_calls: dict[str, int] = {}

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls += 1
        if host in self.pattern:
            n = self.pattern_calls[host] = self.pattern_calls.get(host, 0) + 1
            outcomes = self.pattern[host]
            if outcomes[(n - 1) % len(outcomes)]:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host in self.hang:
            self.release.wait(30)
        if host in self.broken or host in self.hang:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]


@pytest.fixture
def dns() -> Iterator[FlakyDNS]:
    d = FlakyDNS()
    yield d
    d.release.set()
