"""Delivering batches: HTTP to the sinks, objects to a Datadog archive, and how to react.

Each sink answers in its own words; they come down to four outcomes:

* accepted (2xx) — the batch's lines are checkpointed;
* *retry later* — 408, 429, 5xx, a connection error or a timeout: the batch is sent again
  after ``Retry-After`` (seconds or an HTTP date) when the sink gave one, else after an
  exponential back-off with jitter (0.5 s doubling to 30 s);
* *too large* (413) — a Datadog batch is split in two and each half sent;
* *refused* — any other answer (bad credentials, a malformed batch, Loki refusing lines older
  than ``reject_old_samples_max_age``): the replay of that target stops with one line that
  says what the sink said and what to do about it. Nothing is checkpointed, nothing is lost:
  the lines are still in the store.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from evidence_keeper.replay.encoding import Batch
from evidence_keeper.settings import ReplayTarget
from evidence_keeper.store import Store, StoreError, open_store

RETRY_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S: Final = 30.0
MAX_RETRY_AFTER_S: Final = 300.0
_OLD_SAMPLE_HINTS: Final = ("too far behind", "too old", "greater_than_max_sample_age",
                            "older than", "out of order")


class RetryLater(Exception):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    pass


class Refused(Exception):
    """The sink will not take these lines as they are: one line for the operator."""


class CredentialsError(Refused):
    pass


def read_credentials(target: ReplayTarget) -> str | None:
    path = target.credentials_file
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"target {target.name}: cannot read credentials_file {path}:"
                               f" {exc}") from exc
    if not text:
        raise CredentialsError(f"target {target.name}: credentials_file {path} is empty")
    return text


def auth_headers(target: ReplayTarget, secret: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if target.kind == "datadog":
        if secret is None:
            raise CredentialsError(f"target {target.name}: no API key")
        headers["DD-API-KEY"] = secret
    elif secret is not None:
        if target.kind == "loki" and ":" in secret:
            headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        else:
            headers["Authorization"] = f"Bearer {secret}"
    if target.kind == "loki" and target.tenant:
        headers["X-Scope-OrgID"] = target.tenant
    return headers


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date), capped; None when absent."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        secs = when.timestamp() - (now if now is not None else time.time())
    return min(MAX_RETRY_AFTER_S, max(0.0, secs))


class HttpSink:
    """POSTs batches to one target's URL."""

    def __init__(self, target: ReplayTarget, *, session: aiohttp.ClientSession,
                 secret: str | None, timeout_s: float = 60.0) -> None:
        self.target = target
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.headers = auth_headers(target, secret)

    async def post(self, batch: Batch) -> None:
        headers = {**self.headers, "Content-Type": batch.content_type,
                   "Content-Encoding": "gzip", "User-Agent": "evidence-keeper-replay"}
        try:
            async with self.session.post(self.target.url, data=batch.body, headers=headers,
                                         timeout=self.timeout) as resp:
                body = await resp.read()
                self.check(resp.status, body, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryLater(f"{self.target.url}: {type(exc).__name__}: {exc}", None) from exc

    def check(self, status: int, body: bytes, retry_after: str | None) -> None:
        if 200 <= status < 300:
            if self.target.kind == "otlp":
                _otlp_partial(self.target, body)
            return
        text = body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
        where = f"target {self.target.name} ({self.target.url})"
        if status in RETRY_STATUS:
            raise RetryLater(f"{where}: HTTP {status} {text}", retry_after_s(retry_after))
        if status == 413:
            raise TooLarge(f"{where}: HTTP 413 {text}")
        if status in (401, 403):
            raise CredentialsError(f"{where} refused the credentials in"
                                   f" {self.target.credentials_file}: HTTP {status} {text}")
        if self.target.kind == "loki" and status == 400 and any(
                h in text.lower() for h in _OLD_SAMPLE_HINTS):
            raise Refused(f"{where} refused lines as too old (reject_old_samples /"
                          " reject_old_samples_max_age, or out-of-order limits): raise them"
                          " in Loki's limits_config for the replay, or replay a more recent"
                          f" window; Loki said: {text}")
        raise Refused(f"{where}: HTTP {status} {text}")


def _otlp_partial(target: ReplayTarget, body: bytes) -> None:
    if not body:
        return
    resp = ExportLogsServiceResponse()
    try:
        resp.ParseFromString(body)
    except Exception:  # a JSON or empty answer from a proxy: the 2xx stands
        return
    if resp.partial_success.rejected_log_records:
        raise Refused(f"target {target.name}: the collector rejected"
                      f" {resp.partial_success.rejected_log_records} log records:"
                      f" {resp.partial_success.error_message}")


class ArchiveSink:
    """Writes Datadog log-archive objects under ``archive_url`` (``file://`` or ``s3://``).

    A file archive is written as plain files (no metadata sidecars: Datadog reads every
    object under the archive path); each object temp + fsync + rename, so a crash leaves the
    old object or the new one.
    """

    def __init__(self, url: str, *, s3_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.root: Path | None = None
        self.store: Store | None = None
        if url.startswith("file://"):
            self.root = Path(url[len("file://"):])
        else:
            self.store = open_store(url, **(s3_options or {}))

    def write(self, key: str, body: bytes) -> None:
        if self.store is not None:
            try:
                self.store.put(key, body, {})
            except StoreError as exc:
                if exc.retryable:
                    raise RetryLater(str(exc), None) from exc
                raise Refused(f"archive {self.url}: {exc}") from exc
            return
        assert self.root is not None
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise RetryLater(f"archive {self.url}: cannot write {key}: {exc}", None) from exc


class RateLimit:
    """A token bucket on lines per second (``None``: no limit)."""

    def __init__(self, lines_per_s: float | None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = lines_per_s
        self.clock = clock
        self.sleep = sleep
        self.tokens = lines_per_s or 0.0
        self.last = clock()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if not self.rate or n <= 0:
            return
        async with self.lock:
            while True:
                now = self.clock()
                self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
                self.last = now
                need = min(n, self.rate)  # a batch above one second's worth needs a full bucket
                if self.tokens >= need - 1e-6:  # (float rounding must not stall the loop)
                    self.tokens -= n
                    return
                await self.sleep(max(0.001, (need - self.tokens) / self.rate))


def backoff_s(attempt: int) -> float:
    base: float = min(MAX_BACKOFF_S, 0.5 * 2.0 ** min(attempt, 10))
    return base * (0.5 + random.random() / 2)

