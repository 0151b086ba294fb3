"""The measurements. Each returns plain numbers; :mod:`bench.report` judges and prints them.

1. :func:`raw_loop`: read every file in 1 MiB chunks, write one output file per input, fsync
   every 8 MiB: the physical limit of this disk and this Python for the agent's job (and, for
   reference, the same loop with one fsync per file: the streaming rate of the disk).
2. :func:`measure_agent` with :class:`DiscardStore`: the real :class:`Agent` in this event loop
   (as ``tests/conftest.running_agent`` runs it); the clock runs from ``agent.run()`` until
   ``evidence_keeper_captured_bytes_total`` reaches the tree's size. The store refuses every
   upload, so shipping costs (almost) nothing: the shipper's circuit breaker backs off after
   the first refusal and probes at most once per back-off period.
3. :func:`measure_agent` with a file store: the same until
   ``evidence_keeper_shipped_bytes_total`` reaches the size (read, hash, zstd, write + fsync).
4. :func:`quiet_footprint`: ``python -m evidence_keeper.cli run`` in a subprocess with 200
   quiet files and default intervals; RSS from ``/proc/<pid>/status`` and CPU from the
   utime + stime of ``/proc/<pid>/stat`` over an idle window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

import yaml

from bench.datagen import Tree, quiet_tree
from evidence_keeper.logs import configure_logging
from evidence_keeper.settings import Settings, load_settings
from evidence_keeper.store import META_SUFFIX, ObjectMissing, Store, StoreError
from evidence_keeper.store.codec import decompress
from evidence_keeper.supervisor import Agent

MiB: Final = 1 << 20
GiB: Final = 1 << 30
RAW_CHUNK: Final = 1 * MiB
RAW_FSYNC_EVERY: Final = 8 * MiB
POLL_S: Final = 0.02
CAPTURED: Final = "evidence_keeper_captured_bytes_total"
SHIPPED: Final = "evidence_keeper_shipped_bytes_total"


def mb_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


class Ticker:
    """True at most once every ``every_s`` seconds (progress lines on long phases)."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = self.t0

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class Progress:
    """Prints ``label: done / total`` to stderr at most every ``every_s`` seconds."""

    def __init__(self, label: str, total: int, *, every_s: float = 2.0) -> None:
        self.label = label
        self.total = total
        self.ticker = Ticker(every_s)

    def update(self, done: float, what: str = "") -> None:
        if not self.ticker.due():
            return
        elapsed = self.ticker.elapsed
        pct = 100.0 * done / self.total if self.total else 100.0
        print(f"  {self.label}: {done / MiB:8.1f} / {self.total / MiB:.1f} MiB {what}"
              f"({pct:5.1f} %) after {elapsed:5.1f} s, {mb_s(done, elapsed):6.1f} MB/s",
              file=sys.stderr, flush=True)


@dataclass(slots=True)
class Throughput:
    name: str
    nbytes: int
    seconds: float
    cpu_seconds: float
    # Time at which the first 10 % / 90 % of the bytes were through (steady-state rate).
    t10: float | None = None
    t90: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        return mb_s(self.nbytes, self.seconds)

    @property
    def cores_used(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_mb_s(self) -> float | None:
        if self.t10 is None or self.t90 is None or self.t90 <= self.t10:
            return None
        return mb_s(0.8 * self.nbytes, self.t90 - self.t10)


# --------------------------------------------------------------------------- 1. raw loop


def raw_loop(tree: Tree, out_dir: Path, *, fsync_every: int | None = RAW_FSYNC_EVERY
             ) -> Throughput:
    """Read 1 MiB chunks, write one output per input, fsync every 8 MiB (and at each end).

    ``fsync_every=None`` fsyncs each output once, at its end: the disk's streaming bandwidth
    rather than the latency of many small synchronous flushes (a reference only).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    total = tree.total_bytes
    every = fsync_every or 1 << 62
    name = ("raw read/write/fsync-every-8-MiB loop" if fsync_every == RAW_FSYNC_EVERY else
            "raw loop, one fsync per file" if fsync_every is None else
            f"raw loop, fsync every {fsync_every / MiB:g} MiB")
    progress = Progress("raw loop" if fsync_every else "raw loop (one fsync per file)", total)
    done = 0
    t10 = t90 = None
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i, f in enumerate(tree.files):
        src = os.open(tree.root / f.path, os.O_RDONLY | os.O_CLOEXEC)
        dst = os.open(out_dir / f"{i:04d}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                      | os.O_CLOEXEC, 0o640)
        try:
            unsynced = 0
            while True:
                data = os.read(src, RAW_CHUNK)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view):]
                unsynced += len(data)
                done += len(data)
                if unsynced >= every:
                    os.fsync(dst)
                    unsynced = 0
                if t10 is None and done >= 0.1 * total:
                    t10 = time.perf_counter() - t0
                if t90 is None and done >= 0.9 * total:
                    t90 = time.perf_counter() - t0
                progress.update(done)
            if unsynced:
                os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
    dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    seconds = time.perf_counter() - t0
    return Throughput(name, done, seconds, time.process_time() - c0, t10=t10, t90=t90)


# --------------------------------------------------------------------------- 2./3. agent


class DiscardStore:
    """A store that refuses every upload (retryably): nothing ships, nothing is deleted."""

    scheme = "bench"
    check_name = "file"

    def put(self, key: str, body: bytes, meta: Mapping[str, str], *,
            retain_until: datetime | None = None) -> None:
        raise StoreError("benchmark: shipping is disabled in the tail -> spool phase")

    def get(self, key: str) -> bytes:
        raise ObjectMissing(key)

    def head(self, key: str) -> dict[str, str] | None:
        return None

    def list(self, prefix: str) -> Iterator[str]:
        return iter(())

    def check(self) -> None:
        return None

    def check_object_lock(self) -> None:
        return None  # nothing is ever stored: no retention to check

    def describe(self) -> str:
        return "bench://discard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def throughput_settings(tree: Tree, spool_dir: Path, store_dir: Path | None,
                        **extra: object) -> Settings:
    """The issue's settings for the throughput runs (intervals, 8 MiB segments, 5 s flush)."""
    overrides: dict[str, object] = {
        "node_name": "bench-node",
        "log_root": str(tree.root),
        "spool_dir": str(spool_dir),
        "store_url": f"file://{store_dir}" if store_dir else f"file://{spool_dir}/store",
        "kubernetes": "off",
        "listen": f"127.0.0.1:{free_port()}",
        "log_level": "warning",
        "tail_interval_s": 0.05,
        "commit_interval_s": 0.25,
        "discover_interval_s": 0.5,
        "segment_max_bytes": 8 * MiB,
        "flush_interval_s": 5,
        "spool_max_bytes": max(4 * GiB, 2 * tree.total_bytes),
        **extra,
    }
    return load_settings(None, environ={}, overrides=overrides)


@dataclass(slots=True)
class AgentRun:
    result: Throughput
    captured_s: float | None  # when captured reached the total (both phases)
    log_levels: dict[str, int] = field(default_factory=dict)  # filled in by the caller


def _metric(agent: Agent, name: str) -> float:
    value = agent.metrics.registry.get_sample_value(name)
    return float(value) if value is not None else 0.0


def count_levels(path: Path) -> dict[str, int]:
    """The agent's JSON log lines in ``path``, counted by ``level``."""
    counts: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    level = str(json.loads(line).get("level", "?"))
                except ValueError:
                    level = "unparseable"
                counts[level] = counts.get(level, 0) + 1
    except OSError:
        pass
    return counts


async def measure_agent(name: str, settings: Settings, *, total: int, until: str,
                        store: Store | None, log_stream: TextIO,
                        timeout_s: float) -> AgentRun:
    """Run the agent in this loop; time ``agent.run()`` until metric ``until`` >= ``total``.

    The agent's own log lines go to ``log_stream`` (a file), not to the console.
    """
    configure_logging(settings.log_level, stream=log_stream)
    try:
        return await _measure(name, settings, total=total, until=until, store=store,
                              timeout_s=timeout_s)
    finally:
        log_stream.flush()
        configure_logging("warning")


async def _measure(name: str, settings: Settings, *, total: int, until: str,
                   store: Store | None, timeout_s: float) -> AgentRun:
    agent = Agent(settings, store=store)
    stop = asyncio.Event()
    label = "tail -> spool" if until == CAPTURED else "tail -> spool -> store"
    progress = Progress(label, total)
    t10 = t90 = captured_s = None
    t0 = time.perf_counter()
    c0 = time.process_time()
    task = asyncio.create_task(agent.run(stop), name="agent")
    notes: list[str] = []
    try:
        while True:
            await asyncio.sleep(POLL_S)
            now = time.perf_counter() - t0
            value = _metric(agent, until)
            if captured_s is None and _metric(agent, CAPTURED) >= total:
                captured_s = now
            if t10 is None and value >= 0.1 * total:
                t10 = now
            if t90 is None and value >= 0.9 * total:
                t90 = now
            if value >= total:
                break
            if task.done():
                task.result()
                raise RuntimeError(f"{name}: the agent stopped before {until} reached {total}")
            if now > timeout_s:
                raise TimeoutError(f"{name}: {until} = {value:.0f} of {total} after {now:.0f} s")
            what = "captured " if until == CAPTURED else "shipped "
            progress.update(value, what)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if value > total:
            notes.append(f"{until} overshot the input by {value - total:.0f} bytes")
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=max(60.0, settings.shutdown_timeout_s + 30))
        except Exception as exc:
            notes.append(f"shutdown: {exc!r}")
        finally:
            agent.close()
    result = Throughput(name, total, seconds, cpu, t10=t10, t90=t90, notes=notes)
    return AgentRun(result, captured_s)


def store_stats(store_dir: Path) -> tuple[int, int]:
    """(segment objects, their compressed bytes) in a file store."""
    n = size = 0
    for dirpath, _dirs, files in os.walk(store_dir):
        for f in files:
            if f.endswith((".log.zst", ".log.gz")):
                n += 1
                size += os.stat(os.path.join(dirpath, f)).st_size
    return n, size


def verify_stream(tree: Tree, store_dir: Path, index: int = 0) -> bool:
    """Concatenated, decompressed segments of one stream == its source file, byte for byte."""
    rel = tree.files[index].path
    pod_dir, container, _ = rel.split("/")
    ns, _, rest = pod_dir.partition("_")
    pod, _, uid = rest.rpartition("_")
    stream_dir = store_dir / "default" / ns / f"{pod}_{uid}" / container / "0"
    keys = sorted(p for p in os.listdir(stream_dir) if not p.endswith((META_SUFFIX, ".tmp")))
    with open(tree.root / rel, "rb") as source:
        expected_offset = 0
        for key in keys:
            start, end = (int(x) for x in key.split(".", 1)[0].split("-"))
            if start != expected_offset:
                return False
            body = decompress((stream_dir / key).read_bytes(), key.rsplit(".", 1)[1])
            if len(body) != end - start or body != source.read(end - start):
                return False
            expected_offset = end
        return expected_offset == tree.files[index].size and source.read(1) == b""


# --------------------------------------------------------------------------- 4. quiet files


@dataclass(slots=True)
class Footprint:
    files: int
    warmup_s: float
    idle_s: float
    rss_bytes: int  # largest VmRSS seen during the idle window
    rss_end_bytes: int
    hwm_bytes: int  # VmHWM: the peak since start (includes the warm-up)
    cpu_percent: float  # of one core, over the idle window
    threads: int
    shipped_objects: int
    tailed_files: float | None  # evidence_keeper_tailed_files from /metrics after warm-up
    exit_code: int | None
    log_levels: dict[str, int]
    notes: list[str] = field(default_factory=list)


def _scrape(url: str, metric: str) -> float | None:
    """One sample of an unlabelled metric from a Prometheus text endpoint; None if absent."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == metric:
            return float(value)
    return None


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0]) * 1024


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def quiet_footprint(workdir: Path, *, pods: int = 100, containers_per_pod: int = 2,
                    idle_s: float = 20.0, warmup_timeout_s: float = 90.0,
                    settle_s: float = 5.0,
                    overrides: Mapping[str, object] | None = None) -> Footprint:
    """RSS and idle CPU of ``evidence-keeper run`` (a subprocess) tailing quiet files.

    ``overrides`` are extra settings for experiments (the benchmark uses the defaults).
    """
    tree = quiet_tree(workdir / "pods", pods=pods, containers_per_pod=containers_per_pod)
    n_files = len(tree.files)
    spool_dir, store_dir = workdir / "spool", workdir / "store"
    port = free_port()
    config: dict[str, Any] = {
        "node_name": "bench-quiet",
        "log_root": str(tree.root),
        "spool_dir": str(spool_dir),
        "store_url": f"file://{store_dir}",
        "kubernetes": "off",
        "listen": f"127.0.0.1:{port}",
        "log_level": "info",
        **(overrides or {}),
    }
    config_path = workdir / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "agent.log"
    notes: list[str] = []
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    clk = os.sysconf("SC_CLK_TCK")
    try:
        t0 = time.perf_counter()
        shipped = 0
        ticker = Ticker(2.0)
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"agent exited with {proc.returncode} during warm-up:\n{tail}")
            shipped, _ = store_stats(store_dir) if store_dir.exists() else (0, 0)
            if shipped >= n_files:
                break
            if time.perf_counter() - t0 > warmup_timeout_s:
                notes.append(f"warm-up timed out: {shipped} of {n_files} streams shipped")
                break
            time.sleep(0.5)
            if ticker.due():
                print(f"  quiet warm-up: {shipped} / {n_files} streams in the store after "
                      f"{ticker.elapsed:4.1f} s", file=sys.stderr, flush=True)
        tailed = _scrape(f"http://127.0.0.1:{port}/metrics", "evidence_keeper_tailed_files")
        time.sleep(settle_s)
        warmup = time.perf_counter() - t0
        print(f"  quiet: {shipped} / {n_files} streams shipped after {warmup:.1f} s "
              f"(incl. {settle_s:.0f} s settle); measuring {idle_s:.0f} s idle",
              file=sys.stderr, flush=True)
        ticks0, w0 = _cpu_ticks(proc.pid), time.perf_counter()
        rss_max = 0
        while time.perf_counter() - w0 < idle_s:
            rss_max = max(rss_max, _kib(_status(proc.pid)["VmRSS"]))
            time.sleep(min(1.0, max(0.0, idle_s - (time.perf_counter() - w0))))
        ticks1, w1 = _cpu_ticks(proc.pid), time.perf_counter()
        status = _status(proc.pid)
        rss_end = _kib(status["VmRSS"])
        rss_max = max(rss_max, rss_end)
        cpu = (ticks1 - ticks0) / clk / (w1 - w0) * 100.0
        hwm = _kib(status["VmHWM"])
        threads = int(status["Threads"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                notes.append("agent ignored SIGTERM for 40 s; killed")
                proc.kill()
                proc.wait()
    return Footprint(
        files=n_files, warmup_s=warmup, idle_s=w1 - w0, rss_bytes=rss_max, rss_end_bytes=rss_end,
        hwm_bytes=hwm, cpu_percent=cpu, threads=threads, shipped_objects=shipped,
        tailed_files=tailed,
        exit_code=proc.returncode, log_levels=count_levels(log_path), notes=notes,
    )

