"""Search the store: which lines of a namespace's streams match a pattern, and where they are.

Reading only what can match:

* the key layout narrows the listing (namespace, the literal head of the pod glob) and the
  globs are matched on keys (:func:`~evidence_keeper.archive.manifest.list_scope`);
* with ``since``/``until``, segments are ``head``-ed for ``ek-first-ts``/``ek-last-ts`` and those
  that cannot overlap the window are skipped (``manifest.window_mask``);
* compressed bodies are fetched a few segments ahead by worker threads (at most
  :data:`PREFETCH_BYTES` of them), while the main thread decompresses one chunk at a time:
  memory holds a few segments, never a whole stream.

Hostile stores. Every body is fetched bounded by what its key's length can compress to and
decompressed bounded by that length (:mod:`evidence_keeper.archive.objects`): a decompression
bomb or a forged object is skipped with an error naming the key (``SearchStats.errors``; the
CLI prints each and exits 2, as grep does) and the search goes on with the next segment, so
one bad object hides no evidence elsewhere (lines of the bad segment scanned before the
error was found may have been reported). A line is
carried across segments at most :data:`MAX_LINE_BYTES` long; a longer one (kubelet splits
lines at 16 KiB, so only a forged store has them) is matched in pieces of that size.

Lines. A stream's lines are its bytes split at ``\\n``; a line may span segments (a size seal
in a line longer than a segment, an age seal mid-write), so the unfinished tail of one segment
is carried into the next, and at the end of a run of selected segments the next stored segment
is read up to its first newline to finish the line. A run that starts after a skipped
segment begins inside the skipped segment's last line, whose timestamp put it before the
window: that fragment counts only if it is a line of its own (it parses with a timestamp).

Matching is on the *message*, as ``kubectl logs`` and ``stern`` show it: CRI lines after
``<ts> <stream> <P|F>``, Docker lines the decoded ``log`` field without its newline. Per-line
Python work would not reach the throughput goal, so a *prefilter* scans the raw bytes at C
speed: the pattern itself for ``--fixed-strings``, else the longest literal every regex match
must contain. Only lines containing it are parsed and matched exactly. Docker's JSON escaping
changes ``"``, ``\\``, ``<``, ``>``, ``&`` and control characters, so the prefilter literal
never contains those; a pattern without a usable literal is matched line by line (slower,
still exact).
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from evidence_keeper.archive.manifest import (
    HEAD_WORKERS,
    Listing,
    Scope,
    StoredKey,
    list_scope,
    select_segments,
)
from evidence_keeper.archive.objects import (
    SegmentError,
    claimed_length,
    full_key,
    get_bounded,
    segment_chunks,
)
from evidence_keeper.formats import line_message, line_ts
from evidence_keeper.model import StreamId
from evidence_keeper.store import Store
from evidence_keeper.store.codec import compressed_bound
from evidence_keeper.timefmt import rfc3339_or_none

CHUNK: Final = 4 << 20  # decompressed bytes handed to the scanner at a time
PREFETCH: Final = 4  # compressed segments fetched ahead
PREFETCH_BYTES: Final = 64 << 20  # ... and at most this much compressed data (bounds)
MAX_LINE_BYTES: Final = 64 << 20  # a longer partial line is matched in pieces


class SearchError(Exception):
    """A segment that cannot be searched (a forged or damaged object); names its key."""
_CRI_HEAD: Final = re.compile(
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d) (?:stdout|stderr) [PF] ")
# Bytes Docker's json-file encoding (and Go's HTML-safe escaping) can rewrite.
_UNSAFE: Final = frozenset(b'"\\<>&') | frozenset(range(0x20)) | {0x7F}


class PatternError(ValueError):
    pass


class Matcher:
    """A pattern matched against line messages, with a raw-bytes prefilter."""

    def __init__(self, pattern: str, *, fixed: bool = False, ignore_case: bool = False) -> None:
        raw = pattern.encode("utf-8", "surrogateescape")
        if not raw:
            raise PatternError("the pattern is empty")
        if b"\n" in raw and fixed:
            raise PatternError("a fixed string cannot contain a newline (lines never do)")
        flags = re.IGNORECASE if ignore_case else 0
        try:
            self._rx = re.compile(re.escape(raw) if fixed else raw, flags)
        except re.error as exc:
            raise PatternError(f"invalid regular expression: {exc}") from None
        literal, nocase = (raw, ignore_case) if fixed else _required_literal(raw, flags)
        literal = max(_safe_pieces(literal), key=len, default=b"")
        self.fixed = fixed
        self.literal = literal
        self._needle: bytes | None = literal if literal and not nocase else None
        self._prefilter = (re.compile(re.escape(literal), re.IGNORECASE)
                           if literal and nocase else None)
        self._plain = raw if fixed and not ignore_case else None

    def find(self, buf: bytes, start: int, end: int) -> int:
        """Position of the next possible match in ``buf[start:end]``, or -1."""
        if self._needle is not None:
            return buf.find(self._needle, start, end)
        if self._prefilter is not None:
            m = self._prefilter.search(buf, start, end)
            return -1 if m is None else m.start()
        return start if start < end else -1

    def message(self, line: bytes) -> bytes | None:
        """The line's message if it matches, else None."""
        msg = message_of(line)
        if self._plain is not None:
            return msg if self._plain in msg else None
        return msg if self._rx.search(msg) else None


def message_of(line: bytes) -> bytes:
    """What the container printed: :func:`~evidence_keeper.formats.line_message`, with the
    CRI header recognised by a regular expression alone (no date parsing on the hot path) and
    the newline of a Docker ``log`` field dropped."""
    m = _CRI_HEAD.match(line)
    if m is not None:
        return line[m.end():]
    msg = line_message(line)
    if line.startswith(b"{") and msg.endswith(b"\n"):
        msg = msg[:-1]
    return msg


def _required_literal(raw: bytes, flags: int) -> tuple[bytes, bool]:
    """The longest run of literal bytes every match of ``raw`` contains, and its case mode."""
    try:
        import re._parser as sre  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - a future Python moved it: no prefilter
        return b"", False
    try:
        parsed: Any = sre.parse(raw, flags)
    except Exception:
        return b"", False
    best: list[int] = []
    run: list[int] = []

    def walk(items: Any) -> None:
        nonlocal run, best
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                run.append(int(av))
                continue
            if name == "SUBPATTERN" and not av[1] and not av[2]:
                walk(av[3])  # a plain group is concatenation
                continue
            best = max(best, run, key=len)
            run = []

    walk(parsed)
    best = max(best, run, key=len)
    nocase = bool(parsed.state.flags & re.IGNORECASE)
    return bytes(best), nocase


def _safe_pieces(literal: bytes) -> list[bytes]:
    pieces: list[bytes] = []
    cur = bytearray()
    for b in literal:
        if b in _UNSAFE:
            if cur:
                pieces.append(bytes(cur))
            cur = bytearray()
        else:
            cur.append(b)
    if cur:
        pieces.append(bytes(cur))
    return pieces


@dataclass(frozen=True, slots=True)
class Hit:
    stream: StreamId
    offset: int  # stream offset of the line's first byte
    line: bytes  # the raw line, without its newline
    message: bytes
    key: str  # the segment holding the line's first byte

    @property
    def ts(self) -> datetime | None:
        return line_ts(self.line)


@dataclass
class SearchStats:
    streams: int = 0
    segments: int = 0  # read
    segments_total: int = 0  # in the scope by key
    skipped: int = 0  # skipped by their time range
    bytes: int = 0  # raw bytes scanned
    bytes_total: int = 0  # raw bytes of the segments to read
    matches: int = 0
    split_lines: int = 0  # lines longer than MAX_LINE_BYTES, matched in pieces
    errors: list[str] = field(default_factory=list)  # segments that could not be searched
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True, slots=True)
class _Run:
    stream: StreamId
    segments: tuple[StoredKey, ...]
    lead_check: bool  # starts inside a skipped segment's last line
    follow: StoredKey | None  # the stored segment right after the run (to finish a line)


def _plan(listing: Listing, selected: set[str] | None) -> list[_Run]:
    out: list[_Run] = []
    for sid in sorted(listing.streams):
        keys = listing.streams[sid]
        i = 0
        while i < len(keys):
            if selected is not None and keys[i][0] not in selected:
                i += 1
                continue
            j = i
            while (j + 1 < len(keys) and keys[j + 1][1].offset == keys[j][1].end
                   and (selected is None or keys[j + 1][0] in selected)):
                j += 1
            lead = i > 0 and keys[i - 1][1].end == keys[i][1].offset
            follow = keys[j + 1] if j + 1 < len(keys) and (
                keys[j + 1][1].offset == keys[j][1].end) else None
            out.append(_Run(sid, tuple(keys[i:j + 1]), lead, follow))
            i = j + 1
    return out


def _fetch(store: Store, stored: StoredKey) -> bytes:
    """A segment's compressed body, refused when larger than its length can compress to."""
    key, sk = stored
    length = sk.end - sk.offset
    try:
        claimed_length(key, length, None)
        return get_bounded(store, key, limit=compressed_bound(length))
    except SegmentError as exc:
        raise SearchError(str(exc).replace(key, full_key(store, key), 1)) from None


def _chunks(store: Store, stored: StoredKey, body: bytes) -> Iterator[bytes]:
    """Decompressed bytes of one segment body, ``CHUNK`` at a time, bounded by its length."""
    key, sk = stored
    try:
        yield from segment_chunks(store, key, ext=sk.ext, length=sk.end - sk.offset,
                                  body=body, chunk=CHUNK)
    except SegmentError as exc:
        raise SearchError(str(exc).replace(key, full_key(store, key), 1)) from None


@dataclass
class _Carry:
    """The unfinished line carried between chunks and segments of a run."""

    base: int  # stream offset of the first carried byte
    lead: bool  # the first line may be the tail of a line before the run
    pieces: list[bytes] = field(default_factory=list)
    carried: int = 0


class Searcher:
    def __init__(self, store: Store, matcher: Matcher, *, since: datetime | None = None,
                 until: datetime | None = None, emit: Callable[[Hit], None],
                 progress: Callable[[SearchStats], None] | None = None,
                 workers: int = PREFETCH) -> None:
        self.store = store
        self.matcher = matcher
        self.since = since
        self.until = until
        self.emit = emit
        self.progress = progress
        self.workers = workers
        self.stats = SearchStats()
        self._run: _Run
        self._starts: list[int] = []

    # ----------------------------------------------------------------- driving
    def run(self, runs: list[_Run]) -> SearchStats:
        self.stats.streams = len({r.stream for r in runs})
        self.stats.bytes_total = sum(sk.end - sk.offset for r in runs for _, sk in r.segments)
        depth = max(1, self.workers)
        pending = deque(stored for r in runs for stored in r.segments)
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="ek-search") as pool:
            ahead: deque[tuple[int, Future[bytes]]] = deque()

            def fill() -> None:
                held = sum(size for size, _ in ahead)
                while pending and len(ahead) < depth:
                    size = compressed_bound(pending[0][1].end - pending[0][1].offset)
                    if ahead and held + size > PREFETCH_BYTES:
                        return
                    held += size
                    ahead.append((size, pool.submit(_fetch, self.store, pending.popleft())))

            def bodies(run: _Run) -> Iterator[tuple[StoredKey, Future[bytes]]]:
                for stored in run.segments:
                    _size, future = ahead.popleft()
                    fill()
                    yield stored, future

            fill()
            for run in runs:
                fetched = bodies(run)
                try:
                    self._scan_run(run, fetched)
                except SearchError as exc:  # the line's end (the next segment) is bad
                    self.stats.errors.append(str(exc))
                    for _ in fetched:
                        pass
        return self.stats

    def _scan_run(self, run: _Run, bodies: Iterator[tuple[StoredKey, Future[bytes]]]) -> None:
        self._run = run
        self._starts = [sk.offset for _, sk in run.segments]
        c = _Carry(base=run.segments[0][1].offset, lead=run.lead_check)
        for stored, fetched in bodies:
            try:
                for chunk in _chunks(self.store, stored, fetched.result()):
                    self._feed(c, chunk)
            except SearchError as exc:
                # Skip the bad segment: its partial line ends here, the next one starts
                # anew (inside a line, as after a segment skipped by time).
                self.stats.errors.append(str(exc))
                self._flush(c)
                c = _Carry(base=stored[1].end, lead=True)
            self.stats.segments += 1
            if self.progress is not None:
                self.progress(self.stats)
        if c.carried and run.follow is not None:
            rest = self._until_newline(run.follow)
            c.pieces.append(rest)
            c.carried += len(rest)
        self._flush(c)

    def _feed(self, c: _Carry, chunk: bytes) -> None:
        """Scan the complete lines of ``chunk`` (after what is carried); carry the rest."""
        self.stats.bytes += len(chunk)
        nl = chunk.rfind(b"\n")
        if nl < 0:
            c.pieces.append(chunk)
            c.carried += len(chunk)
            if c.carried >= MAX_LINE_BYTES:  # match it in pieces (bounded memory)
                self._flush(c)
                self.stats.split_lines += 1
            return
        buf = b"".join([*c.pieces, chunk]) if c.pieces else chunk
        end = c.carried + nl + 1
        self._scan(buf, end, c.base, c.lead)
        c.lead = False
        c.pieces = [buf[end:]] if end < len(buf) else []
        c.carried = len(buf) - end
        c.base += end

    def _flush(self, c: _Carry) -> None:
        """Match what is carried as a line of its own."""
        if c.carried:
            buf = b"".join(c.pieces) + b"\n"
            self._scan(buf, len(buf), c.base, c.lead)
            c.lead = False
            c.base += c.carried
        c.pieces, c.carried = [], 0

    def _until_newline(self, stored: StoredKey) -> bytes:
        """The start of a segment up to (not including) its first newline."""
        out: list[bytes] = []
        size = 0
        for chunk in _chunks(self.store, stored, _fetch(self.store, stored)):
            nl = chunk.find(b"\n")
            if nl >= 0:
                out.append(chunk[:nl])
                break
            out.append(chunk)
            size += len(chunk)
            if size >= MAX_LINE_BYTES:
                break
        return b"".join(out)

    # ----------------------------------------------------------------- scanning
    def _scan(self, buf: bytes, end: int, base: int, lead: bool) -> None:
        """Match the complete lines of ``buf[:end]`` (which ends with a newline)."""
        m = self.matcher
        pos = 0
        if lead:
            first_end = buf.index(b"\n", 0, end)
            line = buf[:first_end]
            if line_ts(line) is not None:
                self._check(line, base)
            pos = first_end + 1
        while pos < end:
            i = m.find(buf, pos, end)
            if i < 0:
                return
            j = buf.rfind(b"\n", pos, i)
            ls = pos if j < 0 else j + 1
            le = buf.index(b"\n", i, end)
            self._check(buf[ls:le], base + ls)
            pos = le + 1

    def _check(self, line: bytes, offset: int) -> None:
        msg = self.matcher.message(line)
        if msg is None:
            return
        if self.since is not None or self.until is not None:
            ts = line_ts(line)
            if ts is not None and ((self.since is not None and ts < self.since)
                                   or (self.until is not None and ts > self.until)):
                return
        self.stats.matches += 1
        seg = self._run.segments[bisect.bisect_right(self._starts, offset) - 1][0]
        self.emit(Hit(stream=self._run.stream, offset=offset, line=line, message=msg, key=seg))


def search(store: Store, matcher: Matcher, *, cluster: str, scope: Scope,
           emit: Callable[[Hit], None], progress: Callable[[SearchStats], None] | None = None,
           workers: int = PREFETCH, head_workers: int = HEAD_WORKERS) -> SearchStats:
    """Every line of the scope whose message matches, in stream and offset order."""
    started = time.monotonic()
    listing = list_scope(store, cluster=cluster, scope=scope)
    selected: set[str] | None = None
    total = listing.segment_count()
    if scope.since is not None or scope.until is not None:
        sel = select_segments(store, cluster=cluster, scope=scope, listing=listing,
                              workers=head_workers)
        selected = {e.key for e in sel.segments}
    searcher = Searcher(store, matcher, since=scope.since, until=scope.until, emit=emit,
                        progress=progress, workers=workers)
    searcher.stats.started = started
    searcher.stats.segments_total = total
    searcher.stats.skipped = total - (len(selected) if selected is not None else total)
    return searcher.run(_plan(listing, selected))


def format_text(hit: Hit) -> bytes:
    """``pod container │ message``, as stern prints it (the message bytes as they are)."""
    return f"{hit.stream.pod} {hit.stream.container} │ ".encode() + hit.message + b"\n"


def format_json(hit: Hit) -> bytes:
    """One JSON object; bytes that are not UTF-8 become ``\\udcXX`` escapes (lossless)."""
    s, ts = hit.stream, hit.ts
    return json.dumps({
        "namespace": s.namespace, "pod": s.pod, "pod_uid": s.pod_uid, "container": s.container,
        "restart": s.restart, "offset": hit.offset,
        "ts": rfc3339_or_none(ts),
        "message": hit.message.decode("utf-8", "surrogateescape"), "key": hit.key,
    }).encode() + b"\n"
