"""The log-tree scan: symlinks (cri-dockerd), Docker rotation, an empty root, per-directory
listing failures."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from evidence_keeper.discover.logtree import LogTree, docker_order_key
from evidence_keeper.fsio import FileSystem
from evidence_keeper.sim import KubeletSim


class Eio(FileSystem):
    def __init__(self, bad: set[str]) -> None:
        self.bad = bad

    def listdir(self, path: str) -> list[str]:
        if path in self.bad:
            raise OSError(errno.EIO, "Input/output error")
        return super().listdir(path)


def test_symlinks_are_followed_only_into_the_roots(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    sim = KubeletSim(tmp_path / "pods", docker_root=docker)
    sim.add_pod("ns", "web", fmt="docker")
    sid = sim.stream_of("ns", "web", "app")
    sim.write("ns", "web", "app", "one")
    time.sleep(0.01)  # Docker's rotated files are ordered by mtime: distinct ones
    sim.rotate("ns", "web", "app")
    sim.write("ns", "web", "app", "two")
    time.sleep(0.01)
    sim.rotate("ns", "web", "app")
    outside = tmp_path / "outside.log"
    outside.write_text("secret")
    evil = tmp_path / "pods" / "ns_evil_uid" / "app"
    evil.mkdir(parents=True)
    (evil / "0.log").symlink_to(outside)
    (tmp_path / "pods" / "ns_linked_uid2").symlink_to(tmp_path / "pods" / "ns_evil_uid")
    skipped: list[str] = []
    tree = LogTree(str(tmp_path / "pods"), symlink_roots=(str(docker),),
                   on_skip=skipped.append)
    scan = tree.scan()
    assert set(scan.streams) == {sid}
    listing = scan.streams[sid]
    target = sim.docker_target(sid)
    assert listing.target == str(target) and listing.live_path == str(target)
    # Docker's .2 is older than .1: ordered by the stable key, listed by absolute path.
    assert [Path(listing.path(r)).name for r in listing.rotated] == [
        f"{target.name}.2", f"{target.name}.1"]
    st = os.stat(listing.path(listing.rotated[0]))
    assert listing.rotated[0].ts == docker_order_key(st.st_mtime_ns, st.st_ino)
    assert sorted(skipped) == ["symlink_outside_roots", "symlinked_dir"]
    tree.scan()
    assert len(skipped) == 2  # counted and logged once per path
    assert str(target.parent) in tree.dirs  # Docker directories are watched too


def test_an_empty_root_is_reported_not_judged(tmp_path: Path) -> None:
    (tmp_path / "pods").mkdir()
    scan = LogTree(str(tmp_path / "pods")).scan()
    assert scan.root_ok and scan.root_empty and not scan.streams
    missing = LogTree(str(tmp_path / "nope")).scan()
    assert not missing.root_ok


def test_listing_failures_are_per_directory(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "a")
    sim.add_pod("ns", "b")
    a_dir = str(sim.path_of("ns", "a", "app").parent)
    fs = Eio({a_dir})
    scan = LogTree(str(tmp_path / "pods"), fs=fs).scan()
    assert scan.unlisted == {a_dir} and not scan.complete
    assert sim.stream_of("ns", "b", "app") in scan.streams
    # An emptied pod directory (not removed) is not a deletion either.
    b_pod = sim.path_of("ns", "b", "app").parent.parent
    (b_pod / "app" / "0.log").unlink()
    (b_pod / "app").rmdir()
    scan = LogTree(str(tmp_path / "pods")).scan()
    assert str(b_pod) in scan.unlisted


def test_a_change_driven_scan_lists_only_changed_directories(tmp_path: Path) -> None:
    sim = KubeletSim(tmp_path / "pods")
    sim.add_pod("ns", "a")
    calls: list[str] = []

    class Counting(FileSystem):
        def listdir(self, path: str) -> list[str]:
            calls.append(path)
            return super().listdir(path)

    tree = LogTree(str(tmp_path / "pods"), fs=Counting())
    first = tree.scan()
    calls.clear()
    assert tree.scan(changed=set()).streams == first.streams
    assert calls == []  # nothing changed: no listing, no stat
    cdir = str(sim.path_of("ns", "a", "app").parent)
    sim.rotate("ns", "a", "app")
    scan = tree.scan(changed={cdir})
    assert calls == [cdir]
    assert len(scan.streams[sim.stream_of("ns", "a", "app")].rotated) == 1
