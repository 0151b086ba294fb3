"""A kubelet-shaped log tree of realistic CRI lines, generated from a seed.

Layout: ``<root>/<namespace>_<pod>_<uid>/<container>/0.log``, as on a node. Lines are
containerd's CRI format ``<RFC3339Nano> <stdout|stderr> <P|F> <message>\\n`` (Go trims trailing
zeros of the fraction). Messages (~100-200 bytes) mix the shapes a shop's pods write: access
logs, logfmt business events, JSON lines, Java-style errors and free text, with random ids,
trace ids, amounts and words from a vocabulary, so zstd sees a realistic ratio (about 3-5x),
not the 100x of a repeated line. About 1 % of the records are partial (``P``) records followed
by their final (``F``) part, as containerd writes for long lines.

Generation runs one process per CPU (one file per task) and is deterministic: the same
``(seed, file index, size)`` always gives the same bytes. A ``manifest.json`` describes the
tree so a kept work directory (``--keep``) is reused by the next run with the same parameters.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

GENERATOR_VERSION: Final = 1
START_EPOCH: Final = 1762777620  # 2025-11-10T12:27:00Z, the incident
_BUF: Final = 4 << 20

NAMESPACES: Final = ("shop", "payments", "search", "checkout", "identity", "ledger")
APPS: Final = (
    "orders", "cart", "gateway", "catalog", "pricing", "auth", "notifier", "inventory",
    "billing", "recommend", "shipping", "frontend",
)
CONTAINERS: Final = ("app", "sidecar", "envoy", "worker")
WORDS: Final = (
    "order", "payment", "customer", "invoice", "refund", "cart", "item", "checkout", "session",
    "token", "user", "account", "request", "response", "timeout", "retry", "backoff", "upstream",
    "downstream", "cache", "miss", "hit", "queue", "message", "consumer", "producer", "partition",
    "offset", "commit", "rollback", "transaction", "lock", "deadlock", "connection", "pool",
    "exhausted", "latency", "slow", "fast", "healthy", "degraded", "unavailable", "circuit",
    "open", "closed", "half", "shipment", "warehouse", "inventory", "reserved", "released",
    "price", "discount", "coupon", "tax", "currency", "exchange", "rate", "webhook", "signature",
    "verified", "rejected", "accepted", "pending", "settled", "failed", "succeeded", "scheduled",
    "cancelled", "expired", "renewed", "batch", "job", "worker", "shard", "replica", "leader",
    "follower", "election", "snapshot", "compaction", "index", "search", "query", "result",
    "page", "cursor",
)
EVENTS: Final = (
    "created", "paid", "PAYMENT_FAILED", "refunded", "shipped", "cancelled", "reserved",
    "retrying", "settled", "expired",
)
CURRENCIES: Final = ("EUR", "USD", "GBP", "CHF", "SEK", "PLN")
PATHS: Final = (
    "/api/v1/orders/", "/api/v1/carts/", "/api/v2/payments/", "/api/v1/users/",
    "/healthz", "/api/v1/search?q=", "/api/v1/items/", "/metrics",
)
METHODS: Final = ("GET", "GET", "GET", "POST", "PUT", "DELETE")
STATUSES: Final = (200, 200, 200, 200, 201, 204, 301, 400, 404, 409, 500, 502, 503)
LEVELS: Final = ("debug", "info", "info", "info", "warn", "error")
EXCEPTIONS: Final = (
    "java.net.SocketTimeoutException: Read timed out",
    "java.io.IOException: Connection reset by peer",
    "org.postgresql.util.PSQLException: could not serialize access",
    "io.grpc.StatusRuntimeException: UNAVAILABLE: upstream connect error",
    "java.lang.IllegalStateException: pool exhausted",
)
AGENTS: Final = ("curl/8.5.0", "Go-http-client/1.1", "okhttp/4.12.0", "Mozilla/5.0",
                 "kube-probe/1.30", "python-requests/2.32.3")


@dataclass(frozen=True, slots=True)
class LogFile:
    path: str  # relative to the tree root
    size: int


@dataclass(frozen=True, slots=True)
class Tree:
    root: Path
    files: tuple[LogFile, ...]
    seed: int
    reused: bool = False  # found complete in a kept work directory, not generated

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _pod_dirs(n_files: int, containers_per_pod: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    pod = 0
    while len(out) < n_files:
        ns = NAMESPACES[pod % len(NAMESPACES)]
        app = APPS[pod % len(APPS)]
        suffix = f"{rng.getrandbits(40):010x}"[:10]
        uid = (f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}"
               f"-{rng.getrandbits(16):04x}-{rng.getrandbits(48):012x}")
        for c in range(containers_per_pod):
            if len(out) == n_files:
                break
            out.append(f"{ns}_{app}-{suffix}_{uid}/{CONTAINERS[c % len(CONTAINERS)]}/0.log")
        pod += 1
    return out


class _Lines:
    """CRI lines from one seeded RNG. ``chunk()`` returns about ``_BUF`` bytes at a time."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sec = START_EPOCH + self.rng.randrange(0, 3600)
        self.ns = 0
        self._prefix_sec = -1
        self._prefix = ""

    def _ts(self) -> str:
        self.ns += self.rng.randrange(1, 3_000_000)
        if self.ns >= 1_000_000_000:
            self.sec += self.ns // 1_000_000_000
            self.ns %= 1_000_000_000
        if self.sec != self._prefix_sec:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.sec))
            self._prefix_sec = self.sec
        if self.ns == 0:
            return self._prefix + "Z"
        return f"{self._prefix}.{self.ns:09d}".rstrip("0") + "Z"

    def _message(self) -> str:
        r = self.rng
        kind = r.random()
        if kind < 0.30:
            return (f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)} - - "
                    f"\"{r.choice(METHODS)} {r.choice(PATHS)}{r.getrandbits(36)} HTTP/1.1\" "
                    f"{r.choice(STATUSES)} {r.randrange(40, 90000)} \"{r.choice(AGENTS)}\" "
                    f"rt={r.randrange(1, 4000)}ms trace_id={r.getrandbits(128):032x}")
        if kind < 0.55:
            amount = r.randrange(100, 5_000_000) / 100
            return (f"level={r.choice(LEVELS)} msg=\"order {r.choice(EVENTS)}\" "
                    f"order_id=ORD-{r.randrange(10**10):010d} customer=c{r.randrange(10**7)} "
                    f"amount={amount:.2f} currency={r.choice(CURRENCIES)} "
                    f"items={r.randrange(1, 30)} sku=SKU-{r.randrange(10**6):06d}")
        if kind < 0.75:
            return ("{\"level\":\"" + r.choice(LEVELS) + "\",\"logger\":\""
                    + r.choice(APPS) + "." + r.choice(WORDS) + "\",\"msg\":\""
                    + " ".join(r.choices(WORDS, k=r.randrange(3, 9)))
                    + f"\",\"attempt\":{r.randrange(1, 6)},\"latency_ms\":"
                    + f"{r.randrange(1, 30000) / 10:.1f},\"request_id\":\""
                    + f"{r.getrandbits(128):032x}\"}}")
        if kind < 0.85:
            return (f"ERROR [{r.choice(APPS)}-exec-{r.randrange(1, 64)}] "
                    f"c.e.{r.choice(APPS)}.{r.choice(WORDS).title()}Service: "
                    f"{r.choice(WORDS)} {r.choice(WORDS)} failed: {r.choice(EXCEPTIONS)} "
                    f"after {r.randrange(1, 60000)} ms (host=db-{r.randrange(12)}.internal)")
        words = " ".join(r.choices(WORDS, k=r.randrange(10, 26)))
        return f"{words[:1].upper()}{words[1:]} id={r.getrandbits(64):016x}"

    def chunk(self) -> bytes:
        r = self.rng
        parts: list[str] = []
        n = 0
        while n < _BUF:
            stream = "stderr" if r.random() < 0.08 else "stdout"
            msg = self._message()
            if r.random() < 0.01:  # a long line, written by containerd as P + F records
                line = f"{self._ts()} {stream} P {msg} {msg}\n{self._ts()} {stream} F {msg}\n"
            else:
                line = f"{self._ts()} {stream} F {msg}\n"
            parts.append(line)
            n += len(line)
        return "".join(parts).encode()


def write_log(path: Path, size: int, seed: int) -> int:
    """Write at least ``size`` bytes of whole CRI lines to ``path``; returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = _Lines(seed)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            data = gen.chunk()
            if written + len(data) > size:
                # Cut after the first line end at or past the target: whole lines only.
                cut = data.find(b"\n", size - written - 1) + 1
                data = data[:cut]
            f.write(data)
            written += len(data)
    return written


def _write_task(args: tuple[str, int, int]) -> int:
    path, size, seed = args
    return write_log(Path(path), size, seed)


def generate(root: Path, *, total_bytes: int, n_files: int, seed: int = 20251110,
             containers_per_pod: int = 2, workers: int | None = None) -> Tree:
    """Generate (or reuse, if its manifest matches) a tree of ``n_files`` files."""
    manifest_path = root / "manifest.json"
    want = {"version": GENERATOR_VERSION, "total_bytes": total_bytes, "n_files": n_files,
            "seed": seed, "containers_per_pod": containers_per_pod}
    reused = _load(root, manifest_path, want)
    if reused is not None:
        return reused
    rng = random.Random(seed)
    rels = _pod_dirs(n_files, containers_per_pod, rng)
    per_file = -(-total_bytes // n_files)
    tasks = [(str(root / rel), per_file, seed * 1000 + i) for i, rel in enumerate(rels)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            sizes = list(pool.map(_write_task, tasks))
    else:
        sizes = [_write_task(t) for t in tasks]
    tree = Tree(root=root, files=tuple(LogFile(rel, n) for rel, n in zip(rels, sizes,
                                                                        strict=True)),
                seed=seed)
    manifest_path.write_text(json.dumps(
        {**want, "files": [asdict(f) for f in tree.files]}, indent=1))
    return tree


def _load(root: Path, manifest_path: Path, want: dict[str, int]) -> Tree | None:
    try:
        doc = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if any(doc.get(k) != v for k, v in want.items()):
        return None
    files = tuple(LogFile(str(f["path"]), int(f["size"])) for f in doc["files"])
    for f in files:
        try:
            if (root / f.path).stat().st_size != f.size:
                return None
        except OSError:
            return None
    return Tree(root=root, files=files, seed=int(want["seed"]), reused=True)


def quiet_tree(root: Path, *, pods: int, containers_per_pod: int, seed: int = 7,
               sizes: Sequence[int] = (2048, 8192)) -> Tree:
    """``pods * containers_per_pod`` small files (a few KiB each), written once."""
    rng = random.Random(seed)
    rels = _pod_dirs(pods * containers_per_pod, containers_per_pod, rng)
    files = []
    for i, rel in enumerate(rels):
        size = write_log(root / rel, rng.randrange(sizes[0], sizes[1]), seed * 1000 + i)
        files.append(LogFile(rel, size))
    return Tree(root=root, files=tuple(files), seed=seed)
