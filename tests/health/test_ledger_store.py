"""The gap ledger in the store: one record per change, exactly-once shipping, chains, archives.

The ledger is the real SQLite ledger, the stores are a directory or moto's S3 server; faults
are a store that loses a reply (the object is stored, the answer never arrives), refuses a
put, or a "crash" (an exception nothing catches) between the put and the commit.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from evidence_keeper.api.client import call
from evidence_keeper.archive.ledger import newest_gaps, read_ledger, verify_ledger
from evidence_keeper.archive.verify import verify_archive
from evidence_keeper.health.ledger import Ledger
from evidence_keeper.health.ledgership import (
    LedgerShipConfig,
    LedgerShipper,
    ledger_key,
    parse_ledger_key,
)
from evidence_keeper.metrics import Metrics
from evidence_keeper.model import Loss, StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore, Store, StoreError
from evidence_keeper.store.s3 import S3Store
from evidence_keeper.supervisor import Agent
from tests.conftest import AgentThread, running_agent, wait_until
from tests.support.s3 import s3

pytestmark = pytest.mark.usefixtures("aws_env")

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
SID = StreamId("shop", "orders-1", "uid-1", "app", 0)


class Crash(BaseException):
    """The process dies here: nothing in the shipper catches it."""


class FaultyStore:
    """A store in front of another one that can lose replies, refuse puts, or crash."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.scheme, self.check_name = inner.scheme, inner.check_name
        self.puts: list[tuple[str, datetime | None]] = []
        self.heads = 0
        self.lose_reply = 0  # store, then fail
        self.refuse = 0  # fail without storing
        self.crash_after_put = False

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        if self.refuse:
            self.refuse -= 1
            raise StoreError("connection refused (injected)")
        self.inner.put(key, body, meta, retain_until=retain_until)
        self.puts.append((key, retain_until))
        if self.crash_after_put:
            raise Crash
        if self.lose_reply:
            self.lose_reply -= 1
            raise StoreError("read timeout: the reply was lost (injected)")

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def head(self, key: str) -> dict[str, str] | None:
        self.heads += 1
        return self.inner.head(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def check(self) -> None:
        self.inner.check()

    def check_object_lock(self) -> None:
        self.inner.check_object_lock()

    def describe(self) -> str:
        return self.inner.describe()


def shipper(ledger: Ledger, store: Store, *, node: str = "node-1", **kw: Any) -> LedgerShipper:
    return LedgerShipper(ledger, store, LedgerShipConfig(node=node, cluster="default", **kw),
                         metrics=Metrics())


def outage(ledger: Ledger, sink: str = "loki") -> int:
    return ledger.open_gap("sink_outage", dedup=f"sink_outage:{sink}", at=NOW, sink=sink,
                           check="dns", reason="dns_failed", detail="NXDOMAIN")


def loss(ledger: Ledger, offset: int) -> bool:
    return ledger.record_loss(Loss(SID, offset, 10, "evicted", "spool budget"), at=NOW)


def stored_records(store: Store) -> list[dict[str, Any]]:
    return [r for o in read_ledger(store, "default") for r in o.records]


# ------------------------------------------------------------------------------ records
def test_every_change_is_one_record_and_a_no_op_is_none(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    gap = outage(ledger)
    assert outage(ledger) == gap  # idempotent open: no change
    cov = json.dumps({"coverage": {"streams": 1, "captured_bytes": 5}})
    ledger.update_gap(gap, extra=cov)
    ledger.update_gap(gap, extra=cov)  # the same coverage again: no change
    ledger.close_gap(gap, at=NOW + timedelta(minutes=5))
    ledger.close_gap(gap, at=NOW + timedelta(minutes=9))  # already closed: no change
    assert loss(ledger, 100) and not loss(ledger, 100)  # a re-detected hole: no change
    records = ledger.records_after(0, limit=100)
    assert [(r.gap["id"], r.gap["kind"], r.gap["open"]) for r in records] == [
        (gap, "sink_outage", True), (gap, "sink_outage", True), (gap, "sink_outage", False),
        (2, "loss", False)]
    assert "coverage" not in records[0].gap
    assert records[1].gap["coverage"] == {"streams": 1, "captured_bytes": 5}
    assert records[2].gap["end"] == "2026-12-06T09:05:00.000000Z"
    assert [r.seq for r in records] == [1, 2, 3, 4]
    # The record is the gap exactly as /gaps shows it.
    assert records[2].gap == ledger.gaps(kind="sink_outage")[0].to_json()
    ledger.close()


def test_a_ledger_from_before_the_outbox_is_backfilled_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    outage(ledger)
    loss(ledger, 7)
    ledger.close()
    db = sqlite3.connect(path)  # what an agent of the previous version left behind
    db.executescript("DELETE FROM ledger_records; DELETE FROM ledger_state;"
                     " DELETE FROM meta WHERE key = 'ledger_id';")
    db.commit()
    db.close()
    ledger = Ledger(path)
    assert [r.gap["kind"] for r in ledger.records_after(0, limit=10)] == ["sink_outage", "loss"]
    first_id = ledger.ledger_id
    ledger.close()
    ledger = Ledger(path)
    assert len(ledger.records_after(0, limit=10)) == 2 and ledger.ledger_id == first_id
    ledger.close()


# ------------------------------------------------------------------------------ shipping
def test_batches_chain_and_read_back_newest_state(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store = FileStore(tmp_path / "store")
    ship = shipper(ledger, store)
    gap = outage(ledger)
    loss(ledger, 0)
    assert ship.ship_all() == 2 and ship.unshipped() == 0
    assert ship.metrics.ledger_unshipped_records._value.get() == 0
    ledger.close_gap(gap, at=NOW + timedelta(minutes=1))
    assert ship.ship_all() == 1 and ship.ship_all() == 0
    keys = list(store.list("default/_ledger/"))
    assert keys == [ledger_key("default", "node-1", n, "zst") for n in (0, 1)]
    first, second = (store.head(k) or {} for k in keys)
    assert first["ek-prev-sha256"] == "" and second["ek-prev-sha256"] == first["ek-sha256"]
    assert (first["ek-records"], first["ek-first-record"], first["ek-last-record"]) == (
        "2", "1", "2")
    assert first["ek-node"] == "node-1" and first["ek-ledger-id"] == ledger.ledger_id
    assert ledger.records_after(0, limit=10) == []  # shipped records leave the outbox
    gaps = newest_gaps(read_ledger(store, "default"))
    assert [(g["kind"], g["open"]) for g in gaps] == [("sink_outage", False), ("loss", False)]
    assert verify_ledger(store, "default").ok
    ledger.close()


def test_a_lost_reply_is_headed_never_put_twice(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store = FaultyStore(FileStore(tmp_path / "store"))
    ship = shipper(ledger, store)
    outage(ledger)
    store.lose_reply = 1
    with pytest.raises(StoreError):
        ship.ship_all()
    assert ship.unshipped() == 1  # not acknowledged: still waiting
    assert ship.ship_all() == 1
    assert [k for k, _ in store.puts] == [ledger_key("default", "node-1", 0, "zst")]
    assert ship.unshipped() == 0 and len(stored_records(store)) == 1


def test_a_crash_before_the_put_reputs_the_same_bytes_after_a_config_change(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    store = FaultyStore(FileStore(tmp_path / "store"))
    outage(ledger)
    store.refuse = 1
    with pytest.raises(StoreError):
        shipper(ledger, store).ship_all()
    ledger.close()  # the agent dies; it comes back configured for gzip
    ledger = Ledger(path)
    loss(ledger, 0)  # a change made after the batch was cut goes into the next object
    ship = shipper(ledger, store, compression="gzip")
    assert ship.ship_all() == 2
    keys = [k for k, _ in store.puts]
    assert keys == [ledger_key("default", "node-1", 0, "zst"),
                    ledger_key("default", "node-1", 1, "gz")]
    assert [r["gap"]["kind"] for r in stored_records(store)] == ["sink_outage", "loss"]
    assert verify_ledger(store, "default").ok
    ledger.close()


def test_a_crash_after_the_put_commits_without_a_second_put(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    store = FaultyStore(FileStore(tmp_path / "store"))
    outage(ledger)
    store.crash_after_put = True
    with pytest.raises(Crash):
        shipper(ledger, store).ship_all()
    ledger.close()
    store.crash_after_put = False
    ledger = Ledger(path)
    loss(ledger, 0)
    assert shipper(ledger, store).ship_all() == 2
    assert [k for k, _ in store.puts] == [ledger_key("default", "node-1", n, "zst")
                                          for n in (0, 1)]
    records = stored_records(store)
    assert [r["seq"] for r in records] == [1, 2]  # each once, none skipped
    ledger.close()


def test_someone_elses_object_under_our_key_is_never_overwritten(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    a = Ledger(tmp_path / "a.sqlite")
    outage(a)
    ship_a = shipper(a, FaultyStore(store))
    ship_a.store.refuse = 1  # type: ignore[attr-defined]
    with pytest.raises(StoreError):
        ship_a.ship_all()  # pending: seq 0
    b = Ledger(tmp_path / "b.sqlite")  # a second agent with the same node name
    loss(b, 0)
    assert shipper(b, store).ship_all() == 1  # takes seq 0 first
    with pytest.raises(StoreError, match="two agents"):
        ship_a.ship_all()
    assert [r["gap"]["kind"] for r in stored_records(store)] == ["loss"]
    a.close()
    b.close()


def test_a_lost_spool_continues_the_nodes_chain(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    old = Ledger(tmp_path / "old" / "ledger.sqlite")
    outage(old)
    assert shipper(old, store).ship_all() == 1
    loss(old, 0)
    assert shipper(old, store).ship_all() == 1
    new = Ledger(tmp_path / "new" / "ledger.sqlite")  # the spool is gone: a new ledger
    assert new.ledger_id != old.ledger_id
    outage(new)
    assert shipper(new, store).ship_all() == 1
    keys = [parse_ledger_key(k) for k in store.list("default/_ledger/node-1/")]
    assert [k.seq for k in keys if k] == [0, 1, 2]
    report = verify_ledger(store, "default")
    assert report.ok and report.objects == 3, report.problems
    gaps = newest_gaps(read_ledger(store, "default"))
    # Both ledgers have a gap 1: they stay two gaps, told apart by ledger id.
    assert sorted((g["ledger_id"] == new.ledger_id, g["id"], g["kind"]) for g in gaps) == [
        (False, 1, "sink_outage"), (False, 2, "loss"), (True, 1, "sink_outage")]
    old.close()
    new.close()


def test_verify_names_a_missing_object_and_a_broken_link(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ship = shipper(ledger, store)
    for n in range(4):
        loss(ledger, n * 100)
        ship.ship_all()
    keys = list(store.list("default/_ledger/"))
    (tmp_path / "store" / keys[1]).unlink()
    report = verify_ledger(store, "default")
    assert not report.ok
    assert (keys[2], "objects 1..1 of node node-1's ledger are missing from the store") in (
        report.problems)
    ledger.close()


async def test_the_store_down_counts_unshipped_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store = FaultyStore(FileStore(tmp_path / "store"))
    now = [0.0]  # the shipper's clock: its back-off passes when the test says so
    ship = LedgerShipper(ledger, store, LedgerShipConfig(node="node-1", cluster="default",
                                                         backoff_initial_s=5.0),
                         metrics=Metrics(), clock=lambda: now[0])
    outage(ledger)
    loss(ledger, 0)
    store.refuse = 1
    assert await ship.tick() is False
    assert ship.last_error and "refused" in ship.last_error
    assert ship.metrics.ledger_unshipped_records._value.get() == 2
    now[0] = 4.9
    assert await ship.tick() is False  # still backing off: no new attempt
    assert ship.unshipped() == 2
    now[0] = 5.0
    assert await ship.tick() is True
    assert ship.unshipped() == 0 and ship.last_error is None
    assert ship.metrics.ledger_unshipped_records._value.get() == 0
    ledger.close()


# ------------------------------------------------------------------------------ S3
def test_s3_object_lock_and_a_lost_reply(tmp_path: Path, moto_url: str) -> None:
    client = s3(moto_url)
    name = f"ek-ledger-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    inner = S3Store(name, "evidence", endpoint_url=moto_url, object_lock_days=3)
    store = FaultyStore(inner)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ship = shipper(ledger, store, object_lock_days=3)
    outage(ledger)
    store.lose_reply = 1
    with pytest.raises(StoreError):
        ship.ship_all()
    assert ship.ship_all() == 1
    key = ledger_key("default", "node-1", 0, "zst")
    versions = client.list_object_versions(Bucket=name, Prefix=f"evidence/{key}")["Versions"]
    assert len(versions) == 1  # headed before a re-put: no second version
    info = inner.object_info(key)
    assert info["ObjectLockMode"] == "COMPLIANCE"
    assert 2 <= (info["ObjectLockRetainUntilDate"] - datetime.now(UTC)).days <= 3
    assert verify_ledger(inner, "default").ok
    ledger.close()


# ------------------------------------------------------------------------------ the agent
async def test_the_agent_ships_its_ledger_within_the_flush_interval(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(flush_interval_s=1.0)
    store = FileStore(tmp_path / "store")
    async with running_agent(settings) as agent:
        await asyncio.to_thread(loss, agent.ledger, 0)
        await wait_until(lambda: len(stored_records(store)) == 1, within=10,
                         what="the loss record in the store")
        ready = await asyncio.to_thread(agent.readiness)
        assert ready["ledger"] == {"unshipped_records": 0, "last_error": None}
        assert agent.api_address is not None
        url = f"http://{agent.api_address[0]}:{agent.api_address[1]}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert b"\nevidence_keeper_ledger_unshipped_records 0.0\n" in text


class ClosedUntilShutdown(FaultyStore):
    """Refuses ledger objects while the agent runs: only the shutdown drain can ship them."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.stopping: Callable[[], bool] = lambda: False
        self.order: list[str] = []

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        if "/_ledger/" in key and not self.stopping():
            raise StoreError("ledger refused while running (injected)")
        if self.stopping():
            self.order.append("ledger" if "/_ledger/" in key else "segment")
        super().put(key, body, meta, retain_until=retain_until)


async def test_shutdown_drains_the_ledger_before_the_segments(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    # A long flush interval: the segment is still open at SIGTERM and ships in the drain.
    settings = make_settings(flush_interval_s=30.0)
    store = ClosedUntilShutdown(FileStore(tmp_path / "store"))
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1", containers=("app",))

    def prepare(agent: Agent) -> None:
        store.stopping = agent.intake_closed.is_set

    async with running_agent(settings, store=store, prepare=prepare) as agent:
        sim.write("shop", "orders-1", "app", "captured, not yet shipped")
        await wait_until(lambda: agent.spool.total_bytes() > 0, within=10, what="capture")
        await asyncio.to_thread(loss, agent.ledger, 0)
        await wait_until(lambda: agent.ledger_shipper.last_error is not None, within=10,
                         what="the ledger refused while running")
        assert agent.metrics.ledger_unshipped_records._value.get() == 1
    assert [r["gap"]["offset"] for r in stored_records(store)] == [0]
    assert store.order[0] == "ledger" and "segment" in store.order, store.order


def _archive(t: AgentThread, token: str, label: str) -> dict[str, Any]:
    _, doc = call(t.url, "/archive", method="POST", token=token,
                  body={"namespace": "shop", "since": "1h", "reason": "INC-14", "label": label})
    deadline = time.monotonic() + 30
    while doc["status"] not in ("complete", "failed"):
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)
        _, doc = call(t.url, f"/archives/{doc['id']}", token=token)
    assert doc["status"] == "complete", doc
    return dict(doc)


def test_archive_manifest_lists_ledger_objects_and_verify_checks_them(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    token = "ledger-archive-token-0123456789"
    (tmp_path / "token").write_text(token)
    settings = make_settings(archive_token_file=str(tmp_path / "token"))
    store = FileStore(tmp_path / "store")
    with AgentThread(settings) as t:
        ledger = t.agent.ledger
        # An outage that ended two days ago: its object is outside the window.
        old = ledger.open_gap("sink_outage", dedup="x", at=datetime.now(UTC) - timedelta(days=3),
                              sink="old", check="dns")
        ledger.close_gap(old, at=datetime.now(UTC) - timedelta(days=2))
        deadline = time.monotonic() + 20
        while len(stored_records(store)) < 2:
            assert time.monotonic() < deadline, "the old outage was not shipped"
            time.sleep(0.1)
        ledger.record_loss(Loss(SID, 0, 10, "evicted", "spool budget"), at=datetime.now(UTC))
        doc = _archive(t, token, "first")
        manifest = json.loads(store.get(doc["manifest_key"]))
        entries = manifest["ledger"]
        listed = {e["key"] for e in entries}
        records = [r for o in read_ledger(store, "default") if o.key in listed
                   for r in o.records]
        assert [r["gap"]["kind"] for r in records] == ["loss"], records
        assert all(e["node"] == "node-1" and e["sha256"] for e in entries)
        report = verify_archive(store, cluster="default", archive_id=doc["id"])
        assert report.ok, report.problems
        assert any("gap-ledger objects" in n for n in report.notes)

        # One flipped byte in a listed ledger object: verify names it.
        victim = tmp_path / "store" / entries[0]["key"]
        body = bytearray(victim.read_bytes())
        body[len(body) // 2] ^= 0x01
        victim.write_bytes(bytes(body))
        report = verify_archive(store, cluster="default", archive_id=doc["id"])
        assert not report.ok
        assert entries[0]["key"] in {p.key for p in report.problems}

        # A later archive does not vouch for the damaged object: it lists it without a hash.
        later = _archive(t, token, "second")
    damaged = [e for e in json.loads(store.get(later["manifest_key"]))["ledger"]
               if e["sha256"] is None]
    assert [e["key"] for e in damaged] == [entries[0]["key"]]
    report = verify_archive(store, cluster="default", archive_id=later["id"])
    assert any(p.key == entries[0]["key"] and "already damaged" in p.message
               for p in report.problems), report.problems


class HangingLedger(FaultyStore):
    """Ledger puts hang (a store that accepts the connection and never answers)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.hung = threading.Event()

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        if "/_ledger/" in key:
            self.hung.set()
            self.release.wait(120)
        super().put(key, body, meta, retain_until=retain_until)


async def test_a_hanging_store_does_not_hold_the_shutdown_past_its_deadline(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    store = HangingLedger(FileStore(tmp_path / "store"))
    settings = make_settings(shutdown_timeout_s=1)
    try:
        async with running_agent(settings, store=store) as agent:
            await asyncio.to_thread(loss, agent.ledger, 0)
            await wait_until(store.hung.is_set, within=10, what="a ledger put hanging")
            stopping = time.monotonic()
        # The deadline is 1 s; a put that never answers must not stretch it to the store's
        # timeouts (the bound here is generous for a loaded machine, not a benchmark).
        assert time.monotonic() - stopping < 15
    finally:
        store.release.set()  # the put lands now; its commit finds the ledger closed
    await wait_until(lambda: bool(store.puts), within=10, what="the hung put to land")
    # The next start: the record is still in the outbox, the batch pending; the put that
    # landed after the shutdown is found by its hash and committed, not put again.
    ledger = Ledger(Path(settings.spool_dir) / "ledger.sqlite")
    assert ledger.count_records_after(0) == 1
    assert shipper(ledger, store).ship_all() == 1
    assert len(store.puts) == 1 and len(stored_records(store)) == 1
    ledger.close()


def test_a_hostile_ledger_object_is_an_error_not_an_out_of_memory(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (32 << 20))  # 32 MiB of zeros
    key = ledger_key("default", "node-1", 0, "zst")
    store.put(key, bomb, {"ek-length": "64", "ek-sha256": "0" * 64, "ek-prev-sha256": ""})
    report = verify_ledger(store, "default")
    assert not report.ok
    assert (key, "body decompresses to more than 64 bytes (ek-length)") in report.problems
