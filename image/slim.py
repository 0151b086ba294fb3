"""Reduce an mmdebstrap root file system to Python 3 and what it needs: no shell, no dpkg.

Run by ``image/build.sh`` as mmdebstrap's customize hook, on the build host, with the root
file system's directory as the only argument (``python3 image/slim.py "$1"``).

Design: mmdebstrap's ``essential`` variant installs Debian's Essential packages (dash, bash,
coreutils, dpkg, perl-base...) so that every maintainer script of ``python3`` and
``ca-certificates`` runs as Debian intends (the standard library byte-compiled, the CA bundle
generated, the loader cache written). This script then keeps only the packages that ``python3``
and the kept extras depend on, transitively, minus a deny list of tools nobody needs at run
time (the shells, the package manager and their interpreters), and deletes every file of the
others. ``/var/lib/dpkg/status`` is rewritten to list exactly the packages whose files remain,
so that image scanners (trivy, grype) see the true inventory; dpkg itself is gone.

It also adds the agent's user (uid/gid 65532, as in the chart) to ``/etc/passwd`` and
``/etc/group``, and the mount points the DaemonSet uses.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Final

# The roots of what stays; everything they depend on stays too, unless denied.
KEEP: Final = ("python3", "ca-certificates", "base-files", "netbase", "tzdata")
# Never kept, even as a dependency: the shells, the package manager and their interpreters.
# (python3-minimal and ca-certificates declare dependencies on dpkg, debconf and openssl for
# their maintainer scripts, which have run by now.)
DENY: Final = (
    "dash", "bash", "dpkg", "apt", "debconf", "perl-base", "debianutils", "coreutils",
    "diffutils", "findutils", "grep", "sed", "gzip", "tar", "util-linux", "login", "ncurses-bin",
    "hostname", "sensible-utils", "init-system-helpers", "openssl", "mount", "bsdutils",
    "passwd", "adduser", "base-passwd", "mawk", "libc-bin",
)
# Directories of commands: any file there that no kept package owns goes (alternatives links
# into removed tools, mmdebstrap's start-stop-daemon shim).
COMMAND_DIRS: Final = ("usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin", "etc/alternatives")
# Kept from base-passwd before it goes: the files it created.
KEEP_FILES: Final = ("/etc/passwd", "/etc/group")
USER: Final = "evidence-keeper:x:65532:65532:evidence-keeper:/nonexistent:/usr/sbin/nologin\n"
GROUP: Final = "evidence-keeper:x:65532:\n"
MOUNT_POINTS: Final = ("var/log/pods", "var/lib/evidence-keeper", "etc/evidence-keeper")


def parse_status(text: str) -> dict[str, str]:
    """dpkg's status file: package name -> its stanza (one stanza per installed package)."""
    stanzas: dict[str, str] = {}
    for stanza in text.strip().split("\n\n"):
        match = re.search(r"^Package: (\S+)$", stanza, re.M)
        if match:
            stanzas[match[1]] = stanza
    return stanzas


def _field(stanza: str, name: str) -> str:
    """A (possibly folded) control field's value, '' when absent."""
    match = re.search(rf"^{name}: (.*(?:\n[ \t].*)*)", stanza, re.M)
    return match[1].replace("\n", " ") if match else ""


def dependencies(stanza: str) -> set[str]:
    """Package names a stanza depends on (Depends and Pre-Depends; every alternative)."""
    names: set[str] = set()
    for field in ("Depends", "Pre-Depends"):
        for clause in _field(stanza, field).split(","):
            for alternative in clause.split("|"):
                word = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
                if word:
                    names.add(word)
    return names


def provided(stanzas: dict[str, str]) -> dict[str, set[str]]:
    """Virtual package name -> installed packages that provide it."""
    providers: dict[str, set[str]] = {}
    for name, stanza in stanzas.items():
        for item in _field(stanza, "Provides").split(","):
            word = item.strip().split(" ", 1)[0]
            if word:
                providers.setdefault(word, set()).add(name)
    return providers


def closure(stanzas: dict[str, str]) -> set[str]:
    """The kept packages: KEEP and their dependencies, transitively, never crossing DENY."""
    providers = provided(stanzas)
    keep: set[str] = set()
    todo = [name for name in KEEP if name in stanzas]
    while todo:
        name = todo.pop()
        if name in keep or name in DENY:
            continue
        keep.add(name)
        for dep in dependencies(stanzas[name]):
            todo.extend(n for n in {dep} | providers.get(dep, set()) if n in stanzas)
    return keep


def _arch_name(info: Path, name: str) -> Path:
    plain = info / f"{name}.list"
    if plain.exists():
        return plain
    found = sorted(info.glob(f"{name}:*.list"))
    return found[0] if found else plain


def remove_package(root: Path, name: str, keep_paths: set[str]) -> None:
    """Delete the files (not directories) a package installed, and its dpkg metadata."""
    info = root / "var/lib/dpkg/info"
    listing = _arch_name(info, name)
    if listing.exists():
        for line in listing.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line in keep_paths or line in ("/.", ""):
                continue
            path = root / line.lstrip("/")
            if path.is_symlink() or path.is_file():
                path.unlink()
    prefix = listing.name.removesuffix(".list")
    for meta in info.glob(f"{prefix}.*"):
        meta.unlink()


def slim(root: Path) -> list[str]:
    """Slim the root file system in place; returns the removed package names."""
    status_path = root / "var/lib/dpkg/status"
    stanzas = parse_status(status_path.read_text(encoding="utf-8"))
    keep = closure(stanzas)
    removed = sorted(set(stanzas) - keep)
    keep_paths = {p for name in keep for p in _listed(root, name)} | set(KEEP_FILES)
    for name in removed:
        remove_package(root, name, keep_paths)
    status_path.write_text("\n\n".join(stanzas[n] for n in sorted(keep)) + "\n", encoding="utf-8")
    # Left-overs no package lists: alternatives links into deleted tools, caches of apt/dpkg.
    for leftover in ("usr/bin/sh", "bin/sh", "var/cache/apt", "var/lib/apt", "var/log/dpkg.log",
                     "var/log/apt", "var/cache/debconf", "etc/alternatives/pager"):
        path = root / leftover
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    for directory in COMMAND_DIRS:
        for entry in sorted((root / directory).iterdir()) if (root / directory).is_dir() else []:
            owned = f"/{directory}/{entry.name}"
            merged = owned.replace("/usr/", "/", 1)  # dpkg may list /bin/x for /usr/bin/x
            if owned not in keep_paths and merged not in keep_paths and not entry.is_dir():
                entry.unlink()
    with (root / "etc/passwd").open("a", encoding="utf-8") as passwd:
        passwd.write(USER)
    with (root / "etc/group").open("a", encoding="utf-8") as group:
        group.write(GROUP)
    for mount_point in MOUNT_POINTS:
        (root / mount_point).mkdir(parents=True, exist_ok=True)
    return removed


def _listed(root: Path, name: str) -> list[str]:
    listing = _arch_name(root / "var/lib/dpkg/info", name)
    if not listing.exists():
        return []
    return listing.read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not Path(argv[1], "var/lib/dpkg/status").is_file():
        print("usage: slim.py ROOTFS (a Debian root file system)", file=sys.stderr)
        return 2
    removed = slim(Path(argv[1]))
    print(f"slim: removed {len(removed)} packages: {' '.join(removed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
