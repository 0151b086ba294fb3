"""``file:///dir``: each object a file at ``dir/<key>``, its metadata beside it in
``<key>.meta.json``. The sidecar is renamed into place before the body, so a body that exists
always has its metadata; both are written temp + fsync + rename, so a crash leaves either the
old object or the new one, never half of one."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

from evidence_keeper.fsio import FileSystem
from evidence_keeper.store.base import (
    META_SUFFIX,
    CannotLock,
    ObjectMissing,
    StoreError,
    safe_key,
)


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
        for dirpath, dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            # Only directories that can hold such keys: a pod's prefix in a namespace of
            # thousands of pods walks one pod, not the namespace.
            dirs[:] = [d for d in dirs if _may_hold(d if rel == "." else f"{rel}/{d}", prefix)]
            for f in files:
                if f.endswith(META_SUFFIX) or f.endswith(".tmp"):
                    continue
                key = f if rel == "." else f"{rel}/{f}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def check(self) -> None:
        # A name of this call's own: agents (and the CLI) sharing one file:// store probe it
        # at the same time, and a shared name let one unlink the other's: a false outage.
        probe = self.root / f".ek-probe-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self.fs.makedirs(str(self.root))
            self.fs.write_atomic(str(probe), b"ok")
            self.fs.unlink(str(probe))
        except OSError as exc:
            raise StoreError(f"{self.describe()} is not writable: {exc}") from exc

    def check_object_lock(self) -> None:
        raise CannotLock(f"object_lock_days > 0 needs an S3 bucket with Object Lock enabled;"
                         f" {self.describe()} cannot lock objects")


def _may_hold(rel_dir: str, prefix: str) -> bool:
    """Can a key below the directory ``rel_dir`` start with ``prefix``?"""
    below = f"{rel_dir}/"
    return below.startswith(prefix) or prefix.startswith(below)
