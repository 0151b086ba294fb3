"""Archive manifests: which store objects hold the evidence of a scope, sealed by a digest.

A *scope* is a namespace, optional pod and container globs and a time window. Turning it into
segments costs as little as the store allows:

1. the key layout narrows the listing: ``<cluster>/<namespace>/`` plus the literal head of the
   pod glob, and each key names its stream and byte range, so globs are matched on keys alone;
2. only when a time window (or the node) matters are the remaining objects ``head``-ed, in
   parallel, for their ``ek-*`` metadata;
3. a segment is in the window when ``[ek-first-ts, ek-last-ts]`` overlaps it. A segment whose
   edges had no parseable timestamp (the middle of a line of many MiB) takes the nearest known
   timestamps of its stream's neighbours, so it is dropped only when they prove it outside.

A manifest (CONTRACT.md section 4) is one JSON object stored at
``<prefix>/<cluster>/_archives/<id>/manifest.json`` (``_`` cannot start a namespace, so the
place never collides with evidence; v1 wrote ``<cluster>/archives/``, which readers still
accept); its ``digest`` is the SHA-256 of the object without ``digest``, serialised as
``json.dumps(m, sort_keys=True, separators=(",", ":"))`` in UTF-8. Numbers in it are integers
only, so any JSON implementation re-serialises it identically. Since version 2 every segment
``key`` is the object's *full* key (store prefix included), so the manifest alone finds its
objects in the bucket; version 1 keys were relative to the store prefix.

Bundles: :func:`write_archive_tar` and :func:`write_streams_tar` write the exact stream bytes
of an archive (with its manifest) or of some streams as a tar, one member per contiguous run of
segments, fetching and checking one segment at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final

from evidence_keeper.archive.objects import (
    SegmentError,
    full_key,
    get_bounded,
    read_segment,
    relative_key,
    store_prefix,
)
from evidence_keeper.model import SegmentKey, StreamId, parse_segment_key
from evidence_keeper.store import ObjectMissing, Store
from evidence_keeper.timefmt import parse_rfc3339
from evidence_keeper.timefmt import rfc3339_or_none as rfc3339

MANIFEST_VERSION: Final = 2  # 2: full segment keys, manifests under <cluster>/_archives/
MANIFEST_NAME: Final = "manifest.json"
ARCHIVES_DIR: Final = "_archives"
LEGACY_ARCHIVES_DIR: Final = "archives"  # v1; read, never written
MAX_MANIFEST_BYTES: Final = 256 * 1024 * 1024
ARCHIVE_ID: Final = re.compile(r"^[0-9a-f]{24}$")
# Kubernetes names: namespaces and containers are DNS labels, pods DNS subdomains.
DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Globs: name characters plus * ? [ ] only, so a glob can never spell a path or a range escape.
GLOB_CHARS: Final = re.compile(r"^[a-z0-9.*?\[\]-]+$")
GLOB_META: Final = re.compile(r"[*?\[]")
MAX_WILDCARDS: Final = 16
HEAD_WORKERS: Final = 16


class ScopeError(ValueError):
    """A namespace, pod, container or window that cannot name evidence (one clear sentence)."""


class ManifestError(Exception):
    """A manifest that is missing, unreadable or malformed."""


# ------------------------------------------------------------------------------ names, scope
def check_namespace(value: object, what: str = "namespace") -> str:
    if not isinstance(value, str) or not DNS_LABEL.match(value):
        raise ScopeError(f"{what}: {_show(value)} is not a Kubernetes namespace name"
                         " (a DNS label: a-z, 0-9 and '-', at most 63 characters)")
    return value


def check_glob(value: object, what: str, *, subdomain: bool) -> str:
    """A Kubernetes name (pod: DNS subdomain, container: DNS label) or a bounded glob of one."""
    limit = 253 if subdomain else 63
    kind = "pod name" if subdomain else "container name"
    if not isinstance(value, str) or not value:
        raise ScopeError(f"{what}: must be a non-empty string")
    if not GLOB_META.search(value):
        if not (DNS_SUBDOMAIN if subdomain else DNS_LABEL).match(value):
            raise ScopeError(f"{what}: {_show(value)} is not a Kubernetes {kind}")
        return value
    if len(value) > limit or not GLOB_CHARS.match(value):
        raise ScopeError(f"{what}: {_show(value)} is not a {kind} glob (name characters and"
                         f" * ? [ ] only, at most {limit} characters)")
    if sum(value.count(c) for c in "*?[") > MAX_WILDCARDS:
        raise ScopeError(f"{what}: more than {MAX_WILDCARDS} wildcards")
    depth = 0
    for c in value:
        if c == "[":
            if depth:
                raise ScopeError(f"{what}: nested '[' in {_show(value)}")
            depth = 1
        elif c == "]":
            if not depth:
                raise ScopeError(f"{what}: unmatched ']' in {_show(value)}")
            depth = 0
    if depth or "[]" in value:
        raise ScopeError(f"{what}: unterminated or empty '[...]' in {_show(value)}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class Scope:
    """What an archive or a search covers. ``pod`` and ``container`` may be globs."""

    namespace: str
    pod: str | None = None
    container: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, sid: StreamId) -> bool:
        return (sid.namespace == self.namespace and self.matches_pod(sid.pod)
                and self.matches_container(sid.container))

    def matches_pod(self, pod: str) -> bool:
        return self.pod is None or fnmatch.fnmatchcase(pod, self.pod)

    def matches_container(self, container: str) -> bool:
        return self.container is None or fnmatch.fnmatchcase(container, self.container)

    def list_prefix(self, cluster: str) -> str:
        """The narrowest store prefix holding every key of the scope."""
        prefix = f"{cluster}/{self.namespace}/"
        if self.pod is None:
            return prefix
        m = GLOB_META.search(self.pod)
        return prefix + (self.pod[:m.start()] if m else f"{self.pod}_")

    def window_json(self) -> dict[str, str | None]:
        return {"since": rfc3339(self.since), "until": rfc3339(self.until)}


# ------------------------------------------------------------------------------ segments
@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """One segment of a manifest: its key, stream, byte range, hashes and timestamp range.

    ``key`` is relative to the store prefix (what the store backend reads); ``store_key`` is
    the full object key the manifest records (the same when the store has no prefix).
    """

    key: str
    stream: StreamId
    offset: int
    end: int
    ext: str
    sha256: str
    prev_sha256: str = ""
    first_ts: str = ""
    last_ts: str = ""
    node: str = ""
    store_key: str = ""

    @property
    def length(self) -> int:
        return self.end - self.offset

    @property
    def full_key(self) -> str:
        return self.store_key or self.key

    @classmethod
    def from_store(cls, key: str, sk: SegmentKey, meta: Mapping[str, str], *,
                   prefix: str = "") -> SegmentEntry:
        return cls(key=key, stream=sk.stream, offset=sk.offset, end=sk.end, ext=sk.ext,
                   sha256=meta.get("ek-sha256", ""), prev_sha256=meta.get("ek-prev-sha256", ""),
                   first_ts=meta.get("ek-first-ts", ""), last_ts=meta.get("ek-last-ts", ""),
                   node=meta.get("ek-node", ""), store_key=f"{prefix}/{key}" if prefix else key)

    def to_json(self) -> dict[str, Any]:
        s = self.stream
        return {"key": self.full_key, "namespace": s.namespace, "pod": s.pod, "pod_uid": s.pod_uid,
                "container": s.container, "restart": s.restart, "offset": self.offset,
                "length": self.length, "sha256": self.sha256, "prev_sha256": self.prev_sha256,
                "first_ts": self.first_ts, "last_ts": self.last_ts, "node": self.node}

    @classmethod
    def from_json(cls, doc: object, *, store: Store | None = None,
                  cluster: str | None = None) -> SegmentEntry:
        """Parse a manifest entry; the key must agree with the entry's own fields.

        With ``store`` and ``cluster`` the entry's (full or v1) key is mapped to the key the
        store reads; without, the key is taken as it is (a store without prefix).
        """
        if not isinstance(doc, dict):
            raise ManifestError("a segment entry is not an object")
        key = doc.get("key")
        sk = parse_segment_key(key) if isinstance(key, str) else None
        if sk is None or not isinstance(key, str):
            raise ManifestError(f"segment entry with an invalid key {_show(key)}")
        offset, length = doc.get("offset"), doc.get("length")
        if not isinstance(offset, int) or not isinstance(length, int):
            raise ManifestError(f"{key}: offset and length must be integers")
        claimed = (doc.get("namespace"), doc.get("pod"), doc.get("pod_uid"), doc.get("container"),
                   doc.get("restart"), offset, offset + length)
        s = sk.stream
        if claimed != (s.namespace, s.pod, s.pod_uid, s.container, s.restart, sk.offset, sk.end):
            raise ManifestError(f"{key}: entry fields disagree with the key")
        rel = key
        if store is not None and cluster is not None:
            try:
                rel = relative_key(store, key, cluster=cluster)
            except SegmentError as exc:
                raise ManifestError(str(exc)) from None
        return cls(key=rel, store_key=key, stream=s, offset=sk.offset, end=sk.end, ext=sk.ext,
                   sha256=str(doc.get("sha256") or ""),
                   prev_sha256=str(doc.get("prev_sha256") or ""),
                   first_ts=str(doc.get("first_ts") or ""), last_ts=str(doc.get("last_ts") or ""),
                   node=str(doc.get("node") or ""))


StoredKey = tuple[str, SegmentKey]


@dataclass
class Listing:
    """The store's segment keys for a scope, per stream, by offset."""

    streams: dict[StreamId, list[StoredKey]] = field(default_factory=dict)

    def segment_count(self) -> int:
        return sum(len(v) for v in self.streams.values())


def list_scope(store: Store, *, cluster: str, scope: Scope) -> Listing:
    """Keys of the scope's segments, from the key layout alone (no object is read)."""
    out = Listing()
    for key in store.list(scope.list_prefix(cluster)):
        sk = parse_segment_key(key)
        if sk is not None and sk.prefix == "" and sk.cluster == cluster and scope.matches(
                sk.stream):
            out.streams.setdefault(sk.stream, []).append((key, sk))
    for keys in out.streams.values():
        keys.sort(key=lambda p: p[1].offset)
    return out


def head_all(store: Store, keys: Sequence[str], *,
             workers: int = HEAD_WORKERS) -> list[dict[str, str] | None]:
    """``store.head`` of many keys, in parallel (S3 answers each in milliseconds), in order."""
    if len(keys) <= 1 or workers <= 1:
        return [store.head(k) for k in keys]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ek-head") as pool:
        return list(pool.map(store.head, keys))


def window_mask(entries: Sequence[SegmentEntry], since: datetime | None,
                until: datetime | None) -> list[bool]:
    """Which of one stream's segments (by offset) can hold lines in ``[since, until]``."""
    if since is None and until is None:
        return [True] * len(entries)
    firsts = [parse_rfc3339(e.first_ts) for e in entries]
    lasts = [parse_rfc3339(e.last_ts) for e in entries]
    # Unknown edges take the nearest known timestamps of the neighbours (logs move forward).
    before: list[datetime | None] = []
    known: datetime | None = None
    for first, last in zip(firsts, lasts, strict=True):
        before.append(first or known)
        known = last or first or known
    after: list[datetime | None] = [None] * len(entries)
    known = None
    for i in range(len(entries) - 1, -1, -1):
        after[i] = lasts[i] or known
        known = firsts[i] or lasts[i] or known
    return [(until is None or lo is None or lo <= until) and (since is None or hi is None
                                                               or hi >= since)
            for lo, hi in zip(before, after, strict=True)]


@dataclass
class Selection:
    segments: list[SegmentEntry]
    listing: Listing
    headed: int


def select_segments(store: Store, *, cluster: str, scope: Scope, node: str | None = None,
                    exclude_nodes: Iterable[str] = (), listing: Listing | None = None,
                    workers: int = HEAD_WORKERS) -> Selection:
    """Segments of the scope in its window, with their metadata, by stream and offset.

    ``node`` keeps only segments this node wrote (a node manifest); ``exclude_nodes`` drops
    the nodes already covered (a cluster manifest lists the rest).
    """
    listing = listing if listing is not None else list_scope(store, cluster=cluster, scope=scope)
    flat = [(key, sk) for sid in sorted(listing.streams) for key, sk in listing.streams[sid]]
    metas = head_all(store, [k for k, _ in flat], workers=workers)
    excluded = set(exclude_nodes)
    per_stream: dict[StreamId, list[SegmentEntry]] = {}
    for (key, sk), meta in zip(flat, metas, strict=True):
        if meta is None:
            continue  # removed between list and head: not evidence any more (verify would say)
        entry = SegmentEntry.from_store(key, sk, meta, prefix=store_prefix(store))
        if (node is not None and entry.node != node) or entry.node in excluded:
            continue
        per_stream.setdefault(sk.stream, []).append(entry)
    out: list[SegmentEntry] = []
    for sid in sorted(per_stream):
        entries = per_stream[sid]
        mask = window_mask(entries, scope.since, scope.until)
        out.extend(e for e, keep in zip(entries, mask, strict=True) if keep)
    return Selection(out, listing, len(flat))


# ------------------------------------------------------------------------------ documents
def manifest_key(cluster: str, archive_id: str, *, legacy: bool = False) -> str:
    """The manifest's key relative to the store prefix (``legacy``: where v1 wrote it)."""
    if not ARCHIVE_ID.match(archive_id):
        raise ManifestError(f"{_show(archive_id)} is not an archive id (24 hex digits)")
    folder = LEGACY_ARCHIVES_DIR if legacy else ARCHIVES_DIR
    return f"{cluster}/{folder}/{archive_id}/{MANIFEST_NAME}"


def archive_id(*parts: str) -> str:
    """A stable id for a labelled archive: the same parts always give the same id."""
    return hashlib.sha256("\0".join(("evidence-keeper/archive", *parts)).encode()).hexdigest()[:24]


def manifest_digest(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its ``digest`` set."""
    doc = {k: v for k, v in doc.items() if k != "digest"}
    doc["digest"] = manifest_digest(doc)
    return doc


def encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("utf-8")


def manifest_meta(doc: Mapping[str, Any]) -> dict[str, str]:
    return {"ek-kind": f"archive-manifest-{doc.get('kind', 'node')}",
            "ek-archive-id": str(doc.get("id", "")), "ek-node": str(doc.get("node") or ""),
            "ek-digest": str(doc.get("digest", ""))}


def find_manifest(store: Store, cluster: str,
                  archive_id_: str) -> tuple[str, dict[str, Any], bytes]:
    """The manifest's key (relative), object and stored bytes, from ``_archives/`` or v1's
    ``archives/``; raises ObjectMissing (neither exists) or ManifestError."""
    key = manifest_key(cluster, archive_id_)
    try:
        raw = get_bounded(store, key, limit=MAX_MANIFEST_BYTES)
    except ObjectMissing:
        key = manifest_key(cluster, archive_id_, legacy=True)
        try:
            raw = get_bounded(store, key, limit=MAX_MANIFEST_BYTES)
        except ObjectMissing:
            raise ObjectMissing(manifest_key(cluster, archive_id_)) from None
    except SegmentError as exc:
        raise ManifestError(str(exc)) from None
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ManifestError(f"{key}: JSON nested too deeply") from None
    except ValueError as exc:
        raise ManifestError(f"{key}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{key}: not a JSON object")
    return key, doc, raw


def load_manifest(store: Store, cluster: str, archive_id_: str) -> tuple[dict[str, Any], bytes]:
    """The manifest object and its stored bytes; raises ObjectMissing or ManifestError."""
    _key, doc, raw = find_manifest(store, cluster, archive_id_)
    return doc, raw


def manifest_full_key(store: Store, cluster: str, archive_id_: str) -> str:
    """The manifest's full object key (``manifest_key`` in ``GET /archives/<id>``)."""
    return full_key(store, manifest_key(cluster, archive_id_))


# ------------------------------------------------------------------------------ bundles (tar)
@dataclass(frozen=True, slots=True)
class Run:
    """Contiguous segments of one stream: one tar member."""

    stream: StreamId
    segments: tuple[SegmentEntry, ...]

    @property
    def offset(self) -> int:
        return self.segments[0].offset

    @property
    def end(self) -> int:
        return self.segments[-1].end

    def member_name(self) -> str:
        s = self.stream
        base = f"{s.namespace}/{s.pod}_{s.pod_uid}/{s.container}/{s.restart}"
        return f"{base}.log" if self.offset == 0 else f"{base}@{self.offset}.log"


def runs(entries: Iterable[SegmentEntry]) -> list[Run]:
    """Group segments (any order) into contiguous runs per stream."""
    by_stream: dict[StreamId, list[SegmentEntry]] = {}
    for e in entries:
        by_stream.setdefault(e.stream, []).append(e)
    out: list[Run] = []
    for sid in sorted(by_stream):
        current: list[SegmentEntry] = []
        for e in sorted(by_stream[sid], key=lambda x: x.offset):
            if current and e.offset != current[-1].end:
                out.append(Run(sid, tuple(current)))
                current = []
            current.append(e)
        if current:
            out.append(Run(sid, tuple(current)))
    return out


class BundleError(Exception):
    pass


def fetch_verified(store: Store, entry: SegmentEntry) -> bytes:
    """A segment's raw bytes, checked against its length and sha256 (manifest or ek-sha256).

    Decompression is bounded by the entry's length: a bomb is a BundleError, not a crash.
    """
    try:
        return read_segment(store, entry.key, ext=entry.ext, length=entry.length,
                            sha256=entry.sha256 or None)
    except SegmentError as exc:
        raise BundleError(str(exc).replace(entry.key, entry.full_key, 1)) from None


class _RunReader(io.RawIOBase):
    """The bytes of a run, one verified segment in memory at a time (tarfile reads from it)."""

    def __init__(self, store: Store, run: Run,
                 on_segment: Callable[[SegmentEntry], None] | None) -> None:
        self._store = store
        self._todo = list(run.segments)
        self._buf = memoryview(b"")
        self._on_segment = on_segment

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf and self._todo:
            entry = self._todo.pop(0)
            self._buf = memoryview(fetch_verified(self._store, entry))
            if self._on_segment is not None:
                self._on_segment(entry)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _tar_member(tar: tarfile.TarFile, name: str, size: int, mtime: int,
                body: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    tar.addfile(info, body)


def write_runs_tar(store: Store, tar: tarfile.TarFile, all_runs: Sequence[Run], *, mtime: int,
                   on_segment: Callable[[SegmentEntry], None] | None = None) -> None:
    for run in all_runs:
        reader = io.BufferedReader(_RunReader(store, run, on_segment), buffer_size=1 << 20)
        _tar_member(tar, run.member_name(), run.end - run.offset, mtime, reader)


def write_archive_tar(store: Store, cluster: str, archive_id_: str, out: IO[bytes], *,
                      on_segment: Callable[[SegmentEntry], None] | None = None) -> int:
    """``manifest.json`` (the stored bytes) and the stream bytes of every segment it lists.

    A cluster manifest brings its node manifests along as ``nodes/<id>/manifest.json``.
    Returns the number of segments written.
    """
    doc, raw = load_manifest(store, cluster, archive_id_)
    mtime = int((parse_rfc3339(doc.get("created_at")) or datetime.now(UTC)).timestamp())
    entries = _entries(doc, store, cluster)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, MANIFEST_NAME, len(raw), mtime, io.BytesIO(raw))
        for node in doc.get("nodes") or []:
            node_id = node.get("archive_id") if isinstance(node, dict) else None
            if not isinstance(node_id, str) or not ARCHIVE_ID.match(node_id):
                continue
            node_doc, node_raw = load_manifest(store, cluster, node_id)
            _tar_member(tar, f"nodes/{node_id}/{MANIFEST_NAME}", len(node_raw), mtime,
                        io.BytesIO(node_raw))
            entries.extend(_entries(node_doc, store, cluster))
        write_runs_tar(store, tar, runs(entries), mtime=mtime, on_segment=on_segment)
    return len(entries)


def _entries(doc: Mapping[str, Any], store: Store, cluster: str) -> list[SegmentEntry]:
    segs = doc.get("segments")
    if not isinstance(segs, list):
        raise ManifestError("manifest has no segment list")
    return [SegmentEntry.from_json(s, store=store, cluster=cluster) for s in segs]


def write_streams_tar(store: Store, streams: Mapping[StreamId, Sequence[StoredKey]],
                      out: IO[bytes], *,
                      on_segment: Callable[[SegmentEntry], None] | None = None) -> int:
    """The stream bytes of ``streams`` (e.g. a whole pod) as a tar, checked against ek-sha256."""
    flat = [(key, sk) for sid in sorted(streams) for key, sk in streams[sid]]
    metas = head_all(store, [k for k, _ in flat])
    entries = [SegmentEntry.from_store(key, sk, meta or {}, prefix=store_prefix(store))
               for (key, sk), meta in zip(flat, metas, strict=True)]
    mtime = int(datetime.now(UTC).timestamp())
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        write_runs_tar(store, tar, runs(entries), mtime=mtime, on_segment=on_segment)
    return len(entries)

