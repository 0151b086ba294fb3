"""The shipper alone: a real spool, a scripted store, a fake clock; no agent, no sleeps.

Each path of one upload is driven through the shipper's own entry point (``launch`` claims
ready segments and starts their uploads): prepare (key, metadata, body), put, the HEAD after
an ambiguous PUT (found: acknowledged without a second PUT; absent or other bytes: put
again; unanswered: ``StoreNotAsked``, the segment stays uncertain), release after a failure,
and a damaged spool file (``SpoolSegmentDamaged``: an exact ``spool_corrupt`` loss, no
back-off). The back-off itself is in ``test_breaker.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId, parse_segment_key, segment_key
from evidence_keeper.ship.shipper import ShipConfig, Shipper, SpoolSegmentDamaged, StoreNotAsked
from evidence_keeper.spool.spool import Spool
from evidence_keeper.store import StoreError
from evidence_keeper.store.codec import decompress
from tests.support.clock import FakeClock
from tests.support.shipping import PutFailure, ScriptedStore, add_segment, make_spool, settle

A = StreamId("shop", "orders-1", "uid-a", "orders", 0)
B = StreamId("shop", "cart-1", "uid-b", "cart", 2)


def lines(first: int, n: int, *, tag: str = "x") -> bytes:
    """CRI log lines with timestamps at 12:00:<first>..; the edges become ek-first/last-ts."""
    return b"".join(
        f"2025-11-10T12:00:{first + i:02d}.000000000Z stdout F {tag} line {i}\n".encode()
        for i in range(n))


class Rig:
    def __init__(self, tmp_path: Path, clock: FakeClock, **config: object) -> None:
        self.losses: list[Loss] = []
        self.metrics = Metrics()
        self.spool: Spool = make_spool(tmp_path / "spool", self.losses, metrics=self.metrics)
        self.store = ScriptedStore()
        cfg = ShipConfig(node="node-1", cluster="c1", **config)  # type: ignore[arg-type]
        self.shipper = Shipper(self.spool, self.store, cfg, metrics=self.metrics, clock=clock)

    async def attempt(self) -> int:
        """Start what the breaker allows and wait for it; returns how many uploads started."""
        started = self.shipper.launch()
        await settle(self.shipper)
        return started

    def errors(self, op: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "evidence_keeper_ship_errors_total", {"op": op})
        return value or 0.0


@pytest.fixture
def rig(tmp_path: Path, clock: FakeClock) -> Iterator[Rig]:
    r = Rig(tmp_path, clock)
    yield r
    r.shipper.close()


def ambiguous(msg: str = "read timeout") -> StoreError:
    return StoreError(msg, ambiguous=True)


def definite(msg: str = "403 AccessDenied") -> StoreError:
    return StoreError(msg, retryable=False)


# ------------------------------------------------------------------------------ prepare, put


def test_prepare_names_the_range_and_describes_the_bytes(rig: Rig) -> None:
    data = lines(0, 5)
    s, seg = add_segment(rig.spool, A, data)
    p = rig.shipper.prepare(s, seg)
    sk = parse_segment_key(p.key)
    assert sk is not None and sk.stream == A and (sk.offset, sk.end) == (0, len(data))
    assert sk.ext == "zst" and sk.cluster == "c1"
    assert decompress(p.body, "zst") == data
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    assert p.meta == {
        "ek-node": "node-1", "ek-namespace": "shop", "ek-pod": "orders-1",
        "ek-pod-uid": "uid-a", "ek-container": "orders", "ek-restart": "0",
        "ek-offset": "0", "ek-length": str(len(data)), "ek-sha256": p.sha256,
        "ek-prev-sha256": "",
        "ek-first-ts": "2025-11-10T12:00:00.000000Z",
        "ek-last-ts": "2025-11-10T12:00:04.000000Z",
    }


async def test_segments_ship_in_order_and_chain_their_hashes(rig: Rig) -> None:
    first, second = lines(0, 3), lines(10, 4)
    add_segment(rig.spool, A, first)
    add_segment(rig.spool, A, second)
    # One segment per stream at a time: the second names the first's hash, known only later.
    assert await rig.attempt() == 1
    assert await rig.attempt() == 1
    assert await rig.attempt() == 0
    k1 = segment_key("", "c1", A, 0, len(first), "zst")
    k2 = segment_key("", "c1", A, len(first), len(first) + len(second), "zst")
    assert rig.store.ops("put") == [k1, k2] and rig.store.ops("head") == []
    sha1 = hashlib.sha256(first).hexdigest()
    assert rig.store.objects[k1][1]["ek-prev-sha256"] == ""
    assert rig.store.objects[k2][1]["ek-prev-sha256"] == sha1
    s = rig.spool.streams[A]
    assert s.sealed == [] and s.chain == hashlib.sha256(second).hexdigest()
    assert rig.shipper.store_up is True and rig.shipper.breaker.failures == 0
    assert rig.metrics.registry.get_sample_value(
        "evidence_keeper_shipped_bytes_total") == len(first) + len(second)


async def test_object_lock_sets_the_retention_of_every_put(tmp_path: Path,
                                                           clock: FakeClock) -> None:
    r = Rig(tmp_path, clock, object_lock_days=7)
    try:
        add_segment(r.spool, A, lines(0, 2))
        before = datetime.now(UTC)
        await r.attempt()
        [(_key, retain)] = r.store.retained.items()
        assert retain is not None
        assert before + timedelta(days=7) <= retain <= datetime.now(UTC) + timedelta(days=7)
    finally:
        r.shipper.close()


# ------------------------------------------------------------------------------ failures


async def test_a_definite_refusal_releases_the_segment_for_a_plain_retry(
        rig: Rig, clock: FakeClock) -> None:
    _s, seg = add_segment(rig.spool, A, lines(0, 3))
    rig.store.put_failures.append(PutFailure(definite()))
    assert await rig.attempt() == 1
    # Released, not uncertain: the store said no for sure, so no HEAD is needed before retry.
    assert not seg.inflight and not seg.uncertain and not seg.shipped
    assert rig.shipper.store_up is False and rig.shipper.last_error == "403 AccessDenied"
    assert rig.errors("put") == 1 and rig.errors("head") == 0
    clock.advance(rig.shipper.breaker.open_until - clock())
    assert await rig.attempt() == 1
    assert rig.store.ops("head") == [] and len(rig.store.ops("put")) == 2
    assert seg.shipped and rig.shipper.store_up is True and rig.shipper.last_error is None
    assert rig.shipper.breaker.failures == 0


async def test_after_an_ambiguous_put_a_stored_segment_is_acknowledged_not_put_again(
        rig: Rig, clock: FakeClock) -> None:
    data = lines(0, 3)
    s, seg = add_segment(rig.spool, A, data)
    # The store kept the object but the reply was lost (timeout after sending).
    rig.store.put_failures.append(PutFailure(ambiguous(), keep=True))
    await rig.attempt()
    assert seg.uncertain and not seg.inflight and not seg.shipped
    # A successor must not be chained to anything while the store's answer is unknown.
    add_segment(rig.spool, A, lines(10, 2))
    assert rig.spool.ready_segments() == [(s, seg)]
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    key = segment_key("", "c1", A, 0, len(data), "zst")
    assert rig.store.calls == [("put", key), ("head", key)]  # found: no second PUT
    assert seg.shipped and not seg.uncertain
    assert s.chain == hashlib.sha256(data).hexdigest()


async def test_after_an_ambiguous_put_a_missing_segment_is_put_again(
        rig: Rig, clock: FakeClock) -> None:
    _s, seg = add_segment(rig.spool, A, lines(0, 3))
    rig.store.put_failures.append(PutFailure(ambiguous("connection reset"), keep=False))
    await rig.attempt()
    assert seg.uncertain
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    key = segment_key("", "c1", A, 0, seg.length, "zst")
    assert rig.store.calls == [("put", key), ("head", key), ("put", key)]
    assert seg.shipped and key in rig.store.objects


async def test_other_bytes_under_the_key_are_replaced(rig: Rig, clock: FakeClock) -> None:
    data = lines(0, 3)
    _s, seg = add_segment(rig.spool, A, data)
    key = segment_key("", "c1", A, 0, len(data), "zst")
    rig.store.objects[key] = (b"torn", {"ek-sha256": "0" * 64})
    rig.store.put_failures.append(PutFailure(ambiguous()))
    await rig.attempt()
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    assert rig.store.calls == [("put", key), ("head", key), ("put", key)]
    assert rig.store.objects[key][1]["ek-sha256"] == hashlib.sha256(data).hexdigest()
    assert seg.shipped


async def test_an_unexpected_exception_is_treated_as_ambiguous(
        rig: Rig, clock: FakeClock) -> None:
    _s, seg = add_segment(rig.spool, A, lines(0, 3))
    # Not a StoreError (a bug in a client library, a broken socket): it may have reached
    # the store, so the store is asked before anything else.
    rig.store.put_failures.append(PutFailure(ConnectionResetError("reset by peer")))
    await rig.attempt()
    assert seg.uncertain and rig.errors("put") == 1
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    assert [op for op, _ in rig.store.calls] == ["put", "head", "put"] and seg.shipped


async def test_a_head_that_cannot_answer_keeps_the_segment_uncertain(
        rig: Rig, clock: FakeClock) -> None:
    _s, seg = add_segment(rig.spool, A, lines(0, 3))
    rig.store.put_failures.append(PutFailure(ambiguous(), keep=True))
    await rig.attempt()
    rig.store.head_failures.append(StoreError("HEAD: 503 SlowDown"))
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    # Never skipped, never put blind: it stays uncertain and the error is counted as a HEAD's.
    assert [op for op, _ in rig.store.calls] == ["put", "head"]
    assert seg.uncertain and not seg.shipped and not seg.inflight
    assert rig.errors("head") == 1 and rig.errors("put") == 1
    assert rig.shipper.breaker.failures == 2
    assert rig.shipper.last_error == "HEAD: 503 SlowDown"
    clock.advance(rig.shipper.breaker.open_until - clock())
    await rig.attempt()
    assert [op for op, _ in rig.store.calls] == ["put", "head", "head"] and seg.shipped


def test_store_not_asked_keeps_the_store_errors_retry_hint(rig: Rig) -> None:
    s, seg = add_segment(rig.spool, A, lines(0, 3))
    seg.uncertain = True
    rig.store.head_failures.append(StoreError("bucket gone", retryable=False))
    prepared = rig.shipper.prepare(s, seg)
    with pytest.raises(StoreNotAsked) as err:
        rig.shipper._stored(s, seg, prepared)
    assert err.value.retryable is False and "bucket gone" in str(err.value)


# ------------------------------------------------------------------------------ damaged spool


async def test_a_missing_spool_file_is_an_exact_loss_without_backoff(rig: Rig) -> None:
    s, seg = add_segment(rig.spool, A, lines(0, 3))
    os.unlink(seg.path)
    with pytest.raises(SpoolSegmentDamaged, match="is missing"):
        rig.shipper.prepare(s, seg)
    await rig.attempt()
    assert [(x.stream, x.offset, x.bytes, x.reason) for x in rig.losses] == [
        (A, 0, seg.length, "spool_corrupt")]
    assert rig.store.calls == [] and s.sealed == []
    # Not the store's fault: no back-off, no store error, the store is not marked down.
    assert rig.shipper.breaker.failures == 0 and rig.shipper.store_up is None
    assert rig.errors("put") == 0


async def test_a_spool_file_of_the_wrong_size_is_an_exact_loss(rig: Rig) -> None:
    _s, seg = add_segment(rig.spool, A, lines(0, 3))
    _, nxt = add_segment(rig.spool, A, lines(10, 2))
    os.truncate(seg.path, seg.length - 7)
    await rig.attempt()
    assert [(x.offset, x.bytes, x.reason) for x in rig.losses] == [
        (0, seg.length, "spool_corrupt")]
    assert "expected" in rig.losses[0].detail
    # The stream goes on with its next segment.
    await rig.attempt()
    assert nxt.shipped and rig.store.ops("put") == [
        segment_key("", "c1", A, nxt.start, nxt.end, "zst")]


async def test_streams_ship_side_by_side_up_to_the_concurrency(
        tmp_path: Path, clock: FakeClock) -> None:
    r = Rig(tmp_path, clock, concurrency=1)
    try:
        add_segment(r.spool, A, lines(0, 2))
        add_segment(r.spool, B, lines(0, 2, tag="b"))
        assert r.shipper.launch() == 1 and r.shipper.launch() == 0
        await settle(r.shipper)
        assert await r.attempt() == 1
        assert {parse_segment_key(k).stream for k in r.store.ops("put")  # type: ignore[union-attr]
                } == {A, B}
    finally:
        r.shipper.close()
