"""Verify an archive against the store: presence, hashes, hash chains and the manifest digest.

For every segment a manifest lists, the object must exist, its body must decompress to exactly
``length`` bytes whose SHA-256 is the manifest's ``sha256`` and the object's ``ek-sha256``, and
its metadata must agree with the manifest. Per stream the hash chain must be continuous: each
segment's ``ek-prev-sha256`` is the SHA-256 of the segment before it. When a manifest starts a
stream mid-way, its first segment is chained to the store's previous segment (whose own body is
checked too); a stream starting at offset 0 must start the chain (empty ``ek-prev-sha256``).
Holes (recorded loss) do not break a chain: the chain links shipped segments.

The manifest's ``digest`` is recomputed (CONTRACT.md section 4). A cluster manifest is verified
with every node manifest it lists, each of which must still have the digest recorded for it.

Nothing here stops at the first problem: the report names every failing object (by its full
key, as the manifest records it), so one run tells the whole story. Bodies are fetched and
hashed in a thread pool, one compressed body per worker in memory, decompressed a chunk at a
time and never beyond the length the manifest claims, so a decompression bomb is one failing
object; the number of workers is bounded by :data:`VERIFY_MEMORY` over the largest segment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from evidence_keeper.archive.ledger import verify_entries
from evidence_keeper.archive.manifest import (
    ARCHIVE_ID,
    ManifestError,
    SegmentEntry,
    find_manifest,
    manifest_digest,
    manifest_key,
)
from evidence_keeper.archive.objects import (
    SegmentError,
    claimed_length,
    full_key,
    get_bounded,
    segment_chunks,
)
from evidence_keeper.model import parse_segment_key
from evidence_keeper.store import ObjectMissing, Store, StoreError
from evidence_keeper.store.codec import CHUNK, ZSTD_MAX_WINDOW, compressed_bound

VERIFY_WORKERS: Final = 8
VERIFY_MEMORY: Final = 384 * 1024 * 1024  # bodies and decompression state of all workers
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass
class VerifyReport:
    archive_id: str
    manifest_key: str
    kind: str = "node"
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: int = 0
    bytes: int = 0
    streams: int = 0
    nodes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def to_json(self) -> dict[str, Any]:
        return {"archive_id": self.archive_id, "manifest_key": self.manifest_key,
                "kind": self.kind, "ok": self.ok, "segments": self.segments,
                "bytes": self.bytes, "streams": self.streams, "nodes": self.nodes,
                "problems": [{"key": p.key, "error": p.message} for p in self.problems],
                "notes": self.notes}


@dataclass(slots=True)
class _Checked:
    sha256: str | None = None  # of the body, when it could be read
    meta: dict[str, str] | None = None


def verify_archive(store: Store, *, cluster: str, archive_id: str,
                   progress: Progress | None = None,
                   workers: int = VERIFY_WORKERS) -> VerifyReport:
    """Check everything an archive claims; raises ManifestError only for a malformed id."""
    key = full_key(store, manifest_key(cluster, archive_id))
    report = VerifyReport(archive_id, key)
    found = _load(store, cluster, archive_id, report)
    if found is None:
        return report
    key, doc = found
    report.manifest_key = key
    report.kind = str(doc.get("kind") or "node")
    _verify_ledger_list(store, doc, key, report)
    entries = _entries(doc, key, report, store=store, cluster=cluster)
    for node in doc.get("nodes") or []:
        entries += _verify_node(store, cluster, node, key, report)
    _verify_segments(store, entries, report, progress=progress,
                     workers=memory_bounded_workers(entries, workers))
    return report


def memory_bounded_workers(entries: Sequence[SegmentEntry], workers: int) -> int:
    """As many workers as :data:`VERIFY_MEMORY` holds for the largest segment (at least 1)."""
    largest = max((max(0, e.length) for e in entries), default=0)
    per_worker = compressed_bound(largest) + 2 * CHUNK + ZSTD_MAX_WINDOW
    return max(1, min(workers, VERIFY_MEMORY // per_worker))


def _load(store: Store, cluster: str, archive_id: str,
          report: VerifyReport) -> tuple[str, dict[str, Any]] | None:
    """The manifest's full key and object; a problem in the report if there is none."""
    key = full_key(store, manifest_key(cluster, archive_id))
    try:
        rel, doc, _raw = find_manifest(store, cluster, archive_id)
    except ObjectMissing:
        report.fail(key, "manifest missing from the store")
        return None
    except ManifestError as exc:
        report.fail(key, str(exc).removeprefix(f"{manifest_key(cluster, archive_id)}: "))
        return None
    key = full_key(store, rel)
    stored, computed = doc.get("digest"), manifest_digest(doc)
    if stored != computed:
        report.fail(key, f"manifest digest mismatch: the manifest was modified (digest field"
                         f" {str(stored)[:16]}..., content hashes to {computed[:16]}...)")
    if doc.get("id") != archive_id or doc.get("cluster") != cluster:
        report.fail(key, f"manifest names archive {doc.get('id')!r} of cluster"
                         f" {doc.get('cluster')!r}, not {archive_id!r} of {cluster!r}")
    return key, doc


def _entries(doc: Mapping[str, Any], key: str, report: VerifyReport, *, store: Store,
             cluster: str) -> list[SegmentEntry]:
    segs = doc.get("segments")
    if not isinstance(segs, list):
        report.fail(key, "manifest has no segment list")
        return []
    out = []
    for s in segs:
        try:
            out.append(SegmentEntry.from_json(s, store=store, cluster=cluster))
        except ManifestError as exc:
            report.fail(key, str(exc))
    return out


def _verify_node(store: Store, cluster: str, node: object, key: str,
                 report: VerifyReport) -> list[SegmentEntry]:
    """One node manifest of a cluster manifest; returns its segments to check."""
    if not isinstance(node, dict):
        report.fail(key, "a node entry is not an object")
        return []
    name = node.get("node") or node.get("agent_pod") or "?"
    node_id = node.get("archive_id")
    report.nodes += 1
    if node.get("status") != "complete" or not isinstance(node_id, str):
        report.fail(key, f"node {name}: archive did not complete"
                         f" ({node.get('status')}: {node.get('error') or 'no manifest'})")
        return []
    if not ARCHIVE_ID.match(node_id):
        report.fail(key, f"node {name}: invalid archive id {node_id!r}")
        return []
    found = _load(store, cluster, node_id, report)
    if found is None:
        return []
    node_key, doc = found
    _verify_ledger_list(store, doc, node_key, report)
    if doc.get("digest") != node.get("manifest_digest"):
        report.fail(node_key, f"node manifest of {name} is not the one the cluster manifest"
                              " recorded (digest differs)")
    return _entries(doc, node_key, report, store=store, cluster=cluster)


def _hash_body(store: Store, entry: SegmentEntry) -> tuple[str | None, list[str]]:
    """SHA-256 of the segment's raw bytes, streamed and bounded by the claimed length.

    Raises ObjectMissing; every other failure is a problem (and no hash).
    """
    try:
        claimed_length(entry.key, entry.length, None)
        body = get_bounded(store, entry.key, limit=compressed_bound(entry.length))
    except ObjectMissing:
        raise
    except SegmentError as exc:
        return None, [str(exc).removeprefix(f"{entry.key}: ")]
    except StoreError as exc:
        return None, [f"cannot read: {exc}"]
    h = hashlib.sha256()
    try:
        for part in segment_chunks(store, entry.key, ext=entry.ext, length=entry.length,
                                   body=body):
            h.update(part)
    except SegmentError as exc:
        return None, [f"body does not decompress to the segment:"
                      f" {str(exc).removeprefix(f'{entry.key}: ')}"]
    return h.hexdigest(), []


def _verify_ledger_list(store: Store, doc: Mapping[str, Any], key: str,
                        report: VerifyReport) -> None:
    """The gap-ledger objects a manifest lists: bodies, hashes and links to their chain."""
    problems, checked = verify_entries(store, doc.get("ledger"), key)
    for where, message in problems:
        report.fail(where, message)
    if checked:
        report.notes.append(f"{checked} gap-ledger objects listed by {key} checked (bodies,"
                            " sha256, chain links)")


def _check_one(store: Store, entry: SegmentEntry) -> tuple[_Checked, list[str]]:
    """Fetch, decompress, hash and head one segment (runs in a worker thread)."""
    out = _Checked()
    try:
        out.sha256, problems = _hash_body(store, entry)
    except ObjectMissing:
        return out, ["segment missing from the store"]
    if out.sha256 is not None and out.sha256 != entry.sha256:
        problems.append(f"sha256 of the body {out.sha256[:16]}... does not match the"
                        f" manifest {entry.sha256[:16]}...")
    try:
        out.meta = store.head(entry.key)
    except StoreError as exc:
        problems.append(f"cannot read metadata: {exc}")
    meta = out.meta or {}
    if out.meta is not None:
        if meta.get("ek-sha256") != entry.sha256:
            problems.append(f"ek-sha256 {meta.get('ek-sha256', '')[:16]}... does not match"
                            f" the manifest {entry.sha256[:16]}...")
        if (meta.get("ek-offset"), meta.get("ek-length")) != (str(entry.offset),
                                                             str(entry.length)):
            problems.append("ek-offset/ek-length do not match the key")
        if entry.prev_sha256 and meta.get("ek-prev-sha256") != entry.prev_sha256:
            problems.append("ek-prev-sha256 does not match the manifest")
    return out, problems


def _verify_segments(store: Store, entries: list[SegmentEntry], report: VerifyReport, *,
                     progress: Progress | None, workers: int) -> None:
    total = len(entries)
    checked: dict[str, _Checked] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ek-verify") as pool:
        for done, (entry, (result, problems)) in enumerate(
                zip(entries, pool.map(lambda e: _check_one(store, e), entries), strict=True),
                start=1):
            checked[entry.key] = result
            for p in problems:
                report.fail(entry.full_key, p)
            report.segments += 1
            report.bytes += entry.length
            if progress is not None:
                progress(done, total)
    by_stream: dict[Any, list[SegmentEntry]] = {}
    for e in entries:
        by_stream.setdefault(e.stream, []).append(e)
    report.streams = len(by_stream)
    for sid in sorted(by_stream):
        _verify_chain(store, sorted(by_stream[sid], key=lambda e: e.offset), checked, report)


def _verify_chain(store: Store, entries: list[SegmentEntry], checked: Mapping[str, _Checked],
                  report: VerifyReport) -> None:
    """Each segment's ek-prev-sha256 names the segment before it (in the store or manifest)."""
    listing: list[tuple[int, str]] | None = None
    prev: SegmentEntry | None = None
    for e in entries:
        if prev is not None and e.offset < prev.end:
            report.fail(e.full_key, f"overlaps {prev.full_key}")
        gap = prev is None or e.offset != prev.end
        if gap and (prev is not None or e.offset > 0):
            if listing is None:
                listing = _stream_listing(store, e)
            between = [k for off, k in listing
                       if (prev.offset if prev else -1) < off < e.offset]
            if prev is None:
                expected, source = _store_predecessor(store, between[-1] if between else None,
                                                      report)
            elif between:
                report.fail(e.full_key, f"the manifest skips {full_key(store, between[-1])},"
                                        " which the store holds before this segment")
                expected, source = _store_predecessor(store, between[-1], report)
            else:
                expected, source = prev.sha256, prev.full_key
                report.notes.append(f"hole [{prev.end}, {e.offset}) of {e.stream.key}: not in"
                                    " the store (recorded loss; see the manifest's gaps)")
        elif prev is None:
            expected, source = "", ""
        else:
            expected, source = prev.sha256, prev.full_key
        meta = checked[e.key].meta
        if meta is None:
            prev = e
            continue  # missing: already reported
        got = meta.get("ek-prev-sha256", "")
        if expected is not None and got != expected:
            what = f"the sha256 of {source}" if source else "empty (first segment of the stream)"
            report.fail(e.full_key, f"hash chain broken: ek-prev-sha256 {got[:16] or '(empty)'}..."
                               f" should be {what}")
        prev = e


def _stream_listing(store: Store, e: SegmentEntry) -> list[tuple[int, str]]:
    prefix = e.key.rsplit("/", 1)[0] + "/"
    out = []
    for key in store.list(prefix):
        sk = parse_segment_key(key)
        if sk is not None and sk.stream == e.stream:
            out.append((sk.offset, key))
    return sorted(out)


def _store_predecessor(store: Store, key: str | None,
                       report: VerifyReport) -> tuple[str | None, str]:
    """The sha256 a chain continues from: the store's previous segment, checked itself."""
    if key is None:
        return "", ""
    sk = parse_segment_key(key)
    assert sk is not None
    entry = SegmentEntry(key=key, stream=sk.stream, offset=sk.offset, end=sk.end, ext=sk.ext,
                         sha256="")
    result, _ = _check_one(store, entry)
    meta = result.meta or {}
    sha = meta.get("ek-sha256", "")
    name = full_key(store, key)
    if result.sha256 is None or result.sha256 != sha:
        report.fail(name, "the segment before the archive's first one does not match its"
                          " ek-sha256: the chain cannot be anchored")
        return None, name
    return sha, name


def format_report(report: VerifyReport) -> str:
    """The human report: every failing object by name, then one verdict line."""
    lines = [f"archive {report.archive_id} ({report.kind}): {report.manifest_key}"]
    for p in report.problems:
        lines.append(f"  FAIL  {p.key}: {p.message}")
    for note in report.notes:
        lines.append(f"  note  {note}")
    what = (f"{report.segments} segments, {report.bytes} bytes, {report.streams} streams"
            + (f", {report.nodes} node manifests" if report.nodes else ""))
    if report.ok:
        lines.append(f"verified: {what}; every segment present, hashes, hash chains and"
                     " manifest digest match")
    else:
        lines.append(f"VERIFICATION FAILED: {len(report.problems)} problem(s) in {what}")
    return "\n".join(lines)
