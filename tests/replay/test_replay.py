"""Replay of a simulated node's store into strict local intakes (Datadog, Loki, OTLP).

Every test compares the multiset of ``(stream, timestamp, message)`` the sink received with
what the CRI / json-file records say (an independent reference parser in
``tests/support/replay.py``): partial records joined, invalid UTF-8 kept (escaped for the
JSON sinks, exact for OTLP), nothing twice, nothing missing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest

from evidence_keeper.cli import main as cli_main
from evidence_keeper.model import StreamId
from evidence_keeper.replay.checkpoint import Checkpoints
from evidence_keeper.replay.delivery import RateLimit, retry_after_s
from evidence_keeper.replay.parsing import LineParser
from evidence_keeper.replay.runner import Replayer, ReplayRequest
from evidence_keeper.settings import ConfigError, ReplayTarget, Settings, load_settings
from evidence_keeper.sim.intakes import DatadogIntake, LokiIntake, OtlpIntake
from evidence_keeper.sim.kubelet import KubeletSim, SimClock
from evidence_keeper.store import FileStore, Store
from evidence_keeper.store.s3 import S3Store
from tests.support.replay import (
    as_json_text,
    expected_lines,
    store_lifecycle,
    store_stream,
)

API_KEY = "0123456789abcdef0123456789abcdef"
NS = "shop"
BAD_UTF8 = b"card \xff\xfe declined \xc3("


def build_node(root: Path, *, start: datetime, lines: int = 1500,
               step: timedelta = timedelta(seconds=2)) -> KubeletSim:
    """A node with CRI and Docker pods: stderr, partial and long lines, invalid UTF-8."""
    sim = KubeletSim(root, max_files=5, clock=SimClock(start=start), cri_max_line=16384)
    sim.add_pod(NS, "orders-1", containers=("orders", "sidecar"))
    sim.add_pod(NS, "payment-1", containers=("payment",), fmt="docker")
    sim.add_pod("ops", "cron-1", containers=("job",))
    for i in range(lines):
        sim.write(NS, "orders-1", "orders", f"Order {i:05d} status updated to PAYMENT_FAILED")
        if i % 7 == 0:
            sim.write(NS, "orders-1", "orders", f"WARN retry {i}", stream="stderr")
        if i % 50 == 0:
            sim.write(NS, "orders-1", "orders", f"half of line {i} ", partial=True)
            sim.write(NS, "orders-1", "orders", f"err between {i}", stream="stderr")
            sim.write(NS, "orders-1", "orders", "and its end")
        if i % 97 == 0:
            sim.write(NS, "orders-1", "orders", BAD_UTF8 + str(i).encode())
            sim.write(NS, "payment-1", "payment", BAD_UTF8 + b" docker " + str(i).encode())
        if i % 400 == 0:
            sim.write(NS, "orders-1", "orders", "x" * 40_000 + f" long {i}")  # P records
        if i % 3 == 0:
            sim.write(NS, "payment-1", "payment", f'level=error msg="refused" order={i}',
                      stream="stderr")
            sim.write(NS, "orders-1", "sidecar", f"GET /health {i} 200")
        if i % 25 == 0:
            sim.write("ops", "cron-1", "job", f"tick {i} \u00e9t\u00e9 \u2603")
        if i in (lines // 3, 2 * lines // 3):
            sim.restart(NS, "orders-1", "sidecar")  # restarts: one Loki stream, in order
        sim.advance(step)
    sim.write(NS, "orders-1", "orders", "y" * 1_500_000)  # beyond Datadog's 1 MB per entry
    sim.write(NS, "payment-1", "payment", "tail without end", partial=True)
    sim.write(NS, "payment-1", "payment", " ... ended")
    return sim


def ship(sim: KubeletSim, store: FileStore, *, segment_bytes: int = 7000) -> dict[StreamId,
                                                                                    bytes]:
    records = {}
    for sid in sim.streams():
        data = sim.record(sid)
        store_stream(store, sid, data, segment_bytes=segment_bytes,
                     compression="gzip" if sid.pod == "payment-1" else "zstd")
        records[sid] = data
    sid = sim.stream_of(NS, "orders-1", "orders")
    store_lifecycle(store, sid, {"app.kubernetes.io/name": "orders", "team": "shop"})
    return records


def expected(records: dict[StreamId, bytes], *, json_text: bool = True,
             keep: Callable[[StreamId, int], bool] = lambda s, t: True) -> Counter[Any]:
    out: Counter[Any] = Counter()
    for sid, data in records.items():
        for stream, ts, msg in expected_lines(data):
            if keep(sid, ts):
                out[(sid.key, stream, ts, as_json_text(msg) if json_text else msg)] += 1
    return out


def dd_received(intake: DatadogIntake | list[dict[str, Any]]) -> Counter[Any]:
    """Entries back into lines: split entries joined by their id and part numbers."""
    parts: dict[str, list[tuple[int, str]]] = {}
    meta: dict[str, tuple[str, str, int]] = {}
    seen: Counter[str] = Counter()
    for e in intake if isinstance(intake, list) else intake.entries:
        ek = e["evidence_keeper"]
        tags = dict(t.split(":", 1) for t in e["ddtags"].split(","))
        key = f"{tags['kube_namespace']}_{tags['pod_name']}"
        seen[ek["id"] + f"#{ek.get('part', 1)}"] += 1
        parts.setdefault(ek["id"], []).append((ek.get("part", 1), e["message"]))
        assert e["timestamp"] == ns_of(ek["time"]) // 1_000_000
        meta[ek["id"]] = (key, ek["stream"], ns_of(ek["time"]))
    assert max(seen.values(), default=1) == 1, "an entry arrived twice"
    out: Counter[Any] = Counter()
    for line_id, pieces in parts.items():
        sid_key = line_id.rsplit("@", 1)[0]
        ns_pod, container, restart = sid_key.rsplit("/", 2)
        ns, pod_uid = ns_pod.split("/", 1)
        pod, uid = pod_uid.rsplit("_", 1)
        _key, stream, ts = meta[line_id]
        sid = StreamId(ns, pod, uid, container, int(restart))
        out[(sid.key, stream, ts, "".join(m for _, m in sorted(pieces)))] += 1
    return out


def loki_received(intake: LokiIntake, records: dict[StreamId, bytes]) -> Counter[Any]:
    """What Loki stored, keyed like :func:`without_restart` (Loki has no restart label)."""
    got: Counter[Any] = Counter()
    for labels, ts, line in intake.entries:
        lab = json.loads(labels)
        uid = next(s.pod_uid for s in records if s.pod == lab["pod"])
        got[(f"{lab['namespace']}_{lab['pod']}_{uid}/{lab['container']}", lab["stream"], ts,
             line)] += 1
    return got


def without_restart(c: Counter[Any]) -> Counter[Any]:
    out: Counter[Any] = Counter()
    for (key, *rest), n in c.items():
        out[(key.rsplit("/", 1)[0], *rest)] += n
    return out


def ns_of(text: str) -> int:
    m = re.fullmatch(r"(.{19})\.(\d{9})Z", text)
    assert m, text
    sec = int(datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return sec * 10**9 + int(m[2])


def target(kind: str, url: str, tmp_path: Path, **kw: Any) -> ReplayTarget:
    creds = tmp_path / f"{kind}.key"
    creds.write_text(API_KEY + "\n")
    doc: dict[str, Any] = {"kind": kind, "url": url, "credentials_file": str(creds), **kw}
    s = load_settings(None, environ={}, overrides={"replay_targets": {kind: doc}})
    return s.replay_targets[0]


def replayer(store: Store, tgt: ReplayTarget, state: Path | None, *,
             now: datetime | None = None, **kw: Any) -> Replayer:
    return Replayer(store=store, cluster="default", target=tgt, checkpoints=Checkpoints(state),
                    node_name="node-1", clock=lambda: now or datetime.now(UTC), **kw)


def bad_utf8_lines(records: dict[StreamId, bytes]) -> int:
    n = 0
    for data in records.values():
        for _s, _t, msg in expected_lines(data):
            try:
                msg.decode()
            except UnicodeDecodeError:
                n += 1
    return n


@pytest.fixture
def node(tmp_path: Path) -> tuple[FileStore, dict[StreamId, bytes]]:
    sim = build_node(tmp_path / "pods", start=datetime.now(UTC) - timedelta(hours=1))
    store = FileStore(tmp_path / "store")
    return store, ship(sim, store)


# ------------------------------------------------------------------------------ Datadog
async def test_datadog_replay_is_exact(tmp_path: Path,
                                       node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    try:
        summary = await replayer(store, target("datadog", url, tmp_path),
                                 tmp_path / "state").run(ReplayRequest())
    finally:
        await intake.stop()
    assert intake.violations == []
    assert summary.status == "complete", summary.to_json()
    want = expected(records)
    assert dd_received(intake) == want
    assert summary.lines == sum(want.values())
    assert sum(r.invalid_utf8 for r in summary.streams) == bad_utf8_lines(records) > 0
    assert sum(r.partials_joined for r in summary.streams) > 10
    assert sum(r.split_entries for r in summary.streams) == 1  # the 1.5 MB line, in parts
    assert max(len(json.dumps(e)) for e in intake.entries) <= 1_000_000
    assert intake.accepted_requests == intake.requests == summary.requests
    orders = [e for e in intake.entries if "pod_name:orders-1" in e["ddtags"]
              and "kube_container_name:orders" in e["ddtags"]]
    tags = dict(t.split(":", 1) for t in orders[0]["ddtags"].split(","))
    assert tags["service"] == "orders" and tags["host"] == "node-1"  # from the pod's labels
    assert orders[0]["service"] == "orders" and orders[0]["hostname"] == "node-1"
    assert {e["status"] for e in orders} == {"info", "error"}  # stdout / stderr


async def test_datadog_429_storm_completes(tmp_path: Path,
                                           node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = DatadogIntake(api_key=API_KEY)
    intake.fault_every = 3  # two requests of every three: 429 with Retry-After
    intake.faults = [(503, 0.05), (429, 0.02), (500, None)]
    url = await intake.start()
    try:
        summary = await replayer(store, target("datadog", url, tmp_path), tmp_path / "state",
                                 concurrency=3).run(ReplayRequest())
    finally:
        await intake.stop()
    assert intake.violations == []
    assert summary.status == "complete"
    assert intake.statuses[429] >= 10 and summary.retries == intake.requests - (
        intake.accepted_requests)
    assert dd_received(intake) == expected(records)


async def test_datadog_413_splits_and_bad_key_is_refused(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = DatadogIntake(api_key=API_KEY)
    intake.faults = [(413, None)]
    url = await intake.start()
    try:
        scope = ReplayRequest(namespace="ops")
        summary = await replayer(store, target("datadog", url, tmp_path), None).run(scope)
        assert summary.status == "complete"
        assert intake.statuses[413] == 1
        assert dd_received(intake) == expected(records, keep=lambda s, t: s.namespace == "ops")
        (tmp_path / "datadog.key").write_text("wrong")
        bad = target("datadog", url, tmp_path)
        (tmp_path / "datadog.key").write_text("wrong")
        summary = await replayer(store, bad, None).run(scope)
    finally:
        await intake.stop()
    assert summary.status == "failed"
    assert summary.error is not None and "refused the credentials" in summary.error
    assert "wrong" not in summary.error


async def test_older_than_18h_goes_to_the_archive_format(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    sim = build_node(tmp_path / "pods", start=now - timedelta(hours=20), lines=600,
                     step=timedelta(seconds=20))  # 20 h ago .. 16.7 h ago
    store = FileStore(tmp_path / "store")
    records = ship(sim, store)
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    archive = tmp_path / "dd-archive"
    try:
        tgt = target("datadog", url, tmp_path, archive_url=f"file://{archive}")
        summary = await replayer(store, tgt, tmp_path / "state").run(ReplayRequest())
        first = list(intake.entries)
        no_archive = await replayer(store, target("datadog", url, tmp_path), None).run(
            ReplayRequest(namespace="ops"))
    finally:
        await intake.stop()
    assert intake.violations == []  # nothing older than 18 h reached the intake
    assert summary.status == "complete"
    paths = summary.paths()
    assert paths["archive"] > 0 and paths["intake"] > 0
    objects = sorted(p for p in archive.rglob("*") if p.is_file())
    assert objects and all(re.fullmatch(
        r"dt=\d{8}/hour=\d\d/archive_\d{6}\.\d{4}\.[0-9a-f-]{36}\.json\.gz",
        str(p.relative_to(archive))) for p in objects), objects
    got = dd_received(first)
    for p in objects:
        dt, hour = p.parent.parent.name[3:], p.parent.name[5:]
        for row in gzip.decompress(p.read_bytes()).decode().splitlines():
            doc = json.loads(row)
            assert {"_id", "date", "host", "source", "service", "status", "message",
                    "attributes", "tags"} <= set(doc)
            assert doc["date"][:13].replace("-", "").replace("T", "") == dt + hour
            ek = doc["attributes"]["evidence_keeper"]
            sid_key = ek["id"].rsplit("@", 1)[0]
            ns_pod, container, restart = sid_key.rsplit("/", 2)
            ns, pod_uid = ns_pod.split("/", 1)
            pod, uid = pod_uid.rsplit("_", 1)
            sid = StreamId(ns, pod, uid, container, int(restart))
            got[(sid.key, ek["stream"], ns_of(ek["time"]), doc["message"])] += 1
    assert got == expected(records)
    # Without an archive the old lines are counted, not sent, and the replay says so.
    assert no_archive.status == "partial"
    assert sum(r.too_old for r in no_archive.streams) > 0


# ------------------------------------------------------------------------------ Loki, OTLP
async def test_loki_replay_is_exact_ordered_and_deduplicated(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = LokiIntake(token=API_KEY)
    url = await intake.start()
    try:
        tgt = target("loki", url, tmp_path)
        summary = await replayer(store, tgt, tmp_path / "state").run(ReplayRequest())
        again = await replayer(store, tgt, None).run(ReplayRequest(namespace="ops"))
    finally:
        await intake.stop()
    assert intake.violations == []
    assert summary.status == again.status == "complete"
    got = loki_received(intake, records)
    assert all(json.loads(labels)["node"] == "node-1" for labels, _t, _l in intake.entries)
    assert got == without_restart(expected(records))
    # The resend (no checkpoint) hit Loki's own deduplication: nothing stored twice.
    assert any(n == 2 for n in intake.entries.values())


async def test_loki_refusing_old_samples_says_so(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, _records = node
    intake = LokiIntake(reject_old_samples_max_age_s=1800)
    url = await intake.start()
    try:
        summary = await replayer(store, target("loki", url, tmp_path), tmp_path / "state").run(
            ReplayRequest(namespace="ops"))
    finally:
        await intake.stop()
    assert summary.status == "failed"
    assert summary.error is not None and "too old" in summary.error
    assert "reject_old_samples" in summary.error


async def test_otlp_replay_is_exact(tmp_path: Path,
                                    node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = OtlpIntake()
    url = await intake.start()
    try:
        summary = await replayer(store, target("otlp", url, tmp_path), tmp_path / "state").run(
            ReplayRequest())
    finally:
        await intake.stop()
    assert intake.violations == []
    assert summary.status == "complete"
    got: Counter[Any] = Counter()
    for attrs, rec in intake.records:
        sid = StreamId(attrs["k8s.namespace.name"], attrs["k8s.pod.name"],
                       attrs["k8s.pod.uid"], attrs["k8s.container.name"],
                       attrs["k8s.container.restart_count"])
        assert attrs["k8s.node.name"] == "node-1"
        rattrs = {kv.key: kv.value for kv in rec.attributes}
        body = rec.body.string_value.encode() if rec.body.WhichOneof("value") == (
            "string_value") else rec.body.bytes_value
        assert rec.observed_time_unix_nano >= rec.time_unix_nano
        got[(sid.key, rattrs["log.iostream"].string_value, rec.time_unix_nano, body)] += 1
    assert got == expected(records, json_text=False)  # exact bytes, invalid UTF-8 included


# ------------------------------------------------------------------------------ windows, CLI
async def test_window_filters_and_dry_run_counts(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    all_ts = sorted(ts for data in records.values() for _s, ts, _m in expected_lines(data))
    since_ns, until_ns = all_ts[len(all_ts) // 3], all_ts[2 * len(all_ts) // 3]
    since = datetime.fromtimestamp(since_ns / 1e9, UTC)
    until = datetime.fromtimestamp(until_ns / 1e9, UTC)
    since_ns, until_ns = (int(since.timestamp()) * 10**9 + since.microsecond * 1000,
                          int(until.timestamp()) * 10**9 + until.microsecond * 1000)
    want = expected(records, keep=lambda s, t: since_ns <= t <= until_ns and s.namespace == NS)
    dry = await replayer(store, target("datadog", "http://127.0.0.1:9", tmp_path), None).run(
        ReplayRequest(namespace=NS, since=since, until=until, dry_run=True))
    assert dry.lines == sum(want.values()) and dry.dry_run
    assert dry.bytes > 0 and all(r.paths.get("intake", 0) == r.lines for r in dry.streams)
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    try:
        summary = await replayer(store, target("datadog", url, tmp_path), tmp_path / "s").run(
            ReplayRequest(namespace=NS, since=since, until=until))
    finally:
        await intake.stop()
    assert dd_received(intake) == want
    assert summary.bytes == dry.bytes


async def test_a_window_starting_at_a_segment_boundary_keeps_its_first_line(
        tmp_path: Path) -> None:
    """Segments end on a newline (the spool's size seal does): a window that starts at a
    segment's first line replays that line; one whose start is a partial line begun in the
    skipped segment does not replay the line's tail as a line of its own."""
    start = datetime(2025, 11, 10, 12, tzinfo=UTC)
    sim = KubeletSim(tmp_path / "pods", clock=SimClock(start=start))
    sim.add_pod(NS, "orders-1", containers=("orders",))
    for i in range(300):
        if i % 25 == 0:
            sim.write(NS, "orders-1", "orders", f"half of line {i} ", partial=True)
        sim.write(NS, "orders-1", "orders", f"Order {i:05d} status updated to PAYMENT_FAILED")
    sid = sim.stream_of(NS, "orders-1", "orders")
    data = sim.record(sid)
    store = FileStore(tmp_path / "store")
    assert store_stream(store, sid, data, segment_bytes=1200, line_aligned=True) > 5
    starts = sorted(int(k.rsplit("/", 1)[1].split("-")[0]) for k in store.list("default/"))
    checked = 0
    for offset in starts[1:]:
        (_s, first_ts, _m), *_ = expected_lines(data[offset:])
        since = datetime.fromtimestamp(first_ts // 10**9, UTC).replace(
            microsecond=first_ts % 10**9 // 1000)
        want = [ts for _s, ts, _m in expected_lines(data) if ts >= first_ts]
        got = await replayer(store, target("datadog", "http://127.0.0.1:9", tmp_path),
                             None).run(ReplayRequest(namespace=NS, since=since, dry_run=True))
        assert got.lines == len(want), f"window from the segment at {offset}"
        checked += 1
    assert checked == len(starts) - 1


def write_config(tmp_path: Path, store: FileStore, url: str, *, extra: str = "") -> Path:
    key = tmp_path / "dd.key"
    key.write_text(API_KEY)
    cfg = tmp_path / "replay.yaml"
    cfg.write_text(f"store_url: file://{store.root}\nspool_dir: {tmp_path / 'spool'}\n"
                   f"node_name: node-1\nkubernetes: 'off'\nreplay_targets:\n"
                   f"  datadog:\n    kind: datadog\n    url: {url}\n"
                   f"    credentials_file: {key}\n{extra}")
    return cfg


async def test_kill_9_mid_replay_then_rerun_sends_every_line_once(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    store, records = node
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    cfg = write_config(tmp_path, store, url)
    procs: list[asyncio.subprocess.Process] = []
    kill_at = 4

    def kill(n: int) -> None:
        if n == kill_at:
            os.kill(procs[0].pid, signal.SIGKILL)

    intake.on_request = kill
    intake.drop_request = lambda n: n == kill_at  # the client died: never acknowledged
    cmd = [sys.executable, "-m", "evidence_keeper.cli", "replay", "--config", str(cfg),
           "--to", "datadog", "--concurrency", "1", "-o", "json"]
    try:
        procs.append(await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
        await asyncio.wait_for(procs[0].communicate(), timeout=90)
        assert procs[0].returncode == -signal.SIGKILL
        assert intake.accepted_requests == kill_at - 1
        delivered_before = len(intake.entries)
        assert delivered_before > 0
        procs.append(await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
        out, err = await asyncio.wait_for(procs[1].communicate(), timeout=90)
    finally:
        await intake.stop()
    assert procs[1].returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["status"] == "complete" and doc["already_replayed"] > 0
    assert intake.violations == []
    assert dd_received(intake) == expected(records)  # asserts no entry arrived twice


async def test_cli_replay_text_json_and_errors(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]],
        capsys: pytest.CaptureFixture[str]) -> None:
    store, records = node
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    cfg = str(write_config(tmp_path, store, url))
    try:
        rc = await asyncio.to_thread(cli_main, ["replay", "--config", cfg, "--to", "datadog",
                                                "-n", "ops", "--dry-run", "-o", "json"])
        dry = json.loads(capsys.readouterr().out)
        assert rc == 0 and dry["dry_run"] and dry["lines"] == sum(
            expected(records, keep=lambda s, t: s.namespace == "ops").values())
        assert intake.requests == 0
        rc = await asyncio.to_thread(cli_main, ["replay", "--config", cfg, "--to", "datadog",
                                                "-n", "ops"])
        text = capsys.readouterr().out
        assert rc == 0 and "intake path:" in text and "complete" in text
        for args, msg in (
                (["--to", "nope"], "no such replay target"),
                (["--to", "datadog", "--pod", "x"], "need --namespace"),
                (["--to", "datadog", "--since", "yesterday"], "--since"),
                (["--to", "datadog", "-n", "../etc"], "namespace"),
                (["--to", "datadog", "--gap", "3", "--url", "http://127.0.0.1:9"],
                 "cannot reach the agent")):
            rc = await asyncio.to_thread(cli_main, ["replay", "--config", cfg, *args])
            err = capsys.readouterr().err
            assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    finally:
        await intake.stop()


# ------------------------------------------------------------------------------ units
def test_parser_handles_chunk_edges_and_odd_records() -> None:
    data = (b"2025-11-10T12:00:00.5Z stdout P one \n2025-11-10T12:00:01Z stderr F e\n"
            b"garbage line\n2025-11-10T12:00:02.123456789+00:00 stdout F two\n"
            b'{"log":"d\\n","stream":"stderr","time":"2025-11-10T12:00:03.000000001Z"}\n'
            b"2025-11-10T12:00:04Z stdout F\n2025-11-10T12:00:05Z stdout F last")
    for cut in range(1, len(data)):
        p = LineParser()
        lines = p.feed(data[:cut], 0) + p.feed(data[cut:], cut) + p.finish()
        msgs = [(m, s) for _a, _b, _t, s, m in lines]
        assert msgs == [(b"e", 1), (b"garbage line", 0), (b"one two", 0), (b"d", 1),
                        (b"", 0), (b"last", 0)], cut
        assert lines[2][0] == 0 and lines[2][2] == 1762776000_500000000
        assert p.unparsed == 1 and p.partials_joined == 1
    # The inline path (a second already seen) and the general one agree, odd forms included.
    same_second = (b"2025-11-10T12:00:00Z stdout F a\n2025-11-10T12:00:00.25Z stderr F b\n"
                   b"2025-11-10T12:00:00X25Z stdout F c\n2025-11-10T12:00:00.Z stdout F d\n"
                   b"2025-11-10T12:00:00.1234567890Z stdout F e\n"
                   b"2025-11-10T12:00:00.000000001Z stdout F f\n")
    p = LineParser()
    got = [(t, s, m) for _a, _b, t, s, m in p.feed(same_second, 0)]
    base = 1762776000_000000000
    assert got == [(base, 0, b"a"), (base + 250_000_000, 1, b"b"),
                   (base + 250_000_000, 0, b"2025-11-10T12:00:00X25Z stdout F c"),
                   (base + 250_000_000, 0, b"2025-11-10T12:00:00.Z stdout F d"),
                   (base + 250_000_000, 0, b"2025-11-10T12:00:00.1234567890Z stdout F e"),
                   (base + 1, 0, b"f")]
    assert p.unparsed == 3


async def test_rate_limit_holds_the_rate() -> None:
    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    limit = RateLimit(100.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        await limit.take(10)  # 500 lines at 100 lines/s, a burst of 100 allowed
    assert 4.0 <= now[0] <= 4.2
    await limit.take(1000)  # a batch larger than a second's worth waits for a full bucket
    assert 4.0 <= now[0] <= 5.3


def test_retry_after_forms() -> None:
    assert retry_after_s("2") == 2.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    assert retry_after_s("99999") == 300.0


def test_replay_settings_errors(make_settings: Callable[..., Settings]) -> None:
    for value, msg in (({"x": {"kind": "splunk"}}, "kind"),
                       ({"x": {"kind": "loki"}}, "needs a url"),
                       ({"x": {"kind": "datadog"}}, "credentials_file"),
                       ({"x": {"kind": "loki", "url": "ftp://h"}}, r"http\(s\)"),
                       ({"x": {"kind": "loki", "url": "http://h", "archive_url": "/t"}},
                        "datadog targets only"),
                       ({"x": {"kind": "loki", "url": "http://h", "colour": 1}}, "unknown key")):
        with pytest.raises(ConfigError, match=msg):
            make_settings(replay_targets=value)
    s = make_settings(replay_targets={"dd": {"kind": "datadog", "site": "datadoghq.eu",
                                             "credentials_file": "/k"}},
                      replay_on_recovery="dd")
    assert s.replay_targets[0].url == "https://http-intake.logs.datadoghq.eu/api/v2/logs"
    with pytest.raises(ConfigError, match="replay_on_recovery"):
        make_settings(replay_on_recovery="dd")


async def test_the_datadog_intake_itself_is_strict() -> None:
    """The intake the replay tests trust refuses what Datadog would not take whole."""
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start() + DatadogIntake.path
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    entry = {"ddsource": "s", "ddtags": ",".join(f"{t}:x" for t in (
        "kube_namespace", "pod_name", "kube_container_name", "host", "source", "service")),
        "hostname": "h", "service": "s", "status": "info", "message": "m",
        "timestamp": now_ms, "evidence_keeper": {"id": "a@0"}}
    headers = {"DD-API-KEY": API_KEY, "Content-Type": "application/json",
               "Content-Encoding": "gzip"}

    def body(entries: list[dict[str, Any]]) -> bytes:
        return gzip.compress(json.dumps(entries).encode())

    try:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            cases = [
                (body([entry]), headers, 202),
                (body([entry]), {**headers, "DD-API-KEY": "x"}, 403),
                (json.dumps([entry]).encode(), headers, 400),  # says gzip, is not
                (body([entry] * 1001), headers, 400),
                (body([{**entry, "message": "y" * 1_100_000}]), headers, 400),
                (body([{**entry, "message": "z" * 900_000}] * 6), headers, 413),
                (body([{**entry, "timestamp": now_ms - 19 * 3600 * 1000}]), headers, 400),
                (body([{**entry, "ddtags": "host:h"}]), headers, 400),
            ]
            for data, hdrs, want in cases:
                async with s.post(url, data=data, headers=hdrs) as resp:
                    assert resp.status == want, (want, await resp.text())
    finally:
        await intake.stop()
    assert len(intake.entries) == 1 and len(intake.violations) == 6


# ------------------------------------------------------------------------------ S3 (moto)
@pytest.mark.usefixtures("aws_env")
async def test_replay_from_s3_with_the_archive_in_a_bucket(tmp_path: Path,
                                                           moto_url: str) -> None:
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    for bucket in ("evidence", "dd-archive"):
        client.create_bucket(Bucket=bucket)
    store = S3Store.from_url("s3://evidence/prod", endpoint_url=moto_url)
    now = datetime.now(UTC)
    sim = build_node(tmp_path / "pods", start=now - timedelta(hours=19), lines=120,
                     step=timedelta(seconds=60))  # 19 h ago .. 17 h ago
    records = {sid: sim.record(sid) for sid in sim.streams()}
    for sid, data in records.items():
        store_stream(store, sid, data, segment_bytes=20_000)
    intake = DatadogIntake(api_key=API_KEY)
    url = await intake.start()
    try:
        tgt = target("datadog", url, tmp_path, archive_url="s3://dd-archive/logs")
        summary = await replayer(store, tgt, tmp_path / "state",
                                 s3_options={"endpoint_url": moto_url}).run(ReplayRequest())
    finally:
        await intake.stop()
    assert intake.violations == []
    assert summary.status == "complete", summary.to_json()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="dd-archive")["Contents"]]
    assert keys and all(re.fullmatch(r"logs/dt=\d{8}/hour=\d\d/archive_.*\.json\.gz", k)
                        for k in keys)
    assert sorted(keys) == sorted(f"logs/{k}" for k in summary.archive_objects)
    got = dd_received(intake)
    for k in keys:
        body = client.get_object(Bucket="dd-archive", Key=k)["Body"].read()
        for row in gzip.decompress(body).decode().splitlines():
            doc = json.loads(row)
            ek = doc["attributes"]["evidence_keeper"]
            ns_pod, container, restart = ek["id"].rsplit("@", 1)[0].rsplit("/", 2)
            ns, pod_uid = ns_pod.split("/", 1)
            pod, uid = pod_uid.rsplit("_", 1)
            sid = StreamId(ns, pod, uid, container, int(restart))
            got[(sid.key, ek["stream"], ns_of(ek["time"]), doc["message"])] += 1
    assert got == expected(records)


async def test_kill_9_after_the_sink_accepted_is_absorbed_by_loki_dedup(
        tmp_path: Path, node: tuple[FileStore, dict[StreamId, bytes]]) -> None:
    """The window checkpoints cannot close: the sink took a batch, the client died before
    hearing so. The rerun sends that batch again; Loki stores it once."""
    store, records = node
    intake = LokiIntake()
    url = await intake.start()
    cfg = write_config(tmp_path, store, "http://127.0.0.1:9",
                       extra=f"  loki:\n    kind: loki\n    url: {url}\n")
    procs: list[asyncio.subprocess.Process] = []
    kill_at = 3

    def kill(n: int) -> None:
        if n == kill_at:
            os.kill(procs[0].pid, signal.SIGKILL)  # the request itself is still accepted

    intake.on_request = kill
    cmd = [sys.executable, "-m", "evidence_keeper.cli", "replay", "--config", str(cfg),
           "--to", "loki", "--concurrency", "4", "-o", "json"]
    try:
        for _ in range(2):
            procs.append(await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
            out, err = await asyncio.wait_for(procs[-1].communicate(), timeout=120)
    finally:
        await intake.stop()
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].returncode == 0, err.decode()
    assert json.loads(out)["already_replayed"] > 0
    assert intake.violations == []
    stored = loki_received(intake, records)
    assert stored == without_restart(expected(records))  # each line stored once, none missing
    assert max(intake.entries.values()) == 2  # the unacknowledged batch did arrive twice


async def test_loki_gets_a_containers_restarts_in_order(tmp_path: Path) -> None:
    """Loki has no restart label: restarts are one Loki stream and must arrive in time order
    even with several streams in flight."""
    sim = KubeletSim(tmp_path / "pods", clock=SimClock(start=datetime.now(UTC)
                                                        - timedelta(minutes=30)))
    sim.add_pod(NS, "api-1", containers=("api",))
    for i in range(12_000):
        sim.write(NS, "api-1", "api", f"request {i}")
    sim.restart(NS, "api-1", "api")
    for i in range(10):
        sim.write(NS, "api-1", "api", f"after the restart {i}")
    store = FileStore(tmp_path / "store")
    records = {sid: sim.record(sid) for sid in sim.streams()}
    for sid, data in records.items():
        store_stream(store, sid, data, segment_bytes=50_000)
    intake = LokiIntake()
    url = await intake.start()
    try:
        summary = await replayer(store, target("loki", url, tmp_path), None,
                                 concurrency=4).run(ReplayRequest())
    finally:
        await intake.stop()
    assert intake.violations == []  # an ordered Loki took every batch
    assert summary.status == "complete" and intake.requests == 4
    assert loki_received(intake, records) == without_restart(expected(records))
