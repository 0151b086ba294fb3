"""Discovery of the node's log tree: ``<log_root>/<ns>_<pod>_<uid>/<container>/<restart>.log*``.

A scan lists the tree and groups files into streams. It is cheap enough to run every half
second on a node with hundreds of containers because each directory listing is cached and
reused while the directory's mtime is unchanged. A listing taken less than two seconds after
the directory's last change is not trusted (a change in the same clock tick would not move
the mtime: git's "racy" rule) and is taken again next time.

The scan reports facts only: which files exist, and for each stream whether its live file
exists, whether a later restart superseded it, and whether its pod directory is gone. What
to do with them is the tailer's business.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Final

from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger
from evidence_keeper.model import StreamId, split_pod_dir

log = get_logger("evidence_keeper.discover")

LOG_NAME: Final = re.compile(r"^(?P<restart>\d+)\.log(?:\.(?P<ts>\d{8}-\d{6}))?(?P<gz>\.gz)?$")
RACY_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Listed:
    """One file of a stream as named on disk."""

    name: str
    ts: str | None  # rotation timestamp, None for the live ``<restart>.log``
    gz: bool


@dataclass(frozen=True, slots=True)
class StreamListing:
    stream: StreamId
    dir: str
    rotated: tuple[Listed, ...]  # oldest first; a plain file hides its .gz twin in progress
    live: bool
    superseded: bool  # a later restart of the same container exists

    @property
    def live_path(self) -> str:
        return f"{self.dir}/{self.stream.restart}.log"

    def path(self, f: Listed) -> str:
        return f"{self.dir}/{f.name}"


@dataclass(slots=True)
class Scan:
    streams: dict[StreamId, StreamListing] = field(default_factory=dict)
    root_ok: bool = True
    error: str | None = None
    complete: bool = True  # False: some directory could not be read (not "gone")


class LogTree:
    def __init__(self, root: str, *, fs: FileSystem | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.fs = fs or FileSystem()
        self._cache: dict[str, tuple[int, list[str]]] = {}
        self._bad_names: set[str] = set()
        self._stale: dict[str, tuple[int, list[str]]] = {}  # last good listing, racy or not
        self._incomplete = False
        # Grouped listings of container directories, reused while the cached names are.
        self._groups: dict[str, tuple[list[str], dict[StreamId, StreamListing]]] = {}

    def _list(self, path: str, now: float) -> list[str] | None:
        """Names in ``path``; None only when it is really gone (ENOENT, ENOTDIR).

        Any other error (EIO, EACCES, a stale NFS handle) must not make its streams look
        deleted, which would end them: the last listing is reused and the scan is marked
        incomplete, so the tailer forgets nothing because of it.
        """
        try:
            st = self.fs.stat(path)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == st.st_mtime_ns:
                return cached[1]
            names = self.fs.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(path, None)
            return None
        except OSError:
            self._incomplete = True
            kept = self._cache.get(path) or self._stale.get(path)
            return None if kept is None else kept[1]
        self._stale[path] = (st.st_mtime_ns, names)
        if now - st.st_mtime_ns / 1e9 >= RACY_S:
            self._cache[path] = (st.st_mtime_ns, names)
        else:
            self._cache.pop(path, None)
        return names

    def scan(self) -> Scan:
        now = time.time()
        out = Scan()
        self._incomplete = False
        pods = self._list(self.root, now)
        if pods is None:
            out.root_ok = False
            out.error = f"log_root {self.root} is missing or unreadable"
            return out
        seen_dirs: set[str] = {self.root}
        for pod_dir in pods:
            try:
                namespace, pod, uid = split_pod_dir(pod_dir)
            except ValueError:
                if pod_dir not in self._bad_names:
                    self._bad_names.add(pod_dir)
                    log.info("ignoring entry that is not a pod log directory", name=pod_dir)
                continue
            ppath = f"{self.root}/{pod_dir}"
            containers = self._list(ppath, now)
            if containers is None:
                continue
            seen_dirs.add(ppath)
            for container in containers:
                cpath = f"{ppath}/{container}"
                names = self._list(cpath, now)
                if names is None:
                    continue
                seen_dirs.add(cpath)
                cached = self._groups.get(cpath)
                if cached is not None and cached[0] is names:
                    out.streams.update(cached[1])  # unchanged directory: same listings
                    continue
                part = Scan()
                self._group(part, StreamId(namespace, pod, uid, container, 0), cpath, names)
                self._groups[cpath] = (names, part.streams)
                out.streams.update(part.streams)
        out.complete = not self._incomplete
        for stale in self._cache.keys() - seen_dirs:
            del self._cache[stale]
        for stale in self._stale.keys() - seen_dirs:
            del self._stale[stale]
        for stale in self._groups.keys() - seen_dirs:
            del self._groups[stale]
        return out

    def relist(self, listing: StreamListing) -> StreamListing | None:
        """The stream's files as they are now (no cache): for decisions a rename could race."""
        try:
            names = self.fs.listdir(listing.dir)
        except OSError:
            return None
        out = Scan()
        self._group(out, listing.stream, listing.dir, names)
        return out.streams.get(listing.stream)

    @staticmethod
    def _group(out: Scan, base: StreamId, cpath: str, names: list[str]) -> None:
        by_restart: dict[int, tuple[bool, dict[str, Listed]]] = {}
        for name in names:
            m = LOG_NAME.match(name)
            if m is None:
                continue  # .tmp files of an in-progress gzip, and anything else
            restart = int(m["restart"])
            live, rotated = by_restart.get(restart, (False, {}))
            ts = m["ts"]
            if ts is None:
                if m["gz"]:
                    continue
                live = True
            else:
                # During kubelet's gzip both N.log.TS and N.log.TS.gz exist: the plain file
                # is the one the reader may hold open, so it wins until it is removed.
                prev = rotated.get(ts)
                if prev is None or prev.gz:
                    rotated[ts] = Listed(name, ts, bool(m["gz"]))
            by_restart[restart] = (live, rotated)
        if not by_restart:
            return
        top = max(by_restart)
        for restart, (live, rotated) in by_restart.items():
            sid = StreamId(base.namespace, base.pod, base.pod_uid, base.container, restart)
            out.streams[sid] = StreamListing(
                stream=sid, dir=cpath,
                rotated=tuple(rotated[ts] for ts in sorted(rotated)),
                live=live, superseded=restart < top,
            )
