"""Where evidence goes: the :class:`Store` interface and its backends (``file://``, ``s3://``).

A low layer of its own: the shipper writes through it, and the readers (archive, replay, the
commands) and the store probe use it, without depending on each other.
"""

from __future__ import annotations

from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.store.base import (
    META_SUFFIX,
    CannotLock,
    ObjectMissing,
    Store,
    StoreError,
    safe_key,
)
from evidence_keeper.store.file import FileStore
from evidence_keeper.store.s3 import S3Store

__all__ = ["META_SUFFIX", "CannotLock", "FileStore", "ObjectMissing", "S3Store", "Store",
           "StoreError", "open_store", "safe_key"]


def open_store(store_url: str, *, fs: FileSystem | None = None, **s3_options: object) -> Store:
    """The backend for a ``store_url`` (``file:///dir`` or ``s3://bucket/prefix``)."""
    if store_url.startswith("file://"):
        return FileStore(Path(store_url[len("file://"):]), fs=fs)
    if store_url.startswith("s3://"):
        return S3Store.from_url(store_url, **s3_options)
    raise StoreError(f"unsupported store_url {store_url!r}", retryable=False)
