"""A faithful simulator of the node log tree that kubelet and the container runtime maintain.

Tests and ``make demo`` need a ``/var/log/pods`` that behaves like a real node, including the
awkward parts the agent must survive (CONTRACT.md section 2). :class:`KubeletSim` writes real
files under a temporary ``log_root`` with the same names, formats and file operations as
kubelet + containerd (or Docker's json-file driver), and remembers, per stream, every byte it
ever appended. That in-memory *record* is the ground truth: a perfect agent exports exactly
``record(stream)`` for every stream, byte for byte, whatever happened on disk.

What is reproduced, and from where:

* Layout ``<log_root>/<namespace>_<pod>_<uid>/<container>/<restart>.log``.
* containerd's CRI line format ``<RFC3339Nano> <stream> <P|F> <msg>\\n``. The timestamp is Go's
  ``time.RFC3339Nano``: trailing zeros of the fraction are trimmed, and the fraction vanishes
  entirely on a whole second (``2025-11-10T12:27:00Z``), so timestamps have variable width.
  Lines longer than ``cri_max_line`` (containerd's ``max_container_log_line_size``, 16 KiB)
  become several ``P`` records and a final ``F``. Message bytes are written raw: invalid UTF-8
  and NUL bytes pass through untouched, as they do in containerd.
* Docker's json-file line ``{"log":…,"stream":…,"time":…}\\n`` with a fixed 9-digit fraction,
  Go-style escaping of ``<``, ``>``, ``&``, U+2028 and U+2029, and 16 KiB partial messages
  (every chunk but the last has no trailing ``\\n`` in ``log``). One deliberate deviation: Docker
  replaces invalid UTF-8 with U+FFFD, which loses information. Here such bytes are decoded with
  ``surrogateescape`` and written as ``\\udcXX`` escapes, so the line stays valid UTF-8 and valid
  JSON, and ``json.loads(line)["log"].encode("utf-8", "surrogateescape")`` gives back the exact
  bytes the container wrote.
* kubelet's ``rotateLog`` (pkg/kubelet/logs/container_log_manager.go), step by step and in its
  order: drop stale ``.tmp`` files and plain files whose ``.gz`` exists, remove excess rotated
  files oldest first keeping ``max_files - 2``, gzip the remaining plain rotated files through a
  ``.tmp`` file, then rename ``N.log`` to ``N.log.<YYYYMMDD-HHMMSS>``. Between the rename and the
  runtime reopening ``N.log``, the runtime can still append to the renamed inode; ``rotate``
  lets a caller put half a line there and the other half in the new file.
* A container restart starts ``N+1.log`` and removes every file of instance ``N-1`` (kubelet
  keeps only the previous instance); deleting a pod removes its directory.
* copytruncate-style truncation in place (same inode, size 0).
* cri-dockerd (with ``docker_root``): a ``fmt="docker"`` pod's ``<restart>.log`` is a symlink
  to ``<docker_root>/<id>/<id>-json.log``, and rotation is Docker json-file's own: the oldest
  ``<id>-json.log.<max-1>`` is removed, ``.N`` renamed to ``.N+1`` from the oldest down, the live
  file renamed to ``.1`` and a new one created (no late writes: Docker rotates under its lock).
  A restart links ``N+1.log`` to a new container id; the container before the previous one is
  removed with its directory.

All writes are plain ``open("ab")`` appends, so renames keep inodes exactly as on a node. The
simulator never looks at the agent: whether bytes were read before a file disappeared is the
agent's business, judged by comparing its export with ``record()``.

Time comes from an injected clock. The default :class:`SimClock` starts at the Nov 10 incident
(2025-11-10T12:27:00Z) and advances 1 ms per reading, so every run writes identical bytes.
:meth:`KubeletSim.advance` / :meth:`KubeletSim.advance_to` move simulated time forward on top of
any clock (a scenario can jump from the incident to the next morning's restarts).

Public methods take a lock, so a demo may drive the simulator from a thread while an agent
reads the tree from its event loop.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from evidence_keeper.model import StreamId

LogFormat = Literal["cri", "docker"]

SIM_EPOCH: Final = datetime(2025, 11, 10, 12, 27, 0, tzinfo=UTC)
ROTATED_TS_FORMAT: Final = "%Y%m%d-%H%M%S"  # kubelet's timestampFormat "20060102-150405"
CRI_MAX_LINE_DEFAULT: Final = 16 * 1024
_STREAMS: Final = ("stdout", "stderr")
_GZ: Final = ".gz"
_TMP: Final = ".tmp"
# Namespaces and pod names are DNS subdomains, containers DNS labels: never "_" or "/", which
# is what makes the "<namespace>_<pod>_<uid>" directory name parseable.
_DNS_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_UID: Final = re.compile(r"^[A-Za-z0-9-]+$")
# Characters Go's JSON encoder escapes that Python's does not (HTML-safe escaping and JS line
# separators), plus lone surrogates from surrogateescape-decoded invalid UTF-8.
_JSON_EXTRA_ESCAPES: Final = re.compile("[<>&\u2028\u2029\udc80-\udcff]")


class SimClock:
    """A deterministic clock: each reading returns the current instant, then moves on by ``tick``.

    Ticking per reading (rather than per wall-clock second) keeps CRI timestamps strictly
    increasing and identical from run to run.
    """

    def __init__(self, start: datetime = SIM_EPOCH, tick: timedelta = timedelta(milliseconds=1)):
        self._now = _utc(start)
        self._tick = tick

    def __call__(self) -> datetime:
        now = self._now
        self._now += self._tick
        return now


def _utc(ts: datetime) -> datetime:
    """Naive datetimes are taken as UTC: the log formats only ever carry UTC (``Z``)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def rfc3339nano(ts: datetime) -> str:
    """Go's ``time.RFC3339Nano`` as containerd writes it: fraction trimmed, omitted if zero."""
    ts = _utc(ts)
    nanos = ts.microsecond * 1000
    frac = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{ts:%Y-%m-%dT%H:%M:%S}{frac}Z"


def rfc3339nano_fixed(ts: datetime) -> str:
    """Docker json-file's timestamp: RFC 3339 with an always-present 9-digit fraction."""
    ts = _utc(ts)
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond * 1000:09d}Z"


def _go_json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def docker_json_line(log: bytes, stream: str, ts: datetime) -> bytes:
    """One json-file entry; invalid UTF-8 in ``log`` becomes ``\\udcXX`` escapes (module doc)."""
    text = log.decode("utf-8", "surrogateescape")
    body = json.dumps(
        {"log": text, "stream": stream, "time": rfc3339nano_fixed(ts)},
        ensure_ascii=False,  # Docker writes valid non-ASCII UTF-8 as is, not as \u escapes
        separators=(",", ":"),
    )
    # json.dumps leaves lone surrogates as raw characters with ensure_ascii=False; escaping
    # them keeps the file valid UTF-8 while json.loads still returns the surrogates.
    return _JSON_EXTRA_ESCAPES.sub(_go_json_escape, body).encode("utf-8") + b"\n"


def split_rotated_name(name: str) -> tuple[int, str, bool] | None:
    """Parse ``N.log.<YYYYMMDD-HHMMSS>[.gz]`` into ``(N, stamp, gzipped)``; ``None`` otherwise."""
    m = re.fullmatch(r"(\d+)\.log\.(\d{8}-\d{6})(\.gz)?", name)
    if m is None:
        return None
    return int(m[1]), m[2], m[3] is not None


@dataclass(slots=True)
class _Pod:
    namespace: str
    name: str
    uid: str
    fmt: LogFormat
    directory: Path
    restarts: dict[str, int] = field(default_factory=dict)  # container -> current instance
    linked: bool = False  # cri-dockerd: <restart>.log is a symlink into docker_root


class KubeletSim:
    """Writes a kubelet-shaped log tree and keeps the byte-exact truth of every stream."""

    def __init__(
        self,
        log_root: Path,
        *,
        max_files: int = 5,
        clock: Callable[[], datetime] | None = None,
        cri_max_line: int = CRI_MAX_LINE_DEFAULT,
        docker_root: Path | None = None,
        docker_max_files: int = 3,
    ) -> None:
        # kubelet rejects containerLogMaxFiles < 2: the live file plus the latest rotated one.
        if max_files < 2:
            raise ValueError("max_files must be at least 2 (kubelet's own validation)")
        if cri_max_line < 1:
            raise ValueError("cri_max_line must be positive")
        self.log_root = Path(log_root)
        self.docker_root = Path(docker_root) if docker_root is not None else None
        self.docker_max_files = docker_max_files
        self.max_files = max_files
        self.cri_max_line = cri_max_line
        self._clock: Callable[[], datetime] = clock if clock is not None else SimClock()
        self._skew = timedelta(0)  # simulated time added on top of the clock (advance*)
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._records: dict[StreamId, bytearray] = {}
        self._truncations: dict[StreamId, list[int]] = {}
        self._last_stamp: dict[StreamId, str] = {}
        self._uid_counter = 0
        self.log_root.mkdir(parents=True, exist_ok=True)

    # -- time ---------------------------------------------------------------------------------

    def now(self) -> datetime:
        """Simulated time: the clock's reading plus any :meth:`advance` (ticks a SimClock)."""
        with self._lock:
            return _utc(self._clock()) + self._skew

    def advance(self, delta: timedelta) -> None:
        """Move simulated time forward (never backward: logs only ever go forward in time)."""
        if delta < timedelta(0):
            raise ValueError("simulated time cannot go backward")
        with self._lock:
            self._skew += delta

    def advance_to(self, when: datetime) -> None:
        """Jump simulated time to ``when`` if it is in the future; a no-op otherwise."""
        with self._lock:
            delta = _utc(when) - self.now()
            if delta > timedelta(0):
                self._skew += delta

    # -- pods ---------------------------------------------------------------------------------

    def add_pod(
        self,
        namespace: str,
        pod: str,
        *,
        uid: str | None = None,
        containers: Sequence[str] = ("app",),
        fmt: LogFormat = "cri",
    ) -> None:
        """Create the pod directory and an empty ``0.log`` per container (first instance)."""
        named = [(namespace, "namespace"), (pod, "pod name")]
        for name, what in [*named, *((c, "container") for c in containers)]:
            if not _DNS_NAME.fullmatch(name):
                raise ValueError(f"invalid {what} {name!r}: kubernetes names are DNS names")
        if not containers or len(set(containers)) != len(containers):
            raise ValueError("containers must be a non-empty list of distinct names")
        if fmt not in ("cri", "docker"):
            raise ValueError(f"unknown log format {fmt!r}")
        with self._lock:
            if (namespace, pod) in self._pods:
                raise ValueError(f"pod {namespace}/{pod} already exists")
            if uid is None:
                uid = self._next_uid()
            elif not _UID.fullmatch(uid):
                raise ValueError(f"invalid pod uid {uid!r}")
            directory = self.log_root / f"{namespace}_{pod}_{uid}"
            p = _Pod(namespace, pod, uid, fmt, directory,
                     linked=fmt == "docker" and self.docker_root is not None)
            for container in containers:
                (directory / container).mkdir(parents=True, exist_ok=False)
                p.restarts[container] = 0
                sid = StreamId(namespace, pod, uid, container, 0)
                self._new_stream(sid)
                self._create_log(p, container, 0)
            self._pods[(namespace, pod)] = p

    def delete_pod(self, namespace: str, pod: str) -> None:
        """The pod was deleted: kubelet removes its whole log directory."""
        with self._lock:
            p = self._pod(namespace, pod)
            if p.linked:
                for container, n in p.restarts.items():
                    for restart in range(n + 1):
                        self._remove_docker_container(p, container, restart)
            shutil.rmtree(p.directory)
            del self._pods[(namespace, pod)]

    def pod_uid(self, namespace: str, pod: str) -> str:
        with self._lock:
            return self._pod(namespace, pod).uid

    def pods(self) -> list[tuple[str, str]]:
        """Live pods as ``(namespace, pod)``, in creation order."""
        with self._lock:
            return list(self._pods)

    def containers(self, namespace: str, pod: str) -> list[str]:
        with self._lock:
            return list(self._pod(namespace, pod).restarts)

    # -- writing ------------------------------------------------------------------------------

    def render(
        self,
        namespace: str,
        pod: str,
        container: str,
        message: bytes | str,
        *,
        stream: str = "stdout",
        partial: bool = False,
    ) -> bytes:
        """The exact bytes the runtime would append for ``message``, without appending them.

        ``message`` is what the container printed, followed by a newline: each ``\\n`` inside it
        ends a line, and each line becomes one record, or several ``P`` records and a final
        ``F`` when longer than ``cri_max_line``. ``partial=True`` means the container did not
        end the last line, so its last record is ``P`` (Docker: ``log`` without ``\\n``).
        Rendering reads the clock once per record, like the runtime does.
        """
        if stream not in _STREAMS:
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        data = message.encode("utf-8", "surrogateescape") if isinstance(message, str) else message
        with self._lock:
            fmt = self._pod(namespace, pod).fmt
            self._current(namespace, pod, container)  # validates the container
            out = bytearray()
            lines = data.split(b"\n")
            for i, line in enumerate(lines):
                last_line = i == len(lines) - 1
                chunks = [
                    line[j : j + self.cri_max_line] for j in range(0, len(line), self.cri_max_line)
                ] or [b""]
                for k, chunk in enumerate(chunks):
                    complete = k == len(chunks) - 1 and not (partial and last_line)
                    ts = self.now()
                    if fmt == "cri":
                        tag = b"F" if complete else b"P"
                        head = f"{rfc3339nano(ts)} {stream} ".encode()
                        out += head + tag + b" " + chunk + b"\n"
                    else:
                        out += docker_json_line(chunk + (b"\n" if complete else b""), stream, ts)
            return bytes(out)

    def write(
        self,
        namespace: str,
        pod: str,
        container: str,
        message: bytes | str,
        *,
        stream: str = "stdout",
        partial: bool = False,
    ) -> int:
        """Append ``message`` as the runtime would (see :meth:`render`); returns bytes appended."""
        with self._lock:
            data = self.render(namespace, pod, container, message, stream=stream, partial=partial)
            self._append_current(namespace, pod, container, data)
            return len(data)

    def write_raw(self, namespace: str, pod: str, container: str, raw: bytes) -> None:
        """Append ``raw`` verbatim to the current ``N.log`` (e.g. a line cut off by a crash)."""
        with self._lock:
            self._append_current(namespace, pod, container, raw)

    # -- kubelet operations -------------------------------------------------------------------

    def rotate(
        self,
        namespace: str,
        pod: str,
        container: str,
        *,
        late_write: bytes = b"",
        then_write: bytes = b"",
        on_renamed: Callable[[], None] | None = None,
    ) -> str:
        """kubelet's ``rotateLog`` in its order; returns the rotated file's name.

        ``late_write`` is appended to the renamed file (the runtime had not reopened yet),
        ``then_write`` to the new ``N.log``; both are stream bytes, in that order.
        ``on_renamed`` runs right after the rename, before the late write and the reopen: a
        test can let a reader look at the tree in that window.
        """
        with self._lock:
            p = self._pod(namespace, pod)
            sid = self._current(namespace, pod, container)
            if p.linked:
                return self._docker_rotate(sid, then_write)
            log = self._log_path(p, container, sid.restart)
            cdir = log.parent
            prefix = log.name + "."
            names = sorted(n for n in os.listdir(cdir) if n.startswith(prefix))
            # (1) cleanupUnusedLogs: a .tmp is a compression that died half-way, and a plain
            # file whose .gz exists was compressed but not yet removed.
            in_use: list[str] = []
            for name in names:
                if name.endswith(_TMP) or (not name.endswith(_GZ) and name + _GZ in names):
                    os.remove(cdir / name)
                else:
                    in_use.append(name)
            # (2) removeExcessLogs: the new N.log and the file about to be rotated are the two
            # other files, so at most max_files-2 older rotated files stay; oldest (by name,
            # which is time order) go first so an ongoing `kubectl logs` is not cut short.
            excess = max(len(in_use) - (self.max_files - 2), 0)
            for name in in_use[:excess]:
                os.remove(cdir / name)
            # (3) compressLog for every rotated file not yet compressed.
            for name in in_use[excess:]:
                if not name.endswith(_GZ):
                    _compress(cdir / name)
            # (4) rotateLatestLog: the rename keeps the inode; a reader holding it open keeps it.
            rotated = cdir / f"{log.name}.{self._rotation_stamp(sid, cdir, log.name)}"
            os.rename(log, rotated)
            if on_renamed is not None:
                on_renamed()
            # (5) the runtime still has the old inode open until ReopenContainerLog.
            if late_write:
                self._append(sid, rotated, late_write)
            # (6) ReopenContainerLog: O_CREATE|O_APPEND on the original path.
            with log.open("ab") as f:
                f.write(then_write)
            self._records[sid] += then_write
            return rotated.name

    def restart(self, namespace: str, pod: str, container: str) -> int:
        """The container restarted: ``N+1.log`` starts, instance ``N-1``'s files are removed."""
        with self._lock:
            p = self._pod(namespace, pod)
            old = self._current(namespace, pod, container).restart
            new = old + 1
            sid = StreamId(namespace, pod, p.uid, container, new)
            self._new_stream(sid)
            self._create_log(p, container, new)
            p.restarts[container] = new
            if old >= 1 and p.linked:
                self._remove_docker_container(p, container, old - 1)
            # Container GC removes the instance before the previous one, with its rotated logs.
            if old >= 1:
                gone = f"{old - 1}.log"
                cdir = p.directory / container
                for name in os.listdir(cdir):
                    if name == gone or name.startswith(gone + "."):
                        os.remove(cdir / name)
            return new

    def truncate(self, namespace: str, pod: str, container: str) -> int:
        """copytruncate: cut the current ``N.log`` to 0 bytes in place; returns the old size."""
        with self._lock:
            sid = self._current(namespace, pod, container)
            path = self.path_of(namespace, pod, container)
            size = path.stat().st_size
            os.truncate(path, 0)
            self._truncations[sid].append(len(self._records[sid]))
            return size

    # -- ground truth -------------------------------------------------------------------------

    def record(self, stream: StreamId) -> bytes:
        """Every byte ever appended to ``stream``, in order: what a perfect agent exports."""
        with self._lock:
            return bytes(self._record(stream))

    def record_len(self, stream: StreamId) -> int:
        with self._lock:
            return len(self._record(stream))

    def truncations(self, stream: StreamId) -> list[int]:
        """Stream offsets at which the live file was truncated in place."""
        with self._lock:
            self._record(stream)
            return list(self._truncations[stream])

    def streams(self) -> list[StreamId]:
        """Every stream ever created (also of deleted pods), in creation order."""
        with self._lock:
            return list(self._records)

    def stream_of(self, namespace: str, pod: str, container: str) -> StreamId:
        """The stream currently being written for a live container."""
        with self._lock:
            return self._current(namespace, pod, container)

    def path_of(self, namespace: str, pod: str, container: str) -> Path:
        """The current ``N.log`` of a live container."""
        with self._lock:
            sid = self._current(namespace, pod, container)
            return self._log_path(self._pod(namespace, pod), container, sid.restart)

    def files_of(self, stream: StreamId) -> list[Path]:
        """The files of ``stream`` still on disk, in stream order (rotated by name, then live)."""
        with self._lock:
            cdir = self.log_root / stream.pod_dir / stream.container
            base = f"{stream.restart}.log"
            if (cdir / base).is_symlink():
                return self._docker_files(cdir / base)
            try:
                names = os.listdir(cdir)
            except FileNotFoundError:
                return []
            rotated: list[tuple[str, str]] = []
            for name in names:
                parsed = split_rotated_name(name)
                if parsed is not None and parsed[0] == stream.restart:
                    rotated.append((parsed[1], name))
            files = [cdir / name for _, name in sorted(rotated)]
            if base in names:
                files.append(cdir / base)
            return files

    def disk_bytes(self, stream: StreamId) -> bytes:
        """What is left of ``stream`` on disk: its files concatenated, ``.gz`` ones gunzipped.

        Equal to :meth:`record` as long as nothing was removed or truncated.
        """
        with self._lock:
            out = bytearray()
            for path in self.files_of(stream):
                data = path.read_bytes()
                out += gzip.decompress(data) if path.name.endswith(_GZ) else data
            return bytes(out)

    # -- internals ----------------------------------------------------------------------------

    def _next_uid(self) -> str:
        # Deterministic but uuid-shaped (version 4 bits set), so uids look real and are stable.
        self._uid_counter += 1
        digest = hashlib.sha256(f"evidence-keeper-sim/{self._uid_counter}".encode()).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))

    def _pod(self, namespace: str, pod: str) -> _Pod:
        try:
            return self._pods[(namespace, pod)]
        except KeyError:
            raise KeyError(f"no live pod {namespace}/{pod}") from None

    def _current(self, namespace: str, pod: str, container: str) -> StreamId:
        p = self._pod(namespace, pod)
        if container not in p.restarts:
            raise KeyError(f"pod {namespace}/{pod} has no container {container!r}")
        return StreamId(namespace, pod, p.uid, container, p.restarts[container])

    @staticmethod
    def _log_path(p: _Pod, container: str, restart: int) -> Path:
        return p.directory / container / f"{restart}.log"

    # -- cri-dockerd --------------------------------------------------------------------------

    def docker_id(self, stream: StreamId) -> str:
        """The (deterministic) Docker container id behind a cri-dockerd stream."""
        return hashlib.sha256(f"ek-sim-docker/{stream.key}".encode()).hexdigest()

    def docker_target(self, stream: StreamId) -> Path:
        assert self.docker_root is not None
        cid = self.docker_id(stream)
        return self.docker_root / cid / f"{cid}-json.log"

    def _create_log(self, p: _Pod, container: str, restart: int) -> None:
        link = self._log_path(p, container, restart)
        if not p.linked:
            link.touch(exist_ok=False)
            return
        target = self.docker_target(StreamId(p.namespace, p.name, p.uid, container, restart))
        target.parent.mkdir(parents=True, exist_ok=False)
        target.touch(exist_ok=False)
        link.symlink_to(target)

    def _remove_docker_container(self, p: _Pod, container: str, restart: int) -> None:
        target = self.docker_target(StreamId(p.namespace, p.name, p.uid, container, restart))
        shutil.rmtree(target.parent, ignore_errors=True)
        self._log_path(p, container, restart).unlink(missing_ok=True)

    def _docker_rotate(self, sid: StreamId, then_write: bytes) -> str:
        """Docker json-file rotation (daemon/logger/loggerutils ``rotate``)."""
        target = self.docker_target(sid)
        keep = self.docker_max_files - 1  # rotated files kept besides the live one
        (target.parent / f"{target.name}.{keep}").unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            src = target.parent / f"{target.name}.{n}"
            if src.exists():
                os.rename(src, target.parent / f"{target.name}.{n + 1}")
        os.rename(target, target.parent / f"{target.name}.1")
        with target.open("ab") as f:
            f.write(then_write)
        self._records[sid] += then_write
        return f"{target.name}.1"

    @staticmethod
    def _docker_files(link: Path) -> list[Path]:
        target = Path(os.path.realpath(link))
        rotated = []
        for path in target.parent.glob(f"{target.name}.*"):
            suffix = path.name[len(target.name) + 1:]
            if suffix.isdigit():
                rotated.append((int(suffix), path))
        files = [path for _, path in sorted(rotated, reverse=True)]
        if target.exists():
            files.append(target)
        return files

    def _record(self, stream: StreamId) -> bytearray:
        try:
            return self._records[stream]
        except KeyError:
            raise KeyError(f"unknown stream {stream.key}") from None

    def _new_stream(self, sid: StreamId) -> None:
        self._records[sid] = bytearray()
        self._truncations[sid] = []

    def _append_current(self, namespace: str, pod: str, container: str, data: bytes) -> None:
        sid = self._current(namespace, pod, container)
        self._append(sid, self._log_path(self._pod(namespace, pod), container, sid.restart), data)

    def _append(self, sid: StreamId, path: Path, data: bytes) -> None:
        # Open per write, like a fresh O_APPEND: after a rename the caller chooses the path,
        # so whether bytes land in the renamed inode or the new file is explicit.
        with path.open("ab") as f:
            f.write(data)
        self._records[sid] += data

    def _rotation_stamp(self, sid: StreamId, cdir: Path, base: str) -> str:
        # kubelet would silently overwrite a same-second rotated file (os.Rename replaces). The
        # simulator instead moves its time forward a second at a time, so rotated names stay
        # unique and keep sorting in time order, which the contract's readers rely on.
        last = self._last_stamp.get(sid, "")
        while True:
            stamp = self.now().strftime(ROTATED_TS_FORMAT)
            taken = (cdir / f"{base}.{stamp}").exists() or (cdir / f"{base}.{stamp}{_GZ}").exists()
            if stamp > last and not taken:
                self._last_stamp[sid] = stamp
                return stamp
            self._skew += timedelta(seconds=1)


def _compress(path: Path) -> None:
    """kubelet's compressLog: gzip to ``<f>.tmp``, rename to ``<f>.gz``, remove ``<f>``."""
    tmp = path.with_name(path.name + _TMP)
    # mtime=0 and no embedded name, like Go's gzip.NewWriter: the output is deterministic.
    with (
        path.open("rb") as src,
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
    ):
        shutil.copyfileobj(src, gz, 1 << 20)
    os.rename(tmp, path.with_name(path.name + _GZ))
    os.remove(path)


# -- workload --------------------------------------------------------------------------------

_WORDS: Final = (
    "GET",
    "POST",
    "order",
    "payment",
    "cart",
    "user",
    "item",
    "catalogue",
    "latency",
    "ms",
    "status",
    "ok",
    "error",
    "retry",
    "timeout",
    "connect",
    "refused",
    "upstream",
    "request",
    "response",
    "span",
    "trace",
    "id",
    "db",
    "query",
    "cache",
    "hit",
    "miss",
)
_UNICODE: Final = ("héllo", "wörld", "日本語", "✓", "Ünïcödé", "ação", "Ωμέγα", "😀")
# A lone continuation byte, bytes never valid, a truncated sequence, an encoded surrogate.
_INVALID_UTF8: Final = (b"\xff", b"\xfe\xfe", b"\xc3(", b"\xa0\xa1", b"\xe2\x28", b"\xed\xa0\x80")


def _text_line(rng: random.Random, words: int) -> bytes:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).encode()


def _message(rng: random.Random, long_line: int) -> tuple[bytes, str, bool]:
    """A random message, stream and partial flag, covering the awkward byte classes."""
    kind = rng.random()
    stream = "stderr" if rng.random() < 0.2 else "stdout"
    partial = rng.random() < 0.03
    if kind < 0.45:
        msg = _text_line(rng, rng.randint(0, 25))
    elif kind < 0.60:
        msg = " ".join(rng.choice(_UNICODE) for _ in range(rng.randint(1, 8))).encode()
    elif kind < 0.72:
        parts = [_text_line(rng, 3), rng.choice(_INVALID_UTF8), _text_line(rng, 2)]
        msg = b" ".join(parts)
    elif kind < 0.82:
        msg = _text_line(rng, 2) + b"\x00" * rng.randint(1, 4) + _text_line(rng, 2)
    elif kind < 0.92:
        # A multi-line message (a stack trace): one record per line.
        msg = b"\n".join(b"\tat " + _text_line(rng, 3) for _ in range(rng.randint(2, 6)))
    else:
        # Longer than a CRI record: split into P records and a final F.
        msg = rng.randbytes(rng.randint(long_line + 1, 3 * long_line)).replace(b"\n", b"#")
    return msg, stream, partial


def churn(
    sim: KubeletSim,
    rng: random.Random,
    *,
    pods: int,
    steps: int,
    namespace: str = "churn",
    big_line_every: int = 0,
    big_line_bytes: int = 3 * 1024 * 1024,
    rotate_p: float = 0.06,
    split_p: float = 0.5,
    restart_p: float = 0.01,
    truncate_p: float = 0.0,
    delete_p: float = 0.0,
    docker_p: float = 0.25,
) -> None:
    """Drive ``sim`` through a random but reproducible (from ``rng``) mix of operations.

    Creates ``pods`` pods ``<namespace>/worker-<i>`` (reusing live ones) with one or two
    containers, CRI or Docker format, then for ``steps`` steps picks a container and writes
    text, non-ASCII, invalid UTF-8, NUL bytes, stack traces or over-long lines; rotates (with
    probability ``split_p`` a record is split across the rename via ``late_write`` /
    ``then_write``); restarts (sometimes after a crash left a line without its newline);
    optionally truncates in place or deletes and re-creates pods. Every ``big_line_every``-th
    step (0: never) writes a line of ``big_line_bytes``. Compare against ``sim.record()``.
    Truncation and deletion default to off because they make the disk diverge from the record.
    """
    for i in range(pods):
        name = f"worker-{i}"
        if (namespace, name) not in sim.pods():
            _add_worker(sim, rng, namespace, name, docker_p)
    live = [(ns, p) for ns, p in sim.pods() if ns == namespace]
    if not live:
        return
    for step in range(1, steps + 1):
        ns, pod = rng.choice(live)
        container = rng.choice(sim.containers(ns, pod))
        roll = rng.random()
        if big_line_every and step % big_line_every == 0:
            # Build a few MiB cheaply from a random block; no newline so it stays one line.
            block = rng.randbytes(4096).replace(b"\n", b" ")
            sim.write(ns, pod, container, (block * (big_line_bytes // 4096 + 1))[:big_line_bytes])
        elif roll < rotate_p:
            if rng.random() < split_p:
                msg, stream, _ = _message(rng, 64)
                rec = sim.render(ns, pod, container, msg or b"split", stream=stream)
                cut = rng.randrange(1, len(rec))
                sim.rotate(ns, pod, container, late_write=rec[:cut], then_write=rec[cut:])
            else:
                sim.rotate(ns, pod, container)
        elif roll < rotate_p + restart_p:
            if rng.random() < 0.3:
                # The container died mid-line: the runtime flushed a record without "\n".
                rec = sim.render(ns, pod, container, _text_line(rng, 6), stream="stderr")
                sim.write_raw(ns, pod, container, rec[: rng.randrange(1, len(rec))])
            sim.restart(ns, pod, container)
        elif roll < rotate_p + restart_p + truncate_p:
            sim.truncate(ns, pod, container)
        elif roll < rotate_p + restart_p + truncate_p + delete_p:
            sim.delete_pod(ns, pod)
            _add_worker(sim, rng, ns, pod, docker_p)  # same name, new uid (a StatefulSet pod)
        else:
            msg, stream, partial = _message(rng, sim.cri_max_line)
            sim.write(ns, pod, container, msg, stream=stream, partial=partial)


def _add_worker(
    sim: KubeletSim, rng: random.Random, namespace: str, pod: str, docker_p: float
) -> None:
    containers = ("app", "sidecar") if rng.random() < 0.4 else ("app",)
    fmt: LogFormat = "docker" if rng.random() < docker_p else "cri"
    sim.add_pod(namespace, pod, containers=containers, fmt=fmt)
