"""Replay test support: a simulated node's store, and the truth of what its lines say.

:func:`store_streams` writes every stream of a :class:`KubeletSim` into a store exactly as the
shipper lays it out (keys, compressed bodies, ``ek-*`` metadata with hashes, the hash chain
and edge timestamps), cut at byte sizes that do not respect lines, so lines and partial
records span segments. :func:`expected_lines` is an independent, deliberately simple parser
(regular expressions and ``json.loads`` per line) of the same bytes: the reference the fast
parser of ``evidence_keeper.replay`` is checked against.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from evidence_keeper.formats import edge_timestamps, rfc3339
from evidence_keeper.model import StreamId, segment_key
from evidence_keeper.store import Store
from evidence_keeper.store.codec import compress, extension

CRI = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) ?(.*)$", re.S)


def store_stream(store: Store, sid: StreamId, data: bytes, *, cluster: str = "default",
                 node: str = "node-1", segment_bytes: int = 1500,
                 compression: str = "zstd", line_aligned: bool = False) -> int:
    """Write ``data`` as the stream's segments; returns how many.

    ``line_aligned`` ends each segment at its last newline, as the spool's size seal does;
    otherwise segments are cut at ``segment_bytes`` wherever that falls.
    """
    prev = ""
    n = 0
    start = 0
    while start < len(data):
        body = data[start:start + segment_bytes]
        if line_aligned and b"\n" in body[:-1]:
            body = body[:body.rfind(b"\n") + 1]
        end = start + len(body)
        first, last = edge_timestamps(body[:65536], body[-65536:])
        sha = hashlib.sha256(body).hexdigest()
        key = segment_key("", cluster, sid, start, end, extension(compression))
        store.put(key, compress(body, compression, 3), {
            "ek-node": node, "ek-namespace": sid.namespace, "ek-pod": sid.pod,
            "ek-pod-uid": sid.pod_uid, "ek-container": sid.container,
            "ek-restart": str(sid.restart), "ek-offset": str(start),
            "ek-length": str(len(body)), "ek-sha256": sha, "ek-prev-sha256": prev,
            "ek-first-ts": rfc3339(first), "ek-last-ts": rfc3339(last)})
        prev = sha
        n += 1
        start = end
    return n


def store_lifecycle(store: Store, sid: StreamId, labels: dict[str, str], *,
                    cluster: str = "default", node: str = "node-1") -> None:
    rec = {"id": "created", "event": "created", "ts": "2025-11-10T12:00:00.000000Z",
           "observed_at": "2025-11-10T12:00:00.000000Z", "namespace": sid.namespace,
           "pod": sid.pod, "pod_uid": sid.pod_uid, "node": node, "labels": labels}
    store.put(f"{cluster}/{sid.namespace}/{sid.pod}_{sid.pod_uid}/lifecycle.jsonl",
              json.dumps(rec).encode() + b"\n", {"ek-kind": "lifecycle"})


def _ns(ts: str) -> int:
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", ts)
    assert m, ts
    sec = int(datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return sec * 10**9 + int((m[2] or "0").ljust(9, "0"))


def expected_lines(data: bytes) -> list[tuple[str, int, bytes]]:
    """``(stream, ts_ns, message)`` of every line of a stream's bytes, partials joined."""
    out: list[tuple[str, int, bytes]] = []
    pending: dict[str, tuple[int, list[bytes]]] = {}
    for rec in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        if rec.startswith(b"{"):
            doc: dict[str, Any] = json.loads(rec)
            stream, ts = doc["stream"], _ns(doc["time"])
            msg = doc["log"].encode("utf-8", "surrogateescape")
            partial = not msg.endswith(b"\n")
            msg = msg if partial else msg[:-1]
        else:
            m = CRI.match(rec)
            assert m, rec
            stream, ts, partial, msg = m[2].decode(), _ns(m[1].decode()), m[3] == b"P", m[4]
        if stream in pending:
            first_ts, pieces = pending[stream]
            pieces.append(msg)
            if not partial:
                del pending[stream]
                out.append((stream, first_ts, b"".join(pieces)))
        elif partial:
            pending[stream] = (ts, [msg])
        else:
            out.append((stream, ts, msg))
    return out


def as_json_text(msg: bytes) -> str:
    """What a JSON sink receives for a message (invalid UTF-8 escaped as ``\\xNN``)."""
    return msg.decode("utf-8", "backslashreplace")


def multiset(items: Any) -> Counter[Any]:
    return Counter(items)
