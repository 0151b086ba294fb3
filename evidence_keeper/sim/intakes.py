"""Local log intakes on 127.0.0.1 that check each wire format strictly (tests and the demo).

Each intake is a real aiohttp server (port from the OS). A request that breaks the sink's
documented rules is answered the way the sink would (400/403/413) *and* recorded in
``violations``, so a test fails on any request the real sink would not have taken whole:

* :class:`DatadogIntake` — ``/api/v2/logs``: ``DD-API-KEY``, ``Content-Type: application/json``,
  ``Content-Encoding: gzip``, a JSON array of at most 1000 entries, at most 5 MB uncompressed
  (413 beyond), entries at most 1 MB, the attributes and tags replay promises, and Datadog's
  18 h rule (older timestamps are dropped by Datadog: here a violation);
* :class:`LokiIntake` — ``/loki/api/v1/push``: the JSON push shape, labels, nanosecond string
  timestamps, per-stream timestamp order across requests (an ordered Loki), optional
  ``reject_old_samples`` (400, Loki's wording), Loki's deduplication of identical entries;
* :class:`OtlpIntake` — ``/v1/logs``: protobuf decoded with ``opentelemetry-proto``, resource
  attributes, ``time``/``observed_time``, and an ``ExportLogsServiceResponse`` answer.

``faults`` is a list of ``(status, retry_after)`` answered (in order) before real handling —
a 429 storm; ``on_request(n)`` runs when the n-th request arrives (e.g. to kill the client).
"""

from __future__ import annotations

import abc
import gzip
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

DD_TAGS = ("kube_namespace", "pod_name", "kube_container_name", "host", "source", "service")
LOKI_LABELS = {"namespace", "pod", "container", "node", "stream"}
K8S_ATTRS = {"k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.container.name",
             "k8s.node.name"}


class Intake(abc.ABC):
    path = "/"

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.requests = 0
        self.accepted_requests = 0
        self.statuses: Counter[int] = Counter()
        self.violations: list[str] = []
        self.faults: list[tuple[int, float | None]] = []
        self.fault_every: int = 0  # answer 429 to every n-th request (0: never)
        self.on_request: Callable[[int], None] | None = None
        self.drop_request: Callable[[int], bool] = lambda n: False
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post(self.path, self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    auto_decompress=False)  # check the raw gzip
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def violate(self, what: str) -> web.Response:
        self.violations.append(what)
        return web.json_response({"errors": [what]}, status=400)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        n = self.requests
        if self.on_request is not None:
            self.on_request(n)
        raw = await request.read()
        if self.drop_request(n):
            resp: web.StreamResponse = web.Response(status=503, text="dropped")
        elif self.faults:
            status, after = self.faults.pop(0)
            headers = {"Retry-After": f"{after:g}"} if after is not None else {}
            resp = web.json_response({"errors": ["busy"]}, status=status, headers=headers)
        elif self.fault_every and n % self.fault_every:
            resp = web.json_response({"errors": ["rate limited"]}, status=429,
                                     headers={"Retry-After": "0.01"})
        else:
            resp = self.handle(request, raw)
        self.statuses[resp.status] += 1
        if 200 <= resp.status < 300:
            self.accepted_requests += 1
        return resp

    @abc.abstractmethod
    def handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """Validate one accepted request strictly and answer it (each intake's wire format)."""

    def body(self, request: web.Request, raw: bytes) -> bytes | None:
        enc = request.headers.get("Content-Encoding", "")
        if enc == "gzip":
            try:
                return gzip.decompress(raw)
            except (OSError, EOFError):
                self.violations.append("Content-Encoding: gzip but the body is not gzip")
                return None
        if enc:
            self.violations.append(f"unexpected Content-Encoding {enc}")
            return None
        return raw


class DatadogIntake(Intake):
    path = "/api/v2/logs"
    MAX_REQUEST = 5_000_000
    MAX_ENTRIES = 1000
    MAX_ENTRY = 1_000_000
    MAX_AGE_S = 18 * 3600

    def __init__(self, *, api_key: str, now: Callable[[], float] = time.time) -> None:
        super().__init__(now=now)
        self.api_key = api_key
        self.entries: list[dict[str, Any]] = []

    def handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if request.headers.get("DD-API-KEY") != self.api_key:
            return web.json_response({"errors": ["Forbidden"]}, status=403)
        if request.headers.get("Content-Type", "").split(";")[0] != "application/json":
            return self.violate("Content-Type is not application/json")
        if request.headers.get("Content-Encoding") != "gzip":
            return self.violate("not gzip-compressed")
        data = self.body(request, raw)
        if data is None:
            return web.json_response({"errors": ["bad gzip"]}, status=400)
        if len(data) > self.MAX_REQUEST:
            self.violations.append(f"payload of {len(data)} bytes > 5 MB")
            return web.json_response({"errors": ["Payload too large"]}, status=413)
        try:
            doc = json.loads(data)
        except ValueError:
            return self.violate("body is not JSON")
        if not isinstance(doc, list) or not doc:
            return self.violate("body is not a non-empty JSON array")
        if len(doc) > self.MAX_ENTRIES:
            return self.violate(f"{len(doc)} entries > 1000")
        cutoff_ms = (self.now() - self.MAX_AGE_S) * 1000
        for entry in doc:
            problem = self._check_entry(entry, cutoff_ms)
            if problem:
                return self.violate(problem)
        self.entries.extend(doc)
        return web.json_response({}, status=202)

    def _check_entry(self, entry: Any, cutoff_ms: float) -> str | None:
        if not isinstance(entry, dict):
            return "an entry is not an object"
        # Only a long message can make an entry reach 1 MB (the other fields are short).
        if len(str(entry.get("message", ""))) > 100_000 and len(
                json.dumps(entry, ensure_ascii=False).encode()) > self.MAX_ENTRY:
            return "an entry is larger than 1 MB"
        for key in ("ddsource", "ddtags", "hostname", "service", "message", "timestamp",
                    "status"):
            if key not in entry:
                return f"entry without {key}"
        if not isinstance(entry["message"], str):
            return "message is not a string"
        tags = dict(t.split(":", 1) for t in entry["ddtags"].split(","))
        missing = [t for t in DD_TAGS if t not in tags]
        if missing:
            return f"ddtags lack {missing}"
        ts = entry["timestamp"]
        if not isinstance(ts, int):
            return "timestamp is not epoch milliseconds"
        if ts < cutoff_ms:
            return f"timestamp {ts} is older than 18 h: Datadog would drop it"
        if "id" not in entry.get("evidence_keeper", {}):
            return "entry without its idempotency key"
        return None


class LokiIntake(Intake):
    path = "/loki/api/v1/push"

    def __init__(self, *, now: Callable[[], float] = time.time,
                 reject_old_samples_max_age_s: float | None = None,
                 token: str | None = None) -> None:
        super().__init__(now=now)
        self.max_age = reject_old_samples_max_age_s
        self.token = token
        self.entries: dict[tuple[str, int, str], int] = {}  # (labels, ts, line) -> times seen
        self.order: dict[str, list[tuple[int, str]]] = {}
        self.last_ts: dict[str, int] = {}

    def handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if self.token is not None and request.headers.get("Authorization") != (
                f"Bearer {self.token}"):
            return web.Response(status=401, text="no org id")
        if request.headers.get("Content-Type", "").split(";")[0] != "application/json":
            return self.violate("Content-Type is not application/json")
        data = self.body(request, raw)
        if data is None:
            return web.Response(status=400, text="bad gzip")
        try:
            doc = json.loads(data)
        except ValueError:
            return self.violate("body is not JSON")
        streams = doc.get("streams") if isinstance(doc, dict) else None
        if not isinstance(streams, list) or not streams:
            return self.violate("no streams")
        accepted: list[tuple[str, int, str]] = []
        for s in streams:
            problem = self._check_stream(s, accepted)
            if problem is not None:
                return problem
        for key, ts, line in accepted:
            k = (key, ts, line)
            if k not in self.entries:  # Loki drops an identical (labels, ts, line)
                self.order.setdefault(key, []).append((ts, line))
                self.last_ts[key] = ts
            self.entries[k] = self.entries.get(k, 0) + 1
        return web.Response(status=204)

    def _check_stream(self, s: Any, accepted: list[tuple[str, int, str]]
                      ) -> web.Response | None:
        labels = s.get("stream") if isinstance(s, dict) else None
        values = s.get("values") if isinstance(s, dict) else None
        if not isinstance(labels, dict) or set(labels) != LOKI_LABELS or not all(
                isinstance(v, str) and v for v in labels.values()):
            return self.violate(f"labels {labels} are not {sorted(LOKI_LABELS)}")
        if not isinstance(values, list) or not values:
            return self.violate("a stream without values")
        key = json.dumps(labels, sort_keys=True)
        last = self.last_ts.get(key, 0)
        for v in values:
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                    and v[0].isdigit() and isinstance(v[1], str)):
                return self.violate(f"value {str(v)[:80]} is not [\"<ns>\", \"<line>\"]")
            ts = int(v[0])
            if self.max_age is not None and ts < (self.now() - self.max_age) * 1e9:
                return web.Response(status=400, text=(
                    f"entry for stream '{key}' has timestamp too old: {ts},"
                    f" oldest acceptable timestamp is: {self.now() - self.max_age}"))
            if (key, ts, v[1]) not in self.entries:  # a known entry is a duplicate, dropped
                if ts < last:
                    return self.violate(f"entry out of order for stream {key}")
                last = ts
            accepted.append((key, ts, v[1]))
        return None


class OtlpIntake(Intake):
    path = "/v1/logs"

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        super().__init__(now=now)
        self.records: list[tuple[dict[str, Any], Any]] = []  # (resource attrs, LogRecord)

    def handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if request.headers.get("Content-Type") != "application/x-protobuf":
            return self.violate("Content-Type is not application/x-protobuf")
        data = self.body(request, raw)
        if data is None:
            return web.Response(status=400)
        req = ExportLogsServiceRequest()
        try:
            req.ParseFromString(data)
        except Exception:
            return self.violate("body is not an ExportLogsServiceRequest")
        for rl in req.resource_logs:
            attrs = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
            if not set(attrs) >= K8S_ATTRS:
                return self.violate(f"resource attributes {sorted(attrs)} lack k8s.*")
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    if not rec.time_unix_nano or not rec.observed_time_unix_nano:
                        return self.violate("a record without time or observed_time")
                    self.records.append((attrs, rec))
        return web.Response(body=ExportLogsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None
