"""Contract conformance through the HTTP API and the store (issue 12 item 8).

* every ``loss`` of unknown length carries ``bytes: null`` in ``/gaps``, ``gaps --json`` and an
  archive manifest's gaps (CONTRACT.md sections 3 and 6);
* manifests and ``manifest_key`` name objects by their full keys, archives live under
  ``<prefix>/<cluster>/_archives/``, and readers still accept v1's ``archives/`` with
  relative keys (section 4; moto for the S3 prefix);
* a ``sink_outage``'s coverage counts from the gap's start, not from the debounce moment.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from evidence_keeper.api.client import call
from evidence_keeper.archive.manifest import encode, manifest_key, seal
from evidence_keeper.archive.verify import verify_archive
from evidence_keeper.cli import main as cli_main
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim
from evidence_keeper.store.s3 import S3Store
from tests.conftest import AgentThread, running_agent, wait_until
from tests.support.archive import (
    NS,
    archive_orders,
    archive_settings,
    load,
    post_archive,
    realtime_sim,
    store_of,
    wait_archive,
    write_config,
)
from tests.support.dns import SINK_HOST, FlakyDNS
from tests.support.s3 import s3


def test_unknown_length_loss_has_bytes_null_everywhere(
        tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = archive_settings(make_settings, token_file, flush_interval_s=1)
    sim = realtime_sim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1", containers=("orders",))
    with AgentThread(settings) as t:
        for i in range(20):
            sim.write(NS, "orders-1", "orders", f"order {i}")
        sid = sim.streams()[0]
        deadline = time.monotonic() + 20
        while t.agent.metrics.registry.get_sample_value(
                "evidence_keeper_captured_bytes_total") != len(sim.record(sid)):
            assert time.monotonic() < deadline, "not captured"
            time.sleep(0.05)
        sim.truncate(NS, "orders-1", "orders")  # copytruncate: a loss of unknown length
        sim.write(NS, "orders-1", "orders", "after the truncation")
        while not t.agent.ledger.gaps(kind="loss"):
            assert time.monotonic() < deadline, "no truncation loss recorded"
            time.sleep(0.05)
        _, doc = call(t.url, "/gaps", params={"kind": "loss"})
        (loss,) = doc["gaps"]
        assert loss["reason"] == "truncated" and "bytes" in loss and loss["bytes"] is None
        assert cli_main(["gaps", "--url", t.url, "--kind", "loss", "--json"]) == 0
        (printed,) = json.loads(capsys.readouterr().out)["gaps"]
        assert "bytes" in printed and printed["bytes"] is None
        archive = post_archive(t.url, {"namespace": NS, "reason": "conformance"})
        done = wait_archive(t.url, archive["id"])
        assert done["status"] == "complete", done
    manifest = load(store_of(settings), done["manifest_key"])
    losses = [g for g in manifest["gaps"] if g["kind"] == "loss"]
    assert losses and all("bytes" in g and g["bytes"] is None for g in losses)


def _legacy_copy(store: Any, doc: dict[str, Any], *, prefix: str, legacy_id: str) -> None:
    """What a v1 agent wrote: version 1, keys relative to the prefix, under archives/."""
    segs = [dict(s, key=s["key"].removeprefix(f"{prefix}/")) for s in doc["segments"]]
    old = seal(dict(doc, version=1, id=legacy_id, segments=segs))
    store.put(manifest_key("default", legacy_id, legacy=True), encode(old), {})


@pytest.mark.usefixtures("aws_env")
def test_full_keys_and_archives_place_on_s3_with_a_prefix(
        tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path,
        moto_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = s3(moto_url)
    bucket = f"ek-conf-{random.randrange(1 << 32):08x}"
    client.create_bucket(Bucket=bucket)
    settings = archive_settings(make_settings, token_file, store_url=f"s3://{bucket}/ev/idence",
                                s3_endpoint_url=moto_url)
    doc, done = archive_orders(settings, tmp_path / "pods", lines=60, reason="prefix")
    # GET /archives/<id>: the full key, under _archives/.
    assert done["manifest_key"] == f"ev/idence/default/_archives/{doc['id']}/manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=done["manifest_key"])[
        "Body"].read())
    assert manifest["version"] == 2 and len(manifest["segments"]) >= 2
    for seg in manifest["segments"]:  # the manifest alone finds each object in the bucket
        head = client.head_object(Bucket=bucket, Key=seg["key"])
        assert head["Metadata"]["ek-sha256"] == seg["sha256"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if "/archives/" in k]  # nothing written to v1's place
    config = tmp_path / "s3.yaml"
    config.write_text(f"store_url: s3://{bucket}/ev/idence\ns3_endpoint_url: {moto_url}\n"
                      f"spool_dir: {tmp_path / 'cli-spool'}\n")
    assert cli_main(["verify", "--config", str(config), doc["id"]]) == 0
    assert f"ev/idence/default/_archives/{doc['id']}/manifest.json" in capsys.readouterr().out
    # A v1 manifest (relative keys, under archives/) is still read: verify and the tar.
    store = S3Store(bucket, "ev/idence", endpoint_url=moto_url)
    legacy = "0123456789abcdef01234567"
    _legacy_copy(store, manifest, prefix="ev/idence", legacy_id=legacy)
    report = verify_archive(store, cluster="default", archive_id=legacy)
    assert report.ok, report.problems
    assert report.manifest_key == f"ev/idence/default/archives/{legacy}/manifest.json"
    out = tmp_path / "legacy.tar"
    assert cli_main(["export", "--config", str(config), "--archive", legacy, "-o",
                     str(out)]) == 0
    assert out.stat().st_size > 0


def test_v1_archive_on_a_file_store_still_verifies(
        tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = archive_settings(make_settings, token_file)
    sim = realtime_sim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1", containers=("orders",))
    with AgentThread(settings) as t:
        for i in range(60):
            sim.write(NS, "orders-1", "orders", f"order {i}")
        doc = post_archive(t.url, {"namespace": NS, "reason": "v1"})
        done = wait_archive(t.url, doc["id"])
    store = store_of(settings)
    assert done["manifest_key"] == f"default/_archives/{doc['id']}/manifest.json"
    manifest = load(store, done["manifest_key"])
    legacy = "89abcdef0123456789abcdef"
    _legacy_copy(store, manifest, prefix="", legacy_id=legacy)
    config = write_config(tmp_path, settings)
    assert cli_main(["verify", "--config", config, legacy]) == 0
    assert "verified" in capsys.readouterr().out


async def test_outage_coverage_counts_from_the_gaps_start(
        tmp_path: Path, make_settings: Callable[..., Settings], dns: FlakyDNS) -> None:
    """Bytes captured after the first failing probe, before the debounce gave in, are in the
    outage's coverage (seen through GET /gaps)."""
    settings = make_settings(sink_probes=f"datadog=dns:{SINK_HOST}", probe_interval_s=0.5,
                             probe_timeout_s=1.0, probe_failures_before_down=4)
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1", containers=("orders",))
    async with running_agent(settings, resolver=dns) as agent:
        state = agent.sinks.states["datadog"]
        await wait_until(lambda: state.up is True, within=10, what="the sink up")
        dns.broken.add(SINK_HOST)
        await wait_until(lambda: state.fails >= 1, within=10, what="a first failed probe")
        assert state.up is True  # not down yet: the debounce needs 4 failures
        for i in range(30):
            sim.write(NS, "orders-1", "orders", f"Order {i} PAYMENT_FAILED while the sink fails")
        sid = sim.streams()[0]
        expected = len(sim.record(sid))
        await wait_until(lambda: agent.metrics.registry.get_sample_value(
            "evidence_keeper_captured_bytes_total") == expected, within=10, what="capture")
        assert state.up is True, "the test wrote too late: the sink is already down"
        await wait_until(lambda: state.gap_id is not None, within=10, what="the outage")
        assert agent.api_address is not None
        host, port = agent.api_address
        async with aiohttp.ClientSession() as http, http.get(
                f"http://{host}:{port}/gaps", params={"kind": "sink_outage"}) as resp:
            doc = await resp.json()
        (gap,) = doc["gaps"]
        assert gap["open"] and gap["sink"] == "datadog"
        assert gap["coverage"]["captured_bytes"] == expected, gap
        assert gap["coverage"]["streams"] == 1 and gap["coverage"]["namespaces"] == [NS]
        dns.broken.discard(SINK_HOST)
