"""Reading store objects defensively: bounded fetches, bounded decompression, full keys.

Everything that reads evidence back (export, search, verify, archive bundles, and a replay
tool later) goes through here, so a hostile or damaged store cannot make a reader run out of
memory or trust a body it did not check:

* :func:`get_bounded` fetches at most ``limit`` bytes of an object and refuses a larger one
  (a file's size is checked before it is read; S3 gets a ranged GET), so a huge object never
  lands in memory;
* :func:`segment_chunks` streams a segment's raw bytes, never beyond the length its key and
  ``ek-length`` claim (:mod:`evidence_keeper.store.codec`);
* :func:`read_segment` returns one whole segment only after its length and SHA-256 matched.

Full keys (CONTRACT.md section 4, v2). Store backends take keys *relative* to the store's
prefix (``s3://bucket/<prefix>``); manifests and ``manifest_key`` name objects by their *full*
key, prefix included, so a manifest alone finds every object in the bucket.
:func:`full_key` and :func:`relative_key` convert between the two; a file store has no prefix.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from evidence_keeper.model import parse_segment_key
from evidence_keeper.store import FileStore, ObjectMissing, Store, StoreError, safe_key
from evidence_keeper.store.codec import (
    CHUNK,
    BodyError,
    check_claim,
    compressed_bound,
    decompressed_chunks,
)


class SegmentError(Exception):
    """A segment object that cannot be used as evidence (the message names the key)."""


# ------------------------------------------------------------------------------ keys
def store_prefix(store: Store) -> str:
    """The key prefix the backend adds (``s3://bucket/<prefix>``); ``""`` for a file store."""
    prefix = getattr(store, "prefix", "")
    return prefix.strip("/") if isinstance(prefix, str) else ""


def full_key(store: Store, key: str) -> str:
    """The object's key in the bucket: the store prefix, then the relative key."""
    prefix = store_prefix(store)
    return f"{prefix}/{key}" if prefix else key


def relative_key(store: Store, key: str, *, cluster: str) -> str:
    """The store-relative key of a manifest's segment key (full in v2, relative in v1).

    A full key starts with this store's prefix and, without it, is a segment key of
    ``cluster``; a v1 key already is one. Anything else does not belong to this store.
    """
    prefix = store_prefix(store)
    if prefix and key.startswith(prefix + "/"):
        rel = key[len(prefix) + 1:]
        sk = parse_segment_key(rel)
        if sk is not None and sk.prefix == "" and sk.cluster == cluster:
            return rel
    sk = parse_segment_key(key)
    if sk is not None and sk.prefix == "" and sk.cluster == cluster:
        return key
    where = f" (prefix {prefix!r})" if prefix else ""
    raise SegmentError(f"{key}: not a segment key of cluster {cluster!r} in this store{where}")


# ------------------------------------------------------------------------------ bounded reads
def get_bounded(store: Store, key: str, *, limit: int) -> bytes:
    """The object's bytes if it holds at most ``limit``; raises SegmentError if larger."""
    if isinstance(store, FileStore):
        return _file_get(store, key, limit)
    if getattr(store, "scheme", "") == "s3" and hasattr(store, "client"):
        return _s3_get(store, key, limit)
    body = store.get(key)  # an unknown backend: checked after the fact
    _check_size(key, len(body), limit)
    return body


def _check_size(key: str, size: int, limit: int) -> None:
    if size > limit:
        raise SegmentError(f"{key}: object of {size} bytes is larger than its claimed length"
                           f" can compress to ({limit} bytes); refused")


def _file_get(store: FileStore, key: str, limit: int) -> bytes:
    path = store.root / safe_key(key)
    try:
        with open(path, "rb") as f:
            _check_size(key, os.fstat(f.fileno()).st_size, limit)
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ObjectMissing(key) from None
    except OSError as exc:
        raise StoreError(f"{store.describe()}: cannot read {key}: {exc}") from exc
    _check_size(key, len(data), limit)  # grew while being read
    return data


def _s3_get(store: Any, key: str, limit: int) -> bytes:
    bucket = getattr(store, "bucket", "")
    try:
        r = store.client.get_object(Bucket=bucket, Key=full_key(store, safe_key(key)),
                                    Range=f"bytes=0-{limit}")
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code == "InvalidRange":
            return b""  # an empty object: no byte 0
        # The backend classifies the failure (missing, denied, unreachable) on a HEAD.
        if store.head(key) is None:
            raise ObjectMissing(key) from None
        raise StoreError(f"{store.describe()}: cannot get {key}: {exc}") from exc
    total = str(r.get("ContentRange", "")).rpartition("/")[2]
    if total.isdigit():
        _check_size(key, int(total), limit)
    data = bytes(r["Body"].read(limit + 1))
    _check_size(key, len(data), limit)
    return data


# ------------------------------------------------------------------------------ segments
def claimed_length(key: str, length: int, meta: Mapping[str, str] | None) -> int:
    """The segment's length from its key, checked against ``ek-length`` and the hard cap."""
    if meta is not None and "ek-length" in meta and meta["ek-length"] != str(length):
        raise SegmentError(f"{key}: ek-length {meta['ek-length'][:20]!r} disagrees with the"
                           f" key's range of {length} bytes")
    try:
        check_claim(length)
    except BodyError as exc:
        raise SegmentError(f"{key}: {exc}") from None
    return length


def segment_chunks(store: Store, key: str, *, ext: str, length: int,
                   meta: Mapping[str, str] | None = None,
                   body: bytes | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
    """A segment's raw bytes in chunks, bounded by its claimed length (errors name the key)."""
    claimed_length(key, length, meta)
    if body is None:
        body = get_bounded(store, key, limit=compressed_bound(length))
    try:
        yield from decompressed_chunks(body, ext, expected=length, chunk=chunk)
    except BodyError as exc:
        raise SegmentError(f"{key}: {exc}") from None


def read_segment(store: Store, key: str, *, ext: str, length: int, sha256: str | None,
                 meta: Mapping[str, str] | None = None) -> bytes:
    """One whole segment, returned only when its length and (if known) SHA-256 match."""
    h = hashlib.sha256()
    out = bytearray()
    for part in segment_chunks(store, key, ext=ext, length=length, meta=meta):
        h.update(part)
        out += part
    if sha256 and h.hexdigest() != sha256:
        raise SegmentError(f"{key}: sha256 of the body does not match the evidence record")
    return bytes(out)
