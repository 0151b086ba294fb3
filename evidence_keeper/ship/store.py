"""Store backends behind one small, blocking interface.

The shipper, ``export``, ``verify`` and ``search`` see a store only through :class:`Store`:
``put`` an object with its ``ek-*`` metadata, ``get`` it back, ``head`` its metadata, ``list``
keys under a prefix, and ``check`` that the store is usable. Calls block; async callers run
them in threads. Keys are relative to the store prefix; the backend adds the prefix.

``file:///dir`` keeps each object as a file at ``dir/<key>`` with its metadata beside it in
``<key>.meta.json``. The sidecar is renamed into place before the body, so a body that exists
always has its metadata; both are written temp + fsync + rename, so a crash leaves either the
old object or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from evidence_keeper.fsio import FileSystem

META_SUFFIX = ".meta.json"


class StoreError(Exception):
    """The store refused or failed an operation; ``retryable`` says whether to try again.

    ``ambiguous``: a write failed after the request may have reached the store (a timeout,
    a reset connection, a 5xx): the object may be stored although the client saw an error.
    """

    def __init__(self, message: str, *, retryable: bool = True, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous


class CannotLock(StoreError):
    """``object_lock_days > 0`` but the store cannot lock objects: a definite answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ObjectMissing(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object {key}", retryable=False)
        self.key = key


class Store(Protocol):
    scheme: str
    check_name: str  # the ``check`` label of the store probe: "s3" or "file"

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None: ...

    def get(self, key: str) -> bytes: ...

    def head(self, key: str) -> dict[str, str] | None: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def check(self) -> None: ...

    def check_object_lock(self) -> None: ...

    def describe(self) -> str: ...


def safe_key(key: str) -> str:
    """Reject keys that could name a path outside the store."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise StoreError(f"invalid store key {key!r}", retryable=False)
    return key


class FileStore:
    scheme = "file"
    check_name = "file"

    def __init__(self, root: Path, *, fs: FileSystem | None = None) -> None:
        self.root = root
        self.fs = fs or FileSystem()

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        path = self._path(key)
        try:
            self.fs.makedirs(str(path.parent))
            self.fs.write_atomic(f"{path}{META_SUFFIX}", json.dumps(
                dict(meta), sort_keys=True, indent=1).encode())
            self.fs.write_atomic(str(path), body)
        except OSError as exc:
            # A rename may have happened before the error: the object may be there.
            raise StoreError(f"{self.describe()}: cannot write {key}: {exc}",
                             ambiguous=True) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise StoreError(f"{self.describe()}: cannot read {key}: {exc}") from exc

    def head(self, key: str) -> dict[str, str] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            meta = json.loads(Path(f"{path}{META_SUFFIX}").read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.describe()}: bad metadata for {key}: {exc}") from exc
        return {str(k): str(v) for k, v in meta.items()}

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` in lexical order (the order of offsets in a stream)."""
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                if f.endswith(META_SUFFIX) or f.endswith(".tmp"):
                    continue
                key = f if rel == "." else f"{rel}/{f}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def check(self) -> None:
        probe = self.root / ".ek-probe"
        try:
            self.fs.makedirs(str(self.root))
            self.fs.write_atomic(str(probe), b"ok")
            self.fs.unlink(str(probe))
        except OSError as exc:
            raise StoreError(f"{self.describe()} is not writable: {exc}") from exc

    def check_object_lock(self) -> None:
        raise CannotLock(f"object_lock_days > 0 needs an S3 bucket with Object Lock enabled;"
                         f" {self.describe()} cannot lock objects")


def open_store(store_url: str, *, fs: FileSystem | None = None, **s3_options: object) -> Store:
    """The backend for a ``store_url`` (``file:///dir`` or ``s3://bucket/prefix``)."""
    if store_url.startswith("file://"):
        return FileStore(Path(store_url[len("file://"):]), fs=fs)
    if store_url.startswith("s3://"):
        from evidence_keeper.ship.s3 import S3Store

        return S3Store.from_url(store_url, **s3_options)
    raise StoreError(f"unsupported store_url {store_url!r}", retryable=False)
