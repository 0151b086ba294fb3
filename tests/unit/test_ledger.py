"""The gap ledger alone: one SQLite file, no agent.

Gaps open and close (idempotent on their dedup key while open), a loss is recorded exactly
once (also across a restart on the same file), an unknown length stays null, queries select
by kind, time, namespace and openness, and every change leaves the gap's whole newest state
in the outbox — one record per real change, none for a no-op.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evidence_keeper.health.ledger import Ledger
from evidence_keeper.model import Loss, StreamId

T0 = datetime(2025, 11, 10, 12, 0, tzinfo=UTC)
A = StreamId("shop", "orders-1", "uid-a", "orders", 0)
B = StreamId("billing", "invoice-1", "uid-b", "invoice", 1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def states(led: Ledger, gap_id: int) -> list[dict[str, object]]:
    """The outbox records of one gap, oldest first."""
    return [r.gap for r in led.records_after(0, limit=1000) if r.gap["id"] == gap_id]


# ------------------------------------------------------------------------------ open, close


def test_open_is_idempotent_while_open_and_close_releases_the_key(ledger: Ledger) -> None:
    g = ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(0), sink="dd",
                       check="dns", reason="dns_failed")
    # A second "down" for the same condition (a restart re-detecting it) is the same gap.
    assert ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(5), sink="dd") == g
    [row] = ledger.gaps()
    assert row.id == g and row.open and row.start == "2025-11-10T12:00:00.000000Z"
    assert row.fields["sink"] == "dd" and row.fields["check"] == "dns"
    ledger.close_gap(g, at=at(10))
    [row] = ledger.gaps()
    assert not row.open and row.end == "2025-11-10T12:10:00.000000Z"
    # Closed: the same condition later is a new gap.
    again = ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(20), sink="dd")
    assert again != g
    assert [(r.id, r.open) for r in ledger.gaps()] == [(g, False), (again, True)]


def test_closing_twice_keeps_the_first_end(ledger: Ledger) -> None:
    g = ledger.open_gap("backlog", dedup="backlog:store", at=at(0))
    ledger.close_gap(g, at=at(3))
    ledger.close_gap(g, at=at(9))
    assert ledger.gaps()[0].end == "2025-11-10T12:03:00.000000Z"
    assert len(states(ledger, g)) == 2  # opened, closed: the second close changed nothing


def test_an_unknown_kind_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unknown gap kind 'outage'"):
        ledger.open_gap("outage", dedup="x", at=at(0))
    assert ledger.gaps() == []


# ------------------------------------------------------------------------------ losses


def test_a_loss_is_recorded_once_and_an_unknown_length_stays_null(ledger: Ledger) -> None:
    known = Loss(A, 100, 50, "rotated_away", "0.log.20251110-120000 rotated away")
    assert ledger.record_loss(known, at=at(1))
    assert not ledger.record_loss(known, at=at(2))  # the same hole re-detected after a crash
    # Two holes of unknown length at one offset (they consume none) are told apart by detail.
    gone1 = Loss(A, 150, None, "deleted", "1.log created and deleted while stopped")
    gone2 = Loss(A, 150, None, "deleted", "2.log created and deleted while stopped")
    assert ledger.record_loss(gone1, at=at(3))
    assert ledger.record_loss(gone2, at=at(3))
    assert not ledger.record_loss(gone1, at=at(4))
    rows = ledger.gaps(kind="loss")
    assert [(r.fields["offset"], r.fields["bytes"]) for r in rows] == [
        (100, 50), (150, None), (150, None)]
    doc = rows[1].to_json()
    assert "bytes" in doc and doc["bytes"] is None  # the contract: null, never absent or 0
    assert doc["start"] == doc["end"] == "2025-11-10T12:03:00.000000Z" and not doc["open"]
    assert (doc["namespace"], doc["pod"], doc["pod_uid"], doc["container"], doc["restart"]) == (
        "shop", "orders-1", "uid-a", "orders", 0)


# ------------------------------------------------------------------------------ queries


def test_queries_by_kind_time_namespace_and_openness(ledger: Ledger) -> None:
    early = ledger.open_gap("agent_down", dedup="agent_down:1", at=at(0), reason="stopped")
    ledger.close_gap(early, at=at(5))
    outage = ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(10), sink="dd")
    ledger.record_loss(Loss(A, 0, 10, "deleted", "a"), at=at(20))
    ledger.record_loss(Loss(B, 0, 10, "deleted", "b"), at=at(30))

    def ids(**kw: object) -> list[int]:
        return [r.id for r in ledger.gaps(**kw)]  # type: ignore[arg-type]

    assert ids(kind="agent_down") == [early]
    assert [r.fields["namespace"] for r in ledger.gaps(kind="loss")] == ["shop", "billing"]
    assert [r.fields["pod"] for r in ledger.gaps(namespace="billing")] == ["invoice-1"]
    assert ids(open_=True) == [outage]
    assert early in ids(open_=False) and outage not in ids(open_=False)
    # Overlap with [since, until]: a closed gap ending before `since` is out, an open one in.
    assert early not in ids(since=at(6)) and outage in ids(since=at(60))
    assert early in ids(since=at(5))  # ends exactly at since: overlaps
    assert ids(until=at(9)) == [early]
    assert ids(since=at(15), until=at(25), kind="loss") == [
        r.id for r in ledger.gaps(kind="loss")][:1]
    assert ids(until=at(-1)) == []
    # Oldest first.
    assert [r.start for r in ledger.gaps()] == sorted(r.start for r in ledger.gaps())
    assert ledger.open_counts() == {"sink_outage": 1, "loss": 0, "backlog": 0, "agent_down": 0}


def test_prune_drops_old_closed_gaps_never_open_ones(ledger: Ledger) -> None:
    old = ledger.open_gap("backlog", dedup="backlog:1", at=at(0))
    ledger.close_gap(old, at=at(1))
    still_open = ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(0))
    recent = ledger.open_gap("backlog", dedup="backlog:2", at=at(0))
    ledger.close_gap(recent, at=at(60 * 24 * 20))
    assert ledger.prune(older_than=timedelta(days=14), now=at(60 * 24 * 30)) == 1
    assert sorted(r.id for r in ledger.gaps()) == sorted([still_open, recent])


# ------------------------------------------------------------------------------ the outbox


def test_every_change_records_the_gaps_newest_whole_state(ledger: Ledger) -> None:
    g = ledger.open_gap("sink_outage", dedup="sink_outage:dd", at=at(0), sink="dd",
                       extra='{"coverage": {"captured_bytes": 0}}')
    ledger.update_gap(g, extra='{"coverage": {"captured_bytes": 10}}')
    ledger.update_gap(g, extra='{"coverage": {"captured_bytes": 10}}')  # no change: no record
    ledger.close_gap(g, at=at(4), extra='{"coverage": {"captured_bytes": 25}}')
    recs = states(ledger, g)
    assert [(r["open"], r["coverage"]) for r in recs] == [
        (True, {"captured_bytes": 0}), (True, {"captured_bytes": 10}),
        (False, {"captured_bytes": 25})]
    # Each record is the whole gap, so the newest one alone says everything.
    assert recs[-1] == ledger.gaps()[0].to_json()
    assert ledger.changes == 3 and ledger.count_records_after(0) == 3


def test_records_shipped_leave_the_outbox_and_the_sequence_goes_on(ledger: Ledger) -> None:
    for i in range(3):
        ledger.record_loss(Loss(A, i * 10, 10, "deleted", f"f{i}"), at=at(i))
    [r1, r2, r3] = ledger.records_after(0, limit=10)
    assert (r1.seq, r2.seq, r3.seq) == (1, 2, 3)
    assert ledger.records_after(1, limit=1) == [r2]
    ledger.shipped(through=2, state_key="ledgership", state='{"seq": 2}')
    assert ledger.records_after(0, limit=10) == [r3]
    ledger.shipped(through=3, state_key="ledgership", state='{"seq": 3}')
    assert ledger.last_record_seq() == 3  # from AUTOINCREMENT once the outbox is empty
    ledger.record_loss(Loss(A, 30, 10, "deleted", "f3"), at=at(3))
    assert [r.seq for r in ledger.records_after(0, limit=10)] == [4]


# ------------------------------------------------------------------------------ restart


def test_a_restart_on_the_same_file_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    ledger_id = led.ledger_id
    outage = led.open_gap("sink_outage", dedup="sink_outage:dd", at=at(0), sink="dd")
    loss = Loss(A, 0, 10, "rotated_away", "x")
    led.record_loss(loss, at=at(1))
    led.set_meta("heartbeat", "2025-11-10T12:01:00Z")
    led.shipped(through=1, state_key="ledgership", state="pos-1")
    led.close()

    led = Ledger(path)
    try:
        assert led.ledger_id == ledger_id
        assert led.get_meta("heartbeat") == "2025-11-10T12:01:00Z"
        assert led.get_meta("ledgership") == "pos-1"
        # The open outage is still open, and still the one its condition maps to.
        assert led.open_gap("sink_outage", dedup="sink_outage:dd", at=at(9)) == outage
        assert not led.record_loss(loss, at=at(9))  # recorded exactly once across restarts
        assert [r.seq for r in led.records_after(0, limit=10)] == [2]
        led.close_gap(outage, at=at(10))
        assert led.last_record_seq() == 3
        assert [(r.kind, r.open) for r in led.gaps()] == [("sink_outage", False),
                                                          ("loss", False)]
    finally:
        led.close()


def test_a_new_file_gets_a_new_ledger_id(tmp_path: Path) -> None:
    one, two = Ledger(tmp_path / "a.db"), Ledger(tmp_path / "b.db")
    try:
        assert one.ledger_id != two.ledger_id and len(one.ledger_id) == 16
    finally:
        one.close()
        two.close()


def test_a_ledger_from_before_the_outbox_sends_every_gap_once(tmp_path: Path) -> None:
    """An older agent's file has gaps but no ledger id and no records: the first open gives
    it an id and puts each gap's state in the outbox, so the store learns of all of them."""
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    g = led.open_gap("agent_down", dedup="agent_down:1", at=at(0), reason="crashed")
    led.close_gap(g, at=at(2))
    led.close()
    db = sqlite3.connect(path)
    db.executescript("DELETE FROM meta; DELETE FROM ledger_records; DELETE FROM ledger_state;")
    db.close()
    led = Ledger(path)
    try:
        [rec] = led.records_after(0, limit=10)
        assert rec.gap["id"] == g and rec.gap["kind"] == "agent_down" and not rec.gap["open"]
        led.close()
        led = Ledger(path)  # and only once
        assert [r.gap["id"] for r in led.records_after(0, limit=10)] == [g]
    finally:
        led.close()
