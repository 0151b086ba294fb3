"""Tests of the kubelet log-tree simulator: it must be faithful, or every agent test lies.

The on-disk checks re-read the tree with their own code (not ``KubeletSim.files_of``), so a
bug in the simulator's bookkeeping cannot hide behind the same bug in its reader.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from evidence_keeper.model import StreamId, split_pod_dir
from evidence_keeper.sim import (
    PAYMENT_FAILED_COUNT,
    PAYMENT_FAILED_MARKER,
    KubeletSim,
    ScenarioStep,
    SimClock,
    churn,
    nov10_incident,
    payment_failed_lines,
    play,
    rfc3339nano,
    rfc3339nano_fixed,
)
from evidence_keeper.sim import scenario as sc

CRI_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$", re.DOTALL)
CRI_TS = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
NS = "default"


def on_disk(cdir: Path, restart: int) -> bytes:
    """The instance's files concatenated: rotated by timestamp name (gunzipped), live last."""
    base = f"{restart}.log"
    rotated = sorted(
        (p for p in cdir.iterdir() if p.name.startswith(base + ".")),
        key=lambda p: p.name.removesuffix(".gz"),
    )
    out = bytearray()
    for p in rotated:
        assert not p.name.endswith(".tmp"), f"stale temporary file {p}"
        out += gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
    if (cdir / base).exists():
        out += (cdir / base).read_bytes()
    return bytes(out)


def stream_dir(root: Path, s: StreamId) -> Path:
    return root / s.pod_dir / s.container


def rotated_files(cdir: Path, restart: int) -> list[str]:
    return sorted(p.name for p in cdir.iterdir() if p.name.startswith(f"{restart}.log."))


def cri_records(data: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """Parse complete CRI records; the runtime never puts a raw newline inside a message."""
    body, _, tail = data.rpartition(b"\n")
    assert not tail or not body, "only a crashed writer leaves an unterminated record"
    out = []
    for line in body.split(b"\n") if body else []:
        m = CRI_LINE.match(line)
        assert m is not None, f"not a CRI record: {line[:120]!r}"
        assert CRI_TS.match(m[1]), m[1]
        out.append((m[1], m[2], m[3], m[4]))
    return out


def cri_messages(data: bytes) -> list[bytes]:
    """Reassemble P…F chains into the lines the container printed."""
    lines, cur = [], b""
    for _, _, tag, msg in cri_records(data):
        cur += msg
        if tag == b"F":
            lines.append(cur)
            cur = b""
    return lines


@pytest.fixture
def sim(tmp_path: Path) -> KubeletSim:
    return KubeletSim(tmp_path / "pods", max_files=100)


# -- formats -------------------------------------------------------------------------------


def test_rfc3339nano_trims_like_go() -> None:
    base = datetime(2025, 11, 10, 12, 27, 0, tzinfo=UTC)
    assert rfc3339nano(base) == "2025-11-10T12:27:00Z"
    assert rfc3339nano(base.replace(microsecond=120000)) == "2025-11-10T12:27:00.12Z"
    assert rfc3339nano(base.replace(microsecond=1)) == "2025-11-10T12:27:00.000001Z"
    ist = timezone(timedelta(hours=5, minutes=30))
    assert rfc3339nano(datetime(2025, 11, 10, 17, 57, tzinfo=ist)) == "2025-11-10T12:27:00Z"
    assert rfc3339nano(datetime(2025, 11, 10, 12, 27)) == "2025-11-10T12:27:00Z"  # naive = UTC
    assert rfc3339nano_fixed(base) == "2025-11-10T12:27:00.000000000Z"


def test_default_clock_is_deterministic_and_ticks_per_record(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web", containers=("app",))
    sim.write(NS, "web", "app", "one")
    sim.write(NS, "web", "app", "two")
    assert sim.path_of(NS, "web", "app").read_bytes() == (
        b"2025-11-10T12:27:00Z stdout F one\n2025-11-10T12:27:00.001Z stdout F two\n"
    )


def test_layout_and_deterministic_uids(tmp_path: Path) -> None:
    a = KubeletSim(tmp_path / "a")
    b = KubeletSim(tmp_path / "b")
    for s in (a, b):
        s.add_pod("sock-shop", "orders-85dd575fc7-c24ct", containers=("orders", "istio-proxy"))
        s.add_pod("sock-shop", "payment-5fc5fd7f78-svspw", uid="given-uid-1")
    uid = a.pod_uid("sock-shop", "orders-85dd575fc7-c24ct")
    assert uid == b.pod_uid("sock-shop", "orders-85dd575fc7-c24ct")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uid)
    assert a.pod_uid("sock-shop", "payment-5fc5fd7f78-svspw") == "given-uid-1"
    pod_dir = tmp_path / "a" / f"sock-shop_orders-85dd575fc7-c24ct_{uid}"
    assert split_pod_dir(pod_dir.name) == ("sock-shop", "orders-85dd575fc7-c24ct", uid)
    for container in ("orders", "istio-proxy"):
        log = pod_dir / container / "0.log"
        assert log.is_file() and log.stat().st_size == 0
        assert a.path_of("sock-shop", "orders-85dd575fc7-c24ct", container) == log
    assert len(a.streams()) == 3
    assert a.streams()[0] == StreamId("sock-shop", "orders-85dd575fc7-c24ct", uid, "orders", 0)


def test_cri_lines_parse_and_bytes_are_raw(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    msgs = [b"plain", "h\u00e9llo \u2713".encode(), b"bad \xff\xfe utf8", b"nul\x00\x00byte", b""]
    for i, m in enumerate(msgs):
        n = sim.write(NS, "web", "app", m, stream="stderr" if i % 2 else "stdout")
        assert n > len(m)
    data = sim.path_of(NS, "web", "app").read_bytes()
    records = cri_records(data)
    assert [r[3] for r in records] == msgs  # invalid UTF-8 and NULs written raw, untouched
    assert [r[1] for r in records] == [b"stdout", b"stderr"] * 2 + [b"stdout"]
    assert all(r[2] == b"F" for r in records)
    assert data == sim.record(sim.stream_of(NS, "web", "app"))


def test_write_returns_bytes_appended(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    path = sim.path_of(NS, "web", "app")
    total = 0
    for m in ("a", "bb\ncc", "x" * 50_000):
        before = path.stat().st_size
        n = sim.write(NS, "web", "app", m)
        assert path.stat().st_size - before == n
        total += n
    assert sim.record_len(sim.stream_of(NS, "web", "app")) == total


def test_long_message_split_into_partial_records(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    message = bytes(random.Random(1).choice(b"abcdef\x00\xff") for _ in range(40 * 1024))
    sim.write(NS, "web", "app", message)
    records = cri_records(sim.path_of(NS, "web", "app").read_bytes())
    assert [r[2] for r in records] == [b"P", b"P", b"F"]
    assert [len(r[3]) for r in records] == [16384, 16384, 40 * 1024 - 32768]
    assert b"".join(r[3] for r in records) == message


def test_multiline_message_is_one_record_per_line(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    sim.write(NS, "web", "app", "Exception: boom\n\tat a.b(C.java:1)\n\tat d.e(F.java:2)")
    sim.write(NS, "web", "app", "no newline yet", partial=True)
    sim.write(NS, "web", "app", " ...done")
    data = sim.path_of(NS, "web", "app").read_bytes()
    assert [r[2] for r in cri_records(data)] == [b"F", b"F", b"F", b"P", b"F"]
    assert cri_messages(data) == [
        b"Exception: boom",
        b"\tat a.b(C.java:1)",
        b"\tat d.e(F.java:2)",
        b"no newline yet ...done",
    ]


def test_docker_json_lines(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", cri_max_line=1000)
    sim.add_pod(NS, "legacy", fmt="docker")
    messages = [b"<b>&amp;</b>", b"bad \xff\xc3( utf8", b"nul\x00", "\u00e9\u2028".encode()]
    for m in messages:
        sim.write(NS, "legacy", "app", m, stream="stderr")
    sim.write(NS, "legacy", "app", b"y" * 2500)
    raw = sim.path_of(NS, "legacy", "app").read_bytes()
    raw.decode("utf-8")  # invalid input bytes must not make the file invalid UTF-8
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    entries = [json.loads(line) for line in lines[:-1]]
    assert [set(e) for e in entries] == [{"log", "stream", "time"}] * len(entries)
    logs = [e["log"].encode("utf-8", "surrogateescape") for e in entries]
    assert logs[:4] == [m + b"\n" for m in messages]  # lossless round trip
    assert logs[4:] == [b"y" * 1000, b"y" * 1000, b"y" * 500 + b"\n"]  # partial messages
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", e["time"]) for e in entries)
    assert entries[0]["stream"] == "stderr" and entries[4]["stream"] == "stdout"
    # Go's encoder escapes HTML characters and U+2028; the line must look like Docker's.
    assert lines[0].startswith(b'{"log":"\\u003cb\\u003e\\u0026amp;\\u003c/b\\u003e\\n"')
    assert b"\\u2028" in lines[3] and "\u00e9".encode() in lines[3]


# -- rotation --------------------------------------------------------------------------------


def test_rotation_keeps_every_byte_in_order(sim: KubeletSim, tmp_path: Path) -> None:
    root = tmp_path / "pods"
    sim.add_pod(NS, "web", containers=("app", "side"))
    sim.add_pod(NS, "old", fmt="docker")
    rng = random.Random(7)
    for i in range(60):
        ns, pod, c = rng.choice([(NS, "web", "app"), (NS, "web", "side"), (NS, "old", "app")])
        sim.write(ns, pod, c, f"line {i} " + "z" * rng.randint(0, 300))
        if i % 7 == 3:
            rec = sim.render(ns, pod, c, f"split line {i}")
            cut = rng.randrange(1, len(rec))
            name = sim.rotate(ns, pod, c, late_write=rec[:cut], then_write=rec[cut:])
            assert re.fullmatch(r"0\.log\.\d{8}-\d{6}", name)
        if i == 40:
            sim.restart(NS, "web", "app")  # 0 -> 1 deletes nothing yet
    assert len(sim.streams()) == 4
    for s in sim.streams():
        assert on_disk(stream_dir(root, s), s.restart) == sim.record(s)
        assert sim.disk_bytes(s) == sim.record(s)
    app0 = StreamId(NS, "web", sim.pod_uid(NS, "web"), "app", 0)
    cdir = stream_dir(root, app0)
    # Every rotated file but the newest has been gzipped, and every .gz is valid gzip.
    names = rotated_files(cdir, 0)
    assert len(names) >= 2
    assert [n.endswith(".gz") for n in names] == [True] * (len(names) - 1) + [False]
    for n in names[:-1]:
        assert gzip.decompress((cdir / n).read_bytes())
    # The split records reassemble: every line of every CRI stream parses.
    for s in sim.streams():
        if s.pod == "web":
            assert all(
                m.startswith((b"line ", b"split line ")) for m in cri_messages(sim.record(s))
            )


def test_late_write_goes_to_renamed_inode(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    sim.write(NS, "web", "app", "before")
    path = sim.path_of(NS, "web", "app")
    inode = path.stat().st_ino
    with path.open("rb") as reader:  # a tailer holding the file open keeps reading the inode
        name = sim.rotate(
            NS,
            "web",
            "app",
            late_write=b"2025-11-10T12:27:01Z stdout F hal",
            then_write=b"f a line\n",
        )
        rotated = path.parent / name
        assert rotated.stat().st_ino == inode
        assert path.stat().st_ino != inode
        assert reader.read().endswith(b"before\n2025-11-10T12:27:01Z stdout F hal")
    assert path.read_bytes() == b"f a line\n"
    assert sim.record(sim.stream_of(NS, "web", "app")).endswith(b"F half a line\n")


def test_max_files_is_honoured(tmp_path: Path) -> None:
    root = tmp_path / "pods"
    sim = KubeletSim(root, max_files=4)
    sim.add_pod(NS, "web")
    s = sim.stream_of(NS, "web", "app")
    cdir = stream_dir(root, s)
    for i in range(10):
        sim.write(NS, "web", "app", f"generation {i}")
        sim.rotate(NS, "web", "app")
        names = rotated_files(cdir, 0)
        # the live file plus at most max_files-1 rotated ones
        assert len(names) == min(i + 1, 3)
        assert len(list(cdir.iterdir())) == len(names) + 1
    assert [n.endswith(".gz") for n in names] == [True, True, False]
    kept = on_disk(cdir, 0)
    assert (
        kept
        == b"".join(gzip.decompress((cdir / n).read_bytes()) for n in names[:2])
        + (cdir / names[2]).read_bytes()
    )
    # What survived is the newest part of the stream: the three latest generations.
    assert sim.record(s).endswith(kept)
    assert [m[-1:] for m in cri_messages(kept)] == [b"7", b"8", b"9"]


def test_rotation_cleans_stale_tmp_and_compressed_leftovers(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    sim.write(NS, "web", "app", "a")
    first = sim.rotate(NS, "web", "app")
    sim.write(NS, "web", "app", "b")
    sim.rotate(NS, "web", "app")  # gzips `first`
    cdir = sim.path_of(NS, "web", "app").parent
    assert (cdir / f"{first}.gz").exists() and not (cdir / first).exists()
    # A compression that crashed half-way leaves a .tmp, or a plain file next to its .gz.
    (cdir / f"{first}.tmp").write_bytes(b"junk")
    (cdir / first).write_bytes(b"already compressed")
    sim.rotate(NS, "web", "app")
    assert not (cdir / f"{first}.tmp").exists()
    assert not (cdir / first).exists()
    assert sim.disk_bytes(sim.stream_of(NS, "web", "app")) == sim.record(
        sim.stream_of(NS, "web", "app")
    )


def test_rotation_names_unique_within_one_second(tmp_path: Path) -> None:
    frozen = datetime(2025, 11, 10, 12, 30, 0, tzinfo=UTC)
    sim = KubeletSim(tmp_path / "pods", clock=lambda: frozen)
    sim.add_pod(NS, "web")
    names = []
    for i in range(4):
        sim.write(NS, "web", "app", str(i))
        names.append(sim.rotate(NS, "web", "app"))
    assert names == [f"0.log.20251110-12300{i}" for i in range(4)]
    assert sim.now() >= frozen + timedelta(seconds=3)  # simulated time moved on


def test_rotation_names_never_reused_after_removal(tmp_path: Path) -> None:
    # With max_files=2 the previous rotated file is removed before the rename, so a name that
    # is free on disk may still have been used: an agent must never see a name come back.
    frozen = datetime(2025, 11, 10, 12, 30, 0, tzinfo=UTC)
    sim = KubeletSim(tmp_path / "pods", max_files=2, clock=lambda: frozen)
    sim.add_pod(NS, "web")
    names = [sim.rotate(NS, "web", "app") for _ in range(3)]
    assert names == sorted(set(names)) and len(names) == 3
    assert rotated_files(sim.path_of(NS, "web", "app").parent, 0) == [names[-1]]


def test_rotate_empty_file_and_with_only_then_write(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    sim.rotate(NS, "web", "app")
    sim.rotate(NS, "web", "app", then_write=b"x\n")
    s = sim.stream_of(NS, "web", "app")
    assert sim.record(s) == b"x\n"
    assert sim.disk_bytes(s) == b"x\n"
    assert len(sim.files_of(s)) == 3


# -- restarts, deletion, truncation ---------------------------------------------------------


def test_restart_deletes_instance_before_previous(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    cdir = sim.path_of(NS, "web", "app").parent
    sim.write(NS, "web", "app", "instance 0")
    sim.rotate(NS, "web", "app")
    sim.write(NS, "web", "app", "instance 0 again")
    assert sim.restart(NS, "web", "app") == 1
    assert (cdir / "0.log").exists() and len(rotated_files(cdir, 0)) == 1  # previous kept
    sim.write(NS, "web", "app", "instance 1")
    sim.rotate(NS, "web", "app")
    assert sim.restart(NS, "web", "app") == 2
    assert sorted(p.name for p in cdir.iterdir() if p.name.startswith("0.")) == []
    assert (cdir / "1.log").exists() and len(rotated_files(cdir, 1)) == 1
    assert (cdir / "2.log").exists() and sim.path_of(NS, "web", "app") == cdir / "2.log"
    s0, s1, s2 = sim.streams()
    assert (s0.restart, s1.restart, s2.restart) == (0, 1, 2)
    # The truth outlives the files: instance 0 is gone from disk but not from the record.
    assert cri_messages(sim.record(s0)) == [b"instance 0", b"instance 0 again"]
    assert sim.disk_bytes(s0) == b""
    assert on_disk(cdir, 1) == sim.record(s1)


def test_delete_pod_removes_directory(sim: KubeletSim, tmp_path: Path) -> None:
    sim.add_pod(NS, "web")
    sim.write(NS, "web", "app", "bye")
    uid = sim.pod_uid(NS, "web")
    pod_dir = tmp_path / "pods" / f"{NS}_web_{uid}"
    assert pod_dir.is_dir()
    sim.delete_pod(NS, "web")
    assert not pod_dir.exists()
    with pytest.raises(KeyError):
        sim.path_of(NS, "web", "app")
    assert cri_messages(sim.record(StreamId(NS, "web", uid, "app", 0))) == [b"bye"]
    sim.add_pod(NS, "web")  # a StatefulSet pod comes back with the same name, a new uid
    assert sim.pod_uid(NS, "web") != uid
    assert len(sim.streams()) == 2


def test_truncate_in_place(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    n = sim.write(NS, "web", "app", "doomed")
    path = sim.path_of(NS, "web", "app")
    inode = path.stat().st_ino
    assert sim.truncate(NS, "web", "app") == n
    assert path.stat().st_ino == inode and path.stat().st_size == 0
    sim.write(NS, "web", "app", "after")
    s = sim.stream_of(NS, "web", "app")
    assert sim.truncations(s) == [n]
    assert cri_messages(sim.record(s)) == [b"doomed", b"after"]
    assert cri_messages(path.read_bytes()) == [b"after"]


def test_write_raw_is_verbatim(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    sim.write_raw(NS, "web", "app", b"2025-11-10T12:27:00Z stdout F cut off by a cra")
    s = sim.stream_of(NS, "web", "app")
    assert sim.path_of(NS, "web", "app").read_bytes() == sim.record(s)
    assert not sim.record(s).endswith(b"\n")


def test_validation(tmp_path: Path, sim: KubeletSim) -> None:
    with pytest.raises(ValueError, match="max_files"):
        KubeletSim(tmp_path / "x", max_files=1)
    for ns, pod in (("Bad_NS", "web"), (NS, "we_b"), (NS, "a/b"), ("", "web")):
        with pytest.raises(ValueError):
            sim.add_pod(ns, pod)
    sim.add_pod(NS, "web")
    with pytest.raises(ValueError, match="already exists"):
        sim.add_pod(NS, "web")
    with pytest.raises(ValueError, match="stream"):
        sim.write(NS, "web", "app", "x", stream="stdlog")
    with pytest.raises(KeyError):
        sim.write(NS, "web", "nope", "x")
    with pytest.raises(KeyError):
        sim.record(StreamId(NS, "web", "uid", "app", 9))
    with pytest.raises(ValueError):
        sim.advance(timedelta(seconds=-1))


def test_advance_to_only_moves_forward(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", clock=SimClock(tick=timedelta(0)))
    sim.advance_to(datetime(2025, 11, 11, 5, 15, tzinfo=UTC))
    sim.advance_to(datetime(2025, 11, 10, tzinfo=UTC))  # the past: ignored
    assert sim.now() == datetime(2025, 11, 11, 5, 15, tzinfo=UTC)
    sim.advance(timedelta(seconds=2))
    assert sim.now() == datetime(2025, 11, 11, 5, 15, 2, tzinfo=UTC)


# -- churn ---------------------------------------------------------------------------------


def test_churn_is_deterministic_and_consistent(tmp_path: Path) -> None:
    sims = []
    for name in ("a", "b"):
        sim = KubeletSim(tmp_path / name, max_files=3, cri_max_line=2048)
        churn(
            sim,
            random.Random(42),
            pods=4,
            steps=600,
            big_line_every=150,
            big_line_bytes=100_000,
            rotate_p=0.08,
            restart_p=0.02,
        )
        sims.append(sim)
    a, b = sims
    assert a.streams() == b.streams()
    assert all(a.record(s) == b.record(s) for s in a.streams())
    assert any(s.restart > 0 for s in a.streams())
    total = sum(a.record_len(s) for s in a.streams())
    assert total > 4 * 100_000  # the big lines were written
    for s in a.streams():
        record = a.record(s)
        cdir = stream_dir(tmp_path / "a", s)
        disk = on_disk(cdir, s.restart) if cdir.exists() else b""
        # Files only ever disappear oldest first, so what is left is a suffix of the truth.
        assert record.endswith(disk)
        if cdir.exists():
            assert len(rotated_files(cdir, s.restart)) <= 2  # max_files - 1
        body = record[: record.rfind(b"\n") + 1]  # a crash may leave a last unterminated line
        if record[:1] == b"{":
            assert all(json.loads(line) for line in body.splitlines())
        else:
            cri_records(body)


def test_churn_writes_awkward_bytes(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods", max_files=1000)
    churn(
        sim,
        random.Random(3),
        pods=2,
        steps=400,
        restart_p=0.0,
        docker_p=0.0,
        big_line_every=200,
        big_line_bytes=3 * 1024 * 1024,
    )
    everything = b"".join(sim.record(s) for s in sim.streams())
    assert b"\x00" in everything and b"\xff" in everything
    assert b" P " in everything and b" stderr " in everything
    messages = [m for s in sim.streams() for m in cri_messages(sim.record(s))]
    assert max(len(m) for m in messages) == 3 * 1024 * 1024
    for s in sim.streams():  # nothing deleted: the tree holds exactly the truth
        assert on_disk(stream_dir(tmp_path / "pods", s), s.restart) == sim.record(s)


# -- the Nov 10 scenario ---------------------------------------------------------------------


def test_scenario_replays_the_incident(tmp_path: Path) -> None:
    root = tmp_path / "pods"
    sim = KubeletSim(root)
    steps = nov10_incident(sim)
    assert all(isinstance(s, ScenarioStep) for s in steps)
    ats = [s.at_s for s in steps]
    assert ats == sorted(ats) and ats[0] == 0.0 and 6.0 <= ats[-1] <= 10.0
    seen: list[ScenarioStep] = []
    started = time.monotonic()
    play(sim, steps, speed=0, on_step=seen.append)
    assert time.monotonic() - started < 5.0  # speed=0 never sleeps
    assert seen == steps

    assert payment_failed_lines(sim) == PAYMENT_FAILED_COUNT == 12
    orders = sim.stream_of(sc.NAMESPACE, sc.ORDERS_POD, "orders")
    payment = sim.stream_of(sc.NAMESPACE, sc.PAYMENT_POD, "payment")
    assert orders.restart == 4 and payment.restart == 1  # the seed's restart counts
    incident = StreamId(orders.namespace, orders.pod, orders.pod_uid, "orders", 3)
    lines = cri_messages(sim.record(incident))
    failed = [m for m in lines if PAYMENT_FAILED_MARKER in m]
    assert len(failed) == 12
    assert all(
        re.search(rb"Order [0-9a-f]{24} status updated to PAYMENT_FAILED$", m) for m in failed
    )
    assert b"".join(cri_messages(sim.record(payment))).count(b"connect: connection refused") == 0
    prev_payment = StreamId(payment.namespace, payment.pod, payment.pod_uid, "payment", 0)
    refused = [m for m in cri_messages(sim.record(prev_payment)) if b"connection refused" in m]
    assert len(refused) == 2 * 12
    assert re.search(rb"dial tcp 10\.\d+\.\d+\.\d+:12111: connect: connection refused", refused[0])

    cdir = stream_dir(root, incident)
    assert not (cdir / "2.log").exists()  # the 4th restart removed instance 2
    names = rotated_files(cdir, 3)
    assert [n.endswith(".gz") for n in names] == [True, False]  # two rotations
    assert (cdir / names[1]).read_bytes().endswith(b"PAYMENT")  # a line split by rotation
    assert on_disk(cdir, 3) == sim.record(incident)
    assert not any(p.name.startswith("sock-shop_carts-5b8c9f7d6c") for p in root.iterdir())
    assert (sc.NAMESPACE, sc.CARTS_NEW_POD) in sim.pods()
    # Timestamps tell the story: the incident on Nov 10, the restarts the next morning.
    first = cri_records(sim.record(incident))[0][0]
    assert first.startswith(b"2025-11-10T12:")
    assert cri_records(sim.record(orders))[0][0].startswith(b"2025-11-11T05:15:")


def test_scenario_is_deterministic_and_scales(tmp_path: Path) -> None:
    a, b = KubeletSim(tmp_path / "a"), KubeletSim(tmp_path / "b")
    play(a, nov10_incident(a, orders=5), speed=0)
    play(b, nov10_incident(b, orders=5), speed=0)
    assert payment_failed_lines(a) == 5
    assert a.streams() == b.streams()
    assert all(a.record(s) == b.record(s) for s in a.streams())


def test_play_sleeps_until_each_step(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod(NS, "web")
    times: list[float] = []
    steps = [
        ScenarioStep(at, f"step at {at}", lambda s: times.append(time.monotonic()))
        for at in (0.0, 0.2, 0.4)
    ]
    start = time.monotonic()
    play(sim, steps, speed=2.0)
    offsets = [t - start for t in times]
    # Lower bounds are exact (deadlines); upper bounds only guard against sleeping at speed 1.
    assert offsets[0] < 0.1
    assert 0.1 <= offsets[1] < offsets[2] and 0.2 <= offsets[2] < 0.39
    with pytest.raises(ValueError):
        play(sim, steps, speed=-1)


def test_files_are_real_appends_not_rewrites(sim: KubeletSim) -> None:
    sim.add_pod(NS, "web")
    path = sim.path_of(NS, "web", "app")
    inode = path.stat().st_ino
    for i in range(5):
        sim.write(NS, "web", "app", f"{i}")
    assert os.stat(path).st_ino == inode


def test_churn_truncates_and_deletes_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "pods"
    sim = KubeletSim(root)
    churn(sim, random.Random(5), pods=3, steps=300, truncate_p=0.05, delete_p=0.01)
    streams = sim.streams()
    assert any(sim.truncations(s) for s in streams)
    live_dirs = {p.name for p in root.iterdir()}
    uids = {s.pod_uid for s in streams}
    assert len(uids) > 3  # deleted pods came back under new uids
    assert len(live_dirs) == 3 and {d.rsplit("_", 1)[1] for d in live_dirs} < uids
    checked = 0
    for ns, pod in sim.pods():
        for c in sim.containers(ns, pod):
            s = sim.stream_of(ns, pod, c)
            truncs = sim.truncations(s)
            assert truncs == sorted(truncs)
            if truncs:  # the live file only holds bytes written after the last truncation
                live = sim.path_of(ns, pod, c).read_bytes()
                assert sim.record(s)[truncs[-1] :].endswith(live)
                checked += 1
    assert checked > 0
