"""Container log records back into lines: timestamp, stream and the exact message.

The store holds a stream's raw bytes (CONTRACT.md section 4); a sink wants one event per line.
:class:`LineParser` turns chunks of raw bytes into :data:`Line` tuples, in stream order:

* CRI ``<RFC3339Nano> <stdout|stderr> <P|F> <message>``: ``P`` (partial) records are joined
  with the records that follow on the same output stream up to the ``F`` record, into one
  message with the timestamp of its first record (what ``kubectl logs`` shows);
* Docker json-file ``{"log":…,"stream":…,"time":…}``: a ``log`` that does not end in a
  newline is a partial (Docker splits at 16 KiB) and is joined the same way; the final newline
  is not part of the message;
* anything else (a damaged record) is passed on as one line with the raw bytes as the message
  and the timestamp of the line before it, and counted (``unparsed``).

Bytes first, for speed: lines are found with ``bytes.find``, the CRI header is split with
``find`` and ``startswith`` (no regular expression per line), and timestamps are converted
with a cache keyed by their whole-second prefix, so a second's worth of lines costs one
``datetime`` call. The only per-line object is the tuple handed to the encoder. Message bytes
are kept as they are (invalid UTF-8 included); each sink's encoder decides how to escape them.

Order: lines leave in the order their last record was read, so stdout and stderr each keep
their own order (a partial stdout line does not hold back stderr lines written meanwhile).
Offsets are stream offsets: a line covers ``[start, end)``, from its first record's first byte
to its last record's newline, which is what replay checkpoints count.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Final

from evidence_keeper.formats import parse_ts

STDOUT: Final = 0
STDERR: Final = 1
STREAM_NAMES: Final = ("stdout", "stderr")

# (start, end, ts_ns, stream, message): one container log line.
Line = tuple[int, int, int, int, bytes]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class LineParser:
    """Feeds of raw stream bytes in, complete lines out (see the module docstring).

    ``feed`` takes the next bytes of the stream (starting at stream offset ``offset``) and
    returns the lines they complete; an unfinished last line is carried to the next ``feed``.
    ``finish`` flushes what is left at the end of the stream (a last line without a newline,
    partial records never finished).
    """

    def __init__(self, *, skip_first_line: bool = False) -> None:
        self._carry = b""
        self._carry_start = 0
        self._skip = skip_first_line  # a run starting mid-line: drop up to the first newline
        self._sec_cache: dict[bytes, int] = {}
        # per output stream: (first start, ts_ns, pieces) of a partial line being joined
        self._pending: list[tuple[int, int, list[bytes]] | None] = [None, None]
        self.last_ts = 0
        self.unparsed = 0
        self.partials_joined = 0

    # ------------------------------------------------------------------ timestamps
    def ts_ns(self, raw: bytes) -> int:
        """Nanoseconds since the epoch of an RFC3339(Nano) timestamp; -1 if it is not one."""
        n = len(raw)
        if n >= 20 and raw[n - 1] == 90 and raw[19:20] in (b".", b"Z"):  # ...Z, the CRI norm
            sec = self._sec_cache.get(raw[:19])
            if sec is None:
                try:
                    dt = datetime.strptime(raw[:19].decode("ascii"), "%Y-%m-%dT%H:%M:%S")
                except (ValueError, UnicodeDecodeError):
                    return -1
                sec = int((dt.replace(tzinfo=UTC) - _EPOCH).total_seconds())
                if len(self._sec_cache) > 4096:
                    self._sec_cache.clear()
                self._sec_cache[raw[:19]] = sec
            frac = raw[20:n - 1]
            if not frac:
                return sec * 1_000_000_000 if n == 20 else -1  # "…:00.Z" is not RFC 3339
            if len(frac) > 9 or not frac.isdigit():
                return -1
            return sec * 1_000_000_000 + int(frac.ljust(9, b"0"))
        ts = parse_ts(raw)  # offsets (+05:30) and other rare forms
        if ts is None:
            return -1
        return int((ts - _EPOCH).total_seconds()) * 1_000_000_000 + ts.microsecond * 1000

    # ------------------------------------------------------------------ feeding
    def feed(self, chunk: bytes, offset: int) -> list[Line]:
        out: list[Line] = []
        if self._carry:
            buf = self._carry + chunk
            base = self._carry_start
        else:
            buf = chunk
            base = offset
        pos = 0
        n = len(buf)
        if self._skip:
            nl = buf.find(b"\n")
            if nl < 0:
                self._carry, self._carry_start = b"", base + n
                return out
            pos = nl + 1
            self._skip = False
        pos = self._lines(buf, pos, base, out)
        self._carry = buf[pos:] if pos < n else b""
        self._carry_start = base + pos
        return out

    def _lines(self, buf: bytes, pos: int, base: int, out: list[Line]) -> int:
        """Complete lines of ``buf`` from ``pos``; returns where the unfinished rest starts.

        The common record, ``<ts>Z stdout|stderr F <message>`` with no partial line pending on
        its output stream and its second already in the cache, is handled inline; everything
        else goes through :meth:`_line`.
        """
        find, append, cache, pending = buf.find, out.append, self._sec_cache, self._pending
        n = len(buf)
        while pos < n:
            le = find(b"\n", pos)
            if le < 0:
                break
            sp = find(b" ", pos, le)
            if sp - pos >= 20 and buf[sp - 1] == 90 and (
                    buf.startswith(b" stdout F ", sp) or buf.startswith(b" stderr F ", sp)):
                st = 1 if buf[sp + 4] == 101 else 0  # std[e]rr / std[o]ut
                sec = cache.get(buf[pos:pos + 19])
                frac = buf[pos + 20:sp - 1]
                if (sec is not None and pending[st] is None and len(frac) <= 9
                        and (sp - pos == 20 or (buf[pos + 19] == 46 and frac.isdigit()))):
                    ts = sec * 1_000_000_000 + (int(frac.ljust(9, b"0")) if frac else 0)
                    self.last_ts = ts
                    append((base + pos, base + le + 1, ts, st, buf[sp + 10:le]))
                    pos = le + 1
                    continue
            self._line(buf, pos, le, base, out)
            pos = le + 1
        return pos

    def finish(self) -> list[Line]:
        """The last line without a newline, and partial lines never finished, as they are."""
        out: list[Line] = []
        if self._carry:
            buf, self._carry = self._carry, b""
            self._line(buf, 0, len(buf), self._carry_start, out, final=True)
        for st in (STDOUT, STDERR):
            pending = self._pending[st]
            if pending is not None:
                self._pending[st] = None
                start, ts, pieces = pending
                out.append((start, self._carry_start, ts, st, b"".join(pieces)))
        return out

    def _line(self, buf: bytes, pos: int, le: int, base: int, out: list[Line],
              final: bool = False) -> None:
        end = le + (0 if final else 1)
        if buf.startswith(b"{", pos):
            self._docker(buf[pos:le], base + pos, base + end, out)
            return
        sp = buf.find(b" ", pos, le)
        if sp > 0 and le - sp >= 9:
            if buf.startswith(b"stdout ", sp + 1):
                st = STDOUT
            elif buf.startswith(b"stderr ", sp + 1):
                st = STDERR
            else:
                st = -1
            tag = sp + 8
            if st >= 0 and buf[tag] in (70, 80) and (tag + 1 == le or buf[tag + 1] == 32):
                ts = self.ts_ns(buf[pos:sp])
                if ts >= 0:
                    self.last_ts = ts
                    self._emit(st, ts, buf[tag + 2:le] if tag + 1 < le else b"", buf[tag] == 80,
                               base + pos, base + end, out)
                    return
        self.unparsed += 1
        out.append((base + pos, base + end, self.last_ts, STDOUT, buf[pos:le]))

    def _docker(self, raw: bytes, start: int, end: int, out: list[Line]) -> None:
        try:
            obj = json.loads(raw)
            log = obj["log"]
            st = STDERR if obj.get("stream") == "stderr" else STDOUT
            ts = self.ts_ns(str(obj["time"]).encode("ascii"))
            if not isinstance(log, str) or ts < 0:
                raise ValueError("not a json-file record")
        except (ValueError, KeyError, TypeError, UnicodeEncodeError, AttributeError):
            self.unparsed += 1
            out.append((start, end, self.last_ts, STDOUT, raw))
            return
        self.last_ts = ts
        msg = log.encode("utf-8", "surrogateescape")
        partial = not msg.endswith(b"\n")
        self._emit(st, ts, msg if partial else msg[:-1], partial, start, end, out)

    def _emit(self, st: int, ts: int, msg: bytes, partial: bool, start: int, end: int,
              out: list[Line]) -> None:
        pending = self._pending[st]
        if partial:
            if pending is None:
                self._pending[st] = (start, ts, [msg])
            else:
                pending[2].append(msg)
            return
        if pending is None:
            out.append((start, end, ts, st, msg))
            return
        self._pending[st] = None
        first, first_ts, pieces = pending
        pieces.append(msg)
        self.partials_joined += 1
        out.append((first, end, first_ts, st, b"".join(pieces)))


def rfc3339_ns(ts_ns: int) -> str:
    """``2025-11-10T12:32:01.123456789Z`` from nanoseconds since the epoch."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def to_ns(ts: datetime) -> int:
    delta = ts.astimezone(UTC) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
