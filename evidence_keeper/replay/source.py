"""Which stored segments a replay reads, and their bytes, decompressed within bounds.

Planning uses the archive layer's scope machinery: the key layout narrows the listing
(namespace, pod and container globs), and with a time window segments are ``head``-ed for
``ek-first-ts``/``ek-last-ts`` and skipped when they cannot hold a line of the window
(:func:`~evidence_keeper.archive.manifest.select_segments`). Without ``--namespace`` every
namespace of the cluster is listed. A *run* is a list of contiguous segments of one stream; a
run that starts right after a stored segment the window skipped starts inside that segment's
last line, which is dropped (its timestamp put it before the window).

Reading: each body is decompressed as a stream, never to more than its ``ek-length`` (the
key's range, a hard cap); a longer or shorter body, or one whose SHA-256 differs from
``ek-sha256``, is an error naming the object: replaying something other than the evidence
would be a false record. (The bounded decompression of ``store/codec.py`` is being added on
another branch; this local one should be folded into it.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from evidence_keeper.archive.export import store_namespaces
from evidence_keeper.archive.manifest import (
    Listing,
    Scope,
    SegmentEntry,
    list_scope,
    select_segments,
)
from evidence_keeper.model import StreamId
from evidence_keeper.store import Store
from evidence_keeper.store.codec import BodyError, decompressed_chunks
from evidence_keeper.timefmt import parse_rfc3339

CHUNK: Final = 1 << 20


class SourceError(Exception):
    """A stored object that cannot be replayed as it is (one line naming it)."""


@dataclass
class Run:
    segments: list[SegmentEntry]
    # The stored segment just before the run that the window skipped, if any: the run may
    # start inside its last line (or inside a partial line it began). It is read only to
    # find where the run's first line starts; none of its lines is replayed.
    context: SegmentEntry | None = None


@dataclass
class StreamPlan:
    stream: StreamId
    runs: list[Run] = field(default_factory=list)
    node: str = ""

    @property
    def stored_bytes(self) -> int:
        return sum(e.length for r in self.runs for e in r.segments)


def plan(store: Store, *, cluster: str, namespace: str | None,
         namespaces: tuple[str, ...] | None = None, pod: str | None = None,
         container: str | None = None, since: datetime | None = None,
         until: datetime | None = None, node: str | None = None,
         streams: set[str] | None = None) -> list[StreamPlan]:
    """The streams of the scope, each with its runs of segments that can hold window lines.

    ``node`` keeps segments written by that node (``ek-node``); ``streams`` keeps only these
    stream keys (:attr:`StreamId.key`).
    """
    out: list[StreamPlan] = []
    listed = ([namespace] if namespace else list(namespaces) if namespaces
              else store_namespaces(store, cluster))
    for ns in listed:
        scope = Scope(namespace=ns, pod=pod, container=container, since=since, until=until)
        listing = list_scope(store, cluster=cluster, scope=scope)
        if streams is not None:
            listing = Listing({sid: keys for sid, keys in listing.streams.items()
                               if sid.key in streams})
        if not listing.streams:
            continue
        selection = select_segments(store, cluster=cluster, scope=scope, node=node,
                                    listing=listing)
        chosen: dict[StreamId, list[SegmentEntry]] = {}
        for e in selection.segments:
            chosen.setdefault(e.stream, []).append(e)
        for sid in sorted(chosen):
            out.append(_runs(sid, chosen[sid], listing))
    return out


def _runs(sid: StreamId, entries: list[SegmentEntry], listing: Listing) -> StreamPlan:
    stored_ends = {sk.end: (key, sk) for key, sk in listing.streams.get(sid, [])}
    sp = StreamPlan(sid, node=entries[0].node if entries else "")
    entries = sorted(entries, key=lambda e: e.offset)
    for e in entries:
        last = sp.runs[-1].segments[-1] if sp.runs else None
        if last is not None and last.end == e.offset:
            sp.runs[-1].segments.append(e)
        else:
            # A stored segment ends where this one starts but was not chosen: read it as
            # context, since the run may start mid-line (or may not: segments mostly end
            # on a newline, and guessing would drop a whole line of the window).
            before = stored_ends.get(e.offset) if e.offset > 0 else None
            context = None if before is None else SegmentEntry.from_store(*before, {})
            sp.runs.append(Run([e], context=context))
    return sp


def read_segment(store: Store, entry: SegmentEntry) -> Iterator[bytes]:
    """The raw bytes of one segment, ``CHUNK`` at a time: bounded by the key's length by
    ``store.codec`` (the one bounded decompressor) and checked against ``ek-sha256``."""
    body = store.get(entry.key)
    digest = hashlib.sha256()
    try:
        for chunk in decompressed_chunks(body, entry.ext, expected=entry.length, chunk=CHUNK):
            digest.update(chunk)
            yield chunk
    except BodyError as exc:
        raise SourceError(f"{entry.key}: {exc}: not replayed") from exc
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        raise SourceError(f"{entry.key}: sha256 does not match ek-sha256: not replayed")


def observed_ns(entry: SegmentEntry) -> int:
    """When the agent had the segment's lines, as far as the store says: its last line's time
    (every line of a segment was captured at or after it was written; ``ek-last-ts`` is the
    latest of them)."""
    ts = parse_rfc3339(entry.last_ts)
    if ts is None:
        return 0
    return int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1000
