"""Archives: POST /archive, manifests, verify, search, export and the cluster-wide trigger.

Agents run for real (in threads, on loopback), the node is the kubelet simulator, the store is a
directory, and ``--all-nodes`` talks to a fake API server through the official client.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.api.archiving import ArchiveJob
from evidence_keeper.api.client import call
from evidence_keeper.archive.manifest import (
    Scope,
    ScopeError,
    SegmentEntry,
    check_glob,
    encode,
    manifest_digest,
    seal,
    window_mask,
)
from evidence_keeper.archive.search import Hit, Matcher, search
from evidence_keeper.archive.verify import verify_archive
from evidence_keeper.cli import main as cli_main
from evidence_keeper.formats import line_message, line_ts
from evidence_keeper.model import StreamId
from evidence_keeper.settings import Settings
from evidence_keeper.sim import KubeletSim, churn
from evidence_keeper.sim.apiserver import SimApiServer
from evidence_keeper.store import FileStore
from evidence_keeper.store.codec import compress, decompress
from tests.conftest import AgentThread, export_bytes, poll_until, wait_exported
from tests.fakekube import FakeKube
from tests.support.archive import (
    NS,
    TOKEN,
    archive_orders,
    archive_settings,
    load,
    manifest_stream_bytes,
    post_archive,
    raw_http,
    realtime_sim,
    store_of,
    wait_archive,
    write_config,
)
from tests.support.s3 import s3


# -------------------------------------------------------------------------------- the archive
def test_archive_right_after_a_burst(tmp_path: Path, make_settings: Callable[..., Settings],
                                     token_file: Path,
                                     capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    settings = archive_settings(make_settings, token_file)
    sim = realtime_sim(tmp_path / "pods")
    sim.add_pod(NS, "orders-85dd575fc7-c24ct", containers=("orders",))
    sim.add_pod(NS, "payment-5fc5fd7f78-svspw", containers=("payment",), fmt="docker")
    sim.add_pod("datadog", "datadog-agent-7xk2p", containers=("agent",))
    with AgentThread(settings) as t:
        for i in range(150):
            sim.write(NS, "orders-85dd575fc7-c24ct", "orders", f"order {i} created " + "o" * 50)
            sim.write(NS, "payment-5fc5fd7f78-svspw", "payment", f"charge {i} refused")
            sim.write("datadog", "datadog-agent-7xk2p", "agent", f"cannot resolve intake {i}")
        sim.write(NS, "orders-85dd575fc7-c24ct", "orders", "Order 1 status updated to"
                  " PAYMENT_FAILED (captured before the request)")
        # That line is in the spool (not stored: flush is 30 s); the next one is not even
        # read when the request comes: the archive must get both.
        orders = sim.stream_of(NS, "orders-85dd575fc7-c24ct", "orders")
        poll_until(lambda: orders in t.agent.spool.streams
                   and t.agent.spool.streams[orders].next_offset >= sim.record_len(orders),
                   within=20, what="the burst captured")
        sim.write(NS, "payment-5fc5fd7f78-svspw", "payment", "last line before the request")
        doc = post_archive(t.url, {"namespace": NS, "since": "10m", "reason": "INCIDENT-6",
                                   "requester": "sre@laptop"})
        assert doc["status"] in ("pending", "running")
        done = wait_archive(t.url, doc["id"])
        assert done["status"] == "complete", done
        sim.write(NS, "orders-85dd575fc7-c24ct", "orders", "after the archive")
    store = store_of(settings)
    m = load(store, done["manifest_key"])
    assert done["manifest_key"] == f"default/_archives/{doc['id']}/manifest.json"
    assert m["digest"] == manifest_digest(m)
    assert {k: m[k] for k in ("id", "node", "cluster")} == {
        "id": doc["id"], "node": "node-1", "cluster": "default"}
    assert m["request"] == {"namespace": NS, "since": "10m", "reason": "INCIDENT-6",
                            "requester": "sre@laptop"}
    assert m["requester"]["name"] == "sre@laptop" and m["requester"]["address"] == "127.0.0.1"
    assert m["lifecycle"] == [] and isinstance(m["gaps"], list)
    streams = {(s["namespace"], s["pod"]) for s in m["segments"]}
    assert streams == {(NS, "orders-85dd575fc7-c24ct"), (NS, "payment-5fc5fd7f78-svspw")}
    for s in m["segments"]:
        assert set(s) >= {"key", "namespace", "pod", "pod_uid", "container", "restart", "offset",
                          "length", "sha256", "first_ts", "last_ts"}
    for pod, container in (("orders-85dd575fc7-c24ct", "orders"),
                           ("payment-5fc5fd7f78-svspw", "payment")):
        sid = sim.stream_of(NS, pod, container)
        record = sim.record(sid)
        if pod.startswith("orders"):
            record = record[:record.rindex(b"\n", 0, len(record) - 1) + 1]  # "after" excluded
        assert manifest_stream_bytes(store, m, sid) == record
    assert b"captured before the request" in manifest_stream_bytes(
        store, m, sim.stream_of(NS, "orders-85dd575fc7-c24ct", "orders"))

    config = write_config(tmp_path, settings)
    assert cli_main(["verify", "--config", config, doc["id"]]) == 0
    assert b"verified: " in capsysbinary.readouterr().out
    # The whole archive as a tar: the manifest exactly as stored and every stream's bytes.
    out = tmp_path / "archive.tar"
    assert cli_main(["export", "--config", config, "--archive", doc["id"], "-o", str(out)]) == 0
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json"
        f = tar.extractfile("manifest.json")
        assert f is not None and f.read() == store.get(done["manifest_key"])
        for s in {(s["pod"], s["pod_uid"], s["container"]) for s in m["segments"]}:
            member = tar.extractfile(f"{NS}/{s[0]}_{s[1]}/{s[2]}/0.log")
            assert member is not None
            sid = StreamId(NS, s[0], s[1], s[2], 0)
            assert member.read() == manifest_stream_bytes(store, m, sid)
    # A pod as a tar, to stdout.
    capsysbinary.readouterr()
    assert cli_main(["export", "--config", config, "--namespace", NS, "--pod",
                     "payment-5fc5fd7f78-svspw"]) == 0
    with tarfile.open(fileobj=io.BytesIO(capsysbinary.readouterr().out)) as tar:
        (info,) = tar.getmembers()
        f = tar.extractfile(info)
        assert f is not None
        assert f.read() == sim.record(sim.stream_of(NS, "payment-5fc5fd7f78-svspw", "payment"))


@pytest.fixture
def archived(tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path,
             capsys: pytest.CaptureFixture[str]) -> tuple[Settings, str, KubeletSim]:
    """One node archive of two pods, several segments each, made with the CLI."""
    settings = archive_settings(make_settings, token_file, segment_max_bytes="2KiB")
    sim = realtime_sim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1", containers=("orders",))
    sim.add_pod(NS, "carts-1", containers=("carts",))
    with AgentThread(settings) as t:
        for i in range(120):
            sim.write(NS, "orders-1", "orders", f"order {i} " + "x" * 60)
            sim.write(NS, "carts-1", "carts", f"cart {i} " + "y" * 30)
        argv = ["archive", "--config", write_config(tmp_path, settings), "--url", t.url,
                "--token-file", str(token_file), "--namespace", NS, "--since", "1h",
                "--reason", "tamper test", "--wait"]
        assert cli_main(argv) == 0
        out = capsys.readouterr()
        archive_id = out.out.strip()
        assert "running: capturing" in out.err
        assert f"archive {archive_id} complete: default/_archives/{archive_id}/" in out.err
        # Without a token, one clear line and exit 2.
        assert cli_main([a for a in argv if a != str(token_file) and a != "--token-file"]) == 2
        assert "no archive token" in capsys.readouterr().err
        bad = tmp_path / "wrong-token"
        bad.write_text("nope")
        assert cli_main([str(bad) if a == str(token_file) else a for a in argv]) == 2
        assert "HTTP 401: invalid bearer token" in capsys.readouterr().err
    return settings, archive_id, sim


def test_verify_names_tampered_objects(tmp_path: Path,
                                       archived: tuple[Settings, str, KubeletSim],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    settings, archive_id, _sim = archived
    assert settings.store_dir is not None
    original = settings.store_dir
    key = f"default/_archives/{archive_id}/manifest.json"
    m = load(FileStore(original), key)
    entries = [SegmentEntry.from_json(s) for s in m["segments"]]
    orders = [e for e in entries if e.stream.pod == "orders-1"]
    assert len(orders) >= 4
    victim, after = orders[2], orders[3]
    assert verify_archive(FileStore(original), cluster="default", archive_id=archive_id).ok

    def case(name: str) -> FileStore:
        root = tmp_path / f"case-{name}"
        shutil.copytree(original, root)
        return FileStore(root)

    def failing(store: FileStore) -> dict[str, str]:
        report = verify_archive(store, cluster="default", archive_id=archive_id)
        assert not report.ok
        return {p.key: p.message for p in report.problems}

    # One byte of the raw stream changed, recompressed, metadata untouched.
    store = case("byte")
    data = bytearray(decompress(store.get(victim.key), victim.ext))
    data[10] ^= 0x01
    (store.root / victim.key).write_bytes(compress(bytes(data), "zstd", 3))
    problems = failing(store)
    assert set(problems) == {victim.key} and "sha256" in problems[victim.key]

    # One byte of the compressed object changed.
    store = case("compressed")
    body = bytearray(store.get(victim.key))
    body[len(body) // 2] ^= 0xFF
    (store.root / victim.key).write_bytes(bytes(body))
    assert victim.key in failing(store)

    # A segment dropped from the store.
    store = case("dropped")
    (store.root / victim.key).unlink()
    problems = failing(store)
    assert "missing" in problems[victim.key]

    # The manifest edited.
    store = case("manifest")
    edited = dict(m, request=dict(m["request"], reason="nothing happened"))
    (store.root / key).write_bytes(encode(edited))
    problems = failing(store)
    assert set(problems) == {key} and "digest" in problems[key]

    # A segment dropped from the store *and* the manifest, the digest recomputed: the chain
    # of the next segment still names the dropped one.
    store = case("rewritten")
    (store.root / victim.key).unlink()
    forged = seal(dict(m, segments=[s for s in m["segments"] if s["key"] != victim.key]))
    (store.root / key).write_bytes(encode(forged))
    problems = failing(store)
    assert set(problems) == {after.key} and "hash chain" in problems[after.key]

    # The body and its ek-sha256 replaced together: the manifest still disagrees.
    store = case("body-and-meta")
    new = b"forged evidence\n" * 10
    meta = store.head(victim.key) or {}
    store.put(victim.key, compress(new, "zstd", 3), dict(
        meta, **{"ek-sha256": hashlib.sha256(new).hexdigest(), "ek-length": str(len(new))}))
    assert victim.key in failing(store)

    # The CLI: exit 1 and the object named; exit 0 on the intact store.
    config = write_config(tmp_path, settings)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"store_url: file://{tmp_path / 'case-dropped'}\n")
    assert cli_main(["verify", "--config", str(bad), archive_id]) == 1
    out = capsys.readouterr().out
    assert victim.key in out and "VERIFICATION FAILED" in out
    assert cli_main(["verify", "--config", config, archive_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli_main(["verify", "--config", config, "0" * 24]) == 1
    assert "manifest missing" in capsys.readouterr().out
    assert cli_main(["verify", "--config", config, "../../etc/passwd"]) == 2


@pytest.mark.usefixtures("aws_env")
def test_archive_on_s3_is_locked_and_verifiable(
        tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path,
        moto_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = s3(moto_url)
    bucket = f"ek-archive-{random.randrange(1 << 32):08x}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    settings = archive_settings(make_settings, token_file, store_url=f"s3://{bucket}/evidence",
                                s3_endpoint_url=moto_url, object_lock_days=3)
    doc, done = archive_orders(settings, tmp_path / "pods", lines=100, reason="s3")
    # v2: manifest_key and segment keys are full object keys (the store prefix included).
    assert done["manifest_key"] == f"evidence/default/_archives/{doc['id']}/manifest.json"
    head = client.head_object(Bucket=bucket, Key=done["manifest_key"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=2)
    config = tmp_path / "s3.yaml"
    config.write_text(f"store_url: s3://{bucket}/evidence\ns3_endpoint_url: {moto_url}\n")
    assert cli_main(["verify", "--config", str(config), doc["id"]]) == 0
    assert "verified: " in capsys.readouterr().out
    # Locked versions cannot be removed, but a new version can be put on top: verify reads
    # what the store serves now and names it.
    m = json.loads(client.get_object(Bucket=bucket, Key=done["manifest_key"])["Body"].read())
    assert m["version"] == 2 and m["segments"]
    for seg in m["segments"]:  # the manifest alone finds every object
        assert seg["key"].startswith(f"evidence/default/{NS}/")
        assert client.head_object(Bucket=bucket, Key=seg["key"])["Metadata"][
            "ek-sha256"] == seg["sha256"]
    victim = m["segments"][0]["key"]
    client.put_object(Bucket=bucket, Key=victim, Body=compress(b"x\n", "zstd", 3),
                      Metadata=client.head_object(Bucket=bucket, Key=victim)["Metadata"])
    assert cli_main(["verify", "--config", str(config), doc["id"]]) == 1
    assert victim in capsys.readouterr().out
    # Search reads the S3 store the same way; the forged segment is an error (exit 2) naming
    # it, and the other segments are still searched.
    assert cli_main(["search", "--config", str(config), "-F", "PAYMENT_FAILED", "--namespace",
                     NS, "--since", "5m"]) == 2
    out = capsys.readouterr()
    assert f"evidence-keeper: {victim}: decompresses to 2 bytes" in out.err
    assert "PAYMENT_FAILED" in out.out


def test_verify_anchors_a_mid_stream_archive(tmp_path: Path, make_settings: Callable[..., Settings],
                                             token_file: Path) -> None:
    """A window that starts mid-stream chains the first segment to the store's previous one."""
    settings = archive_settings(make_settings, token_file, segment_max_bytes="1KiB")
    sim = KubeletSim(tmp_path / "pods")  # simulated clock: 2025-11-10, 1 ms per line
    sim.add_pod(NS, "orders-1", containers=("orders",))
    for i in range(200):
        sim.write(NS, "orders-1", "orders", f"line {i} " + "z" * 40)
    with AgentThread(settings) as t:
        doc = post_archive(t.url, {"namespace": NS, "reason": "window",
                                   "since": "2025-11-10T12:27:00.100Z",
                                   "until": "2025-11-10T12:27:00.150Z"})
        done = wait_archive(t.url, doc["id"])
    store = store_of(settings)
    m = load(store, done["manifest_key"])
    offsets = sorted(s["offset"] for s in m["segments"])
    assert offsets and offsets[0] > 0 and len(offsets) < 8
    report = verify_archive(store, cluster="default", archive_id=doc["id"])
    assert report.ok, report.problems
    # The store's segment before the window tampered: the anchor fails, named.
    sid = sim.stream_of(NS, "orders-1", "orders")
    before = [k for k in store.list(sid.store_dir("default") + "/")
              if k < m["segments"][0]["key"]][-1]
    data = bytearray(decompress(store.get(before), "zst"))
    data[0] ^= 1
    (store.root / before).write_bytes(compress(bytes(data), "zstd", 3))
    report = verify_archive(store, cluster="default", archive_id=doc["id"])
    assert [p.key for p in report.problems] == [before]


# -------------------------------------------------------------------------------- API security
def test_archive_api_security(tmp_path: Path, make_settings: Callable[..., Settings],
                              token_file: Path) -> None:
    settings = archive_settings(make_settings, token_file)
    good = {"namespace": NS, "reason": "chaos test"}
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    traversal = "../../etc/passwd"
    with AgentThread(settings) as t:
        def post(body: Any, headers: dict[str, str] | None = None, path: str = "/archive",
                 raw: bytes | None = None) -> tuple[int, Any]:
            data = raw if raw is not None else json.dumps(body).encode()
            return raw_http(t.url, "POST", path, body=data,
                            headers=auth if headers is None else headers)

        cases: list[tuple[str, int, tuple[int, Any]]] = [
            ("no token", 401, post(good, {"Content-Type": "application/json"})),
            ("wrong token", 401, post(good, dict(auth, Authorization="Bearer nope"))),
            ("token prefix", 401, post(good, dict(auth, Authorization=f"Bearer {TOKEN[:-1]}"))),
            ("basic auth", 401, post(good, dict(auth, Authorization=f"Basic {TOKEN}"))),
            ("token in query", 401, post(good, {}, path=f"/archive?token={TOKEN}")),
            ("token in query + header", 401, post(good, path=f"/archive?access_token={TOKEN}")),
            ("token value in query", 401, post(good, path=f"/archive?x={TOKEN}")),
            ("other query", 400, post(good, path="/archive?namespace=x")),
            ("oversized", 413, post(None, raw=b'{"reason": "' + b"a" * 70_000 + b'"}')),
            ("oversized, no token", 401, post(None, {}, raw=b"x" * 70_000)),
            ("malformed", 400, post(None, raw=b'{"namespace": "sock-shop",')),
            ("not UTF-8", 400, post(None, raw=b'{"namespace": "\xff"}')),
            ("not an object", 400, post(["sock-shop"])),
            ("duplicate field", 400, post(None, raw=b'{"namespace":"a","namespace":"b",'
                                                    b'"reason":"r"}')),
            ("unknown field", 400, post(dict(good, path="/etc"))),
            ("not a string", 400, post(dict(good, pod=["a"]))),
            ("missing namespace", 400, post({"reason": "r"})),
            ("missing reason", 400, post({"namespace": NS})),
            ("bad since", 400, post(dict(good, since="yesterday"))),
            ("since after until", 400, post(dict(good, since="1m", until="2h"))),
            ("glob too wide", 400, post(dict(good, pod="*" * 20))),
            ("glob range", 400, post(dict(good, pod="a[z-"))),
            ("uppercase", 400, post(dict(good, namespace="Sock-Shop"))),
            ("NUL in reason", 400, post(dict(good, reason="a\x00b"))),
        ]
        for field in ("namespace", "pod", "container", "since", "until", "reason", "label",
                      "requester"):
            for evil in (traversal, "..", "/etc/passwd", "a/../../b", "..\\..\\x", "%2e%2e%2f"):
                cases.append((f"{field}={evil}", 400, post(dict(good, **{field: evil}))))
        for name, want, (status, body) in cases:
            assert status == want, (name, status, body)
            assert isinstance(body, dict) and set(body) == {"error"}, (name, body)
            assert "Traceback" not in body["error"] and body["error"], name
        for path in ("/archives/..%2f..%2fetc%2fpasswd", "/archives/../../etc/passwd",
                     "/archives/%00", "/archives/" + "a" * 300,
                     "/archives/ABCDEF0123456789abcdef01"):
            status, body = raw_http(t.url, "GET", path, headers={"Authorization": auth[
                "Authorization"]})
            assert status in (400, 404) and set(body) == {"error"}, (path, status, body)
        status, body = raw_http(t.url, "GET", f"/archives/{'0' * 24}?token={TOKEN}")
        assert status == 401
        # Nothing was written: no job state, no object in the store.
        assert not list((Path(settings.spool_dir) / "archives").glob("*"))
        assert not list(store_of(settings).list("default/_archives/"))

        # The real thing, then idempotency on the label.
        status, first = post(dict(good, label="chaos-2025-11-10"))
        assert status == 202 and set(first) >= {"id", "status"}
        status, again = post(dict(good, label="chaos-2025-11-10"))
        assert status == 202 and again["id"] == first["id"]
        status, other = post(dict(good, label="chaos-2025-11-10", reason="something else"))
        assert status == 409 and first["id"] in other["error"]
        # The pod proxy strips Authorization: the token may come in X-Evidence-Keeper-Token.
        status, via_proxy = post(dict(good, label="chaos-2025-11-10"),
                                 {"X-Evidence-Keeper-Token": TOKEN})
        assert status == 202 and via_proxy["id"] == first["id"]
        done = wait_archive(t.url, first["id"])
        assert done["status"] == "complete"
    # The job survives a restart of the agent.
    with AgentThread(settings) as t:
        _, after = call(t.url, f"/archives/{first['id']}", token=TOKEN)
        assert after["status"] == "complete" and after["manifest_key"] == done["manifest_key"]
        status, again = post(dict(good, label="chaos-2025-11-10"))
        assert status == 202 and again["id"] == first["id"]


def test_archive_disabled_without_token_file(make_settings: Callable[..., Settings]) -> None:
    with AgentThread(make_settings()) as t:
        # CONTRACT §6: the token is checked first (401), then the endpoint (403).
        status, body = raw_http(t.url, "POST", "/archive", body=b'{"namespace": "a"}',
                                headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 403 and "disabled" in body["error"]
        status, body = raw_http(t.url, "POST", "/archive", body=b'{"namespace": "a"}')
        assert status == 401 and "missing bearer token" in body["error"]
        # v2: GET /archives/<id> needs the token as well (401 first, then 403).
        status, body = raw_http(t.url, "GET", f"/archives/{'0' * 24}")
        assert status == 401 and "missing bearer token" in body["error"]
        status, body = raw_http(t.url, "GET", f"/archives/{'0' * 24}",
                                headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 403


def test_interrupted_archive_resumes_and_unstorable_fails(
        tmp_path: Path, make_settings: Callable[..., Settings], token_file: Path) -> None:
    settings = archive_settings(make_settings, token_file)
    sim = realtime_sim(tmp_path / "pods")
    sim.add_pod(NS, "orders-1", containers=("orders",))
    sim.write(NS, "orders-1", "orders", "before the crash")
    # A job the previous run accepted and never finished (the agent was killed).
    now = datetime.now(UTC)
    job = ArchiveJob(id="ab" * 12, request={"namespace": NS, "reason": "resume"}, since=None,
                     until=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), requester={"name": None},
                     accepted_at=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), status="running",
                     stage="shipping")
    state = Path(settings.spool_dir) / "archives"
    state.mkdir(parents=True)
    (state / f"{job.id}.json").write_text(json.dumps(asdict(job)))
    with AgentThread(settings) as t:
        done = wait_archive(t.url, job.id)
        assert done["status"] == "complete", done
    m = load(store_of(settings), done["manifest_key"])
    assert [s["pod"] for s in m["segments"]] == ["orders-1"]

    # A store that refuses every write: the archive fails with the store's error.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    broken = archive_settings(make_settings, token_file, store_url=f"file://{blocker}/store",
                              spool_dir=str(tmp_path / "spool2"), shutdown_timeout_s=1)
    with AgentThread(broken) as t:
        service = t.agent.archive
        service.ship_timeout_s = 1.5
        doc = post_archive(t.url, {"namespace": NS, "reason": "store down"})
        done = wait_archive(t.url, doc["id"])
    assert done["status"] == "failed"
    assert "not stored within 1.5s" in done["error"] and "cannot write" in done["error"]


# -------------------------------------------------------------------------------- search
def expected_lines(sim: KubeletSim, namespace: str, match: Callable[[bytes], bool],
                   since: datetime | None = None,
                   until: datetime | None = None) -> list[tuple[StreamId, int, bytes]]:
    """The simulator's own lines whose message matches (the ground truth of a search)."""
    out = []
    for sid in sorted(s for s in sim.streams() if s.namespace == namespace):
        record = sim.record(sid)
        offset = 0
        lines = record.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for line in lines:
            msg = line_message(line)
            if line.startswith(b"{") and msg.endswith(b"\n"):
                msg = msg[:-1]
            ts = line_ts(line)
            in_window = ts is None or ((since is None or ts >= since)
                                       and (until is None or ts <= until))
            if match(msg) and in_window:
                out.append((sid, offset, line))
            offset += len(line) + 1
    return out


def _populate(sim: KubeletSim) -> None:
    """Churn (restarts, Docker and CRI pods, invalid UTF-8, long lines) with a rotation per round
    (kubelet gzips and removes old files; every fifth splits a PAYMENT_FAILED line across the
    rename) and PAYMENT_FAILED lines everywhere, one of them longer than several segments.
    Paced like a node: a container rotates at most once per discovery interval."""
    rng = random.Random(6)
    churn(sim, rng, pods=6, steps=0, namespace=NS)
    pods = [p for ns, p in sim.pods() if ns == NS]
    for round_ in range(40):
        time.sleep(0.1)  # pacing: a node's rotations come over time (see above)
        churn(sim, rng, pods=6, steps=25, namespace=NS, rotate_p=0.0, restart_p=0.01)
        pod = pods[round_ % len(pods)]
        container = sim.containers(NS, pod)[0]
        line = f"Order {round_ + 1:04x} status updated to PAYMENT_FAILED"
        if round_ % 5 == 0:  # split by a rotation, half in the renamed file
            rec = sim.render(NS, pod, container, line)
            cut = rec.index(b"PAYMENT") + 3
            sim.rotate(NS, pod, container, late_write=rec[:cut], then_write=rec[cut:])
            continue
        if round_ % 7 == 0:  # one line across several 2 KiB segments
            sim.write(NS, pod, container, "x" * 9000 + " " + line)
        elif round_ % 11 == 0:  # a partial (P) record
            sim.write(NS, pod, container, line, partial=True)
        else:
            sim.write(NS, pod, container, line)
        sim.rotate(NS, pod, container)
    sim.write(NS, pods[0], sim.containers(NS, pods[0])[0], "payment_failed in lower case")


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
async def test_search_finds_exactly_the_simulators_lines(
        tmp_path: Path, make_settings: Callable[..., Settings], compression: str,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    settings = make_settings(compression=compression, segment_max_bytes="2KiB",
                             flush_interval_s=0.5)
    sim = KubeletSim(tmp_path / "pods", max_files=3)
    with AgentThread(settings):
        await asyncio.to_thread(_populate, sim)
        store = store_of(settings)
        for sid in sim.streams():
            await wait_exported(store, sid, sim.record(sid), within=30)
    ext = ".gz" if compression == "gzip" else ".zst"
    assert all(k.endswith(ext) for k in store.list(f"default/{NS}/") if "/lifecycle" not in k)

    def run(pattern: str, **kw: Any) -> tuple[list[Hit], Any]:
        hits: list[Hit] = []
        scope_kw = {k: kw.pop(k) for k in ("since", "until", "pod") if k in kw}
        stats = search(store, Matcher(pattern, **kw), cluster="default",
                       scope=Scope(NS, **scope_kw), emit=hits.append)
        return hits, stats

    def found(hits: list[Hit]) -> list[tuple[StreamId, int, bytes]]:
        return [(h.stream, h.offset, h.line) for h in hits]

    want = expected_lines(sim, NS, lambda m: b"PAYMENT_FAILED" in m)
    assert len(want) >= 40
    hits, stats = run("PAYMENT_FAILED", fixed=True)
    assert found(hits) == want
    assert stats.segments == stats.segments_total and stats.matches == len(want)
    # A regular expression anchored on the message (not on the raw CRI/JSON line).
    anchored = rb"^Order [0-9a-f]{4} status updated to PAYMENT_FAILED$"
    import re

    hits, _ = run(anchored.decode())
    assert found(hits) == expected_lines(sim, NS, lambda m: re.search(anchored, m) is not None)
    hits, _ = run("payment_FAILED", fixed=True, ignore_case=True)
    assert found(hits) == expected_lines(sim, NS, lambda m: b"payment_failed" in m.lower())
    # A pattern without a literal to prefilter on: every line is matched (still exact).
    hits, _ = run(r"[P]AYMENT_FAILED|\bnever-there\b")
    assert found(hits) == want
    # A time window reads only the segments that can hold it.
    times = sorted(ts for sid, _o, line in want if (ts := line_ts(line)) is not None)
    since, until = times[len(times) // 3], times[2 * len(times) // 3]
    hits, stats = run("PAYMENT_FAILED", fixed=True, since=since, until=until)
    assert found(hits) == expected_lines(sim, NS, lambda m: b"PAYMENT_FAILED" in m,
                                         since=since, until=until)
    assert stats.skipped > stats.segments_total // 3
    # A pod glob.
    hits, _ = run("PAYMENT_FAILED", fixed=True, pod="worker-[12]")
    assert found(hits) == [w for w in want if w[0].pod in ("worker-1", "worker-2")]

    # The CLI: stern-like lines, or JSON lines, on stdout.
    config = write_config(tmp_path, settings)
    capsysbinary.readouterr()
    assert cli_main(["search", "--config", config, "-F", "PAYMENT_FAILED",
                     "--namespace", NS]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    assert len(lines) == len(want)
    assert all(" │ " in ln.decode() and b"PAYMENT_FAILED" in ln for ln in lines)
    first = want[0]
    assert lines[0].startswith(f"{first[0].pod} {first[0].container} │ ".encode())
    assert cli_main(["search", "--config", config, "PAYMENT_FAILED", "--namespace", NS,
                     "--json", "--pod", "worker-0"]) == 0
    docs = [json.loads(ln) for ln in capsysbinary.readouterr().out.splitlines()]
    assert [(d["pod"], d["offset"]) for d in docs] == [
        (w[0].pod, w[1]) for w in want if w[0].pod == "worker-0"]
    assert cli_main(["search", "--config", config, "NEVER-LOGGED", "--namespace", NS]) == 1
    assert cli_main(["search", "--config", config, "x[", "--namespace", NS]) == 2
    assert cli_main(["search", "--config", config, "x", "--namespace", "../etc"]) == 2


def test_window_mask_uses_neighbours_for_unknown_timestamps() -> None:
    sid = StreamId(NS, "p", "u", "c", 0)

    def e(i: int, first: str, last: str) -> SegmentEntry:
        return SegmentEntry(key=f"k{i}", stream=sid, offset=i * 10, end=i * 10 + 10, ext="zst",
                            sha256="", first_ts=first, last_ts=last)

    t = [f"2025-11-10T12:{m:02d}:00.000000Z" for m in range(10)]
    entries = [e(0, t[0], t[1]), e(1, "", ""), e(2, t[3], t[4]), e(3, "", ""), e(4, t[8], t[9])]
    at = datetime(2025, 11, 10, 12, 0, tzinfo=UTC)
    assert window_mask(entries, at + timedelta(minutes=2), at + timedelta(minutes=3)) == [
        False, True, True, False, False]
    assert window_mask(entries, at + timedelta(minutes=5), at + timedelta(minutes=7)) == [
        False, False, False, True, False]
    assert window_mask(entries, None, None) == [True] * 5


def test_globs_are_bounded() -> None:
    assert check_glob("orders-*", "pod", subdomain=True) == "orders-*"
    assert check_glob("worker-[0-9]", "pod", subdomain=True) == "worker-[0-9]"
    for bad in ("../x", "a/b", "a[b", "a]b", "a[[b]]", "a[]", "*" * 17, "Orders", "a b", "",
                "x" * 254, "a!b", "a{b}"):
        with pytest.raises(ScopeError):
            check_glob(bad, "pod", subdomain=True)
    with pytest.raises(ScopeError):
        check_glob("c" * 64, "container", subdomain=False)


# -------------------------------------------------------------------------------- all nodes
def test_all_nodes_archive_with_two_agents(tmp_path: Path,
                                           make_settings: Callable[..., Settings],
                                           token_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store_url = f"file://{tmp_path / 'store'}"

    def node(name: str, **kw: Any) -> tuple[Settings, KubeletSim]:
        root = tmp_path / name
        (root / "pods").mkdir(parents=True)
        settings = archive_settings(make_settings, token_file, node_name=name,
                                    log_root=str(root / "pods"), spool_dir=str(root / "spool"),
                                    store_url=store_url, **kw)
        return settings, realtime_sim(root / "pods")

    # A node whose agent is gone: its segments are in the store, no agent answers for it.
    gone, gone_sim = node("node-gone", flush_interval_s=0.5)
    gone_sim.add_pod(NS, "carts-old", containers=("carts",))
    gone_sim.write(NS, "carts-old", "carts", "carts on a node that was scaled down")
    carts = gone_sim.stream_of(NS, "carts-old", "carts")
    with AgentThread(gone):
        deadline = time.monotonic() + 20
        while export_bytes(store_of(gone), carts)[0] != gone_sim.record(carts):
            assert time.monotonic() < deadline, "the gone node's agent did not ship"
            time.sleep(0.1)
    a, sim_a = node("node-a")
    b, sim_b = node("node-b")
    sim_a.add_pod(NS, "orders-1", containers=("orders",))
    sim_b.add_pod(NS, "payment-1", containers=("payment",), fmt="docker")
    sim_b.add_pod("kube-system", "coredns-1", containers=("coredns",))
    with AgentThread(a) as ta, AgentThread(b) as tb, FakeKube() as kube:
        for i in range(60):
            sim_a.write(NS, "orders-1", "orders", f"Order {i} status updated to PAYMENT_FAILED")
            sim_b.write(NS, "payment-1", "payment", f"charge {i}: connection refused")
            sim_b.write("kube-system", "coredns-1", "coredns", f"query {i}")
        labels = {"app.kubernetes.io/name": "evidence-keeper"}
        kube.add_pod("evidence-keeper", "evidence-keeper-aaaaa", uid="uid-a", labels=labels,
                     node="node-a")
        kube.add_pod("evidence-keeper", "evidence-keeper-bbbbb", uid="uid-b", labels=labels,
                     node="node-b")
        kube.add_pod("evidence-keeper", "unrelated-helper", uid="uid-c", node="node-a")
        agents = {("evidence-keeper", "evidence-keeper-aaaaa"): ta.url,
                  ("evidence-keeper", "evidence-keeper-bbbbb"): tb.url}
        # The API server's authenticated front (pod list, pod proxy) before the FakeKube.
        with SimApiServer(kube, targets=agents, token="kube-admin-token") as front:
            kubeconfig = front.write_kubeconfig(tmp_path / "kubeconfig")
            config = write_config(tmp_path, a)
            argv = ["archive", "--config", config, "--all-nodes", "--kubeconfig",
                    str(kubeconfig), "--token-file", str(token_file), "--namespace", NS,
                    "--since", "10m", "--reason", "INCIDENT-6 chaos test", "--label", "inc-6",
                    "--agent-port", "9095"]
            assert cli_main(argv) == 0
            captured = capsys.readouterr()
            cluster_id = captured.out.strip()
            assert "2/2 nodes complete" in captured.err
            assert "node-a: complete" in captured.err and "node-b: complete" in captured.err
            # Through the proxy only the agent token header reached the agents.
            assert {("evidence-keeper", name) for _m, name, _p, _h in front.proxied} == set(
                agents)
            assert all("Authorization" not in h and h.get("X-Evidence-Keeper-Token") == TOKEN
                       for _m, _n, _p, h in front.proxied)
            # Idempotent: the same label gives the same archives.
            assert cli_main(argv) == 0
            assert capsys.readouterr().out.strip() == cluster_id
    store = store_of(a)
    doc = load(store, f"default/_archives/{cluster_id}/manifest.json")
    assert doc["kind"] == "cluster" and doc["digest"] == manifest_digest(doc)
    assert [(n["node"], n["status"]) for n in doc["nodes"]] == [("node-a", "complete"),
                                                                 ("node-b", "complete")]
    pods_by_node = {}
    for n in doc["nodes"]:
        node_doc = load(store, n["manifest_key"])
        assert node_doc["digest"] == n["manifest_digest"] and node_doc["node"] == n["node"]
        pods_by_node[n["node"]] = {s["pod"] for s in node_doc["segments"]}
    assert pods_by_node == {"node-a": {"orders-1"}, "node-b": {"payment-1"}}
    assert {s["pod"] for s in doc["segments"]} == {"carts-old"}
    assert {s["node"] for s in doc["segments"]} == {"node-gone"}
    config = write_config(tmp_path, a)
    assert cli_main(["verify", "--config", config, cluster_id]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "2 node manifests" in out
    # The cluster archive as one tar: both node manifests and all three nodes' streams.
    tar_path = tmp_path / "cluster.tar"
    assert cli_main(["export", "--config", config, "--archive", cluster_id, "-o",
                     str(tar_path)]) == 0
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert sum(n.startswith("nodes/") for n in names) == 2
    assert {n.split("/")[1].split("_")[0] for n in names if n.startswith(NS)} == {
        "orders-1", "payment-1", "carts-old"}
    for sim, pod, container in ((sim_a, "orders-1", "orders"), (sim_b, "payment-1", "payment")):
        sid = sim.stream_of(NS, pod, container)
        data, holes = export_bytes(store, sid)
        assert data == sim.record(sid) and holes == []


def test_export_needs_a_scope(tmp_path: Path, make_settings: Callable[..., Settings],
                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, make_settings())
    assert cli_main(["export", "--config", config, "--namespace", NS]) == 2
    assert cli_main(["export", "--config", config, "--archive", "0" * 24, "--pod", "x"]) == 2
    assert cli_main(["export", "--config", config, "--archive", "0" * 24,
                     "-o", str(tmp_path / "x.tar")]) == 2
    assert "not in" in capsys.readouterr().err
    assert not (tmp_path / "x.tar").exists()

