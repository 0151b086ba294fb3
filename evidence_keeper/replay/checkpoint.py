"""Replay checkpoints: which lines of a stream a target has acknowledged.

One small JSON file per (target, stream) under ``<state>/replay/<target>/``, holding the
stream ranges ``[start, end)`` of every acknowledged line, merged. A line is sent only when its
range is not covered, so an interrupted replay (kill -9 included) resumes where the sink's
acknowledgements stopped, and a second replay of an overlapping window sends nothing twice.
Ranges rather than one offset: a time window or a filter can select lines that are not
contiguous, and stdout/stderr partial lines can complete out of offset order.

The file is replaced atomically after every acknowledged batch (temp, fsync, rename, fsync
the directory), as Vector's checkpointer does: a crash leaves the previous or the new set,
never a torn one. What remains is the instant between the sink's acknowledgement and the
rename: a batch acknowledged then is sent again on the next run. Loki drops such duplicates
itself; Datadog and OTLP entries carry an idempotency key (``evidence_keeper.id`` /
``log.record.uid``) that identifies them; archive objects are rewritten under the same name.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

from evidence_keeper.model import StreamId


class ReplayCheckpoint:
    def __init__(self, path: Path | None, ranges: list[list[int]] | None = None,
                 lines: int = 0) -> None:
        self.path = path
        self.ranges: list[list[int]] = ranges or []
        self.lines = lines
        self._starts = [r[0] for r in self.ranges]

    @classmethod
    def load(cls, path: Path) -> ReplayCheckpoint:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"replay checkpoint {path} is unreadable: {exc}") from exc
        ranges = [[int(a), int(b)] for a, b in doc.get("delivered", [])]
        return cls(path, sorted(ranges), int(doc.get("lines", 0)))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def covers(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` lies within one acknowledged range."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self.ranges[i][1] >= end

    def add(self, ranges: list[tuple[int, int]], lines: int) -> None:
        merged = sorted([*self.ranges, *([a, b] for a, b in ranges)])
        out: list[list[int]] = []
        for a, b in merged:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        self.ranges = out
        self._starts = [r[0] for r in out]
        self.lines += lines

    def save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({"delivered": self.ranges, "lines": self.lines}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Checkpoints:
    """The checkpoint files of one state directory (``None``: nothing is remembered)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def path(self, target: str, sid: StreamId) -> Path | None:
        if self.root is None:
            return None
        # Kubernetes names cannot hold '/' or '_' in namespaces, so the stream key is a safe
        # file name; the hash keeps two clusters' identical names apart.
        tag = hashlib.sha256(sid.key.encode()).hexdigest()[:8]
        return self.root / "replay" / target / f"{sid.key.replace('/', '~')}.{tag}.json"

    def load(self, target: str, sid: StreamId) -> ReplayCheckpoint:
        path = self.path(target, sid)
        return ReplayCheckpoint(None) if path is None else ReplayCheckpoint.load(path)
