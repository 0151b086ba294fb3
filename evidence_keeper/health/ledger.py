"""The gap ledger: an embedded SQLite database in ``spool_dir``.

Every gap the agent knows of is one row: sink outages, shipping backlog, agent downtime and
byte-exact ``loss`` records from the capture pipeline. The ledger is written *before* the
checkpoint that moves past a hole, so a crash between the two re-detects the hole on recovery;
``dedup`` keys make that second insert a no-op, so a loss is recorded exactly once.

SQLite runs with ``synchronous=FULL`` in WAL mode: a committed row survives kill -9 and power
loss. Calls are blocking and come from worker threads; one connection guarded by a lock.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
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
            return cur.rowcount == 1

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
            return int(cur.lastrowid or 0)

    def close_gap(self, gap_id: int, *, at: datetime, **fields: Any) -> None:
        """Close an open gap; its dedup key is released so the same condition can reopen."""
        sets = ['"end" = ?', "dedup = NULL", *(f"{_quote(k)} = ?" for k in fields)]
        with self._tx() as db:
            db.execute(
                f'UPDATE gaps SET {", ".join(sets)} WHERE id = ? AND "end" IS NULL',
                (rfc3339(at), *fields.values(), gap_id),
            )

    def update_gap(self, gap_id: int, **fields: Any) -> None:
        sets = ", ".join(f"{_quote(k)} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE gaps SET {sets} WHERE id = ?", (*fields.values(), gap_id))

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
        out = []
        for r in rows:
            rec = dict(zip(_COLUMNS, r, strict=True))
            fields = {k: v for k, v in rec.items() if k not in ("id", "kind", "start", "end")}
            out.append(GapRow(rec["id"], rec["kind"], rec["start"], rec["end"], fields))
        return out

    def prune(self, *, older_than: timedelta, now: datetime) -> int:
        """Drop closed gaps that ended before ``now - older_than`` (retention)."""
        with self._tx() as db:
            cur = db.execute(
                'DELETE FROM gaps WHERE "end" IS NOT NULL AND "end" < ?',
                (rfc3339(now - older_than),),
            )
            return cur.rowcount

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _quote(col: str) -> str:
    return f'"{col}"'
