"""Lines into each sink's wire format, in batches that respect the sink's limits.

An :class:`Encoder` takes one stream's lines in order and cuts them into :class:`Batch`es; a
batch carries its request body, how many lines and raw bytes it holds, and the stream ranges
``[start, end)`` of those lines (what the checkpoint records once the sink acknowledged it).

* **Datadog** (HTTP logs intake v2): a JSON array of at most 1000 entries and 5 MB
  (uncompressed), each entry at most 1 MB (a longer message is split into parts that say so),
  gzip. Lines older than the intake's 18 h window go to *archive batches* instead: Datadog's
  log-archive format (gzipped NDJSON, one object per line, one object per hour of timestamps,
  ``dt=YYYYMMDD/hour=HH/archive_*.json.gz``), for Log Rehydration. Object names are functions of the
  stream and its offsets, so a rewrite after a crash replaces the object with the same bytes.
* **Loki** (push API, JSON): one Loki stream per output stream (labels namespace, pod,
  container, node, stream), nanosecond timestamps as strings, lines in timestamp order. A
  timestamp that goes backwards is raised to its predecessor (never re-ordered; counted) so an
  ordered Loki accepts the batch; identical (labels, timestamp, line) are deduplicated by Loki,
  which makes a resent batch harmless.
* **OTLP/HTTP** (``/v1/logs``, protobuf): resource attributes ``k8s.*``; ``time_unix_nano`` is
  the line's timestamp, ``observed_time_unix_nano`` when the agent had it (see
  :class:`StreamContext`); a message that is not UTF-8 travels exactly, as ``bytes_value``.

Invalid UTF-8 in the JSON sinks: the message is decoded with ``backslashreplace`` (each bad
byte becomes the four characters ``\\xNN``), the entry is flagged (Datadog attribute
``evidence_keeper.invalid_utf8``) and counted. Every entry carries an idempotency key
``<namespace>/<pod>_<uid>/<container>/<restart>@<offset>`` (Datadog attribute
``evidence_keeper.id``, OTLP attribute ``log.record.uid``) so a duplicate can always be told.
"""

from __future__ import annotations

import abc
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Final, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from evidence_keeper.model import StreamId
from evidence_keeper.replay.parsing import STREAM_NAMES, Line

DD_MAX_ENTRIES: Final = 1000
DD_MAX_REQUEST: Final = 5_000_000
DD_MAX_ENTRY: Final = 1_000_000
DD_PART_BYTES: Final = 900_000  # message bytes per part of a split entry (room for the rest)
ARCHIVE_MAX_BYTES: Final = 64 << 20  # uncompressed NDJSON per archive object
LOKI_MAX_REQUEST: Final = 1 << 20
LOKI_MAX_LINES: Final = 5000
OTLP_MAX_REQUEST: Final = 4 << 20
OTLP_MAX_LINES: Final = 5000
SERVICE_LABELS: Final = ("tags.datadoghq.com/service", "app.kubernetes.io/name", "app",
                         "k8s-app")
_SEC: Final = 1_000_000_000


@dataclass
class StreamContext:
    """What a sink is told about a stream besides its lines."""

    stream: StreamId
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    extra_tags: tuple[tuple[str, str], ...] = ()
    observed_ns: int = 0  # capture time, as far as the store tells it (set per segment)

    @property
    def service(self) -> str:
        for key in SERVICE_LABELS:
            if self.labels.get(key):
                return self.labels[key]
        return self.stream.container

    @property
    def source(self) -> str:
        return self.labels.get("tags.datadoghq.com/source") or self.stream.container

    def line_id(self, offset: int) -> str:
        s = self.stream
        return f"{s.namespace}/{s.pod}_{s.pod_uid}/{s.container}/{s.restart}@{offset}"


@dataclass
class Batch:
    """One request (or one archive object) and the lines it carries."""

    kind: str  # "intake" | "archive"
    body: bytes = b""
    lines: int = 0
    raw_bytes: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    key: str = ""  # archive object key
    parts: list[str] = field(default_factory=list)  # Datadog entries, to split on a 413
    content_type: str = "application/json"

    def cover(self, start: int, end: int) -> None:
        self.lines += 1
        self.raw_bytes += end - start
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], end)
        else:
            self.ranges.append((start, end))


@dataclass
class Counters:
    invalid_utf8: int = 0
    clamped_ts: int = 0
    split_entries: int = 0


class Encoder(Protocol):
    counters: Counters

    def add(self, line: Line) -> list[Batch]:
        """Take one line; return the batches it completed (usually none)."""
        ...

    def add_lines(self, lines: list[Line]) -> list[Batch]:
        """:meth:`add` for each line, in order."""
        ...

    def flush(self) -> list[Batch]:
        """The batches still open."""
        ...


class _LineByLine(abc.ABC):
    """:meth:`add_lines` as :meth:`add` for each line (an encoder with no faster path)."""

    @abc.abstractmethod
    def add(self, line: Line) -> list[Batch]: ...

    def add_lines(self, lines: list[Line]) -> list[Batch]:
        out: list[Batch] = []
        for line in lines:
            out += self.add(line)
        return out


def gzip_bytes(data: bytes, level: int = 1) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def _utf8(msg: bytes) -> bool:
    try:
        msg.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def decode_message(msg: bytes, counters: Counters) -> tuple[str, bool]:
    try:
        return msg.decode("utf-8"), False
    except UnicodeDecodeError:
        counters.invalid_utf8 += 1
        return msg.decode("utf-8", "backslashreplace"), True


class _IsoSeconds:
    """``YYYY-MM-DDTHH:MM:SS`` per whole second, cached (lines come in bursts per second)."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def __call__(self, sec: int) -> str:
        text = self._cache.get(sec)
        if text is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cache[sec] = text
        return text


# ------------------------------------------------------------------------------ Datadog
class DatadogEncoder:
    """Datadog intake batches for recent lines, archive objects for those before ``cutoff_ns``."""

    def __init__(self, ctx: StreamContext, *, cutoff_ns: int, archive: bool,
                 max_entries: int = DD_MAX_ENTRIES, max_request: int = DD_MAX_REQUEST) -> None:
        self.ctx = ctx
        self.cutoff_ns = cutoff_ns
        self.archive = archive
        self.max_entries = max_entries
        self.max_request = max_request
        self.counters = Counters()
        self._iso = _IsoSeconds()
        s = ctx.stream
        tags = [("kube_namespace", s.namespace), ("pod_name", s.pod),
                ("kube_container_name", s.container), ("host", ctx.node),
                ("source", ctx.source), ("service", ctx.service), *ctx.extra_tags]
        self.tags = ",".join(f"{k}:{v}" for k, v in tags)
        self._tag_list = [f"{k}:{v}" for k, v in tags]
        # Entries are pure ASCII (non-ASCII as ``\\u`` escapes), so a string's length is its size.
        enc = encode_basestring_ascii
        common = (f'"ddsource":{enc(ctx.source)},"ddtags":{enc(self.tags)},'
                  f'"hostname":{enc(ctx.node)},"service":{enc(ctx.service)}')
        self._head = "{" + common + ',"status":'
        self._id_prefix = enc(ctx.line_id(0))[1:-3]  # without the quote and "@0"
        # Everything of an entry before the line's offset, per output stream (the fast path).
        self._heads = [f'{self._head}"{status}","evidence_keeper":{{"stream":"{name}","id":"'
                       f"{self._id_prefix}@" for status, name in (("info", "stdout"),
                                                                  ("error", "stderr"))]
        self._intake = Batch("intake")
        self._intake_size = 2
        self._arch: Batch | None = None
        self._arch_hour = -1
        self._arch_lines: list[str] = []
        self._arch_size = 0

    # ---------------------------------------------------------------- intake
    def add_lines(self, lines: list[Line]) -> list[Batch]:
        """:meth:`add` for many lines: the hot path, one f-string per line, no other object."""
        out: list[Batch] = []
        heads, iso, enc, cutoff = self._heads, self._iso, encode_basestring_ascii, self.cutoff_ns
        max_entries, max_request = self.max_entries, self.max_request
        for line in lines:
            start, end, ts, st, msg = line
            if (ts < cutoff and self.archive) or (not msg.isascii() and not _utf8(msg)):
                out += self.add(line)  # the archive path, or invalid UTF-8: escaped, flagged
                continue
            sec, ns = divmod(ts, _SEC)
            entry = (f'{heads[st]}{start}","time":"{iso(sec)}.{ns:09d}Z"}},"message":'
                     f'{enc(msg.decode())},"timestamp":{ts // 1_000_000}}}')
            n = len(entry)
            if n > DD_MAX_ENTRY:
                out += self.add(line)
                continue
            batch = self._intake
            if batch.parts and (len(batch.parts) >= max_entries
                                or self._intake_size + n + 1 > max_request):
                out.append(self._close_intake())
                batch = self._intake
            batch.parts.append(entry)
            self._intake_size += n + 1
            batch.cover(start, end)
        return out

    def add(self, line: Line) -> list[Batch]:
        start, end, ts, st, msg = line
        if ts < self.cutoff_ns and self.archive:
            return self._add_archive(line)
        text, bad = decode_message(msg, self.counters)
        out: list[Batch] = []
        for entry in self._entries(start, ts, st, text, bad):
            if self._intake.parts and (len(self._intake.parts) >= self.max_entries
                                       or self._intake_size + len(entry) + 1 > self.max_request):
                out.append(self._close_intake())
            self._intake.parts.append(entry)
            self._intake_size += len(entry) + 1
        self._intake.cover(start, end)
        return out

    def _entries(self, start: int, ts: int, st: int, text: str, bad: bool) -> list[str]:
        sec, ns = divmod(ts, _SEC)
        iso = f"{self._iso(sec)}.{ns:09d}Z"
        status = '"error"' if st else '"info"'
        ek = (f'"evidence_keeper":{{"id":"{self._id_prefix}@{start}","stream":'
              f'"{STREAM_NAMES[st]}","time":"{iso}"' + (',"invalid_utf8":true' if bad else ""))
        tail = f',"timestamp":{ts // 1_000_000}}}'
        entry = (f"{self._head}{status},{ek}}},\"message\":{encode_basestring_ascii(text)}{tail}")
        if len(entry) <= DD_MAX_ENTRY:
            return [entry]
        pieces = _split_text(text, DD_PART_BYTES)
        self.counters.split_entries += 1
        return [f"{self._head}{status},{ek},\"part\":{i + 1},\"parts\":{len(pieces)}}},"
                f"\"message\":{encode_basestring_ascii(p)}{tail}" for i, p in enumerate(pieces)]

    def _close_intake(self) -> Batch:
        b = self._intake
        b.body = gzip_bytes(("[" + ",".join(b.parts) + "]").encode("ascii"))
        self._intake = Batch("intake")
        self._intake_size = 2
        return b

    # ---------------------------------------------------------------- archive
    def _add_archive(self, line: Line) -> list[Batch]:
        start, end, ts, st, msg = line
        hour = ts // (3600 * _SEC)
        out: list[Batch] = []
        if self._arch is not None and (hour != self._arch_hour
                                       or self._arch_size > ARCHIVE_MAX_BYTES):
            out.append(self._close_archive())
        if self._arch is None:
            self._arch = Batch("archive", content_type="application/gzip")
            self._arch_hour = hour
            self._arch_first = (start, ts)
        text, bad = decode_message(msg, self.counters)
        sec, ns = divmod(ts, _SEC)
        attrs: dict[str, object] = {"evidence_keeper": {
            "id": self.ctx.line_id(start), "stream": STREAM_NAMES[st],
            "time": f"{self._iso(sec)}.{ns:09d}Z", **({"invalid_utf8": True} if bad else {})}}
        doc = {"_id": hashlib.sha256(self.ctx.line_id(start).encode()).hexdigest()[:32],
               "date": f"{self._iso(sec)}.{ns // 1_000_000:03d}Z", "host": self.ctx.node,
               "source": self.ctx.source, "service": self.ctx.service,
               "status": "error" if st else "info", "message": text, "attributes": attrs,
               "tags": self._tag_list}
        row = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        self._arch_lines.append(row)
        self._arch_size += len(row) + 1
        self._arch.cover(start, end)
        return out

    def _close_archive(self) -> Batch:
        b = self._arch
        assert b is not None
        first_start, first_ts = self._arch_first
        when = datetime.fromtimestamp(first_ts // _SEC, UTC)
        digest = hashlib.sha256(f"{self.ctx.line_id(first_start)}-{b.ranges[-1][1]}".encode())
        h = digest.hexdigest()
        uid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        b.key = (f"dt={when:%Y%m%d}/hour={when:%H}/archive_{when:%H%M%S}."
                 f"{(first_ts // 100_000) % 10000:04d}.{uid}.json.gz")
        b.body = gzip_bytes(("\n".join(self._arch_lines) + "\n").encode("utf-8"), 6)
        self._arch, self._arch_lines, self._arch_size = None, [], 0
        return b

    def flush(self) -> list[Batch]:
        out = []
        if self._intake.parts:
            out.append(self._close_intake())
        if self._arch is not None:
            out.append(self._close_archive())
        return out


def split_datadog(batch: Batch) -> list[Batch]:
    """Halve a Datadog intake batch the intake refused as too large (413)."""
    if len(batch.parts) < 2:
        return [batch]
    half = len(batch.parts) // 2
    out = []
    for parts in (batch.parts[:half], batch.parts[half:]):
        b = Batch("intake", parts=parts)
        b.body = gzip_bytes(("[" + ",".join(parts) + "]").encode("utf-8"))
        out.append(b)
    # The lines' ranges go with the second half: they count as delivered only when both are.
    out[0].lines = 0
    out[1].lines, out[1].raw_bytes, out[1].ranges = batch.lines, batch.raw_bytes, batch.ranges
    return out


def _split_text(text: str, limit: int) -> list[str]:
    """Pieces of ``text`` of at most ``limit`` UTF-8 bytes each, even fully escaped."""
    step = max(1, limit // 12)  # worst case: \\ud83d\\ude00 for one character
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


# ------------------------------------------------------------------------------ Loki
class LokiEncoder(_LineByLine):
    def __init__(self, ctx: StreamContext, *, max_request: int = LOKI_MAX_REQUEST,
                 max_lines: int = LOKI_MAX_LINES) -> None:
        self.ctx = ctx
        self.max_request = max_request
        self.max_lines = max_lines
        self.counters = Counters()
        s = ctx.stream
        base = {"namespace": s.namespace, "pod": s.pod, "container": s.container,
                "node": ctx.node, **dict(ctx.extra_tags)}
        self._labels = [json.dumps({**base, "stream": name}, sort_keys=True)
                        for name in STREAM_NAMES]
        self._values: list[list[str]] = [[], []]
        self._prev = [0, 0]
        self._size = 0
        self._batch = Batch("intake")

    def add(self, line: Line) -> list[Batch]:
        start, end, ts, st, msg = line
        if ts < self._prev[st]:
            ts = self._prev[st]  # never re-ordered: raised to its predecessor's time
            self.counters.clamped_ts += 1
        self._prev[st] = ts
        text, _bad = decode_message(msg, self.counters)
        value = f'["{ts}",{encode_basestring(text)}]'
        out: list[Batch] = []
        if self._batch.lines and (self._batch.lines >= self.max_lines
                                  or self._size + len(value) > self.max_request):
            out.append(self._close())
        self._values[st].append(value)
        self._size += len(value) + 1
        self._batch.cover(start, end)
        return out

    def _close(self) -> Batch:
        streams = [f'{{"stream":{self._labels[st]},"values":[{",".join(vals)}]}}'
                   for st, vals in enumerate(self._values) if vals]
        b = self._batch
        b.body = gzip_bytes(('{"streams":[' + ",".join(streams) + "]}").encode("utf-8"))
        self._batch, self._values, self._size = Batch("intake"), [[], []], 0
        return b

    def flush(self) -> list[Batch]:
        return [self._close()] if self._batch.lines else []


# ------------------------------------------------------------------------------ OTLP
def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


class OtlpEncoder(_LineByLine):
    def __init__(self, ctx: StreamContext, *, version: str = "",
                 max_request: int = OTLP_MAX_REQUEST, max_lines: int = OTLP_MAX_LINES) -> None:
        self.ctx = ctx
        self.version = version
        self.max_request = max_request
        self.max_lines = max_lines
        self.counters = Counters()
        s = ctx.stream
        self._resource = [
            _kv("k8s.namespace.name", s.namespace), _kv("k8s.pod.name", s.pod),
            _kv("k8s.pod.uid", s.pod_uid), _kv("k8s.container.name", s.container),
            _kv("k8s.container.restart_count", s.restart), _kv("k8s.node.name", ctx.node),
            _kv("service.name", ctx.service),
            *(_kv(k, v) for k, v in ctx.extra_tags)]
        self._new()

    def _new(self) -> None:
        self._batch = Batch("intake", content_type="application/x-protobuf")
        self._records: list[LogRecord] = []
        self._size = 0

    def add(self, line: Line) -> list[Batch]:
        start, end, ts, st, msg = line
        out: list[Batch] = []
        if self._records and (len(self._records) >= self.max_lines
                              or self._size + len(msg) > self.max_request):
            out.append(self._close())
        try:
            body = AnyValue(string_value=msg.decode("utf-8"))
        except UnicodeDecodeError:
            self.counters.invalid_utf8 += 1
            body = AnyValue(bytes_value=msg)  # exact: protobuf strings must be UTF-8
        rec = LogRecord(time_unix_nano=ts, observed_time_unix_nano=max(self.ctx.observed_ns, ts),
                        body=body, attributes=[_kv("log.iostream", STREAM_NAMES[st]),
                                               _kv("log.record.uid", self.ctx.line_id(start))])
        self._records.append(rec)
        self._size += len(msg) + 64
        self._batch.cover(start, end)
        return out

    def _close(self) -> Batch:
        req = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
            resource=Resource(attributes=self._resource),
            scope_logs=[ScopeLogs(scope=InstrumentationScope(name="evidence-keeper",
                                                             version=self.version),
                                  log_records=self._records)])])
        b = self._batch
        b.body = gzip_bytes(req.SerializeToString())
        self._new()
        return b

    def flush(self) -> list[Batch]:
        return [self._close()] if self._records else []
