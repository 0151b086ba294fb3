"""The store interface: one small, blocking protocol, its errors, and the key rules.

The shipper, ``export``, ``verify``, ``search`` and ``replay`` see a store only through
:class:`Store`: ``put`` an object with its ``ek-*`` metadata, ``get`` it back, ``head`` its
metadata, ``list`` keys under a prefix, ``check`` that the store is usable and
``check_object_lock`` that it can retain objects. Calls block; async callers run them in
threads. Keys are relative to the store prefix; the backend adds the prefix.
"""


from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Protocol

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
