"""Discovery of the node's log tree: ``<log_root>/<ns>_<pod>_<uid>/<container>/<restart>.log*``.

A scan lists the tree and groups files into streams. It is cheap enough to run every half
second on a node with hundreds of containers because each directory listing is cached and
reused while the directory's mtime is unchanged. A listing taken less than two seconds after
the directory's last change is not trusted (a change in the same clock tick would not move
the mtime: git's "racy" rule) and is taken again next time.

Symlinks (cri-dockerd): ``<restart>.log`` may be a symlink to Docker's
``/var/lib/docker/containers/<id>/<id>-json.log``. It is followed only when its ``realpath``
lies under one of ``log_symlink_roots``; Docker's own rotated files ``<id>-json.log.1``,
``.2``… next to the target are listed as the stream's rotated files, ordered by a key that
does not shift with Docker's renames (:func:`docker_order_key`).
Symlinked pod or container directories, symlinked rotated files and links pointing anywhere
else are never followed: each is skipped, counted and logged once.

Missing or failing directories. A missing or empty log root (a remount) yields a scan with
``root_ok`` False or ``root_empty`` True: the tailer ends nothing. A directory that cannot be
listed (EIO, EACCES), and an empty pod or container directory, are reported in
``Scan.unlisted``: streams below them are kept, the rest of the tree is judged normally.

The scan reports facts only: which files exist, and for each stream whether its live file
exists, whether a later restart superseded it, and whether its pod directory is gone. What
to do with them is the tailer's business.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final

from evidence_keeper.fsio import FileSystem
from evidence_keeper.logs import get_logger
from evidence_keeper.model import StreamId, split_pod_dir

log = get_logger("evidence_keeper.discover")

DOCKER_ROTATED: Final = re.compile(r"^(?P<base>.+-json\.log)\.(?P<n>\d+)$")
LOG_NAME: Final = re.compile(r"^(?P<restart>\d+)\.log(?:\.(?P<ts>\d{8}-\d{6}))?(?P<gz>\.gz)?$")
RACY_S: Final = 2.0


def docker_order_key(mtime_ns: int, ino: int) -> str:
    """An ordering name for Docker's ``<id>-json.log.N``, whose own names shift each rotation.

    Docker renames ``.1`` to ``.2`` (and so on) at every rotation, so the suffix is neither
    stable nor unique over time. A rotated file is never written again, so its modification
    time is: ordered by it (inode as a tie-break) the key sorts like kubelet's timestamps and
    stays the same while the file moves down the list.
    """
    return f"d{mtime_ns:020d}.{ino:012d}"


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
    target: str | None = None  # the resolved Docker json log a symlinked live file points to

    @property
    def live_path(self) -> str:
        return self.target or f"{self.dir}/{self.stream.restart}.log"

    def path(self, f: Listed) -> str:
        # Docker's rotated files are listed by absolute path (they live next to the target).
        return f.name if f.name.startswith("/") else f"{self.dir}/{f.name}"


@dataclass(slots=True)
class Scan:
    streams: dict[StreamId, StreamListing] = field(default_factory=dict)
    root_ok: bool = True
    error: str | None = None
    complete: bool = True  # False: some directory could not be read (not "gone")
    root_empty: bool = False  # the root holds no pod directory (a remount, or a new node)
    # Directories whose streams must not be judged gone: listing failed, or empty.
    unlisted: set[str] = field(default_factory=set)


class LogTree:
    def __init__(self, root: str, *, fs: FileSystem | None = None,
                 symlink_roots: tuple[str, ...] = (),
                 on_skip: Callable[[str], None] | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.fs = fs or FileSystem()
        self.symlink_roots = tuple(os.path.realpath(r).rstrip("/") or "/" for r in symlink_roots)
        self.on_skip = on_skip
        self._cache: dict[str, tuple[int, list[str]]] = {}
        self._bad_names: set[str] = set()
        self._skipped: set[str] = set()
        self._stale: dict[str, tuple[int, list[str]]] = {}  # last good listing, racy or not
        self._unlisted: set[str] = set()
        # Grouped listings of container directories, reused while the cached names (and
        # those of any Docker target directory) are.
        self._groups: dict[str, tuple[tuple[list[str], ...], dict[StreamId, StreamListing]]] = {}
        self._targets: dict[str, tuple[str, ...]] = {}  # container dir -> Docker dirs used
        self._changed: Collection[str] | None = None
        self._failed: set[str] = set()  # last listing failed: always listed again
        self.dirs: set[str] = set()  # every directory the last scan listed (to watch)

    def _skip(self, path: str, reason: str, what: str) -> None:
        if path in self._skipped:
            return
        self._skipped.add(path)
        log.warning("skipping a log path that is not followed", path=path, reason=reason,
                    why=what)
        if self.on_skip is not None:
            self.on_skip(reason)

    def _list(self, path: str, now: float, *, dir_check: bool = True) -> list[str] | None:
        """Names in ``path``; None when it is really gone (ENOENT, ENOTDIR) or a symlink.

        Any other error (EIO, EACCES, a stale NFS handle) must not make its streams look
        deleted, which would end them: the last listing is reused and the directory is
        reported unlisted, so the tailer forgets nothing below it because of it.
        """
        if self._changed is not None and path not in self._changed and (
                path not in self._failed):
            kept = self._stale.get(path)
            if kept is not None:
                return kept[1]  # watched and unchanged since listed (inotify)
        try:
            st = self.fs.stat(path)
            if dir_check and stat.S_ISLNK(st.st_mode):
                self._skip(path, "symlinked_dir", "a symlinked pod or container directory")
                return None
            cached = self._cache.get(path)
            if cached is not None and cached[0] == st.st_mtime_ns:
                return cached[1]
            names = self.fs.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(path, None)
            return None
        except OSError:
            self._unlisted.add(path)
            self._failed.add(path)
            kept = self._cache.get(path) or self._stale.get(path)
            return None if kept is None else kept[1]
        self._failed.discard(path)
        self._stale[path] = (st.st_mtime_ns, names)
        if now - st.st_mtime_ns / 1e9 >= RACY_S:
            self._cache[path] = (st.st_mtime_ns, names)
        else:
            self._cache.pop(path, None)
        return names

    def scan(self, changed: Collection[str] | None = None) -> Scan:
        """List the tree. ``changed``: only these directories changed since the last scan
        (inotify); the others reuse their last listing without a system call."""
        now = time.time()
        out = Scan()
        self._unlisted = set()
        self._changed = changed
        pods = self._list(self.root, now, dir_check=False)
        if pods is None:
            out.root_ok = False
            out.error = f"log_root {self.root} is missing or unreadable"
            return out
        seen_dirs: set[str] = {self.root}
        any_pod = False
        for pod_dir in pods:
            try:
                namespace, pod, uid = split_pod_dir(pod_dir)
            except ValueError:
                if pod_dir not in self._bad_names:
                    self._bad_names.add(pod_dir)
                    log.info("ignoring entry that is not a pod log directory", name=pod_dir)
                continue
            any_pod = True
            ppath = f"{self.root}/{pod_dir}"
            containers = self._list(ppath, now)
            if containers is None:
                continue
            seen_dirs.add(ppath)
            if not containers:
                self._unlisted.add(ppath)  # emptied but not removed: not a deletion
            for container in containers:
                cpath = f"{ppath}/{container}"
                names = self._list(cpath, now)
                if names is None:
                    continue
                seen_dirs.add(cpath)
                self._scan_container(out, StreamId(namespace, pod, uid, container, 0), cpath,
                                     names, now, seen_dirs)
        out.root_empty = not any_pod
        self.dirs = seen_dirs
        out.unlisted = set(self._unlisted)
        out.complete = not self._unlisted
        for stale in self._cache.keys() - seen_dirs:
            del self._cache[stale]
        for stale in self._stale.keys() - seen_dirs:
            del self._stale[stale]
        for stale in self._groups.keys() - seen_dirs:
            del self._groups[stale]
        return out

    def _scan_container(self, out: Scan, base: StreamId, cpath: str, names: list[str],
                        now: float, seen_dirs: set[str]) -> None:
        key: tuple[list[str], ...] = (names,)
        for tdir in self._targets.get(cpath, ()):
            tnames = self._list(tdir, now, dir_check=False)
            key += (tnames if tnames is not None else [],)
            seen_dirs.add(tdir)
        cached = self._groups.get(cpath)
        if cached is not None and len(cached[0]) == len(key) and all(
                a is b for a, b in zip(cached[0], key, strict=True)):
            out.streams.update(cached[1])  # unchanged directories: same listings
            if not cached[1]:
                self._unlisted.add(cpath)  # no log file at all: emptied, not a restart
            return
        part = Scan()
        targets = self._group(part, base, cpath, names)
        self._targets[cpath] = targets
        if targets:
            key = (names,)
            for tdir in targets:
                tnames = self._list(tdir, now, dir_check=False)
                key += (tnames if tnames is not None else [],)
                seen_dirs.add(tdir)
        self._groups[cpath] = (key, part.streams)
        out.streams.update(part.streams)
        if not part.streams:
            self._unlisted.add(cpath)  # no log file at all: emptied, not a restart

    def relist(self, listing: StreamListing) -> StreamListing | None:
        """The stream's files as they are now (no cache): for decisions a rename could race."""
        try:
            names = self.fs.listdir(listing.dir)
        except OSError:
            return None
        out = Scan()
        self._group(out, listing.stream, listing.dir, names)
        return out.streams.get(listing.stream)

    def _group(self, out: Scan, base: StreamId, cpath: str,
               names: list[str]) -> tuple[str, ...]:
        """Group a container directory's names into streams; returns Docker dirs used."""
        by_restart: dict[int, tuple[bool, dict[str, Listed], str | None]] = {}
        targets: list[str] = []
        for name in names:
            m = LOG_NAME.match(name)
            if m is None:
                continue  # .tmp files of an in-progress gzip, and anything else
            restart = int(m["restart"])
            live, rotated, target = by_restart.get(restart, (False, {}, None))
            ts = m["ts"]
            if ts is None:
                if m["gz"]:
                    continue
                kind, target = self._live_kind(f"{cpath}/{name}")
                if kind == "skip":
                    continue
                live = True
                if target is not None:
                    targets.append(target.rsplit("/", 1)[0])
                    rotated.update(self._docker_rotated(target))
            else:
                if self._is_link(f"{cpath}/{name}"):
                    continue
                # During kubelet's gzip both N.log.TS and N.log.TS.gz exist: the plain file
                # is the one the reader may hold open, so it wins until it is removed.
                prev = rotated.get(ts)
                if prev is None or prev.gz:
                    rotated[ts] = Listed(name, ts, bool(m["gz"]))
            by_restart[restart] = (live, rotated, target)
        if not by_restart:
            return tuple(targets)
        top = max(by_restart)
        for restart, (live, rotated, target) in by_restart.items():
            sid = StreamId(base.namespace, base.pod, base.pod_uid, base.container, restart)
            out.streams[sid] = StreamListing(
                stream=sid, dir=cpath,
                rotated=tuple(rotated[ts] for ts in sorted(rotated)),
                live=live, superseded=restart < top, target=target,
            )
        return tuple(targets)

    def _is_link(self, path: str) -> bool:
        try:
            if not stat.S_ISLNK(self.fs.stat(path).st_mode):
                return False
        except OSError:
            return False
        self._skip(path, "symlinked_rotated_file", "a rotated log file that is a symlink")
        return True

    def _live_kind(self, path: str) -> tuple[str, str | None]:
        """``("file", None)``, ``("link", target)`` inside the symlink roots, or ``("skip",
        None)``: a symlink anywhere else is never followed."""
        try:
            st = self.fs.stat(path)
        except OSError:
            return "file", None  # vanished since the listing: the tailer's stat decides
        if not stat.S_ISLNK(st.st_mode):
            return "file", None
        real = self.fs.realpath(path)
        if not any(real.startswith(r + "/") for r in self.symlink_roots):
            self._skip(path, "symlink_outside_roots",
                       "a symlinked log file pointing outside log_symlink_roots")
            return "skip", None
        return "link", real

    def _docker_rotated(self, target: str) -> dict[str, Listed]:
        """Docker json-file's own rotation next to the target: ``<id>-json.log.N``."""
        tdir, base = target.rsplit("/", 1)
        try:
            names = self.fs.listdir(tdir)
        except OSError:
            return {}
        out: dict[str, Listed] = {}
        for name in names:
            m = DOCKER_ROTATED.match(name)
            if m is None or m["base"] != base:
                continue
            try:
                st = self.fs.stat(f"{tdir}/{name}")
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = docker_order_key(st.st_mtime_ns, st.st_ino)
            out[key] = Listed(f"{tdir}/{name}", key, False)
        return out
