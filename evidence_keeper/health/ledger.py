"""The gap ledger: an embedded SQLite database in ``spool_dir``.

Every gap the agent knows of is one row: sink outages, shipping backlog, agent downtime and
byte-exact ``loss`` records from the capture pipeline. The ledger is written *before* the
checkpoint that moves past a hole, so a crash between the two re-detects the hole on recovery;
``dedup`` keys make that second insert a no-op, so a loss is recorded exactly once.

SQLite runs with ``synchronous=FULL`` in WAL mode: a committed row survives kill -9 and power
loss. Calls are blocking and come from worker threads; one connection guarded by a lock.

The ledger also feeds the store (``health/ledgership.py``): every change of a gap (opened, closed,
coverage grown) appends one *record*, the gap's whole new state, to an outbox table in the
same transaction as the change, so a change and its record are durable together or not at
all. Records are append-only: a gap that changes gets a new record with the same gap id, and
a change that leaves the state as it was records nothing. Gap ids are local to one SQLite
file, so every record also names the file's ``ledger_id`` (random, made when the file is
created): a node whose spool was lost starts a new ledger id and its ids never merge with the
old ones. Shipped records are deleted from the outbox; the shipping position lives in
``meta`` (see :class:`evidence_keeper.health.ledgership.LedgerShipper`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from evidence_keeper.model import GAP_KINDS, Loss
from evidence_keeper.timefmt import rfc3339

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gaps (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind      TEXT NOT NULL,
    start     TEXT NOT NULL,
    "end"     TEXT,
    sink      TEXT,
    "check"   TEXT,
    reason    TEXT,
    namespace TEXT,
    pod       TEXT,
    pod_uid   TEXT,
    container TEXT,
    restart   INTEGER,
    "offset"  INTEGER,
    bytes     INTEGER,
    detail    TEXT,
    extra     TEXT,
    dedup     TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS gaps_start ON gaps(start);
CREATE INDEX IF NOT EXISTS gaps_open ON gaps("end") WHERE "end" IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_records (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    gap_id      INTEGER NOT NULL,
    recorded_at TEXT NOT NULL,
    state       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_state (gap_id INTEGER PRIMARY KEY, state TEXT NOT NULL);
"""

_COLUMNS = (
    "id", "kind", "start", "end", "sink", "check", "reason", "namespace", "pod", "pod_uid",
    "container", "restart", "offset", "bytes", "detail", "extra",
)


@dataclass(frozen=True, slots=True)
class GapRow:
    id: int
    kind: str
    start: str
    end: str | None
    fields: Mapping[str, Any]

    @property
    def open(self) -> bool:
        return self.end is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "start": self.start, "end": self.end,
            "open": self.open,
        }
        out.update({k: v for k, v in self.fields.items() if v is not None and k != "extra"})
        if self.kind == "loss":
            out.setdefault("bytes", None)  # contract §3: every loss has the key (null: unknown)
        extra = self.fields.get("extra")
        if extra:
            # Internal bookkeeping (e.g. the stream keys behind a coverage count) stays inside.
            out.update({k: v for k, v in json.loads(extra).items() if k != "stream_keys"})
        return out


class Ledger:
    """Durable, idempotent record of gaps."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # Bumped by every outbox record: the ledger shipper skips its tick while it is unchanged.
        self.changes = 0
        self.ledger_id = self._ensure_ledger_id()

    def _ensure_ledger_id(self) -> str:
        """This file's ledger id; made once, when the outbox starts (backfilling every gap)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
            if row is not None:
                return str(row[0])
            ledger_id = secrets.token_hex(8)
            db.execute("INSERT INTO meta (key, value) VALUES ('ledger_id', ?)", (ledger_id,))
            # A ledger from before the outbox existed: its gaps reach the store too.
            now = rfc3339(datetime.now(UTC))
            for (gap_id,) in db.execute("SELECT id FROM gaps ORDER BY id").fetchall():
                self._record_change(db, int(gap_id), now)
            return ledger_id

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_loss(self, loss: Loss, *, at: datetime) -> bool:
        """Insert a ``loss`` gap; returns False when this exact hole was recorded before."""
        s = loss.stream
        # Holes of unknown length consume no offsets, so several can share one: the detail
        # (which names the file) tells them apart, and is the same when a crash re-detects one.
        which = hashlib.sha256(loss.detail.encode()).hexdigest()[:16]
        dedup = f"loss:{s.key}:{loss.offset}:{loss.reason}:{loss.bytes}:{which}"
        when = rfc3339(at)
        with self._tx() as db:
            cur = db.execute(
                'INSERT OR IGNORE INTO gaps (kind, start, "end", reason, namespace, pod, pod_uid,'
                ' container, restart, "offset", bytes, detail, dedup)'
                " VALUES ('loss', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (when, when, loss.reason, s.namespace, s.pod, s.pod_uid, s.container, s.restart,
                 loss.offset, loss.bytes, loss.detail, dedup),
            )
            if cur.rowcount != 1:
                return False
            self._record_change(db, int(cur.lastrowid or 0), when)
            return True

    def open_gap(self, kind: str, *, dedup: str, at: datetime, **fields: Any) -> int:
        """Open a gap (idempotent on ``dedup`` while it is open); returns its id."""
        if kind not in GAP_KINDS:
            raise ValueError(f"unknown gap kind {kind!r}")
        cols = ["kind", "start", "dedup", *fields]
        with self._tx() as db:
            row = db.execute("SELECT id FROM gaps WHERE dedup = ?", (dedup,)).fetchone()
            if row is not None:
                return int(row[0])
            cur = db.execute(
                f"INSERT INTO gaps ({', '.join(_quote(c) for c in cols)})"
                f" VALUES ({', '.join('?' for _ in cols)})",
                (kind, rfc3339(at), dedup, *fields.values()),
            )
            gap_id = int(cur.lastrowid or 0)
            self._record_change(db, gap_id, rfc3339(datetime.now(UTC)))
            return gap_id

    def close_gap(self, gap_id: int, *, at: datetime, **fields: Any) -> None:
        """Close an open gap; its dedup key is released so the same condition can reopen."""
        sets = ['"end" = ?', "dedup = NULL", *(f"{_quote(k)} = ?" for k in fields)]
        with self._tx() as db:
            cur = db.execute(
                f'UPDATE gaps SET {", ".join(sets)} WHERE id = ? AND "end" IS NULL',
                (rfc3339(at), *fields.values(), gap_id),
            )
            if cur.rowcount:
                self._record_change(db, gap_id, rfc3339(datetime.now(UTC)))

    def update_gap(self, gap_id: int, **fields: Any) -> None:
        sets = ", ".join(f"{_quote(k)} = ?" for k in fields)
        with self._tx() as db:
            cur = db.execute(f"UPDATE gaps SET {sets} WHERE id = ?", (*fields.values(), gap_id))
            if cur.rowcount:
                self._record_change(db, gap_id, rfc3339(datetime.now(UTC)))

    # ------------------------------------------------------------------ the outbox
    def _record_change(self, db: sqlite3.Connection, gap_id: int, recorded_at: str) -> None:
        """Append the gap's new state to the outbox, unless it is the state last recorded.

        Runs inside the transaction of the change, so the two commit together.
        """
        row = db.execute(
            f"SELECT {', '.join(_quote(c) for c in _COLUMNS)} FROM gaps WHERE id = ?",
            (gap_id,)).fetchone()
        if row is None:
            return
        state = json.dumps(_row(row).to_json(), sort_keys=True, separators=(",", ":"))
        last = db.execute("SELECT state FROM ledger_state WHERE gap_id = ?", (gap_id,)).fetchone()
        if last is not None and last[0] == state:
            return
        db.execute("INSERT OR REPLACE INTO ledger_state (gap_id, state) VALUES (?, ?)",
                   (gap_id, state))
        db.execute("INSERT INTO ledger_records (gap_id, recorded_at, state) VALUES (?, ?, ?)",
                   (gap_id, recorded_at, state))
        self.changes += 1

    def records_after(self, seq: int, *, limit: int) -> list[LedgerRecord]:
        """Outbox records with a sequence number above ``seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, recorded_at, state FROM ledger_records WHERE seq > ?"
                " ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [LedgerRecord(int(r[0]), str(r[1]), json.loads(r[2])) for r in rows]

    def count_records_after(self, seq: int) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM ledger_records WHERE seq > ?",
                                   (seq,)).fetchone()
        return int(row[0])

    def last_record_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT max(seq) FROM ledger_records").fetchone()
            if row[0] is not None:
                return int(row[0])
            # Every record was shipped and dropped: AUTOINCREMENT still knows the last one.
            seq = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'ledger_records'").fetchone()
        return 0 if seq is None else int(seq[0])

    def shipped(self, *, through: int, state_key: str, state: str) -> None:
        """Records up to ``through`` are in the store: drop them and save the new position
        (``state`` under ``meta[state_key]``) in one transaction."""
        with self._tx() as db:
            db.execute("DELETE FROM ledger_records WHERE seq <= ?", (through,))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (state_key, state))

    def open_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                'SELECT kind, count(*) FROM gaps WHERE "end" IS NULL GROUP BY kind').fetchall()
        counts = dict.fromkeys(GAP_KINDS, 0)
        counts.update({str(k): int(n) for k, n in rows})
        return counts

    def gaps(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kind: str | None = None,
        namespace: str | None = None,
        open_: bool | None = None,
    ) -> list[GapRow]:
        """Gaps overlapping ``[since, until]``, oldest first."""
        where: list[str] = []
        args: list[Any] = []
        if since is not None:
            where.append('("end" IS NULL OR "end" >= ?)')
            args.append(rfc3339(since))
        if until is not None:
            where.append("start <= ?")
            args.append(rfc3339(until))
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        if open_ is not None:
            where.append('"end" IS NULL' if open_ else '"end" IS NOT NULL')
        sql = f"SELECT {', '.join(_quote(c) for c in _COLUMNS)} FROM gaps"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start, id"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_row(r) for r in rows]

    def prune(self, *, older_than: timedelta, now: datetime) -> int:
        """Drop closed gaps that ended before ``now - older_than`` (retention)."""
        with self._tx() as db:
            cur = db.execute(
                'DELETE FROM gaps WHERE "end" IS NOT NULL AND "end" < ?',
                (rfc3339(now - older_than),),
            )
            db.execute("DELETE FROM ledger_state WHERE gap_id NOT IN (SELECT id FROM gaps)")
            return cur.rowcount

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One outbox record: the whole state of one gap after one change."""

    seq: int
    recorded_at: str
    gap: dict[str, Any]


def _row(r: tuple[Any, ...]) -> GapRow:
    rec = dict(zip(_COLUMNS, r, strict=True))
    fields = {k: v for k, v in rec.items() if k not in ("id", "kind", "start", "end")}
    return GapRow(rec["id"], rec["kind"], rec["start"], rec["end"], fields)


def _quote(col: str) -> str:
    return f'"{col}"'
