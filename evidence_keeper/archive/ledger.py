"""Reading the gap ledger back from the store, with no agent running: gaps, chains, archives.

Each node's ledger is a chain of objects ``<cluster>/_ledger/<node>/<seq:020d>.jsonl.<ext>``
(written by ``health/ledgership.py``). Here they are read back:

* :func:`read_ledger` fetches a cluster's (or some nodes') objects in parallel, decompressing
  each within its ``ek-length`` (and a hard cap), so a hostile object costs an error, not the
  memory of the reader;
* :func:`newest_gaps` folds the records into the newest state per gap. A gap is identified by
  ``(node, ledger_id, id)``: ids are local to one ledger file, and a node whose spool was lost
  starts a new ledger id;
* :func:`check_chains` verifies objects like segment chains: body against ``ek-sha256`` and
  ``ek-length``, each ``ek-prev-sha256`` against the object before it, sequence numbers
  without holes; every failing object is named;
* :func:`ledger_entries` and :func:`verify_entries` are the archive side: a manifest lists the
  ledger objects (key, sha256) holding records of the gaps in its window, and ``verify``
  checks them and their links to the chain like the segments.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from evidence_keeper.health.ledgership import LedgerKey, ledger_prefix, parse_ledger_key
from evidence_keeper.store import ObjectMissing, Store, StoreError
from evidence_keeper.store.codec import BodyError, decompressed_chunks

HARD_CAP: Final = 64 * 1024 * 1024  # no ledger object is anywhere near this
READ_WORKERS: Final = 16
Problem = tuple[str, str]  # (key, message)


@dataclass
class LedgerObject:
    """One ledger object as read from the store, with whatever was wrong with it."""

    key: str
    lk: LedgerKey
    meta: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None  # of the decompressed body, when it could be read
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return self.lk.node


def list_ledger(store: Store, cluster: str,
                nodes: Iterable[str] | None = None) -> dict[str, list[tuple[LedgerKey, str]]]:
    """Ledger keys per node, by sequence number (no object is read)."""
    prefixes = ([ledger_prefix(cluster, n) for n in nodes] if nodes is not None
                else [ledger_prefix(cluster)])
    out: dict[str, list[tuple[LedgerKey, str]]] = {}
    for prefix in prefixes:
        for key in store.list(prefix):
            lk = parse_ledger_key(key)
            if lk is not None and lk.cluster == cluster:
                out.setdefault(lk.node, []).append((lk, key))
    for keys in out.values():
        keys.sort(key=lambda p: p[0].seq)
    return out


def bounded_decompress(body: bytes, ext: str, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes; more is an error (a hostile or wrong object).

    The expansion itself is ``store.codec``'s bounded one; the length is checked by the
    caller against ``ek-length`` so that a short body is reported as such, not as corrupt.
    """
    cap = min(limit, HARD_CAP)
    out = bytearray()
    try:
        for part in decompressed_chunks(body, ext, expected=None):
            out += part
            if len(out) > cap:
                raise ValueError(f"body decompresses to more than {cap} bytes (ek-length)")
    except BodyError as exc:
        raise ValueError(f"body does not decompress ({exc})") from None
    return bytes(out)


def read_object(store: Store, lk: LedgerKey, key: str) -> LedgerObject:
    """Fetch, check and parse one object (blocking; runs in a worker thread)."""
    obj = LedgerObject(key, lk)
    try:
        obj.meta = store.head(key) or {}
        body = store.get(key)
    except ObjectMissing:
        obj.problems.append("object missing from the store")
        return obj
    except StoreError as exc:
        obj.problems.append(f"cannot read: {exc}")
        return obj
    try:
        length = int(obj.meta.get("ek-length", ""))
    except ValueError:
        obj.problems.append("no ek-length metadata")
        length = HARD_CAP
    try:
        raw = bounded_decompress(body, lk.ext, length)
    except ValueError as exc:
        obj.problems.append(str(exc))
        return obj
    obj.sha256 = hashlib.sha256(raw).hexdigest()
    if len(raw) != length:
        obj.problems.append(f"body has {len(raw)} bytes, ek-length says {length}")
    if obj.sha256 != obj.meta.get("ek-sha256"):
        obj.problems.append(f"sha256 of the body {obj.sha256[:16]}... does not match"
                            f" ek-sha256 {obj.meta.get('ek-sha256', '')[:16] or '(none)'}...")
    _parse_records(obj, raw)
    return obj


def _parse_records(obj: LedgerObject, raw: bytes) -> None:
    for n, line in enumerate(raw.splitlines(), start=1):
        try:
            rec = json.loads(line)
        except ValueError:
            obj.problems.append(f"line {n} is not JSON")
            continue
        gap = rec.get("gap") if isinstance(rec, dict) else None
        if not isinstance(gap, dict) or "id" not in gap or not isinstance(rec.get("seq"), int):
            obj.problems.append(f"line {n} is not a ledger record")
            continue
        obj.records.append(rec)


def read_ledger(store: Store, cluster: str, *, nodes: Iterable[str] | None = None,
                workers: int = READ_WORKERS,
                progress: Callable[[int, int], None] | None = None) -> list[LedgerObject]:
    """Every ledger object of the cluster (or of ``nodes``), by node and sequence number."""
    listing = list_ledger(store, cluster, nodes)
    flat = [(lk, key) for node in sorted(listing) for lk, key in listing[node]]
    out: list[LedgerObject] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ek-ledger") as pool:
        for done, obj in enumerate(pool.map(lambda p: read_object(store, *p), flat), start=1):
            out.append(obj)
            if progress is not None:
                progress(done, len(flat))
    return out


# ------------------------------------------------------------------------------ gaps
def _overlaps(gap: Mapping[str, Any], since: datetime | None, until: datetime | None) -> bool:
    start, end = _ts(gap.get("start")), _ts(gap.get("end"))
    if since is not None and end is not None and end < since:
        return False
    return not (until is not None and start is not None and start > until)


def _ts(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def gap_identity(rec: Mapping[str, Any]) -> tuple[str, str, int]:
    return (str(rec.get("node")), str(rec.get("ledger_id")), int(rec["gap"]["id"]))


def newest_gaps(objects: Iterable[LedgerObject], *, since: datetime | None = None,
                until: datetime | None = None, kind: str | None = None,
                node: str | None = None) -> list[dict[str, Any]]:
    """The newest state of every gap, as ``/gaps`` shows it plus ``node`` and ``ledger_id``,
    oldest first; filters as ``/gaps`` applies them (window overlap, kind)."""
    newest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for obj in objects:
        for rec in obj.records:
            ident = gap_identity(rec)
            have = newest.get(ident)
            if have is None or int(rec["seq"]) > int(have["seq"]):
                newest[ident] = rec
    out = []
    for rec in newest.values():
        gap = rec["gap"]
        if kind is not None and gap.get("kind") != kind:
            continue
        if node is not None and rec.get("node") != node:
            continue
        if not _overlaps(gap, since, until):
            continue
        out.append({**gap, "node": rec.get("node"), "ledger_id": rec.get("ledger_id"),
                    "recorded_at": rec.get("recorded_at")})
    out.sort(key=lambda g: (str(g.get("start")), str(g["node"]), str(g["ledger_id"]),
                            int(g["id"])))
    return out


# ------------------------------------------------------------------------------ chains
def check_chains(objects: Sequence[LedgerObject]) -> tuple[list[Problem], list[str]]:
    """Problems (key, message) and notes of every node's chain; objects by node and seq."""
    problems: list[Problem] = []
    notes: list[str] = []
    by_node: dict[str, list[LedgerObject]] = {}
    for obj in objects:
        by_node.setdefault(obj.node, []).append(obj)
        problems.extend((obj.key, p) for p in obj.problems)
    for node in sorted(by_node):
        chain = sorted(by_node[node], key=lambda o: o.lk.seq)
        first = chain[0]
        if first.lk.seq > 0:
            notes.append(f"node {node}: the ledger starts at object {first.lk.seq} (older"
                         " objects expired or were removed); its first link is not checked")
        elif first.meta and first.meta.get("ek-prev-sha256", "") != "":
            problems.append((first.key, "the first object of a chain must have an empty"
                                        " ek-prev-sha256"))
        for prev, obj in itertools.pairwise(chain):
            problems.extend(_link(prev, obj))
    return problems, notes


def _link(prev: LedgerObject, obj: LedgerObject) -> list[Problem]:
    out: list[Problem] = []
    if obj.lk.seq != prev.lk.seq + 1:
        out.append((obj.key, f"objects {prev.lk.seq + 1}..{obj.lk.seq - 1} of node"
                             f" {obj.node}'s ledger are missing from the store"))
    if not obj.meta:
        return out
    got = obj.meta.get("ek-prev-sha256", "")
    # The link is to the predecessor's real content: its body hash when it could be read.
    expected = prev.sha256 if prev.sha256 is not None else prev.meta.get("ek-sha256")
    if obj.lk.seq == prev.lk.seq + 1 and got != expected:
        out.append((obj.key, f"hash chain broken: ek-prev-sha256 {got[:16] or '(empty)'}..."
                             f" is not the sha256 of {prev.key}"))
    return out


@dataclass
class LedgerReport:
    nodes: int = 0
    objects: int = 0
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "nodes": self.nodes, "objects": self.objects,
                "records": self.records,
                "problems": [{"key": k, "error": m} for k, m in self.problems],
                "notes": self.notes}


def verify_ledger(store: Store, cluster: str, *, nodes: Iterable[str] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> LedgerReport:
    """Check every ledger chain of the cluster (or of ``nodes``) in the store."""
    objects = read_ledger(store, cluster, nodes=nodes, progress=progress)
    report = LedgerReport(nodes=len({o.node for o in objects}), objects=len(objects),
                          records=sum(len(o.records) for o in objects))
    report.problems, report.notes = check_chains(objects)
    return report


def format_ledger_report(report: LedgerReport, where: str) -> str:
    lines = [f"gap ledger in {where}"]
    lines += [f"  FAIL  {k}: {m}" for k, m in report.problems]
    lines += [f"  note  {n}" for n in report.notes]
    what = (f"{report.nodes} node{'' if report.nodes == 1 else 's'}, {report.objects} ledger"
            f" objects, {report.records} records")
    if report.ok:
        lines.append(f"verified: {what}; every body, hash and chain link matches")
    else:
        lines.append(f"VERIFICATION FAILED: {len(report.problems)} problem(s) in {what}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ archives
def ledger_entries(objects: Sequence[LedgerObject], *, since: datetime | None,
                   until: datetime | None, node: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries of the ledger objects that hold records of gaps in the window."""
    wanted = {(g["node"], g["ledger_id"], int(g["id"]))
              for g in newest_gaps(objects, since=since, until=until, node=node)}
    out: list[dict[str, Any]] = []
    for obj in objects:
        if obj.problems:
            # Damaged before the archive was made: listed without a hash the manifest would
            # vouch for, so verify names it instead of blessing what is there now.
            if obj.node == node or node is None:
                out.append({"key": obj.key, "node": obj.node, "seq": obj.lk.seq,
                            "sha256": None, "error": "; ".join(obj.problems)})
            continue
        if any(gap_identity(r) in wanted for r in obj.records):
            out.append({"key": obj.key, "node": obj.node, "seq": obj.lk.seq,
                        "sha256": obj.sha256, "prev_sha256": obj.meta.get("ek-prev-sha256", ""),
                        "records": len(obj.records)})
    return out


def window_entries(store: Store, cluster: str, *, since: datetime | None,
                   until: datetime | None, nodes: Iterable[str] | None = None,
                   exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The ``ledger`` list of a manifest: read the nodes' ledgers, keep the window's objects."""
    skip = set(exclude)
    objects = [o for o in read_ledger(store, cluster, nodes=nodes) if o.node not in skip]
    return ledger_entries(objects, since=since, until=until)


def verify_entries(store: Store, entries: object, where: str) -> tuple[list[Problem], int]:
    """Check a manifest's ``ledger`` list: each object's body, and its link to the chain.

    Returns the problems and the number of objects checked.
    """
    if entries is None:
        return [], 0
    if not isinstance(entries, list):
        return [(where, "the manifest's ledger list is not a list")], 0
    problems: list[Problem] = []
    listed: dict[str, tuple[LedgerKey, dict[str, Any]]] = {}
    for e in entries:
        lk = parse_ledger_key(e.get("key", "")) if isinstance(e, dict) else None
        if lk is None or not isinstance(e, dict):
            problems.append((where, f"invalid ledger entry {str(e)[:80]}"))
            continue
        listed[e["key"]] = (lk, e)
    for key, (lk, e) in listed.items():
        if e.get("sha256") is None:
            problems.append((key, f"already damaged when the archive was made: {e.get('error')}"))
            continue
        obj = read_object(store, lk, key)
        problems.extend((key, p) for p in obj.problems)
        if obj.sha256 is not None and obj.sha256 != e.get("sha256"):
            problems.append((key, f"sha256 of the body {obj.sha256[:16]}... does not match the"
                                  f" manifest {str(e.get('sha256'))[:16]}..."))
        problems.extend(_anchor(store, obj))
    return problems, len(listed)


def _anchor(store: Store, obj: LedgerObject) -> list[Problem]:
    """An object's ``ek-prev-sha256`` must be the real sha256 of the object before it."""
    if not obj.meta:
        return []
    got = obj.meta.get("ek-prev-sha256", "")
    if obj.lk.seq == 0:
        return [] if got == "" else [(obj.key, "the first object of a chain must have an"
                                               " empty ek-prev-sha256")]
    keys = dict((lk.seq, key) for lk, key in list_ledger(store, obj.lk.cluster,
                                                         [obj.node]).get(obj.node, []))
    prev_key = keys.get(obj.lk.seq - 1)
    if prev_key is None:
        return [(obj.key, f"the object before it (seq {obj.lk.seq - 1}) is missing from the"
                          " store: the chain cannot be anchored")]
    lk = parse_ledger_key(prev_key)
    assert lk is not None
    prev = read_object(store, lk, prev_key)
    if prev.sha256 is None or prev.problems:
        return [(prev_key, "; ".join(prev.problems) or "unreadable")]
    if got != prev.sha256:
        return [(obj.key, f"hash chain broken: ek-prev-sha256 {got[:16] or '(empty)'}... is"
                          f" not the sha256 of {prev_key}")]
    return []
