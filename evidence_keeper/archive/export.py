"""Export: rebuild a stream's exact bytes from the store.

Segments of a stream are found by key prefix and sorted by offset (keys carry the offset
zero-padded, so lexical order is offset order). Each body is decompressed (bounded by the
length its key and ``ek-length`` claim: a decompression bomb is an error after one byte too
many), checked against its ``ek-sha256`` and written out in order. Holes between segments
are reported (they are the ``loss`` gaps of the ledger); overlapping segments or a hash
mismatch are errors, because an export that silently differs from the evidence is worse
than none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from evidence_keeper.archive.objects import SegmentError, read_segment
from evidence_keeper.model import SegmentKey, StreamId, parse_segment_key
from evidence_keeper.store import Store


class ExportError(Exception):
    pass


@dataclass
class StreamSegments:
    stream: StreamId
    keys: list[tuple[str, SegmentKey]] = field(default_factory=list)


@dataclass
class ExportReport:
    stream: StreamId
    bytes: int = 0
    segments: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)  # [start, end) not in the store
    end: int = 0


def find_streams(
    store: Store, *, cluster: str, namespace: str, pod: str | None = None,
    container: str | None = None, restart: int | None = None, pod_uid: str | None = None,
) -> list[StreamSegments]:
    """Streams in the store matching the filters, each with its segment keys by offset."""
    prefix = f"{cluster}/{namespace}/" + (f"{pod}_" if pod else "")
    found: dict[StreamId, StreamSegments] = {}
    for key in store.list(prefix):
        sk = parse_segment_key(key)
        if sk is None or sk.cluster != cluster:
            continue
        sid = sk.stream
        if (pod is not None and sid.pod != pod) or (pod_uid is not None and sid.pod_uid != pod_uid):
            continue
        if (container is not None and sid.container != container) or (
            restart is not None and sid.restart != restart
        ):
            continue
        found.setdefault(sid, StreamSegments(sid)).keys.append((key, sk))
    for ss in found.values():
        ss.keys.sort(key=lambda p: p[1].offset)
    return sorted(found.values(), key=lambda ss: ss.stream)


def store_namespaces(store: Store, cluster: str) -> list[str]:
    """Namespaces with segments of ``cluster`` in the store (``-A``), from the key layout
    alone."""
    found: set[str] = set()
    for key in store.list(f"{cluster}/"):
        sk = parse_segment_key(key)
        if sk is not None and sk.prefix == "" and sk.cluster == cluster:
            found.add(sk.stream.namespace)
    return sorted(found)


def iter_segments(store: Store, ss: StreamSegments) -> Iterator[tuple[SegmentKey, bytes]]:
    """Decompressed, verified segment bodies of one stream, in offset order."""
    expect = 0
    for key, sk in ss.keys:
        if sk.offset < expect:
            raise ExportError(f"{key}: overlaps the previous segment (ends at {expect})")
        meta = store.head(key) or {}
        try:
            data = read_segment(store, key, ext=sk.ext, length=sk.end - sk.offset,
                                sha256=meta.get("ek-sha256"), meta=meta)
        except SegmentError as exc:
            raise ExportError(str(exc)) from None
        expect = sk.end
        yield sk, data


def export_stream(store: Store, ss: StreamSegments, out: BinaryIO, *,
                  progress: Callable[[int], None] | None = None) -> ExportReport:
    report = ExportReport(ss.stream)
    for sk, data in iter_segments(store, ss):
        if sk.offset > report.end:
            report.holes.append((report.end, sk.offset))
        out.write(data)
        report.bytes += len(data)
        report.segments += 1
        report.end = sk.end
        if progress is not None:
            progress(report.bytes)
    return report
