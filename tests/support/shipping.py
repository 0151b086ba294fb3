"""Shipping pieces for unit tests: a real spool with committed segments, a scripted store.

:class:`ScriptedStore` keeps objects in memory and fails the calls a test scripts, the way a
real store fails: a definite refusal (``StoreError``), an *ambiguous* failure after which the
object may or may not be stored (``keep``), a HEAD that cannot answer. It records every call,
so a test counts requests exactly (one per back-off period, no PUT after a found HEAD).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.ship.shipper import Shipper
from evidence_keeper.spool.spool import SealedSegment, Spool, SpoolStream
from evidence_keeper.store import StoreError


@dataclass
class PutFailure:
    """The next PUT raises ``error``; with ``keep`` the store kept the object anyway."""

    error: BaseException
    keep: bool = False


@dataclass
class ScriptedStore:
    scheme: str = "mem"
    check_name: str = "file"
    objects: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (op, key) in call order
    put_failures: list[PutFailure] = field(default_factory=list)  # consumed one per PUT
    head_failures: list[StoreError] = field(default_factory=list)  # consumed one per HEAD
    down: StoreError | None = None  # while set, every PUT raises it (an unreachable store)
    retained: dict[str, datetime | None] = field(default_factory=dict)

    def ops(self, op: str) -> list[str]:
        return [k for o, k in self.calls if o == op]

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        self.calls.append(("put", key))
        if self.down is not None:
            raise self.down
        failure = self.put_failures.pop(0) if self.put_failures else None
        if failure is None or failure.keep:
            self.objects[key] = (body, dict(meta))
            self.retained[key] = retain_until
        if failure is not None:
            raise failure.error

    def get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return self.objects[key][0]

    def head(self, key: str) -> dict[str, str] | None:
        self.calls.append(("head", key))
        if self.head_failures:
            raise self.head_failures.pop(0)
        obj = self.objects.get(key)
        return None if obj is None else dict(obj[1])

    def list(self, prefix: str) -> Iterator[str]:
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def check(self) -> None:
        if self.down is not None:
            raise self.down

    def check_object_lock(self) -> None:
        return None

    def describe(self) -> str:
        return "mem://test"


def make_spool(root: Path, losses: list[Loss], *, metrics: Metrics | None = None,
               ext: str = "zst") -> Spool:
    spool = Spool(root, segment_max_bytes=64 * 1024, flush_interval_s=5, max_bytes=1 << 24,
                  record_loss=losses.append, metrics=metrics or Metrics(), segment_ext=ext)
    spool.recover()
    return spool


def add_segment(spool: Spool, sid: StreamId, data: bytes, *, now_mono: float = 0.0,
                ) -> tuple[SpoolStream, SealedSegment]:
    """Append ``data`` to ``sid`` as one sealed, committed (so shippable) segment."""
    with spool.lock:
        s = spool.stream(sid)
        assert spool.append(s, data, now_mono=now_mono) == len(data)
        spool.seal(s)
    assert spool.commit(), "the spool commit failed"
    return s, s.sealed[-1]


async def settle(shipper: Shipper) -> None:
    """Wait until every upload the shipper has started is finished (acknowledged or not)."""
    while shipper._inflight:
        await asyncio.wait(set(shipper._inflight))
