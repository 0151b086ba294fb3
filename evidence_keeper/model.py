"""Pure records shared by every stage: stream identity, store keys, gaps.

Nothing here does I/O. Stages (discover, tail, spool, ship, health, api, archive) meet only
through these records and the spool, so each one can be read and tested on its own.

A *stream* is one container instance ``(namespace, pod, pod_uid, container, restart)``; its
bytes are everything ever written to ``<restart>.log`` across rotations, in order, and an
*offset* is a position in that concatenation (see CONTRACT.md section 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

SEGMENT_EXTENSIONS: Final = {"zstd": "zst", "gzip": "gz"}
# The contract's capture bound: a byte is captured within one second of being written. A job
# that must see everything written up to an instant (an archive's request, a backfill's window
# end) seals the spool only once this much time has passed since that instant.
CAPTURE_BOUND_S: Final = 1.0
_KEY_RE: Final = re.compile(
    r"^(?:(?P<prefix>.+)/)?(?P<cluster>[^/]+)/(?P<namespace>[^/]+)/(?P<pod>[^/]+)_(?P<uid>[^/_]+)"
    r"/(?P<container>[^/]+)/(?P<restart>\d+)/(?P<offset>\d{20})-(?P<end>\d{20})\.log\.(?P<ext>zst|gz)$"
)


@dataclass(frozen=True, slots=True, order=True)
class StreamId:
    """One container instance: the unit of ordering, offsets and hash chains."""

    namespace: str
    pod: str
    pod_uid: str
    container: str
    restart: int

    @property
    def pod_dir(self) -> str:
        """The kubelet directory name of the pod: ``<namespace>_<pod>_<pod-uid>``."""
        return f"{self.namespace}_{self.pod}_{self.pod_uid}"

    @property
    def key(self) -> str:
        """A stable, filesystem-safe name (kubernetes names cannot contain ``/``)."""
        return f"{self.pod_dir}/{self.container}/{self.restart}"

    def store_dir(self, cluster: str) -> str:
        """Key components of this stream's segments below the store prefix."""
        pod = f"{self.pod}_{self.pod_uid}"
        return f"{cluster}/{self.namespace}/{pod}/{self.container}/{self.restart}"

    def labels(self) -> dict[str, str | int]:
        return {
            "namespace": self.namespace,
            "pod": self.pod,
            "pod_uid": self.pod_uid,
            "container": self.container,
            "restart": self.restart,
        }

    @classmethod
    def from_key(cls, key: str) -> StreamId:
        pod_dir, container, restart = key.split("/")
        namespace, pod, uid = split_pod_dir(pod_dir)
        return cls(namespace, pod, uid, container, int(restart))


def split_pod_dir(name: str) -> tuple[str, str, str]:
    """Split ``<namespace>_<pod>_<uid>``; the uid is after the last ``_``, the namespace before
    the first (namespaces and pod names are DNS names and contain no ``_``)."""
    head, sep, uid = name.rpartition("_")
    namespace, sep2, pod = head.partition("_")
    if not sep or not sep2 or not namespace or not pod or not uid:
        raise ValueError(f"not a kubelet pod directory name: {name!r}")
    return namespace, pod, uid


def segment_key(
    prefix: str, cluster: str, stream: StreamId, offset: int, end: int, ext: str
) -> str:
    """The store key of the segment holding stream bytes ``[offset, end)``."""
    body = f"{stream.store_dir(cluster)}/{offset:020d}-{end:020d}.log.{ext}"
    return f"{prefix.strip('/')}/{body}" if prefix.strip("/") else body


@dataclass(frozen=True, slots=True)
class SegmentKey:
    prefix: str
    cluster: str
    stream: StreamId
    offset: int
    end: int
    ext: str


def parse_segment_key(key: str) -> SegmentKey | None:
    """Inverse of :func:`segment_key`; ``None`` for keys that are not segments."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    stream = StreamId(m["namespace"], m["pod"], m["uid"], m["container"], int(m["restart"]))
    return SegmentKey(
        m["prefix"] or "", m["cluster"], stream, int(m["offset"]), int(m["end"]), m["ext"]
    )


# Gap kinds and loss reasons. Reasons are metric label values, so they stay a closed set.
GAP_KINDS: Final = ("sink_outage", "loss", "backlog", "agent_down")
LOSS_REASONS: Final = (
    "rotated_away",  # kubelet rotated and deleted a file before it was read to the end
    "deleted",  # the file or pod directory vanished before it was read to the end
    "truncated",  # copytruncate: the file shrank under the reader
    "unreadable",  # the file could not be opened or read (EACCES, EIO) until it vanished
    "evicted",  # the spool budget forced unshipped data out
    "spool_corrupt",  # spool data found damaged at recovery
)


@dataclass(frozen=True, slots=True)
class Loss:
    """A hole in a stream: ``bytes`` offsets starting at ``offset`` were not captured.

    ``bytes`` is ``None`` when the length cannot be known (files created and deleted while the
    agent was not running); such a hole consumes no offsets.
    """

    stream: StreamId
    offset: int
    bytes: int | None
    reason: str
    detail: str
