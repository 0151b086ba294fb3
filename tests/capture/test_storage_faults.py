"""Storage faults that must never produce a false record (issue 12, contract v2 sections 3-4).

Each test drives the real agent against real parts: moto's S3 server with real boto3 behind
``tests/netproxy.py`` (a lost reply, an outage), the ``FileSystem`` seam for a failed fsync,
a subprocess ``evidence-keeper run`` for a second agent, a credentials file that appears late.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from evidence_keeper.api.client import call
from evidence_keeper.archive.verify import format_report, verify_archive
from evidence_keeper.fsio import FileSystem
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore, Store, StoreError
from evidence_keeper.store.s3 import S3Store
from evidence_keeper.supervisor import Agent, StartupError
from tests.conftest import (
    assert_bytes_equal,
    check_segments,
    export_bytes,
    loss_gaps,
    running_agent,
    settle,
    stored_segments,
    wait_exported,
    wait_until,
)
from tests.netproxy import Proxy
from tests.support.paths import REPO
from tests.support.s3 import REGION
from tests.support.stream import assert_stored

NS = "shop"
TOKEN = "storage-faults-token-0123456789"


def direct(url: str) -> Any:
    """A client that talks to moto itself (not through the proxy), with its own keys."""
    return boto3.client("s3", endpoint_url=url, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(moto_url: str) -> str:
    name = f"ek-{uuid.uuid4().hex[:12]}"
    direct(moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto_url: str) -> Iterator[Proxy]:
    host, port = moto_url.rsplit("/", 1)[1].split(":")
    p = Proxy((host, int(port)))
    yield p
    p.close()


def keys(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def metric(agent: Agent, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def write_lines(sim: KubeletSim, pod: str, n: int, tag: str, width: int = 60) -> None:
    for i in range(n):
        sim.write(NS, pod, "app", f"{tag} {i:05d} " + "x" * width)


def loss_ranges(agent: Agent, sid: StreamId) -> list[tuple[int, int]]:
    out = []
    for g in loss_gaps(agent.ledger, sid):
        assert g.fields["bytes"] is not None, g
        out.append((int(g.fields["offset"]), int(g.fields["offset"]) + int(g.fields["bytes"])))
    return sorted(out)


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def without(record: bytes, holes: list[tuple[int, int]]) -> bytes:
    out, at = bytearray(), 0
    for start, end in holes:
        out += record[at:start]
        at = end
    return bytes(out + record[at:])


# ----------------------------------------------------------------------------- one agent per spool


async def test_second_agent_on_a_live_spool_exits_and_writes_nothing(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1")
    sid = sim.stream_of(NS, "orders-1", "app")
    store = FileStore(tmp_path / "store")
    cfg = tmp_path / "second.yaml"
    cfg.write_text(f"log_root: {tmp_path / 'pods'}\nspool_dir: {settings.spool_dir}\n"
                   f"store_url: file://{tmp_path / 'store2'}\nkubernetes: 'off'\n"
                   "listen: 127.0.0.1:0\nlog_level: error\n")
    async with running_agent(settings) as agent:
        write_lines(sim, "orders-1", 40, "before")
        await wait_exported(store, sid, sim.record(sid))
        spool = Path(settings.spool_dir)
        # Let the live agent settle (shipped segment files removed) so its own writes stop.
        await wait_until(lambda: not any(n.endswith(".seg") for n in tree(spool)), within=10,
                         what="idle spool")
        await wait_until(lambda: not agent.spool.dirty, within=10, what="a last checkpoint")
        before = await asyncio.to_thread(tree, spool)
        checkpoint = (spool / "checkpoint.json").read_bytes()
        try:
            r = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(cfg)],
                capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        except subprocess.TimeoutExpired:
            raise AssertionError("a second agent ran on a spool another agent holds") from None
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(spool) in lines[0] and "Traceback" not in r.stderr, (
            r.stderr)
        # Nothing written: no new file, the live agent's checkpoint untouched, no gap.
        assert await asyncio.to_thread(tree, spool) == before
        assert (spool / "checkpoint.json").read_bytes() == checkpoint
        assert not (tmp_path / "store2").exists()
        assert agent.ledger.gaps(kind="agent_down") == []
        write_lines(sim, "orders-1", 40, "after")  # the first agent goes on undisturbed
        await wait_exported(store, sid, sim.record(sid))
    check_segments(stored_segments(store, sid))


# ----------------------------------------------------------------------------- lost PUT replies


async def verify_clean(agent: Agent, store: Store) -> None:
    """Archive the namespace through the agent's API, then ``verify`` it: hashes, presence and
    hash chains as the store holds them (holes of recorded loss do not break a chain)."""
    assert agent.api_address is not None
    url = "http://{}:{}".format(*agent.api_address)
    status, doc = await asyncio.to_thread(
        call, url, "/archive", method="POST", token=TOKEN,
        body={"namespace": NS, "reason": "issue 12: verify after storage faults"})
    assert status == 202, doc

    for _ in range(300):  # the agent answers from this event loop: ask from a thread
        _, job = await asyncio.to_thread(call, url, f"/archives/{doc['id']}", token=TOKEN)
        assert job["status"] != "failed", job
        if job["status"] == "complete":
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"archive not complete: {job}")
    report = await asyncio.to_thread(verify_archive, store, cluster="default",
                                     archive_id=doc["id"])
    assert report.ok, format_report(report)


def s3_settings(make_settings: Callable[..., Settings], proxy: Proxy, bucket: str,
                **kw: Any) -> Settings:
    token = Path(make_settings().spool_dir).parent / "archive-token"
    token.write_text(TOKEN + "\n")
    base: dict[str, Any] = {"store_url": f"s3://{bucket}/evidence",
                            "s3_endpoint_url": proxy.url, "shutdown_timeout_s": 4,
                            "archive_token_file": str(token)}
    base.update(kw)
    return make_settings(**base)


async def _lose_one_reply(agent: Agent, proxy: Proxy, client: Any, bucket: str) -> list[str]:
    """Wait until a PUT reached the store while the agent saw its connection reset."""
    await wait_until(lambda: bool(keys(client, bucket)), within=30,
                     what="a PUT stored although its reply was lost")
    await wait_until(lambda: metric(agent, "evidence_keeper_ship_errors_total", op="put") >= 1,
                     within=30, what="the agent to see the PUT fail")
    return keys(client, bucket)


@pytest.mark.usefixtures("aws_env")
async def test_lost_put_reply_then_compression_change_stores_no_range_twice(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str,
    proxy: Proxy,
) -> None:
    client = direct(moto_url)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "payment-1")
    sid = sim.stream_of(NS, "payment-1", "app")
    # Replies stay lost through its drain: a short drain deadline says the same as a long one.
    async with running_agent(s3_settings(make_settings, proxy, bucket, compression="zstd",
                                         shutdown_timeout_s=1)) as agent:
        proxy.drop_replies()
        write_lines(sim, "payment-1", 50, "first")
        stored = await _lose_one_reply(agent, proxy, client, bucket)
    # Stopped while the outcome of that PUT is unknown to it; restarted with gzip.
    assert len(stored) == 1 and stored[0].endswith(".log.zst"), stored
    proxy.drop_replies(False)
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    async with running_agent(s3_settings(make_settings, proxy, bucket,
                                         compression="gzip")) as agent:
        write_lines(sim, "payment-1", 50, "second")
        await wait_exported(store, sid, sim.record(sid), within=30)
        assert loss_gaps(agent.ledger) == []
        await verify_clean(agent, store)
    segments = stored_segments(store, sid)
    check_segments(segments)  # no overlap, hashes, and the chain links to what is stored
    assert segments[0].key == stored[0].split("/", 1)[1]
    assert [s.sk.ext for s in segments] == ["zst"] + ["gz"] * (len(segments) - 1)


@pytest.mark.usefixtures("aws_env")
async def test_lost_put_reply_then_eviction_records_no_false_loss(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str,
    proxy: Proxy,
) -> None:
    client = direct(moto_url)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "quiet-1")
    quiet = sim.stream_of(NS, "quiet-1", "app")
    settings = s3_settings(make_settings, proxy, bucket, spool_max_bytes="256KiB",
                           segment_max_bytes="32KiB")
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    async with running_agent(settings) as agent:
        proxy.drop_replies()
        write_lines(sim, "quiet-1", 30, "quiet")
        await _lose_one_reply(agent, proxy, client, bucket)
        proxy.down()  # an outage: nothing can be asked or shipped for a while
        # A burst pod writes more than the budget and is deleted: its bytes are endangered.
        sim.add_pod(NS, "burst-1")
        burst = sim.stream_of(NS, "burst-1", "app")
        write_lines(sim, "burst-1", 6000, "burst", width=90)
        size = sim.record_len(burst)
        await wait_until(lambda: burst in agent.spool.streams
                         and agent.spool.streams[burst].next_offset > 0, within=20,
                         what="the burst pod to be read")
        # Eviction must come while no upload is in flight (between two back-offs).
        await wait_until(lambda: agent.shipper.breaker.failures >= 4
                         and agent.shipper.pending() == 0, within=30,
                         what="the shipper backing off")
        sim.delete_pod(NS, "burst-1")

        def burst_done() -> bool:
            s = agent.spool.streams.get(burst)
            return s is not None and s.next_offset == size

        await wait_until(burst_done, within=30, what="the deleted pod read to its end")
        await wait_until(lambda: bool(loss_gaps(agent.ledger, burst)), within=20,
                         what="eviction of endangered bytes")
        assert loss_gaps(agent.ledger, quiet) == []
        proxy.up()
        proxy.drop_replies(False)
        await wait_exported(store, quiet, sim.record(quiet), within=60)
        await wait_until(lambda: agent.spool.total_bytes() == 0, within=60,
                         what="the spool to drain")
        holes = loss_ranges(agent, burst)
        assert loss_gaps(agent.ledger, quiet) == []
        assert metric(agent, "evidence_keeper_lost_bytes_total", reason="evicted") == sum(
            e - s for s, e in holes)
        await verify_clean(agent, store)
    check_segments(stored_segments(store, quiet))
    check_segments(stored_segments(store, burst))
    data, export_holes = export_bytes(store, burst)
    assert set(export_holes) <= set(merged(holes))
    assert_bytes_equal(data, without(sim.record(burst), holes), "burst")


# ----------------------------------------------------------------------------- back-pressure


def _noisy(sim: KubeletSim, pod: str, total: int) -> None:
    """Write ``total`` bytes of varied CRI lines in 1 MiB blocks (fast, realistic enough)."""
    written, n = 0, 0
    while written < total:
        block = bytearray()
        while len(block) < 1 << 20:
            block += (f"2026-12-06T10:00:00.{n % 10**9:09d}Z stdout F noisy line {n} "
                      f"{uuid.uuid4().hex} {'y' * (n % 200)}\n").encode()
            n += 1
        sim.write_raw(NS, pod, "app", bytes(block))
        written += len(block)


@pytest.mark.usefixtures("aws_env")
async def test_budget_back_pressure_keeps_bytes_in_their_source(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str,
    proxy: Proxy,
) -> None:
    budget = 16 << 20
    proxy.down()  # the store is out from the start
    settings = s3_settings(make_settings, proxy, bucket, spool_max_bytes=budget,
                           segment_max_bytes="1MiB")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "quiet-1")
    sim.add_pod(NS, "noisy-1")
    quiet, noisy = sim.stream_of(NS, "quiet-1", "app"), sim.stream_of(NS, "noisy-1", "app")
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    async with running_agent(settings) as agent:
        write_lines(sim, "quiet-1", 5, "quiet")
        await asyncio.to_thread(_noisy, sim, "noisy-1", 60_000_000)
        write_lines(sim, "quiet-1", 5, "quiet later")

        await wait_until(lambda: agent.spool.total_bytes() >= budget - (1 << 20)
                         and agent.tailer.tails[noisy].held, within=60,
                         what="the spool to fill to its budget and the noisy pod held back")
        held = agent.spool.streams[noisy].next_offset
        await settle(agent)  # more passes: nothing more may come in
        assert agent.spool.streams[noisy].next_offset == held
        assert agent.spool.total_bytes() <= budget
        assert held < sim.record_len(noisy)  # the rest waits in the source file
        assert loss_gaps(agent.ledger) == []
        assert (await asyncio.to_thread(agent.readiness))["spool"]["back_pressure"] is True
        proxy.up()

        def drained() -> bool:
            s = agent.spool.streams.get(noisy)
            return (s is not None and s.next_offset == sim.record_len(noisy)
                    and agent.spool.total_bytes() == 0)

        await wait_until(drained, within=240, what="60 MB shipped after the outage",
                         interval=0.5)
        assert loss_gaps(agent.ledger) == []
        assert metric(agent, "evidence_keeper_lost_bytes_total", reason="evicted") == 0
    for sid in (quiet, noisy):
        assert_stored(store, sid, sim.record(sid))


async def test_endangered_bytes_evict_the_largest_share_never_a_quiet_pod(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Over budget with the store out, a deleted pod's bytes are read anyway (they exist
    nowhere else) and eviction takes from the stream holding the most, exactly recorded."""
    settings = make_settings(spool_max_bytes="512KiB", segment_max_bytes="32KiB")
    outage = OutageFileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "quiet-1")
    sim.add_pod(NS, "noisy-1")
    quiet, noisy = sim.stream_of(NS, "quiet-1", "app"), sim.stream_of(NS, "noisy-1", "app")
    async with running_agent(settings, store=outage) as agent:
        outage.down = True
        write_lines(sim, "quiet-1", 20, "quiet")
        write_lines(sim, "noisy-1", 12000, "noisy", width=80)  # ~1.4 MB
        await wait_until(lambda: agent.spool.total_bytes() >= (512 << 10) - (64 << 10),
                         within=30, what="the budget reached")
        assert loss_gaps(agent.ledger) == []  # back-pressure, not eviction
        sim.delete_pod(NS, "noisy-1")
        size = sim.record_len(noisy)
        await wait_until(lambda: agent.spool.streams[noisy].next_offset == size, within=30,
                         what="the deleted pod read to its end")
        await wait_until(lambda: agent.spool.total_bytes() <= 512 << 10, within=10,
                         what="eviction back under the budget")
        assert loss_gaps(agent.ledger, quiet) == []
        holes = loss_ranges(agent, noisy)
        assert holes and all(r == "evicted" for r in
                             (g.fields["reason"] for g in loss_gaps(agent.ledger, noisy)))
        outage.down = False
        await wait_exported(outage, quiet, sim.record(quiet), within=30)
        await wait_until(lambda: agent.spool.total_bytes() == 0, within=30, what="drained")
    data, _ = export_bytes(outage, noisy)
    assert_bytes_equal(data, without(sim.record(noisy), holes), "noisy")
    check_segments(stored_segments(outage, noisy))


class OutageFileStore(FileStore):
    """A file store that is out (every call fails) while ``down`` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = False

    def _gate(self) -> None:
        if self.down:
            raise StoreError(f"{self.describe()}: store outage (test)")

    def put(self, key: str, body: bytes, meta: Any, *, retain_until: Any = None) -> None:
        self._gate()
        super().put(key, body, meta, retain_until=retain_until)

    def head(self, key: str) -> dict[str, str] | None:
        self._gate()
        return super().head(key)

    def check(self) -> None:
        self._gate()
        super().check()


# ----------------------------------------------------------------------------- fsync failure


class LosingFS(FileSystem):
    """fdatasync fails once with EIO and, as Linux may, the unsynced pages are gone: the
    bytes written since the descriptor's last successful sync read back as zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.fail = 0
        self.failed = 0
        self._synced: dict[int, int] = {}

    def open_append(self, path: str) -> int:
        fd = super().open_append(path)
        with self.lock:
            self._synced[fd] = os.fstat(fd).st_size
        return fd

    def ftruncate(self, fd: int, size: int) -> None:
        super().ftruncate(fd, size)
        with self.lock:
            self._synced[fd] = min(self._synced.get(fd, size), size)

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            if self.fail:
                self.fail -= 1
                self.failed += 1
                synced = self._synced.get(fd, 0)
                size = os.fstat(fd).st_size
                if size > synced:
                    os.pwrite(fd, b"\0" * (size - synced), synced)
                raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)
        with self.lock:
            self._synced[fd] = os.fstat(fd).st_size

    def close(self, fd: int) -> None:
        with self.lock:
            self._synced.pop(fd, None)
        super().close(fd)


async def test_failed_fsync_rewinds_and_acknowledges_no_unsynced_byte(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(segment_max_bytes="64KiB")
    store = FileStore(tmp_path / "store")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "payment-1")
    sid = sim.stream_of(NS, "payment-1", "app")
    fs = LosingFS()
    async with running_agent(settings, fs=fs) as agent:
        write_lines(sim, "payment-1", 100, "before")
        await wait_exported(store, sid, sim.record(sid))
        fs.fail = 1
        write_lines(sim, "payment-1", 100, "pages dropped")
        await wait_until(lambda: fs.failed == 1, within=10, what="the failed fsync")
        write_lines(sim, "payment-1", 1500, "after")  # crosses a seal during the re-read
        await wait_exported(store, sid, sim.record(sid), within=30)
        assert metric(agent, "evidence_keeper_spool_errors_total", op="fsync") == 1
        assert loss_gaps(agent.ledger) == []
        assert metric(agent, "evidence_keeper_captured_bytes_total") == sim.record_len(sid)
    check_segments(stored_segments(store, sid))


# ----------------------------------------------------------------------------- credentials


async def test_start_without_credentials_captures_then_ships_when_they_appear(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    creds = tmp_path / "aws" / "credentials"  # mounted later, as an IRSA token would be
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws" / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    settings = make_settings(store_url=f"s3://{bucket}/evidence", s3_endpoint_url=moto_url,
                             probe_interval_s=0.3, probe_failures_before_down=2)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "payment-1")
    sid = sim.stream_of(NS, "payment-1", "app")
    store = S3Store(bucket, "evidence", endpoint_url=moto_url,
                    client=direct(moto_url))
    async with running_agent(settings) as agent:
        write_lines(sim, "payment-1", 50, "boot")

        def store_down() -> bool:
            return (metric(agent, "evidence_keeper_sink_up", sink="store", check="s3") == 0
                    and bool(agent.ledger.gaps(kind="sink_outage", open_=True)))

        await wait_until(store_down, within=20, what="the store reported down")
        outage = agent.ledger.gaps(kind="sink_outage", open_=True)[0]
        assert outage.fields["sink"] == "store"
        ready = await asyncio.to_thread(agent.readiness)
        assert ready["ready"] is True
        assert "no AWS credentials" in (ready["store"]["last_error"] or ""), ready["store"]
        await wait_until(lambda: agent.spool.streams.get(sid) is not None
                         and agent.spool.streams[sid].next_offset == sim.record_len(sid),
                         within=15, what="capture to the spool")
        assert keys(direct(moto_url), bucket) == []
        creds.parent.mkdir()
        creds.write_text("[default]\naws_access_key_id = testing\n"
                         "aws_secret_access_key = testing\n")
        write_lines(sim, "payment-1", 50, "credentials mounted")
        await wait_exported(store, sid, sim.record(sid), within=60)
        await wait_until(
            lambda: metric(agent, "evidence_keeper_sink_up", sink="store", check="s3") == 1,
            within=20, what="the store reported up")
        assert loss_gaps(agent.ledger) == []
    check_segments(stored_segments(store, sid))


# ----------------------------------------------------------------------------- Object Lock


async def _start_fails(settings: Settings, store: Store | None = None) -> str:
    agent = Agent(settings, store=store)
    try:
        with pytest.raises(StartupError) as err:
            await agent.start()
    finally:
        agent.close()
    return str(err.value)


@pytest.mark.usefixtures("aws_env")
async def test_object_lock_days_on_a_bucket_without_object_lock_fails_fast(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str,
) -> None:
    settings = make_settings(store_url=f"s3://{bucket}/evidence", s3_endpoint_url=moto_url,
                             object_lock_days=7)
    msg = await _start_fails(settings)
    assert f"bucket {bucket} does not have it enabled" in msg and "\n" not in msg
    msg = await _start_fails(make_settings(object_lock_days=7))
    assert "cannot lock objects" in msg
    cfg = tmp_path / "lock.yaml"
    cfg.write_text(f"log_root: {tmp_path / 'pods'}\nspool_dir: {tmp_path / 'cli-spool'}\n"
                   f"store_url: s3://{bucket}/evidence\ns3_endpoint_url: {moto_url}\n"
                   "object_lock_days: 7\nkubernetes: 'off'\nlisten: 127.0.0.1:0\n")
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("evidence-keeper: ") and "does not have it enabled" in last, r.stderr
    locked = f"ek-lock-{uuid.uuid4().hex[:8]}"
    direct(moto_url).create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    agent = Agent(make_settings(store_url=f"s3://{locked}/evidence", s3_endpoint_url=moto_url,
                                object_lock_days=7))
    try:
        await agent.start()
    finally:
        agent.close()


@pytest.mark.usefixtures("aws_env")
def test_put_failures_are_classified_ambiguous_only_when_the_request_was_sent(
    moto_url: str, bucket: str, proxy: Proxy,
) -> None:
    store = S3Store(bucket, "evidence", endpoint_url=proxy.url, read_timeout_s=5)
    key = "c/ns/p_u/app/0/00000000000000000000-00000000000000000003.log.zst"
    proxy.drop_replies()
    with pytest.raises(StoreError) as err:
        store.put(key, b"abc", {"ek-sha256": "x"})
    assert err.value.ambiguous  # reset after sending: the object may be stored
    assert keys(direct(moto_url), bucket) == [f"evidence/{key}"]  # and it is
    proxy.drop_replies(False)
    proxy.down()
    with pytest.raises(StoreError) as err:
        store.put(key, b"abc", {"ek-sha256": "x"})
    assert not err.value.ambiguous  # refused: nothing was sent
