"""The built OCI image, executed: ``make image-test`` (after ``make image``).

These tests open the ``oci-archive`` that ``image/build.sh`` wrote, with Debian's buildah (vfs
storage under ``build/``, no daemon), and run what is inside it:

- the image configuration: entrypoint, non-root user 65532, OCI labels;
- the file system: Python and its libraries, no shell, no package manager, a dpkg status that
  lists exactly the packages left, byte-compiled code;
- the entrypoint (``buildah run --isolation chroot`` as uid 65532): ``--help``, and
  ``--version`` once the CLI has it;
- the agent on a simulated node: the image's root file system mounted **read-only** in a private
  mount namespace, kubelet's log tree bind-mounted read-only at /var/log/pods, the spool at
  /var/lib/evidence-keeper, a tmpfs /tmp, then ``chroot`` as 65532:65532 into it and ``exec`` of
  the entrypoint with the image's environment (what a container runtime does, without one). The
  simulator writes, rotates and restarts; the store (``file://``) must hold every byte, exactly.

Skipped unless ``EK_IMAGE`` names the archive (the Makefile sets it) and we are root with
buildah; in CI with ``EK_IMAGE`` set, a missing tool is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from evidence_keeper.sim import KubeletSim
from evidence_keeper.store import FileStore
from tests.support.exact import assert_streams_exact, wait_all_stored
from tests.support.paths import REPO

ROOT = REPO
ARCHIVE = os.environ.get("EK_IMAGE", "")
STORAGE = ROOT / "build" / "image" / "test-storage"
UID = 65532

pytestmark = pytest.mark.skipif(not ARCHIVE, reason="EK_IMAGE not set: run `make image-test`")


@dataclass(frozen=True)
class Image:
    container: str
    rootfs: Path
    config: dict[str, Any]  # the OCI image config's "config" object

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config["Entrypoint"])

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env", []))


def _buildah(*args: str, timeout: float = 600) -> str:
    cmd = ["buildah", "--root", str(STORAGE / "root"), "--runroot", str(STORAGE / "run"),
           "--storage-driver", "vfs", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.fail("buildah and root are needed (`make image-test` installs buildah)")
    archive = Path(ARCHIVE).resolve()
    assert archive.is_file(), f"{archive}: no such archive (run `make image`)"
    container = _buildah("from", "--quiet",
                         f"oci-archive:{archive}").strip().splitlines()[-1]
    try:
        rootfs = Path(_buildah("mount", container).strip())
        info = json.loads(_buildah("inspect", "--type", "container", container))
        yield Image(container, rootfs, info["OCIv1"]["config"])
    finally:
        _buildah("rm", container)


def test_image_config(image: Image) -> None:
    assert image.config["User"] == f"{UID}:{UID}"
    entrypoint = image.entrypoint
    assert entrypoint == ["/opt/evidence-keeper/bin/evidence-keeper"]
    assert image.config["Cmd"] == ["run"]
    assert (image.rootfs / entrypoint[0].lstrip("/")).is_file()
    labels = image.config["Labels"]
    for key in ("title", "description", "version", "revision", "created", "source",
                "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert "9095/tcp" in image.config["ExposedPorts"]


def test_no_shell_and_no_package_manager(image: Image) -> None:
    root = image.rootfs
    for name in ("sh", "bash", "dash", "dpkg", "dpkg-query", "apt", "apt-get", "perl", "busybox",
                 "su", "mount", "awk", "env", "ls", "cat", "pip", "pip3"):
        for directory in ("usr/bin", "usr/sbin", "opt/evidence-keeper/bin"):
            path = root / directory / name
            assert not (path.exists() or path.is_symlink()), f"/{directory}/{name} is in the image"
    commands = sorted(p.name for d in ("usr/bin", "usr/sbin") for p in (root / d).iterdir())
    assert {"python3", "python3.11"} <= set(commands)
    # Only Python's own scripts (no interpreter for them but Python) and the inert
    # update-ca-certificates script (a shell script: no shell to run it).
    allowed = {"python3", "python3.11", "pdb3", "pdb3.11", "pydoc3", "pydoc3.11", "pygettext3",
               "pygettext3.11", "py3clean", "py3compile", "py3versions",
               "update-ca-certificates"}
    assert set(commands) <= allowed, set(commands) - allowed
    status = (root / "var/lib/dpkg/status").read_text(encoding="utf-8")
    packages = {line.split()[1] for line in status.splitlines() if line.startswith("Package: ")}
    assert {"python3", "libc6", "ca-certificates"} <= packages
    assert not packages & {"dpkg", "bash", "dash", "coreutils", "perl-base", "apt"}
    assert (root / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
    assert f"evidence-keeper:x:{UID}:{UID}:" in (root / "etc/passwd").read_text(encoding="utf-8")
    # Byte-compiled: the read-only root file system must never need a .pyc written.
    site = next((root / "opt/evidence-keeper/lib").glob("python3*/site-packages"))
    sources = list((site / "evidence_keeper").rglob("*.py"))
    assert sources
    for source in sources:
        cache = source.parent / "__pycache__"
        assert list(cache.glob(f"{source.stem}.cpython-311*.pyc")), source


def _run_in_image(image: Image, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "--root", str(STORAGE / "root"), "--runroot", str(STORAGE / "run"),
           "--storage-driver", "vfs", "run", "--isolation", "chroot", "--user", f"{UID}:{UID}",
           image.container, "--", *image.entrypoint, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_entrypoint_help(image: Image) -> None:
    proc = _run_in_image(image, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: evidence-keeper" in proc.stdout
    for command in ("run", "preflight", "export", "gaps"):
        assert command in proc.stdout


def test_entrypoint_version(image: Image) -> None:
    help_text = _run_in_image(image, "--help").stdout
    if "--version" not in help_text:
        pytest.skip("the CLI has no --version yet (issue 13, CLI part)")
    proc = _run_in_image(image, "--version")
    assert proc.returncode == 0, proc.stderr
    assert image.config["Labels"]["org.opencontainers.image.version"] in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Runs in a private mount namespace (unshare without --fork: the same process, so its pid is
# the agent's once the `exec`s are done). Every mount is undone when the namespace goes.
_CONTAINER_SCRIPT = r"""
set -eu
image_path="$PATH"  # the image's PATH, for the agent; the host's tools for the mounts
PATH=/usr/sbin:/usr/bin:/sbin:/bin
chroot="$(command -v chroot)"
image="$1" new="$2" logs="$3" spool="$4"
mount --make-rprivate /
mount --bind "$image" "$new"
mount --bind "$logs" "$new/var/log/pods"
mount -o remount,bind,ro "$new/var/log/pods"
mount --bind "$spool" "$new/var/lib/evidence-keeper"
mount -t tmpfs -o size=16m,mode=1777 tmpfs "$new/tmp"
mount -t proc proc "$new/proc"
mount --rbind /dev "$new/dev"
mount -o remount,bind,ro "$new"
shift 4
exec env PATH="$image_path" "$chroot" --userspec=65532:65532 --groups=65532 "$new" "$@"
"""


def test_agent_captures_byte_exact_on_a_read_only_root(image: Image, tmp_path: Path) -> None:
    logs, spool, newroot = tmp_path / "pods", tmp_path / "spool", tmp_path / "root"
    for directory in (logs, spool, newroot):
        directory.mkdir()
    os.chmod(logs, 0o755)
    os.chown(spool, UID, UID)
    for mount_point in ("var/log/pods", "var/lib/evidence-keeper", "tmp", "proc", "dev"):
        assert (image.rootfs / mount_point).is_dir(), f"/{mount_point} missing in the image"

    sim = KubeletSim(logs, max_files=50)
    sim.add_pod("shop", "checkout-1", containers=("app", "sidecar"))
    sim.add_pod("shop", "cart-1")
    for i in range(200):
        sim.write("shop", "checkout-1", "app", f"order {i} accepted\n".encode())
    sim.write("shop", "cart-1", "app", b"\xff\xfe binary bytes and a long line " * 400 + b"\n")

    port = _free_port()
    env = {**image.env, "NODE_NAME": "node-1", "EK_LOG_ROOT": "/var/log/pods",
           "EK_SPOOL_DIR": "/var/lib/evidence-keeper", "EK_LISTEN": f"127.0.0.1:{port}",
           "EK_KUBERNETES": "off", "EK_FLUSH_INTERVAL_S": "1", "EK_DISCOVER_INTERVAL_S": "0.2",
           "EK_TAIL_INTERVAL_S": "0.05", "EK_COMMIT_INTERVAL_S": "0.1",
           "EK_SEGMENT_MAX_BYTES": "64KiB"}
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", _CONTAINER_SCRIPT, "container",
         str(image.rootfs), str(newroot), str(logs), str(spool), *image.entrypoint, "run"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "agent.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "the agent in the image never became ready"
            time.sleep(0.2)
        # Node activity while it runs: more lines, a rotation, a restart.
        for i in range(200, 400):
            sim.write("shop", "checkout-1", "app", f"order {i} accepted\n".encode())
        sim.rotate("shop", "checkout-1", "app")
        sim.write("shop", "checkout-1", "sidecar", b"sidecar says hello\n")
        sim.restart("shop", "cart-1", "app")
        sim.write("shop", "cart-1", "app", b"after the restart\n")
        store = FileStore(spool / "store")
        assert wait_all_stored(store, sim, timeout=60), (
            (tmp_path / "agent.log").read_text(errors="replace"))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text(errors="replace")
    assert_streams_exact(FileStore(spool / "store"), sim, spool)
    # The agent wrote nothing outside its mounts: the image's file system is unchanged.
    assert not list((image.rootfs / "var/lib/evidence-keeper").iterdir())
    assert not list((image.rootfs / "tmp").iterdir())


def test_the_harness_root_really_is_read_only(image: Image, tmp_path: Path) -> None:
    """The same mounts, with a probe instead of the agent: a write to / fails with EROFS, a
    write to the spool succeeds (as uid 65532)."""
    logs, spool, newroot = tmp_path / "pods", tmp_path / "spool", tmp_path / "root"
    for directory in (logs, spool, newroot):
        directory.mkdir()
    os.chown(spool, UID, UID)
    probe = (
        "import errno, os\n"
        "try:\n    open('/probe', 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        "open('/var/lib/evidence-keeper/ok', 'w').write(str(os.getuid()))\n"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", _CONTAINER_SCRIPT, "container", str(image.rootfs),
         str(newroot), str(logs), str(spool), "/usr/bin/python3", "-c", probe],
        env=image.env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "EROFS"
    assert (spool / "ok").read_text() == str(UID)
