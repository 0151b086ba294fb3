"""The S3 backend against a real S3 endpoint: moto's server on loopback, driven by real boto3."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from evidence_keeper.archive.export import export_stream, find_streams
from evidence_keeper.model import parse_segment_key
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim, churn
from evidence_keeper.store import StoreError
from evidence_keeper.store.codec import decompress
from evidence_keeper.store.s3 import S3Store
from tests.conftest import export_bytes, running_agent, wait_exported, wait_read, wait_until
from tests.netproxy import Proxy
from tests.support.s3 import REGION, s3

pytestmark = pytest.mark.usefixtures("aws_env")

@pytest.fixture
def bucket(moto_url: str) -> str:
    name = f"ek-{uuid.uuid4().hex[:12]}"
    s3(moto_url).create_bucket(Bucket=name)
    return name


def s3_settings(make_settings: Callable[..., Settings], url: str, bucket: str,
                **kw: Any) -> Settings:
    return make_settings(store_url=f"s3://{bucket}/evidence", s3_endpoint_url=url, **kw)


def check_store(client: Any, bucket: str, sim: KubeletSim, store: S3Store) -> int:
    """Every stream byte-exact, every object's sha256 and chain verified, keys by offset."""
    objects = 0
    for sid in sim.streams():
        found = find_streams(store, cluster="default", namespace=sid.namespace, pod=sid.pod,
                             container=sid.container, restart=sid.restart, pod_uid=sid.pod_uid)
        record = sim.record(sid)
        if not found:
            assert record == b"", sid
            continue
        buf = io.BytesIO()
        report = export_stream(store, found[0], buf)
        assert report.holes == []
        assert buf.getvalue() == record, sid
        prev, end = "", 0
        keys = [k for k, _ in found[0].keys]
        assert keys == sorted(keys)
        for key, sk in found[0].keys:
            obj = client.get_object(Bucket=bucket, Key=f"evidence/{key}")  # body and metadata
            meta = obj["Metadata"]
            body = decompress(obj["Body"].read(), sk.ext)
            assert sk.offset == end
            assert meta["ek-sha256"] == hashlib.sha256(body).hexdigest()
            assert meta["ek-prev-sha256"] == prev
            assert meta["ek-offset"] == str(sk.offset) and meta["ek-length"] == str(len(body))
            prev, end = meta["ek-sha256"], sk.end
            objects += 1
    return objects


async def test_byte_exact_to_s3(tmp_path: Path, make_settings: Callable[..., Settings],
                                moto_url: str, bucket: str) -> None:
    settings = s3_settings(make_settings, moto_url, bucket, segment_max_bytes="128KiB")
    sim = KubeletSim(tmp_path / "pods", max_files=4)
    rng = random.Random(3)
    churn(sim, rng, pods=10, steps=0)
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    async with running_agent(settings) as agent:
        for _ in range(15):
            churn(sim, rng, pods=10, steps=40, rotate_p=0.08, restart_p=0.02)
            await asyncio.sleep(0.15)  # pacing: the agent reads while kubelet rotates (and
            # deletes the oldest of max_files): a node writes over time, not all at once
        churn(sim, rng, pods=10, steps=2, big_line_every=1)
        await wait_read(agent, store, {sid: sim.record(sid) for sid in sim.streams()},
                        within=60)
        assert agent.metrics.registry.get_sample_value(
            "evidence_keeper_sink_up", {"sink": "store", "check": "s3"}) == 1
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    assert len(sim.streams()) >= 20
    assert check_store(s3(moto_url), bucket, sim, store) > 20


def test_multipart_segment_with_sha256(moto_url: str, bucket: str) -> None:
    store = S3Store(bucket, "p", endpoint_url=moto_url)
    body = os.urandom(20 * 1024 * 1024)  # incompressible: above the multipart threshold
    store.put("c/ns/pod_u/app/0/00000000000000000000-00000000000020971520.log.zst", body,
              {"ek-sha256": hashlib.sha256(body).hexdigest()})
    key = "c/ns/pod_u/app/0/00000000000000000000-00000000000020971520.log.zst"
    assert store.get(key) == body
    info = store.object_info(key)
    assert "-" in info["ETag"]  # a multipart ETag: "<md5>-<parts>"
    assert store.head(key) == {"ek-sha256": hashlib.sha256(body).hexdigest()}


async def test_outage_nothing_lost_backlog_recorded(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str
) -> None:
    host_port = moto_url.rsplit("/", 1)[1].split(":")
    proxy = Proxy((host_port[0], int(host_port[1])))
    try:
        settings = s3_settings(make_settings, proxy.url, bucket, backlog_threshold_s=3,
                               segment_max_bytes="32KiB", probe_interval_s=1)
        sim = KubeletSim(tmp_path / "pods")
        sim.add_pod("shop", "orders-1", containers=("app",))
        sid = sim.stream_of("shop", "orders-1", "app")
        store = S3Store(bucket, "evidence", endpoint_url=moto_url)
        async with running_agent(settings) as agent:
            for i in range(10):
                sim.write("shop", "orders-1", "app", f"before outage {i}")
            await wait_exported(store, sid, sim.record(sid), within=30)
            proxy.down()
            outage_start = time.monotonic()
            i = 0
            # The outage itself is the point: S3 unreachable for 20 s during writes (issue 3).
            while time.monotonic() - outage_start < 20:
                sim.write("shop", "orders-1", "app", f"during outage {i} PAYMENT_FAILED")
                i += 1
                await asyncio.sleep(0.05)
            reg = agent.metrics.registry
            assert reg.get_sample_value("evidence_keeper_sink_up",
                                        {"sink": "store", "check": "s3"}) == 0
            assert (reg.get_sample_value("evidence_keeper_unshipped_bytes") or 0) > 0
            assert (reg.get_sample_value("evidence_keeper_oldest_unshipped_age_seconds")
                    or 0) > 10
            gaps = agent.ledger.gaps(kind="backlog")
            assert len(gaps) == 1 and gaps[0].open and gaps[0].fields["sink"] == "store"
            # No retry storm: the breaker caps attempts at one per back-off period.
            errors = reg.get_sample_value("evidence_keeper_ship_errors_total", {"op": "put"}) or 0
            assert 2 <= errors < 40
            proxy.up()
            await wait_until(
                lambda: not agent.ledger.gaps(kind="backlog", open_=True)
                and reg.get_sample_value(
                    "evidence_keeper_sink_up", {"sink": "store", "check": "s3"}) == 1,
                within=60, what="the backlog to close and the store to be up again")
            assert reg.get_sample_value("evidence_keeper_sink_up",
                                        {"sink": "store", "check": "s3"}) == 1
            closed = agent.ledger.gaps(kind="backlog")
            assert len(closed) == 1 and not closed[0].open
            assert agent.ledger.gaps(kind="loss") == []
            # The store's own probe saw the outage too: a sink_outage for sink="store".
            outages = agent.ledger.gaps(kind="sink_outage")
            assert [(g.fields["sink"], g.fields["check"], g.open) for g in outages] == [
                ("store", "s3", False)]
        check_store(s3(moto_url), bucket, sim, store)
    finally:
        proxy.close()


def _agent_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "evidence_keeper.cli", "run", "--config", str(cfg)]


def test_crash_between_put_and_ack_same_keys_same_bytes(
    tmp_path: Path, moto_url: str, bucket: str
) -> None:
    host, port = moto_url.rsplit("/", 1)[1].split(":")
    proxy = Proxy((host, int(port)))
    client = s3(moto_url)
    (tmp_path / "pods").mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"log_root: {tmp_path / 'pods'}\nspool_dir: {tmp_path / 'spool'}\n"
        f"store_url: s3://{bucket}/evidence\ns3_endpoint_url: {proxy.url}\nkubernetes: 'off'\n"
        "flush_interval_s: 1\ndiscover_interval_s: 0.2\ntail_interval_s: 0.05\n"
        "commit_interval_s: 0.1\nsegment_max_bytes: 16KiB\nlog_level: error\n"
        "listen: 127.0.0.1:0\n")
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "payment-1", containers=("app",))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION}
    store = S3Store(bucket, "evidence", endpoint_url=moto_url)
    sid = sim.stream_of("shop", "payment-1", "app")

    def wait_stored(what: str) -> None:
        deadline = time.monotonic() + 30
        while len(export_bytes(store, sid)[0]) < sim.record_len(sid):
            assert proc.poll() is None, f"the agent exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    try:
        for round_ in range(3):
            proc = subprocess.Popen(_agent_cmd(cfg), env=env, stderr=subprocess.DEVNULL)
            try:
                for i in range(200):
                    sim.write("shop", "payment-1", "app", f"round {round_} line {i} " + "x" * 80)
                wait_stored(f"round {round_}'s first lines stored")
                proxy.hold()  # PUTs reach S3, their answers do not reach the agent
                for i in range(200):
                    sim.write("shop", "payment-1", "app", f"round {round_} held {i} " + "y" * 80)
                deadline = time.monotonic() + 15
                before = {o["Key"] for o in client.list_objects_v2(
                    Bucket=bucket).get("Contents", [])}
                while time.monotonic() < deadline:
                    time.sleep(0.2)
                    now = {o["Key"] for o in client.list_objects_v2(
                        Bucket=bucket).get("Contents", [])}
                    if now - before:
                        break
                assert now - before, "no PUT reached the store while answers were held"
                time.sleep(0.3)  # deliberate: other uploads in flight may land unanswered too
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proxy.release()
        proc = subprocess.Popen(_agent_cmd(cfg), env=env, stderr=subprocess.DEVNULL)
        wait_stored("the last run to ship everything")  # it runs (and handles SIGTERM) by then
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proxy.close()
    versions = client.list_object_versions(Bucket=bucket).get("Versions", [])
    bodies: dict[str, set[str]] = {}
    for v in versions:
        bodies.setdefault(v["Key"], set()).add(v["ETag"])
    assert all(len(etags) == 1 for etags in bodies.values()), "a key was rewritten differently"
    check_store(client, bucket, sim, store)


async def test_trickle_each_line_within_flush_interval(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str, bucket: str
) -> None:
    flush = 2.0  # shorter than the default 5 s: the same bound, less waiting for the last line
    settings = s3_settings(make_settings, moto_url, bucket, flush_interval_s=flush,
                           discover_interval_s=0.5, tail_interval_s=0.2, commit_interval_s=0.25)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1", containers=("app",))
    client = s3(moto_url)
    written: dict[bytes, float] = {}
    arrived: dict[bytes, float] = {}
    seen: set[str] = set()

    def poll() -> None:
        for o in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            if o["Key"] in seen:
                continue
            seen.add(o["Key"])
            sk = parse_segment_key(o["Key"].split("/", 1)[1])
            assert sk is not None
            body = decompress(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(),
                              sk.ext)
            for ln in body.splitlines():
                tag = ln.rsplit(b" ", 1)[-1]
                arrived.setdefault(tag, time.monotonic())

    async with running_agent(settings):
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 20:
            tag = f"trickle-{n:04d}".encode()
            sim.write("shop", "orders-1", "app", b"tick " + tag)
            written[tag] = time.monotonic()
            n += 1
            await asyncio.to_thread(poll)
            # The pace is the point: one line every 200 ms for 20 s (issue 3).
            await asyncio.sleep(max(0.0, start + n * 0.2 - time.monotonic()))
        # Lines still missing at the deadline count as infinitely late below.
        while len(arrived) < len(written) and time.monotonic() - start < 40:
            await asyncio.to_thread(poll)
            await asyncio.sleep(0.2)
    late = {t.decode(): round(arrived.get(t, float("inf")) - w, 2) for t, w in written.items()
            if arrived.get(t, float("inf")) - w > flush + 3}
    assert len(written) >= 90
    assert not late, f"lines later than flush_interval_s + 3 s: {late}"


def test_object_lock_compliance(tmp_path: Path, moto_url: str) -> None:
    client = s3(moto_url)
    name = f"ek-lock-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    store = S3Store(name, "evidence", endpoint_url=moto_url, object_lock_days=1)
    key = "c/ns/p_u/app/0/00000000000000000000-00000000000000000003.log.gz"
    store.put(key, gzip.compress(b"abc", mtime=0), {"ek-sha256": "x"},
              retain_until=datetime.now(UTC) + timedelta(days=1))
    info = store.object_info(key)
    assert info["ObjectLockMode"] == "COMPLIANCE"
    assert info["ObjectLockRetainUntilDate"] > datetime.now(UTC)
    with pytest.raises(ClientError) as err:
        client.delete_object(Bucket=name, Key=f"evidence/{key}", VersionId=info["VersionId"])
    assert err.value.response["Error"]["Code"] == "AccessDenied"


async def test_object_lock_through_the_agent(
    tmp_path: Path, make_settings: Callable[..., Settings], moto_url: str
) -> None:
    client = s3(moto_url)
    name = f"ek-lock-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    settings = s3_settings(make_settings, moto_url, name, object_lock_days=7)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("shop", "orders-1", containers=("app",))
    async with running_agent(settings) as agent:
        sim.write("shop", "orders-1", "app", "locked evidence")
        store = S3Store(name, "evidence", endpoint_url=moto_url)
        await wait_read(agent, store, {sid: sim.record(sid) for sid in sim.streams()})
    objs = client.list_objects_v2(Bucket=name)["Contents"]
    assert objs
    for o in objs:
        head = client.head_object(Bucket=name, Key=o["Key"])
        assert head["ObjectLockMode"] == "COMPLIANCE"
        days = (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)).days
        assert 6 <= days <= 7


def _run_cli(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_agent_cmd(cfg), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_missing_bucket_is_one_clear_error(tmp_path: Path, moto_url: str) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"log_root: {tmp_path}\nspool_dir: {tmp_path / 'spool'}\n"
                   f"store_url: s3://no-such-bucket-ek/x\ns3_endpoint_url: {moto_url}\n"
                   "kubernetes: 'off'\nlisten: 127.0.0.1:0\n")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION}
    r = _run_cli(cfg, env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "no-such-bucket-ek does not exist" in last, r.stderr


def test_store_errors_are_classified(moto_url: str, bucket: str) -> None:
    store = S3Store("no-such-bucket-ek2", "", endpoint_url=moto_url)
    with pytest.raises(StoreError) as err:
        store.check()
    assert not err.value.retryable
    down = S3Store(bucket, "", endpoint_url="http://127.0.0.1:9", connect_timeout_s=0.5)
    with pytest.raises(StoreError) as err:
        down.check()
    assert err.value.retryable
    assert S3Store(bucket, "", endpoint_url=moto_url).head("a/b.log.zst") is None
